"""Head dims beyond the models' 64 and 128: the attention kernels take every multiple of 8 up to
256; any other head_dim runs the reference, with one log line; backend="auto" never fails for a
model the reference runs."""
import logging

import pytest
import torch

from pixtral_fast import _cuda_decode, ops
from pixtral_fast.config import ModelArgs, TextArgs, VisionArgs
from pixtral_fast.model.common import resolve_backend
from pixtral_fast.model.pixtral import build_model
from pixtral_fast.tiny import random_state_dict
from tests.conftest import DEVICE
from tests.support.hf_peer import image_tokens
from tests.support.paged_cases import make_case, oracle
from tests.tolerances import MODEL_FP32_ATOL, assert_close


def fallback_lines(caplog, op: str, head_dim: int) -> int:
    return sum(f"ops.{op}: head_dim {head_dim}" in r.getMessage() for r in caplog.records)


def test_varlen_odd_head_dim_runs_the_reference_and_says_so(caplog):
    from tests.test_varlen_attention import make_qkv, oracle as varlen_oracle, pack_grids

    cu, max_seqlen, pos = pack_grids([(3, 4), (1, 5)], DEVICE)
    q, k, v = make_qkv(pos.shape[0], 4, 2, 12, torch.float32, DEVICE)
    with caplog.at_level(logging.WARNING, logger="pixtral_fast"):
        out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=True)
        again = ops.varlen_attention(q, k, v, cu, max_seqlen, pos=pos)
    assert fallback_lines(caplog, "varlen_attention", 12) == 1
    assert_close(out, varlen_oracle(q, k, v, cu, max_seqlen, causal=True), torch.float32)
    assert_close(again, varlen_oracle(q, k, v, cu, max_seqlen, pos=pos), torch.float32)


def test_decode_odd_head_dim_runs_the_reference_and_says_so(caplog):
    q, k_cache, v_cache, table, lens = make_case(20, 2, 2, 16, [3, 40], torch.float32, DEVICE)
    with caplog.at_level(logging.WARNING, logger="pixtral_fast"):
        out = ops.gqa_decode_attention(q, k_cache, v_cache, table, lens)
        ops.gqa_decode_attention(q, k_cache, v_cache, table, lens)
    assert fallback_lines(caplog, "gqa_decode_attention", 20) == 1
    assert_close(out, oracle(q, k_cache, v_cache, table, lens), torch.float32)


# fp32 at every head_dim; bf16 at one per padded width (16, 128, 256) and 256 itself.
DECODE_CASES = [(d, torch.float32) for d in (8, 40, 72, 80, 96, 104, 112, 160, 256)] + \
               [(d, torch.bfloat16) for d in (8, 80, 160, 256)]


@pytest.mark.parametrize("head_dim,dtype", DECODE_CASES, ids=str)
def test_decode_head_dims(head_dim, dtype):
    """Paged decode, GQA 2 x 3, contexts crossing pages and the interpreter's 32-key tiles."""
    q, k_cache, v_cache, table, lens = make_case(head_dim, 2, 3, 16, [1, 17, 70], dtype, DEVICE, seed=head_dim)
    out = ops.gqa_decode_attention(q, k_cache, v_cache, table, lens)
    assert_close(out, oracle(q, k_cache, v_cache, table, lens), dtype)


def test_decode_backend_by_head_dim():
    assert ops.decode_backend("cpu", torch.bfloat16, 80) == "triton"
    assert ops.decode_backend("cpu", torch.bfloat16, 12) == "reference"
    assert ops.decode_backend("cuda", torch.bfloat16, 12) == "reference"
    # The CUDA extension dispatches head_dim 64 and 128 only (csrc/decode_plan.h).
    assert ops.decode_backend("cuda", torch.bfloat16, 80) == "triton"
    assert ops.decode_backend("cuda", torch.bfloat16, 256) == "triton"
    cuda = "cuda" if _cuda_decode.available() else "triton"
    assert ops.decode_backend("cuda", torch.bfloat16, 128) == cuda
    assert ops.decode_backend("cuda", torch.float16, 64) == cuda
    assert ops.decode_backend("cuda", torch.float32, 128) == "triton"


def test_resolve_backend_by_head_dims(caplog):
    with caplog.at_level(logging.WARNING, logger="pixtral_fast"):
        assert resolve_backend("auto", DEVICE, head_dims=(128, 64))[0] == "fast"
        assert not caplog.records
        assert resolve_backend("auto", DEVICE, head_dims=(12, 64))[0] == "reference"
    assert len(caplog.records) == 1 and "head_dim 12" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match=r"backend='fast'.*\[12\]"):
        resolve_backend("fast", DEVICE, head_dims=(64, 12))
    assert resolve_backend("reference", DEVICE, head_dims=(12,))[0] == "reference"


ODD_ARGS = ModelArgs(
    text=TextArgs(dim=48, n_layers=2, head_dim=12, hidden_dim=64, n_heads=4, n_kv_heads=2,
                  rope_theta=1e9, norm_eps=1e-5, vocab_size=131072),
    vision=VisionArgs(hidden_size=48, num_channels=3, image_size=1024, patch_size=16, rope_theta=1e4,
                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),  # head_dim 12
)


def test_model_with_odd_head_dim_runs_on_auto(caplog, monkeypatch):
    """head_dim 12 (decoder and ViT): backend='auto' runs, says why it is not all kernels, and
    gives the reference backend's logits."""
    monkeypatch.setattr(ops, "_fallbacks_logged", set())  # ops log once per process
    state = random_state_dict(ODD_ARGS, seed=3)
    models = {}
    with caplog.at_level(logging.WARNING, logger="pixtral_fast"):
        for backend in ("auto", "reference"):
            model = build_model(ODD_ARGS, device=DEVICE, dtype=torch.float32)
            model.load_state_dict(state, strict=True)
            models[backend] = model.set_backend(backend).eval()
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(3, 32, 48, generator=g)]
        tokens = torch.tensor([1, 3] + image_tokens(2, 3) + [2000, 2001, 4])
        logits = {name: model(tokens, images) for name, model in models.items()}
    assert any("head_dim 12" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(logits["auto"], logits["reference"], atol=MODEL_FP32_ATOL, rtol=0)
