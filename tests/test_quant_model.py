"""A tiny Llava/Pixtral quantized by compressed-tensors itself loads in pixtral_fast with its
linears kept packed, and its logits equal those of transformers + compressed-tensors on the same
folder (which decompresses the weights and, for FP8-dynamic, quantizes each linear's input per
token): fp32, within 2e-3, text only, one image and two images, W4A16 and FP8."""
from __future__ import annotations

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.quant.linear import QuantFeedForward, QuantLinear
from tests.support.ct_quant import save_ct_quantized
from tests.support.hf_peer import IMAGE_CASES as CASES
from tests.support.hf_peer import hf_logits, prompt, tiny_hf_model

ATOL = 2e-3
@pytest.fixture(scope="module", params=["W4A16", "FP8_DYNAMIC"])
def quantized(request, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    folder = save_ct_quantized(tmp_path_factory.mktemp(request.param), request.param)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return request.param, hf, ours


def test_linears_stay_packed(quantized):
    preset, _, ours = quantized
    layer = ours.layers[0]
    assert isinstance(layer.attention.wq, QuantLinear) and isinstance(layer.feed_forward, QuantFeedForward)
    if preset == "W4A16":  # repacked at load into the fast kernel's layout (groups of 32 here)
        wq = layer.attention.wq
        assert wq.layout == "k128" and wq.weight_packed_k128.dtype == torch.int32
        assert not hasattr(wq, "weight_packed")  # not held twice
    else:
        assert layer.attention.wq.weight.dtype == torch.float8_e4m3fn
    assert not any(isinstance(m, QuantLinear) for m in ours.vision_encoder.modules())  # ignored: dense
    assert type(ours.output) is torch.nn.Linear


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_compressed_tensors(quantized, case):
    _, hf, ours = quantized
    grids, images = CASES[case]
    tokens = prompt(*grids)
    expected = hf_logits(hf, tokens, images)
    actual = ours(tokens, images)
    assert actual.shape == expected.shape and expected.std() > 0.5
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"max abs error {err:.2e} vs transformers + compressed-tensors"


def test_the_comparison_can_fail(quantized):
    """Quantization moves the tiny model's logits far beyond the tolerance: a loader that read the
    dense weights, or dequantized wrongly, could not pass the parity test."""
    _, _, ours = quantized
    tokens = prompt()
    dense = hf_logits(tiny_hf_model(seed=0), tokens, [])
    assert (ours(tokens) - dense).abs().max().item() > 50 * ATOL


def test_fast_backend_matches_reference(quantized):
    """Our Triton kernels (interpreted on the CPU) on the same quantized model, text only."""
    _, _, ours = quantized
    tokens = prompt()
    expected = ours(tokens)
    ours.set_backend("fast")
    try:
        actual = ours(tokens)
    finally:
        ours.set_backend("reference")
    assert (actual - expected).abs().max().item() <= 1e-3
