"""The family's tiny checkpoints on our kernels (backend="fast": Triton under the interpreter on the
CPU) against the plain-PyTorch reference (issue 10): the merged path of Mistral-Small-3.1
(patch 14, grids of odd patch counts before merging are impossible, even ones of any aspect) and
Pixtral-Large's shapes (ViT head_dim not a power of two, GQA group 3 in the tiny decoder)."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.conftest import DEVICE
from tests.support.recompute import greedy_by_recompute
from tests.tolerances import MODEL_FP32_ATOL

# variant -> (pixels per [IMG] token side, [IMG] grids of the test images)
SHAPES = {"mistral-small-3.1": (28, [(2, 3), (1, 1), (3, 2)]), "pixtral-large": (16, [(3, 5), (1, 1), (4, 2)])}


@pytest.fixture(scope="module", params=list(SHAPES))
def models(request, tmp_path_factory):
    variant = request.param
    folder = make_tiny(tmp_path_factory.mktemp(variant), seed=0, variant=variant)
    load = lambda backend: pf.load_model(folder, device=DEVICE, dtype=torch.float32, backend=backend,  # noqa: E731
                                         progress=False)
    return variant, load("fast"), load("reference")


def images(variant):
    side, grids = SHAPES[variant]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, side * r, side * c, generator=g) for r, c in grids]


def prompt_tokens(variant, vision):
    """[IMG] blocks with the model's own ids (Pixtral-Large's break/end tokens are 14/15, not 12/13)."""
    tokens = [1, 3]
    for rows, cols in SHAPES[variant][1]:
        block = ([vision.image_token_id] * cols + [vision.image_break_token_id]) * rows
        tokens += block[:-1] + [vision.image_end_token_id]
    return tokens + [2000, 2001, 2002, 4]


def test_tiny_variant_shapes(models):
    variant, fast, ref = models
    v = fast.args.vision
    if variant == "mistral-small-3.1":
        assert (v.patch_size, v.spatial_merge_size) == (14, 2) and v.add_pre_mm_projector_layer_norm
    else:
        assert v.head_dim & (v.head_dim - 1) != 0, "the Large-shaped tiny ViT must have a non-power-of-two head_dim"
        assert fast.args.text.n_heads // fast.args.text.n_kv_heads > 2
    assert not v.adapter_bias
    assert (fast.backend, ref.backend) == ("fast", "reference")


def test_fast_image_features_equal_reference(models):
    variant, fast, ref = models
    a, b = fast.encode_images(images(variant)), ref.encode_images(images(variant))
    assert a.shape == b.shape == (sum(r * c for r, c in SHAPES[variant][1]), fast.args.text.dim)
    torch.testing.assert_close(a, b, atol=MODEL_FP32_ATOL, rtol=0)


def test_fast_logits_equal_reference(models):
    variant, fast, ref = models
    tokens = torch.tensor(prompt_tokens(variant, fast.args.vision))
    fast.check_request(tokens.tolist(), images(variant))
    torch.testing.assert_close(fast(tokens, images(variant)), ref(tokens, images(variant)),
                               atol=MODEL_FP32_ATOL, rtol=0)


def test_fast_engine_equals_full_recompute(models):
    variant, fast, ref = models
    prompt = Encoded(tokens=prompt_tokens(variant, fast.args.vision), images=images(variant))
    got = pf.Engine.from_model(fast, num_blocks=32, progress=False).generate(prompt, max_new_tokens=12)
    assert got.tokens == greedy_by_recompute(ref, prompt.tokens, prompt.images, 12)
