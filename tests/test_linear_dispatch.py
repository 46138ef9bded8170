"""ops.linear: cuBLAS (torch) by default, our split-K GEMV (kernels/gemv.py) for the weight shapes
chosen with ops.use_gemv or $PIXTRAL_FAST_GEMV, at decode batch sizes only; the model's fused QKV
and output head go through it, with the same logits either way."""
import os
import subprocess
import sys

import pytest
import torch

from pixtral_fast import ops
from pixtral_fast.benchmark import random_model
from pixtral_fast.runtime.launches import LaunchCounter
from pixtral_fast.tiny import TINY_ARGS
from tests.tolerances import MODEL_FP32_ATOL, assert_close


@pytest.fixture
def gemv_policy():
    yield ops.use_gemv
    ops.use_gemv(None)


def launched(fn) -> dict:
    with torch.inference_mode(), LaunchCounter() as counter:
        out = fn()
    return out, counter.result.by_name()


def test_default_is_cublas(gemv_policy):
    x, w = torch.randn(3, 64), torch.randn(48, 64)
    out, names = launched(lambda: ops.linear(x, w))
    assert names == {"aten::linear": 1} and torch.equal(out, torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("rows, kernel", [(1, True), (32, True), (33, False)])
def test_chosen_shapes_take_the_gemv_at_decode_sizes(gemv_policy, rows, kernel):
    gemv_policy([(48, 64)])
    x, w = torch.randn(rows, 64, dtype=torch.bfloat16), torch.randn(48, 64, dtype=torch.bfloat16)
    out, names = launched(lambda: ops.linear(x, w))
    assert any(n.startswith("triton::_gemv") for n in names) is kernel
    assert_close(out, x.double() @ w.double().T, torch.bfloat16)
    _, other = launched(lambda: ops.linear(x, torch.randn(40, 64, dtype=torch.bfloat16)))
    assert not any(n.startswith("triton::") for n in other)  # another shape: cuBLAS


def test_model_logits_are_the_same_through_the_gemv(gemv_policy):
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32).set_backend("fast")
    model.fuse_projections()
    tokens = torch.tensor([1, 3, 1000, 1001, 4])
    expected = model(tokens)
    gemv_policy("all")
    _, names = launched(lambda: model.logits(torch.randn(2, TINY_ARGS.text.dim)))
    assert any(n.startswith("triton::_gemv") for n in names)
    torch.testing.assert_close(model(tokens), expected, atol=MODEL_FP32_ATOL, rtol=0)


@pytest.mark.parametrize("shapes, message", [([(0, 5)], "weight shapes"), ([(1, 2, 3)], "weight shapes")])
def test_bad_policies_are_refused(gemv_policy, shapes, message):
    with pytest.raises(ValueError, match=message):
        gemv_policy(shapes)


@pytest.mark.parametrize("value, ok", [("all", True), ("6144x5120,131072x5120", True), ("6144x", False),
                                       ("big", False)])
def test_environment_variable(value, ok, tmp_path):
    env = {**os.environ, "PIXTRAL_FAST_GEMV": value}
    proc = subprocess.run([sys.executable, "-c", "import pixtral_fast"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) is ok, proc.stderr[-2000:]
    if not ok:
        assert "PIXTRAL_FAST_GEMV" in proc.stderr
