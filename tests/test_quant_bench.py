"""`pixtral-fast bench --scheme w4a16|fp8` (pixtral_fast.benchmark.run with scheme/group_size) on the
tiny params: the model it times really runs quantized linears, the roofline counts the bytes the
quantized model stores (computed here from the shapes, by hand), and bad schemes / group sizes
are refused naming the argument before any weight is made. describe_scheme says what runs."""
import json

import pytest
import torch

from pixtral_fast import benchmark, hardware
from pixtral_fast.model.quantized import quantize_model
from pixtral_fast.quant import describe_scheme
from pixtral_fast.quant.linear import QuantLinear
from pixtral_fast.tiny import TINY_ARGS

# Tiny decoder: dim 64, 4 heads x 64, 2 KV heads, hidden 128, 2 layers.
T = TINY_ARGS.text
LINEARS = {"wq": (T.n_heads * T.head_dim, T.dim), "wk": (T.n_kv_heads * T.head_dim, T.dim),
           "wv": (T.n_kv_heads * T.head_dim, T.dim), "wo": (T.dim, T.n_heads * T.head_dim),
           "w1": (T.hidden_dim, T.dim), "w3": (T.hidden_dim, T.dim), "w2": (T.dim, T.hidden_dim)}
N_QUANTIZED = len(LINEARS) * T.n_layers


def expected_decode_weight_bytes(scheme: str, group: int, elem: int) -> int:
    """Per layer: the 7 linears as stored plus 2 norms; then the final norm, lm_head (dense) and
    one embedding row."""
    if scheme == "w4a16":  # held in the k128 layout: K padded to a multiple of 128 (formats.repack_w4a16_k128)
        linear = sum(n * (-(-k // 128) * 128 // 8) * 4 + n * (k // group) * elem for n, k in LINEARS.values())
    elif scheme == "fp8":
        linear = sum(n * k + n * elem for n, k in LINEARS.values())
    else:
        linear = sum(n * k * elem for n, k in LINEARS.values())
    per_layer = linear + 2 * T.dim * elem
    return T.n_layers * per_layer + T.dim * elem + T.vocab_size * T.dim * elem + T.dim * elem


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(TINY_ARGS.to_params_json()))
    return path


@pytest.mark.parametrize("scheme,group", [("w4a16", 32), ("fp8", 128), (None, 128)])
def test_bench_reports_the_quantized_model(params, scheme, group):
    report = benchmark.run(params, batches=(1, 2), image_size=32, decode_steps=2, device="cpu",
                           dtype=torch.float32, backend="reference", reps=1, scheme=scheme, group_size=group)
    assert [d["batch"] for d in report["decode"]] == [1, 2]
    assert all(d["tok_per_s"] > 0 and d["fraction_of_roofline"] > 0 and d["stopped_early"] == 0
               for d in report["decode"])
    weights = expected_decode_weight_bytes(scheme, group, 4)
    assert report["decode_weight_bytes_per_step_GB"] * 1e9 == pytest.approx(weights, rel=1e-12)
    assert report["parameters"] == sum(p.numel() for p in benchmark.build_model(TINY_ARGS).parameters())
    if scheme is None:
        assert report["quantization"] is None
    else:
        label = {"w4a16": "w4a16 g32", "fp8": "fp8 per-channel"}[scheme]
        assert report["quantization"].startswith(f"{label} (reference {scheme}_linear")
        assert f"on {N_QUANTIZED} of " in report["quantization"]
    # The roofline of a batch-1 step with context c: those weights plus K and V of c tokens.
    one = report["decode"][0]
    kv = 2 * T.n_layers * T.n_kv_heads * T.head_dim * 4 * one["context"]
    ideal_s = (weights + kv) / hardware.current().hbm_bytes_per_s
    assert one["roofline_tok_per_s"] == pytest.approx(1 / ideal_s, rel=1e-9)


def test_quantized_bench_model_runs_quantized_linears():
    model = benchmark.random_quantized_model(TINY_ARGS, torch.device("cpu"), torch.float32, "w4a16", 32,
                                             "reference")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == N_QUANTIZED and all(m.layout == "k128" and m.weight_packed_k128.dtype == torch.int32
                                              for m in layers)
    assert model.layers[0].feed_forward.w2.group_size == 32
    assert torch.isfinite(model(torch.tensor([1, 3, 1000, 4]))).all()


@pytest.mark.parametrize("scheme,group,words", [
    ("int8", 128, ["scheme", "int8"]),
    ("w4a16", 0, ["group_size", "positive multiple of 8"]),
    ("w4a16", 12, ["group_size", "positive multiple of 8"]),
    ("w4a16", True, ["group_size"]),
    ("w4a16", 48, ["group_size 48", "dim (64)"]),
    ("w4a16", 256, ["group_size 256", "dim (64)"]),
])
def test_bad_scheme_or_group_size_is_refused_before_any_weight(params, monkeypatch, scheme, group, words):
    monkeypatch.setattr(benchmark, "random_model", lambda *a, **k: pytest.fail("weights were made"))
    with pytest.raises(ValueError) as err:
        benchmark.run(params, image_size=32, device="cpu", dtype=torch.float32, scheme=scheme, group_size=group)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_group_size_is_ignored_for_fp8():
    benchmark.check_scheme(TINY_ARGS, "fp8", 48)  # FP8 scales are per channel: no groups to check


def test_describe_scheme():
    model = benchmark.random_model(TINY_ARGS, torch.device("cpu"), torch.float32).set_backend("reference")
    assert describe_scheme(model) is None
    total = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    quantize_model(model, "w4a16", group_size=64)
    assert describe_scheme(model) == (f"w4a16 g64 (reference w4a16_linear: dequantize, then matmul) "
                                      f"on {N_QUANTIZED} of {total} linears")
    model.set_backend("fast")  # the interpreter's Triton kernels on the CPU
    assert describe_scheme(model) == f"w4a16 g64 (Triton w4a16_linear) on {N_QUANTIZED} of {total} linears"
    fp8 = quantize_model(benchmark.random_model(TINY_ARGS, torch.device("cpu"), torch.float32).set_backend("fast"),
                         "fp8")
    assert describe_scheme(fp8) == f"fp8 per-channel (Triton fp8_linear) on {N_QUANTIZED} of {total} linears"


def test_bench_scheme_options_parse_and_refuse(capsys):
    """What `pixtral-fast bench` registers (add_bench_scheme_options): defaults mean dense weights."""
    import argparse

    from pixtral_fast.quantize_command import add_bench_scheme_options

    parser = argparse.ArgumentParser(prog="bench")
    add_bench_scheme_options(parser)
    assert vars(parser.parse_args([])) == {"scheme": None, "group_size": 128}
    assert vars(parser.parse_args(["--scheme", "w4a16", "--group-size", "32"])) == {"scheme": "w4a16",
                                                                                    "group_size": 32}
    for argv, words in ((["--scheme", "int4"], ["--scheme", "int4"]), (["--group-size", "12"], ["--group-size", "12"]),
                        (["--group-size", "x"], ["--group-size", "'x'"])):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and all(w in err for w in words), err


@pytest.mark.parametrize("merge,patch", [(1, 16), (1, 14), (2, 14)])
def test_bench_image_prompt_follows_the_model_layout(merge, patch):
    """The prompt bench times is the model's own [IMG] layout: the size rounded down to whole
    (merged) patches (1000 is a multiple of none of 16, 14, 28) and capped at the largest image
    (1008 px, a multiple of patch x merge as the config requires)."""
    import dataclasses

    vision = dataclasses.replace(TINY_ARGS.vision, spatial_merge_size=merge, patch_size=patch, image_size=1008,
                                 mm_projector_id="patch_merge" if merge > 1 else "")
    args = dataclasses.replace(TINY_ARGS, vision=vision)
    prompt = benchmark.image_prompt(1000, vision)
    side = prompt.images[0].shape[1]
    assert side == 1000 // (patch * merge) * patch * merge
    assert benchmark.image_prompt(2000, vision).images[0].shape[1] == 1008
    benchmark.build_model(args).check_request(prompt.tokens, [torch.zeros(prompt.images[0].shape)])
    assert prompt.tokens.count(vision.image_token_id) == (side // (patch * merge)) ** 2


def test_describe_scheme_lists_each_kind_of_layer():
    """A checkpoint may mix schemes: per-channel W4A16 for attention, per-tensor FP8 with dynamic
    per-token inputs for the FFN (on the meta device: only the structure matters)."""
    from pixtral_fast.quant.config import ACT_FP8_DYNAMIC_TOKEN, FLOAT_QUANTIZED, WeightScheme
    from pixtral_fast.quant.linear import swap_quantized_modules

    model = benchmark.build_model(TINY_ARGS)
    w4 = WeightScheme("w4a16", "channel", None)
    f8 = WeightScheme("fp8", "tensor", None, ACT_FP8_DYNAMIC_TOKEN, FLOAT_QUANTIZED)
    schemes = {f"layers.{i}.{name}": (f8 if name.startswith("feed_forward") else w4)
               for i in range(T.n_layers) for name in ("attention.wq", "attention.wk", "attention.wv",
                                                       "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                       "feed_forward.w3")}
    total = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    swap_quantized_modules(model, schemes, torch.bfloat16)
    assert describe_scheme(model) == (
        f"w4a16 per-channel (reference w4a16_linear: dequantize, then matmul) on 8 of {total} linears; "
        f"fp8 per-tensor, inputs fp8 dynamic per token (reference fp8_linear: dequantize, then matmul) "
        f"on 6 of {total} linears")
