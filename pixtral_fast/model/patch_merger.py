"""The spatial patch merger of Mistral-Small-3.1/3.2 (`mm_projector_id: "patch_merge"`).

After the ViT, each image's patch grid [h, w, d] is cut into non-overlapping m x m windows
(m = spatial_merge_size, 2 in every release); each window becomes one token of m*m*d features
in the channel-major order of torch.nn.functional.unfold (feature index c*m*m + ki*m + kj), and a
bias-free Linear m*m*d -> d maps it back to d. Merged tokens are ordered row-major over the merged
grid [h/m, w/m], image after image, which is the [IMG] order mistral_common writes.

All images of a batch sit in one packed sequence (as the ViT leaves them). The merge is one gather
with an index built once per batch on the host from the image grids, so the device never loops
over images. `merge_windows_reference` is the plain per-image unfold, kept as the test oracle.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def merged_grid(grid: tuple[int, int], merge: int, index: int | None = None) -> tuple[int, int]:
    """(rows, cols) of merged tokens for a patch grid, or a ValueError if `merge` does not divide it
    (mistral_common resizes images to multiples of patch_size * merge, so this means the pixels did
    not come from it)."""
    rows, cols = grid
    if rows % merge or cols % merge:
        what = "an image" if index is None else f"images[{index}]"
        raise ValueError(f"{what} has a {rows}x{cols} patch grid, which spatial_merge_size {merge} does not "
                         f"divide (its height and width must be multiples of patch_size * {merge})")
    return rows // merge, cols // merge


@dataclass
class MergePlan:
    """Where every window's patches sit in the packed ViT output: built once per batch."""
    merge: int
    grids: list[tuple[int, int]]         # patch grid (rows, cols) per image
    merged_grids: list[tuple[int, int]]  # merged-token grid per image: what the [IMG] layout counts
    index: torch.Tensor                  # int64 [n_merged, merge*merge]: packed row of window element ki*m+kj

    @property
    def num_tokens(self) -> int:
        return self.index.shape[0]

    @classmethod
    def from_grids(cls, grids: Sequence[tuple[int, int]], merge: int, device=None) -> "MergePlan":
        if merge < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {merge}")
        grids = [(int(h), int(w)) for h, w in grids]
        merged = [merged_grid(g, merge, i) for i, g in enumerate(grids)]
        return cls(merge=merge, grids=grids, merged_grids=merged,
                   index=_window_index(grids, merged, merge).to(device))


def _window_index(grids: list[tuple[int, int]], merged: list[tuple[int, int]], m: int) -> torch.Tensor:
    """Vectorised over all merged tokens of all images (no per-image loop): for merged token t of
    image n at merged (i, j), window element (ki, kj) is packed row
    offset[n] + (i*m + ki) * cols[n] + (j*m + kj)."""
    if not grids:
        return torch.empty(0, m * m, dtype=torch.int64)
    cols = torch.tensor([w for _, w in grids], dtype=torch.int64)
    sizes = torch.tensor([h * w for h, w in grids], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    m_rows = torch.tensor([h for h, _ in merged], dtype=torch.int64)
    m_cols = torch.tensor([w for _, w in merged], dtype=torch.int64)
    counts = m_rows * m_cols
    image = torch.repeat_interleave(torch.arange(len(grids)), counts)           # [T] image of each token
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum())) - first[image]                     # token index in its image
    i, j = local // m_cols[image], local % m_cols[image]
    k = torch.arange(m)
    rows = i[:, None, None] * m + k[None, :, None]                             # [T, m, 1]
    cols_ = j[:, None, None] * m + k[None, None, :]                            # [T, 1, m]
    index = offsets[image][:, None, None] + rows * cols[image][:, None, None] + cols_
    return index.reshape(-1, m * m)


def merge_windows(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Packed ViT output [n_patches, d] -> window features [n_merged, d*m*m] in unfold order."""
    if x.dim() != 2:
        raise ValueError(f"x must be [n_patches, dim], got {tuple(x.shape)}")
    expected = sum(h * w for h, w in plan.grids)
    if x.shape[0] != expected:
        raise ValueError(f"x holds {x.shape[0]} patches but the plan's grids hold {expected}")
    windows = x[plan.index]                    # [T, m*m, d]: window element-major
    return windows.transpose(1, 2).flatten(1)  # [T, d*m*m]: channel-major, as unfold


def merge_windows_reference(x: torch.Tensor, grids: Sequence[tuple[int, int]], merge: int) -> torch.Tensor:
    """The oracle: per image, F.unfold over its [d, h, w] grid (what HF's Mistral3PatchMerger does)."""
    out, start = [], 0
    for i, (h, w) in enumerate(grids):
        merged_grid((h, w), merge, i)
        grid = x[start:start + h * w].reshape(h, w, -1).permute(2, 0, 1)[None]
        out.append(F.unfold(grid, kernel_size=merge, stride=merge)[0].T)
        start += h * w
    if not out:
        return x.new_empty(0, x.shape[1] * merge * merge)
    return torch.cat(out)


class PatchMerger(nn.Module):
    """`patch_merger.merging_layer`: Linear(d*m*m -> d, no bias) over each window."""

    def __init__(self, dim: int, merge: int, device=None, dtype=None):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        if plan.merge != self.merge:
            raise ValueError(f"plan merges {plan.merge}x{plan.merge} windows, the layer {self.merge}x{self.merge}")
        return self.merging_layer(merge_windows(x, plan))
