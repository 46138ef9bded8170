"""Quantized (compressed-tensors) checkpoints at tensor_parallel_size 2: each rank reads its share
of the packed tensors (rows of q/k/v/w1/w3, input columns of wo/w2 cut on pack and group
boundaries) and runs it through the quantized linears, with the dense layers' all-reduces. On
CPU ranks (gloo, fp32, reference backend) the logits and the greedy tokens equal one process on
the same quantized checkpoint; a W4A16 group size that does not divide a rank's columns is
refused, naming the layer, the group size and the tensor parallel size."""
from __future__ import annotations

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.parallel import ShardPlan
from pixtral_fast.parallel.comm import Collectives
from pixtral_fast.quant.formats import unrepack_w4a16_k128
from pixtral_fast.quant.linear import QuantLinear
from pixtral_fast.packed_weights import layer_cut
from pixtral_fast.quant.reference import dequantize_fp8, dequantize_w4a16
from pixtral_fast.quantize_checkpoint import quantize_checkpoint
from pixtral_fast.runtime import tp_executor
from pixtral_fast.tiny import TINY_ARGS, make_tiny
from pixtral_fast.weights import CheckpointError
from tests.support.tp import CPU_FP32, greedy_batch, request_with_images, tp_engine
from tests.tolerances import assert_close

# pixtral-12b tiny: w1/w3 take dim 64 inputs, wo 256, w2 128. At TP=2 a rank takes 128 of wo's
# and 64 of w2's columns; at TP=4, 64 and 32.
DIVIDING_GROUP = 32
SPLITTING_GROUP = 64  # divides every layer whole and at TP=2, not a TP=4 rank's 32 columns of w2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def quantized(tiny, tmp_path_factory, scheme: str, group_size: int = DIVIDING_GROUP):
    return quantize_checkpoint(tiny, tmp_path_factory.mktemp(f"{scheme}-g{group_size}") / "q", scheme,
                               group_size=group_size, progress=False)


@pytest.fixture(scope="module", params=["w4a16", "fp8"])
def engines(request, tiny, tmp_path_factory):
    """(scheme, one-process engine, TP=2 engine) on one quantized checkpoint."""
    folder = quantized(tiny, tmp_path_factory, request.param)
    with pf.Engine.from_pretrained(folder, **(CPU_FP32 | {"num_blocks": 64})) as one, tp_engine(folder, 2) as two:
        yield request.param, one, two


def prompt_logits(eng: pf.Engine, tokenizer) -> torch.Tensor:
    enc = tokenizer.encode(request_with_images())
    return eng.prompt_logits(enc.tokens, enc.images)


def test_logits_equal_one_process(engines):
    scheme, one, two = engines
    assert two.executor.size == 2 and f"weights={scheme}" in two.describe()
    want = prompt_logits(one, one.tokenizer)
    assert_close(prompt_logits(two, one.tokenizer), want, torch.float32)


def test_greedy_tokens_equal_one_process(engines):
    _, one, two = engines
    want = [r.tokens for r in one.generate(greedy_batch(), max_new_tokens=12)]
    assert [r.tokens for r in two.generate(greedy_batch(), max_new_tokens=12)] == want


def dequantized(layer: QuantLinear) -> torch.Tensor:
    """The layer's weight [out, in] in fp32, from whichever layout it holds."""
    if layer.scheme.kind == "fp8":
        return dequantize_fp8(layer.weight, layer.weight_scale)
    if layer.layout == "k128":
        packed, scales = unrepack_w4a16_k128(layer.weight_packed_k128, layer.weight_scale_t, layer.in_features)
    else:
        packed, scales = layer.weight_packed, layer.weight_scale
    return dequantize_w4a16(packed, scales, layer.group_size, layer.in_features)


def test_the_driver_rank_holds_its_share_of_each_quantized_layer(engines):
    """Rank 0's quantized layers are exactly its rows (q/k/v/w1/w3) or input columns (wo/w2) of
    the whole model's: packed words, scales and HF's q/k row order included."""
    _, one, two = engines
    plan, text = ShardPlan(2, 0), one.model.args.text
    layers = [(name, m) for name, m in one.model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * text.n_layers
    for name, whole in layers:
        dim, start, length, _ = plan.slice_for(name + ".weight", text)
        want = dequantized(whole).narrow(dim, start, length)
        torch.testing.assert_close(dequantized(two.model.get_submodule(name)), want, atol=0, rtol=0, msg=name)


def test_group_that_splits_a_rank_share_is_refused(tiny, tmp_path_factory, monkeypatch):
    folder = quantized(tiny, tmp_path_factory, "w4a16", SPLITTING_GROUP)
    refusal = (r"down_proj \(W4A16, group_size 64\) cannot be split by tensor_parallel_size 4: each rank takes 32 "
               r"of its 128 input columns")
    spawned = []
    monkeypatch.setattr(tp_executor.subprocess, "Popen", lambda argv, *a, **k: spawned.append(argv))
    with pytest.raises(CheckpointError, match=refusal):
        pf.Engine.from_pretrained(folder, tensor_parallel_size=4, **CPU_FP32)
    assert spawned == []  # found from the headers, before any worker starts
    # A rank's own load refuses it too (Collectives without a process group: loaded, never run),
    # and takes the same checkpoint where its share divides.
    with pytest.raises(CheckpointError, match=refusal):
        pf.load_model(folder, **CPU_FP32, comm=Collectives(ShardPlan(4, 0)))
    pf.load_model(folder, **CPU_FP32, comm=Collectives(ShardPlan(2, 0)))


def test_a_quantized_output_head_is_refused_at_tp2():
    """The vocabulary-parallel head gathers its rows itself; a quantized one would lose that."""
    with pytest.raises(CheckpointError, match=r"lm_head is quantized but tensor parallelism splits it by vocabulary"):
        layer_cut("q", "lm_head", "output", TINY_ARGS, ShardPlan(2, 0))
    assert layer_cut("q", "lm_head", "output", TINY_ARGS, ShardPlan(1, 0)) is None
