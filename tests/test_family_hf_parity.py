"""Parity with HF transformers on the family's shapes (issue 10): Mistral3ForConditionalGeneration
(Mistral-Small-3.1/3.2: patch 14, pre-merger RMSNorm, 2x2 patch merger, adapter without bias) and a
Pixtral-Large-shaped Llava (ViT head_dim 24, no adapter bias, GQA group 3). fp32 logits within 1e-4,
text only / one image / two images of different shapes, loaded from the HF folder and from the
project's convert-hf output; random norms and O(1) activations so that nothing can hide."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.weights import convert_hf_to_consolidated
from tests.support.hf_mistral3 import BUILDERS, hf_logits, image_for_merged_grid, save_tiny
from tests.support.hf_peer import image_tokens
from tests.tolerances import MODEL_FP32_ATOL

BOS, INST, END_INST = 1, 3, 4
TEXT = (300, 301, 302, 303, 304)


def prompt(*grids):
    tokens = [BOS, INST]
    for rows, cols in grids:
        tokens += image_tokens(rows, cols)
    return torch.tensor(tokens + list(TEXT) + [END_INST])


def large_image(rows, cols, seed):
    return torch.randn(3, 16 * rows, 16 * cols, generator=torch.Generator().manual_seed(seed))


# grids are the [IMG] layout: merged tokens for Mistral3, patches for the Large-shaped Llava
CASES = {
    "mistral-small-3.1": {
        "text_only": ([], []),
        "one_non_square_image": ([(2, 3)], [image_for_merged_grid(2, 3, 1)]),
        "two_images_different_shapes": ([(1, 4), (3, 2)], [image_for_merged_grid(1, 4, 2),
                                                            image_for_merged_grid(3, 2, 3)]),
    },
    "pixtral-large": {
        "text_only": ([], []),
        "one_non_square_image": ([(3, 5)], [large_image(3, 5, 1)]),
        "two_images_different_shapes": ([(2, 6), (5, 3)], [large_image(2, 6, 2), large_image(5, 3, 3)]),
    },
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def models(request, tmp_path_factory):
    variant = request.param
    hf_dir = save_tiny(tmp_path_factory.mktemp(f"hf-{variant}"), variant, seed=0)
    cons_dir = convert_hf_to_consolidated(hf_dir, tmp_path_factory.mktemp(f"cons-{variant}"), dtype=torch.float32)
    load = lambda d: pf.load_model(d, device="cpu", dtype=torch.float32, backend="reference",  # noqa: E731
                                   progress=False)
    return variant, BUILDERS[variant](seed=0), {"hf_folder": load(hf_dir), "consolidated": load(cons_dir)}


@pytest.mark.parametrize("case", ["text_only", "one_non_square_image", "two_images_different_shapes"])
@pytest.mark.parametrize("source", ["hf_folder", "consolidated"])
def test_logits_match_hf(models, case, source):
    variant, hf, ours = models
    grids, images = CASES[variant][case]
    tokens = prompt(*grids)
    expected = hf_logits(hf, tokens, images)
    actual = ours[source](tokens, images)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert expected.std() > 0.5, "logits too small for the comparison to mean anything"
    err = (actual - expected).abs().max().item()
    assert err <= MODEL_FP32_ATOL, f"{variant} {case} from {source}: max abs error {err:.2e} vs HF"


def test_image_features_match_hf(models):
    """The merged, projected image features alone (so a merger bug cannot be averaged away by the decoder)."""
    variant, hf, ours = models
    _, images = CASES[variant]["two_images_different_shapes"]
    sizes = torch.tensor([list(i.shape[1:]) for i in images])
    h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    pixels = torch.zeros(len(images), 3, h, w)
    for j, img in enumerate(images):
        pixels[j, :, :img.shape[1], :img.shape[2]] = img
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=pixels, image_sizes=sizes)
    expected = torch.cat(list(out.pooler_output if hasattr(out, "pooler_output") else out))
    actual = ours["consolidated"].encode_images(images)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=MODEL_FP32_ATOL, rtol=0)


def test_convert_hf_writes_family_params(models, tmp_path):
    variant, _, ours = models
    args = ours["consolidated"].args
    if variant == "mistral-small-3.1":
        assert (args.vision.spatial_merge_size, args.vision.mm_projector_id) == (2, "patch_merge")
        assert args.vision.add_pre_mm_projector_layer_norm and not args.vision.adapter_bias
    else:
        assert args.vision.head_dim == 24 and not args.vision.adapter_bias
    assert args == ours["hf_folder"].args


def test_parity_would_catch_a_skipped_norm_or_a_wrong_merger_order(models):
    """The comparison has teeth: unit pre-merger norm weights, or the merger's input features in
    window-major instead of unfold's channel-major order, move the logits far past the tolerance."""
    variant, hf, ours = models
    model = ours["consolidated"]
    if variant == "pixtral-large":  # neither a pre-merger norm nor a merger to get wrong
        assert not hasattr(model, "patch_merger") and not hasattr(model, "pre_mm_projector_norm")
        return
    grids, images = CASES[variant]["two_images_different_shapes"]
    tokens = prompt(*grids)
    expected = hf_logits(hf, tokens, images)
    norm, merger = model.pre_mm_projector_norm.weight, model.patch_merger.merging_layer.weight
    saved = norm.clone(), merger.clone()
    d = norm.shape[0]
    try:
        with torch.no_grad():
            norm.fill_(1.0)
        assert (model(tokens, images) - expected).abs().max() > 100 * MODEL_FP32_ATOL
        with torch.no_grad():
            norm.copy_(saved[0])
            merger.copy_(saved[1].view(d, d, 4).transpose(1, 2).reshape(d, 4 * d))  # c*4+k -> k*d+c
        assert (model(tokens, images) - expected).abs().max() > 100 * MODEL_FP32_ATOL
    finally:
        with torch.no_grad():
            norm.copy_(saved[0])
            merger.copy_(saved[1])
