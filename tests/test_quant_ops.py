"""The W4A16 and FP8 linear kernels against the dequantize-then-matmul oracle in fp64, and our packed
formats against compressed-tensors' own packing and dequantization.

Shapes: N = 45 and K = 160 / 192 / 256 (or 100: a channel-wise group that is no multiple of 8 or
of any tile) span several ragged tiles of the interpreter configs (32 wide) in every dimension;
M in {1, 3, 17} runs the decode form with split-K partials, M = 64 the prefill form. Outputs are
O(1) (weights ~ 1/sqrt(K)), so tests/tolerances.py's per-dtype bounds apply as for dense ops: the
kernels lose the rounding of the dequantized weight to the dot dtype (as the dense model holds
its weights) and of the output.
"""
from __future__ import annotations

import functools

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from pixtral_fast.kernels import fp8_linear as fp8_kernel
from pixtral_fast.kernels import w4a16_linear as w4_kernel
from pixtral_fast.quant import formats
from pixtral_fast.quant import reference as qref
from tests.conftest import DEVICE, DTYPES
from tests.tolerances import assert_close

MS = (1, 3, 17, 64)
GROUPS = (32, 64, 128)
N = 45


def _cases() -> list:
    # Every M with every dtype; the group cycles so that each dtype meets every group size.
    return [pytest.param(m, dtype, GROUPS[(i + j) % 3], id=f"M{m}-{str(dtype)[6:]}-g{GROUPS[(i + j) % 3]}")
            for i, m in enumerate(MS) for j, dtype in enumerate(DTYPES)]


def _w4_weights(n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    packed, scales = formats.quantize_w4a16(w, group, scale_dtype)
    return packed.to(DEVICE), scales.to(DEVICE)


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("k", [64, 72, 100])
def test_pack_int4_matches_compressed_tensors(k):
    q = torch.randint(-8, 8, (7, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    packed = formats.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (7, formats.packed_words(k))
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(formats.unpack_int4(packed, k), q)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size((7, k))), q)


def test_dequantize_matches_compressed_tensors():
    """Our dequantization, rounded to the scale dtype, is compressed-tensors' decompress exactly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, scales = formats.quantize_w4a16(w, 32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    theirs = PackedQuantizationCompressor.decompress(
        {"weight_packed": packed, "weight_scale": scales, "weight_shape": torch.tensor([24, 128])}, scheme)["weight"]
    ours = qref.dequantize_w4a16(packed, scales, 32, 128)
    assert torch.equal(ours.to(torch.bfloat16), theirs)
    # and the quantizer rounds to nearest: within half a step of the weight, but where the
    # range [-8, 7] steps clamps it (max|w| maps to +-7.5 steps: 7 is as near as it gets)
    step = scales.float().repeat_interleave(32, 1)
    bound = torch.maximum(step / 2, w.float() - 7 * step)
    assert ((ours - w.float()).abs() <= bound * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------
# W4A16


@pytest.mark.parametrize("m,dtype,group", _cases())
def test_w4a16_matches_reference(m, dtype, group):
    k = {32: 160, 64: 192, 128: 256}[group]
    packed, scales = _w4_weights(N, k, group, dtype, seed=m)
    x = _x(m, k, dtype, seed=100 + m)
    out = w4_kernel.w4a16_matmul(x, packed, scales, group)
    assert out.dtype == dtype and out.shape == (m, N)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, group), dtype)


@pytest.mark.parametrize("m", [1, 17, 64])
def test_w4a16_channelwise_ragged_k(m):
    """One group of K = 100 inputs: K no multiple of 8 (a short last word) nor of any tile."""
    k = 100
    packed, scales = _w4_weights(N, k, k, torch.float32, seed=7)
    x = _x(m, k, torch.float32, seed=8)
    out = w4_kernel.w4a16_matmul(x, packed, scales, k)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, k), torch.float32)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_w4a16_split_k(split):
    """The decode form with the output written directly (1 slice) and with fp32 partials."""
    packed, scales = _w4_weights(N, 160, 32, torch.bfloat16, seed=3)
    x = _x(2, 160, torch.bfloat16, seed=4)
    out = w4_kernel.w4a16_matmul(x, packed, scales, 32, split=split)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, 32), torch.bfloat16)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("m,bm", [(3, 16), (40, 32)], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_w4a16_block_k_larger_than_the_group(m, bm, group, dtype):
    """The GPU's decode tiles have BLOCK_K = 128 > group 32 / 64: a tile spans several groups
    and each needs its own scale row (issue 19: one scale per K tile gave error 0.57). K = 320
    leaves a ragged last tile; split 2 puts a slice boundary inside the K range."""
    k = 320
    packed, scales = _w4_weights(N, k, group, dtype, seed=group + m)
    x = _x(m, k, dtype, seed=300 + m)
    config = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
    for split in (1, 2):
        out = w4_kernel.w4a16_matmul(x, packed, scales, group, split=split, config=config)
        assert_close(out, qref.w4a16_linear(x.double(), packed, scales, group), dtype)


GPU_CAPABILITIES = (90, 89, 80)  # Hopper; Ada and Ampere (their own tile tables where they differ)


def _gpu_tiles(configs, dtype: torch.dtype) -> list[tuple[str, dict]]:
    """(form, config) of every tile config the GPU launcher picks for this dtype, on any arch."""
    seen: dict[str, tuple[str, dict]] = {}
    for capability in GPU_CAPABILITIES:
        for form, config in configs(capability, dtype).items():
            seen.setdefault(repr(sorted(config.items())), (form, config))
    return list(seen.values())


def _check_gpu_tiles(configs, dtype, k: int, packed, scales, group: int, matmul) -> None:
    """matmul(x, split, config) against the oracle for each GPU tile config: the decode form (3
    rows) with split 1 and 2, the prefill form (40 rows) whole."""
    for form, config in _gpu_tiles(configs, dtype):
        m = 3 if form == "decode" else w4_kernel.plan.DECODE_MAX_M + 8
        x = _x(m, k, dtype, seed=400 + m)
        expected = qref.w4a16_linear(x.double(), packed, scales, group)
        for split in (1, 2) if form == "decode" else (1,):
            assert_close(matmul(x, split, config), expected, dtype, msg=f"{form} {config} split {split}")


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_w4a16_with_the_gpu_tile_configs(dtype, group):
    """The tiles the GPU runs (decode BLOCK_K 128 spans four groups of 32; fp32's BLOCK_K 16 is
    half a group), under the interpreter: each needs its own scale per group, whatever the tile.
    K = 320 (384 for groups of 128): a ragged last tile for the BLOCK_K that do not divide it;
    split 2 cuts K inside the range."""
    k = 384 if group == 128 else 320
    packed, scales = _w4_weights(N, k, group, dtype, seed=group)
    _check_gpu_tiles(w4_kernel.configs, dtype, k, packed, scales, group, lambda x, split, config:
                     w4_kernel.w4a16_matmul(x, packed, scales, group, split=split, config=config))


def test_w4a16_scales_in_another_dtype_and_strided_x():
    packed, scales = _w4_weights(N, 128, 64, torch.float32, seed=5)
    base = _x(3, 200, torch.bfloat16, seed=6)
    x = base[:, 40:168]  # row stride 200: the kernel takes any row stride
    out = w4_kernel.w4a16_matmul(x, packed, scales, 64)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, 64), torch.bfloat16)


def test_w4a16_leading_dimensions():
    packed, scales = _w4_weights(N, 128, 32, torch.float16, seed=9)
    x = _x(6, 128, torch.float16, seed=10).view(2, 3, 128)
    out = w4_kernel.w4a16_linear(x, packed, scales, 32)
    assert out.shape == (2, 3, N)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, 32), torch.float16)


# ---------------------------------------------------------------------------------------------
# FP8


def _fp8_weights(n: int, k: int, per_channel: bool, scale_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    weight, scales = formats.quantize_fp8(w, per_channel, scale_dtype)
    return weight.to(DEVICE), scales.to(DEVICE)


@pytest.mark.parametrize("m,dtype,per_channel", [
    pytest.param(m, dtype, (i + j) % 2 == 0, id=f"M{m}-{str(dtype)[6:]}-{'channel' if (i + j) % 2 == 0 else 'tensor'}")
    for i, m in enumerate(MS) for j, dtype in enumerate(DTYPES)
])
@pytest.mark.parametrize("hw_cvt", [True, False], ids=["hw-cvt", "int-decode"])
def test_fp8_matches_reference(m, dtype, per_channel, hw_cvt):
    """Both e4m3 decodings: the hardware conversion (sm_89+) and the integer one (sm_80)."""
    if DEVICE != "cpu" and hw_cvt and not fp8_kernel.hardware_cvt(torch.device(DEVICE)):
        pytest.skip("this GPU has no e4m3 conversion (sm_89+)")
    k = 150  # no multiple of any tile: whole tiles in the loop, a masked one after it
    weight, scales = _fp8_weights(N, k, per_channel, dtype, seed=m)
    x = _x(m, k, dtype, seed=200 + m)
    out = fp8_kernel.fp8_matmul(x, weight, scales, hw_cvt=hw_cvt)
    assert out.dtype == dtype and out.shape == (m, N)
    assert_close(out, qref.fp8_linear(x.double(), weight, scales), dtype)


@pytest.mark.parametrize("split", [1, 3])
def test_fp8_split_k(split):
    weight, scales = _fp8_weights(N, 150, True, torch.float16, seed=11)
    x = _x(5, 150, torch.float16, seed=12)
    out = fp8_kernel.fp8_matmul(x, weight, scales.view(-1), split=split)  # scales [N] as well as [N, 1]
    assert_close(out, qref.fp8_linear(x.double(), weight, scales), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hw_cvt", [True, False], ids=["hw-cvt", "int-decode"])
def test_fp8_decodes_every_finite_e4m3_value_exactly(dtype, hw_cvt):
    """All 254 finite e4m3 bytes through the kernel's own decodings, into every dot dtype
    (each holds every e4m3 value): x = I, scale 1; K = 127 and 254 rows span several tiles,
    in the loop and in the masked tile after it."""
    if DEVICE != "cpu" and hw_cvt and not fp8_kernel.hardware_cvt(torch.device(DEVICE)):
        pytest.skip("this GPU has no e4m3 conversion (sm_89+)")
    codes = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    weight = codes.view(2, 127).view(torch.float8_e4m3fn).to(DEVICE)
    x = torch.eye(127, dtype=dtype, device=DEVICE)
    out = fp8_kernel.fp8_matmul(x, weight, torch.ones(1, dtype=dtype, device=DEVICE), hw_cvt=hw_cvt)
    assert torch.equal(out.t().float(), weight.float())


# ---------------------------------------------------------------------------------------------
# W4A16, the k128 layout (repacked at load) and its kernel


def _k128(n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int):
    packed, scales = _w4_weights(n, k, group, scale_dtype, seed)
    return (packed, scales) + formats.repack_w4a16_k128(packed, scales, group, k)


@pytest.mark.parametrize("k,group", [(100, 100), (256, 32), (320, 64), (384, 128), (5120, 128)])
def test_k128_repack_is_a_permutation(k, group):
    """Every input lands where the kernel reads it (halfword h of block b, nibble c: k = 128 b +
    32 c + h), padded with q = 0 to a multiple of 128; unrepacking gives the checkpoint back."""
    q = torch.randint(-8, 8, (5, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    packed, scales = formats.pack_int4(q), torch.randn(5, k // group)
    words, scales_t = formats.repack_w4a16_k128(packed, scales, group, k)
    kp = -(-k // 128) * 128
    assert words.dtype == torch.int32 and words.shape == (5, kp // 8) and words.is_contiguous()
    assert torch.equal(scales_t, scales.t())
    half = words.view(torch.int16).view(5, kp // 128, 32).to(torch.int32) & 0xFFFF
    nib = torch.stack([(half >> (4 * c)) & 0xF for c in range(4)], dim=2).view(5, kp) - 8
    assert torch.equal(nib[:, :k].to(torch.int8), q) and not nib[:, k:].any()
    back = formats.unrepack_w4a16_k128(words, scales_t, k)
    assert torch.equal(back[0], packed) and torch.equal(back[1], scales)


def test_k128_refuses_other_group_sizes():
    assert formats.k128_layout_ok(128, 5120) and formats.k128_layout_ok(100, 100)
    assert not formats.k128_layout_ok(96, 192) and not formats.k128_layout_ok(16, 128)
    packed, scales = formats.quantize_w4a16(torch.randn(4, 192), 96)
    with pytest.raises(ValueError, match="power of two"):
        formats.repack_w4a16_k128(packed, scales, 96, 192)


@pytest.mark.parametrize("m,dtype,group", _cases())
def test_w4a16_k128_matches_reference(m, dtype, group):
    """fp32 / fp16 subtract the nibbles' offset from each weight, bf16 (with bf16 scales) folds it
    into a correction of the sums: both against the fp64 oracle."""
    k = {32: 160, 64: 192, 128: 256}[group]
    packed, scales, words, scales_t = _k128(N, k, group, dtype, seed=m)
    x = _x(m, k, dtype, seed=100 + m)
    out = w4_kernel.w4a16_k128_matmul(x, words, scales_t, group)
    assert out.dtype == dtype and out.shape == (m, N)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, group), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_w4a16_k128_channelwise_ragged_k(m, dtype):
    """One group of K = 100 inputs: K no multiple of 8 nor of 128 (the padded block is the masked tile)."""
    k = 100
    packed, scales, words, scales_t = _k128(N, k, k, dtype, seed=7)
    x = _x(m, k, dtype, seed=8)
    out = w4_kernel.w4a16_k128_matmul(x, words, scales_t, k)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, k), dtype)


@pytest.mark.parametrize("group", [32, 64, 256])
@pytest.mark.parametrize("m,bm", [(3, 16), (40, 32)], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_w4a16_k128_block_k_larger_than_the_group(m, bm, group, dtype):
    """BLOCK_K 256 (two blocks of 128 per iteration) with groups of 32 / 64 (several per block) and
    256 (one group over both): K = 512 + 64 leaves a ragged last tile; split 2 puts a slice
    boundary inside the K range."""
    k = 512 + 64 if group != 256 else 768
    packed, scales, words, scales_t = _k128(N, k, group, dtype, seed=group + m)
    x = _x(m, k, dtype, seed=300 + m)
    config = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1}
    for split in (1, 2):
        out = w4_kernel.w4a16_k128_matmul(x, words, scales_t, group, split=split, config=config)
        assert_close(out, qref.w4a16_linear(x.double(), packed, scales, group), dtype)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_w4a16_k128_with_the_gpu_tile_configs(dtype, group):
    """The k128 kernel's GPU tiles (decode BLOCK_K 256 for groups of 128, 128 for 32 and 64;
    prefill 128), under the interpreter: a tile spans several groups, each with its own scale row.
    K = 576 (640 for groups of 128): a ragged last tile for BLOCK_K 256; split 2 cuts K inside
    the range."""
    k = 640 if group == 128 else 576
    packed, scales, words, scales_t = _k128(N, k, group, dtype, seed=group)
    tiles = functools.partial(w4_kernel.k128_configs, cps=w4_kernel.chunks_per_scale(group, k))
    _check_gpu_tiles(tiles, dtype, k, packed, scales, group, lambda x, split, config:
                     w4_kernel.w4a16_k128_matmul(x, words, scales_t, group, split=split, config=config))


@pytest.mark.parametrize("split", [1, 2, 3])
def test_w4a16_k128_split_k(split):
    packed, scales, words, scales_t = _k128(N, 384, 32, torch.bfloat16, seed=3)
    x = _x(2, 384, torch.bfloat16, seed=4)
    out = w4_kernel.w4a16_k128_matmul(x, words, scales_t, 32, split=split)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, 32), torch.bfloat16)


def test_w4a16_k128_scales_in_another_dtype_and_strided_x():
    """fp32 scales with bf16 activations: not exact bf16 dot operands, so the kernel subtracts
    the offset from each weight instead of folding it."""
    packed, scales, words, scales_t = _k128(N, 128, 64, torch.float32, seed=5)
    base = _x(3, 200, torch.bfloat16, seed=6)
    x = base[:, 40:168]  # row stride 200: the kernel takes any row stride
    assert not w4_kernel.k128_fold(x.dtype, scales_t.dtype)
    out = w4_kernel.w4a16_k128_matmul(x, words, scales_t, 64)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, 64), torch.bfloat16)


def test_w4a16_k128_fold_survives_large_activations():
    """The folded offset cancels 136 * sum(x) against the sums of 128 + u: with activations of
    magnitude ~300 and a mean far from zero the result is still within the bf16 bound."""
    packed, scales, words, scales_t = _k128(N, 256, 128, torch.bfloat16, seed=12)
    x = (_x(2, 256, torch.float32, seed=13) * 100 + 200).to(torch.bfloat16)
    out = w4_kernel.w4a16_k128_matmul(x, words, scales_t, 128)
    ref = qref.w4a16_linear(x.double(), packed, scales, 128)
    torch.testing.assert_close(out.double(), ref, atol=1.6e-2 * ref.abs().max().item(), rtol=1.6e-2)


def test_w4a16_k128_leading_dimensions():
    packed, scales, words, scales_t = _k128(N, 128, 32, torch.float16, seed=9)
    x = _x(6, 128, torch.float16, seed=10).view(2, 3, 128)
    out = w4_kernel.w4a16_k128_linear(x, words, scales_t, 32)
    assert out.shape == (2, 3, N)
    assert_close(out, qref.w4a16_linear(x.double(), packed, scales, 32), torch.float16)
