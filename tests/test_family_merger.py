"""The 2x2 patch merger (issue 10) on the packed multi-image layout: one gather built from the
grids equals a per-image F.unfold and HF's Mistral3PatchMerger, in unfold's channel-major order."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixtral_fast.model.patch_merger import (MergePlan, PatchMerger, merge_windows, merge_windows_reference,
                                             merged_grid)


def packed(grids, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(h * w for h, w in grids), dim, generator=g)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
       st.integers(1, 3), st.integers(1, 6))
def test_gather_equals_per_image_unfold(merged, merge, dim):
    grids = [(r * merge, c * merge) for r, c in merged]
    x = packed(grids, dim)
    plan = MergePlan.from_grids(grids, merge)
    out = merge_windows(x, plan)
    assert out.shape == (sum(r * c for r, c in merged), dim * merge * merge)
    assert plan.merged_grids == list(merged)
    assert torch.equal(out, merge_windows_reference(x, grids, merge))


def test_channel_major_order_by_hand():
    """One 2x4 grid of 2-channel patches, values 10*patch + channel: window (0, 1) holds patches
    2, 3, 6, 7 and unfold orders its features c*4 + ki*2 + kj."""
    grid = (2, 4)
    x = torch.tensor([[10.0 * p + c for c in range(2)] for p in range(8)])
    out = merge_windows(x, MergePlan.from_grids([grid], 2))
    assert out[1].tolist() == [20, 30, 60, 70, 21, 31, 61, 71]
    assert out[0].tolist() == [0, 10, 40, 50, 1, 11, 41, 51]


def test_matches_hf_mistral3_patch_merger():
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig
    from transformers.models.mistral3.modeling_mistral3 import Mistral3PatchMerger

    dim, patch = 12, 14
    grids = [(4, 6), (2, 2), (6, 4), (2, 8)]
    config = Mistral3Config(vision_config=PixtralVisionConfig(hidden_size=dim, patch_size=patch),
                            text_config=MistralConfig(hidden_size=16), spatial_merge_size=2)
    hf = Mistral3PatchMerger(config)
    ours = PatchMerger(dim, 2)
    with torch.no_grad():
        ours.merging_layer.weight.copy_(hf.merging_layer.weight)
    x = packed(grids, dim, seed=1)
    pixel_sizes = torch.tensor([[h * patch, w * patch] for h, w in grids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, MergePlan.from_grids(grids, 2)), hf(x, pixel_sizes), atol=1e-6, rtol=0)


def test_window_major_order_would_be_caught():
    """The ordering matters: features laid out window-major (k*d + c) differ from unfold's."""
    grids = [(2, 2)]
    x = packed(grids, 3)
    plan = MergePlan.from_grids(grids, 2)
    assert not torch.equal(x[plan.index].flatten(1), merge_windows(x, plan))


def test_each_image_merges_alone():
    """Packing independence: an image's merged features do not depend on its neighbours."""
    grids = [(2, 4), (4, 2), (2, 2)]
    x = packed(grids, 5)
    together = merge_windows(x, MergePlan.from_grids(grids, 2))
    start, row = 0, 0
    for h, w in grids:
        alone = merge_windows(x[start:start + h * w], MergePlan.from_grids([(h, w)], 2))
        assert torch.equal(together[row:row + alone.shape[0]], alone)
        start, row = start + h * w, row + alone.shape[0]


def test_index_is_built_on_the_target_device_once(device):
    plan = MergePlan.from_grids([(4, 4), (2, 6)], 2, device=device)
    assert plan.index.device.type == torch.device(device).type and plan.index.dtype == torch.int64
    assert plan.num_tokens == 4 + 3


def test_grid_not_divisible_is_named():
    with pytest.raises(ValueError, match=r"images\[1\] has a 3x4 patch grid.*spatial_merge_size 2"):
        MergePlan.from_grids([(2, 2), (3, 4)], 2)
    with pytest.raises(ValueError, match="spatial_merge_size 2"):
        merged_grid((4, 5), 2)


def test_bad_inputs():
    plan = MergePlan.from_grids([(2, 2)], 2)
    with pytest.raises(ValueError, match="holds 5 patches but the plan's grids hold 4"):
        merge_windows(torch.zeros(5, 3), plan)
    with pytest.raises(ValueError, match=r"x must be \[n_patches, dim\]"):
        merge_windows(torch.zeros(4), plan)
    with pytest.raises(ValueError, match="spatial_merge_size must be >= 1"):
        MergePlan.from_grids([(2, 2)], 0)
    with pytest.raises(ValueError, match="plan merges 2x2 windows, the layer 3x3"):
        PatchMerger(3, 3)(torch.zeros(4, 3), plan)


def test_no_images():
    plan = MergePlan.from_grids([], 2)
    assert plan.num_tokens == 0
    assert merge_windows(torch.zeros(0, 3), plan).shape == (0, 12)
