"""One GEMM for q, k and v (AttentionProjections.fuse_qkv, done by every ModelRunner): the same
outputs as three, no memory added, the state dict's names and values kept, and a fusion that ends
by itself when the projections are swapped (quantization) or their weights replaced."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.benchmark import random_model
from pixtral_fast.model.common import AttentionProjections
from pixtral_fast.model.quantized import quantize_model
from pixtral_fast.quant.linear import QuantFeedForward
from pixtral_fast.tiny import TINY_ARGS, write_tokenizer
from pixtral_fast.weights import save_consolidated
from tests.tolerances import MODEL_FP32_ATOL

TOKENS = torch.tensor([1, 3, 1000, 1001, 1002, 4, 1003])


def attentions(model):
    return [m for m in model.modules() if isinstance(m, AttentionProjections)]


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_fused_model_gives_the_same_logits(backend):
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32).set_backend(backend)
    before = model(TOKENS)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = sum(p.numel() for p in model.parameters())
    assert model.fuse_projections() == len(attentions(model)) == TINY_ARGS.text.n_layers + TINY_ARGS.vision.num_hidden_layers
    assert all(a.fused() for a in attentions(model))
    torch.testing.assert_close(model(TOKENS), before, atol=MODEL_FP32_ATOL, rtol=0)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == held
    a = attentions(model)[0]  # the three weights are rows of the fused one: nothing was copied twice
    assert a.wk.weight.data_ptr() == a.wqkv.data_ptr() + a.wq.weight.numel() * a.wqkv.element_size()


def test_quantizing_after_fusing_uses_the_quantized_projections():
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32)
    model.fuse_projections()
    quantize_model(model, "fp8", group_size=32)
    unfused = quantize_model(random_model(TINY_ARGS, torch.device("cpu"), torch.float32), "fp8", group_size=32)
    assert not any(a.fused() for a in attentions(model) if type(a.wq) is not torch.nn.Linear)
    torch.testing.assert_close(model(TOKENS), unfused(TOKENS), atol=MODEL_FP32_ATOL, rtol=0)


def test_replacing_a_weight_ends_the_fusion():
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32)
    model.fuse_projections()
    a = model.layers[0].attention
    a.wk.weight = torch.nn.Parameter(torch.zeros_like(a.wk.weight))
    assert not a.fused()
    _, k, _ = a.qkv(torch.randn(2, a.wq.in_features))
    assert torch.equal(k, torch.zeros_like(k))  # the new weight, not the stale fused rows


def test_converting_the_model_ends_the_fusion():
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32)
    model.fuse_projections()
    expected = model(TOKENS)
    model.to(torch.float64)  # converts each parameter in place: the fused copy would be stale
    assert not any(a.fused() for a in attentions(model))
    torch.testing.assert_close(model(TOKENS).float(), expected, atol=MODEL_FP32_ATOL, rtol=0)


def test_a_fused_model_saves_and_reloads(tmp_path):
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32)
    model.fuse_projections()
    save_consolidated(model.state_dict(), TINY_ARGS, tmp_path, dtype=torch.float32)
    write_tokenizer(tmp_path, TINY_ARGS)
    again = pf.load_model(tmp_path, device="cpu", dtype=torch.float32, backend="reference")
    torch.testing.assert_close(again(TOKENS), model(TOKENS), atol=MODEL_FP32_ATOL, rtol=0)


def test_engines_run_fused():
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32)
    engine = pf.Engine.from_model(model, None, num_blocks=16)
    assert all(a.fused() for a in attentions(engine.model))


def streamed(m):
    return next(getattr(m, n) for n in ("weight", "weight_packed_k128", "weight_packed") if hasattr(m, n))


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("scheme, group", [("w4a16", 32), ("w4a16", 16), ("fp8", None)])
def test_quantized_projections_fuse_too(backend, scheme, group):
    """W4A16 in the k128 layout (g32) and the checkpoint's (g16: below the k128 kernel's 32), FP8: one GEMM,
    the packed rows shared (no memory added), the state dict's names and values kept."""
    model = quantize_model(random_model(TINY_ARGS, torch.device("cpu"), torch.float32), scheme,
                           group_size=group or 32).set_backend(backend)
    before = model(TOKENS)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    assert model.fuse_projections() == len(attentions(model))  # the decoder's quantized, the ViT's dense
    fused = [a for a in attentions(model) if a.fused() and type(a.wq) is not torch.nn.Linear]
    assert len(fused) == TINY_ARGS.text.n_layers
    a = fused[0]
    rows = streamed(a.wqkv)
    assert streamed(a.wk).data_ptr() == rows.data_ptr() + streamed(a.wq).numel() * rows.element_size()
    ffns = [m for m in model.modules() if isinstance(m, QuantFeedForward)]  # gate and up: one GEMM too
    assert len(ffns) == TINY_ARGS.text.n_layers and all(f.fused() for f in ffns)
    gate_up = streamed(ffns[0].w13)
    assert streamed(ffns[0].w3).data_ptr() == gate_up.data_ptr() + streamed(ffns[0].w1).numel() * gate_up.element_size()
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    torch.testing.assert_close(model(TOKENS), before, atol=MODEL_FP32_ATOL, rtol=0)


def test_fp8_per_tensor_scales_fuse_as_per_row_scales():
    from pixtral_fast.quant.linear import QuantLinear, fuse_quant_rows
    from pixtral_fast.quant.config import WeightScheme

    scheme = WeightScheme(kind="fp8", strategy="tensor", group_size=None)
    layers = []
    for i, n in enumerate((8, 4)):
        layer = QuantLinear(16, n, scheme, torch.float32)
        layer.weight.copy_(torch.randn(n, 16).to(layer.weight.dtype))
        layer.weight_scale.fill_(0.5 * (i + 1))
        layers.append(layer)
    fused = fuse_quant_rows(layers)
    assert fused.scheme.strategy == "channel" and fused.weight_scale.shape == (12, 1)
    assert fused.weight_scale[:8].eq(0.5).all() and fused.weight_scale[8:].eq(1.0).all()
    x = torch.randn(3, 16)
    from pixtral_fast import reference
    torch.testing.assert_close(fused.linear(x, reference), torch.cat([m.linear(x, reference) for m in layers], -1),
                               atol=0, rtol=0)


def test_projections_that_differ_do_not_fuse():
    model = quantize_model(random_model(TINY_ARGS, torch.device("cpu"), torch.float32), "w4a16", group_size=32)
    a = model.layers[0].attention
    a.wv.layout = "compressed-tensors-pretend"  # a layout the others do not share
    assert not a.fuse_qkv() and not a.fused()
