"""Pixtral-ViT: patch conv, ln_pre, 24 blocks with RoPE-2D and block-diagonal attention over all
images of a batch packed into one sequence (a patch attends only to patches of its own image)."""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixtral_fast.config import VisionArgs
from pixtral_fast.model.common import AttentionProjections, FeedForward, RMSNorm


@dataclass
class PackedPatches:
    """Where each image's patches sit in the packed sequence (built on the host, valid by
    construction: the attention op need not check it again)."""
    grids: list[tuple[int, int]]   # (rows, cols) of patches per image
    pos: torch.Tensor              # int32 [N, 2]: (row, col) inside its own image
    cu_seqlens: torch.Tensor       # int32 [n_images + 1]
    max_seqlen: int

    @classmethod
    def from_grids(cls, grids: list[tuple[int, int]], device) -> "PackedPatches":
        pos = [torch.cartesian_prod(torch.arange(h), torch.arange(w)).reshape(-1, 2) for h, w in grids]
        sizes = [h * w for h, w in grids]
        cu = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
        return cls(grids=list(grids), pos=torch.cat(pos).to(device=device, dtype=torch.int32),
                   cu_seqlens=cu.to(device=device, dtype=torch.int32), max_seqlen=max(sizes))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attention = AttentionProjections(args.hidden_size, args.num_attention_heads,
                                              args.num_attention_heads, args.head_dim, **kw)
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps, **kw)
        self.ffn_norm = RMSNorm(args.hidden_size, args.norm_eps, **kw)
        self.feed_forward = FeedForward(args.hidden_size, args.intermediate_size, **kw)
        self.rope_theta = args.rope_theta

    def forward(self, x: torch.Tensor, packed: PackedPatches, kernels: types.ModuleType) -> torch.Tensor:
        q, k, v = self.attention.qkv(self.attention_norm(x, kernels), kernels)
        # pos given: RoPE-2D is applied to q and k inside the attention op.
        o = kernels.varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, causal=False,
                                     pos=packed.pos, rope_theta=self.rope_theta, validate_indices=False)
        normed, h = self.ffn_norm.after_add(self.attention.wo(o.flatten(1)), x, kernels)
        return h + self.feed_forward(normed, kernels)


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(args, device, dtype) for _ in range(args.num_hidden_layers))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        p = args.patch_size
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=p, stride=p,
                                    bias=False, device=device, dtype=dtype)
        self.ln_pre = RMSNorm(args.hidden_size, args.norm_eps, device=device, dtype=dtype)
        self.transformer = VisionTransformer(args, device, dtype)

    def check_image(self, index: int, image: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, cols) of one image, or a ValueError saying what is wrong with it."""
        a, p = self.args, self.args.patch_size
        if image.dim() != 3 or image.shape[0] != a.num_channels:
            raise ValueError(f"images[{index}] must be [{a.num_channels}, H, W], got {tuple(image.shape)}")
        _, h, w = image.shape
        if h == 0 or w == 0 or h % p or w % p:
            raise ValueError(f"images[{index}] is {h}x{w}: height and width must be positive multiples of "
                             f"the patch size {p} (mistral_common's image encoder resizes them so)")
        if h > a.image_size or w > a.image_size:
            raise ValueError(f"images[{index}] is {h}x{w}, larger than the encoder's {a.image_size}px limit")
        return h // p, w // p

    def forward(self, images: list[torch.Tensor], kernels: types.ModuleType) -> torch.Tensor:
        """images: [3, H, W] each -> patch features [sum of H*W/p^2, hidden], packed in order."""
        grids = [self.check_image(i, img) for i, img in enumerate(images)]
        weight = self.patch_conv.weight
        patches = [F.conv2d(img.to(device=weight.device, dtype=weight.dtype)[None], weight,
                            stride=self.args.patch_size)[0].flatten(1).T for img in images]
        x = self.ln_pre(torch.cat(patches))
        packed = PackedPatches.from_grids(grids, x.device)
        for layer in self.transformer.layers:
            x = layer(x, packed, kernels)
        return x

