"""Paged GQA decode attention (flash-decoding), Triton.

One query token per sequence over a paged KV cache. A program owns (sequence, KV head, split):
it reads each K/V tile once for the whole query-head group, which sits in the M dimension of
the tl.dot (padded to 16 rows so tensor cores apply), so NeMo's 32/8 heads move 4x fewer
bytes than one program per query head. The context is split (split-K) so that short batches
still fill the GPU: each split runs an online softmax in fp32 over its share of the sequence
and writes a partial (max, sum, unnormalised acc); a second kernel merges the splits.

CUDA-graph safe: the grid depends only on shapes (never on seq_lens, which stay on the device);
each split's share of its sequence is computed in the kernel, and splits with nothing to do
write neutral partials (max -inf, sum 0) that the merge weighs to zero.

head_dim: any multiple of 8 up to 256, on tiles padded to a power of two (masked columns).
"""
from __future__ import annotations

import itertools
import torch
import triton
import triton.language as tl

from pixtral_fast.kernels import INTERPRETING, LOG2E, TRITON_DTYPE, arch, sm_count
from pixtral_fast.kernels._specialize import jit_specialized
from pixtral_fast.kernels.varlen_attention import MAX_HEAD_DIM, _tile_mask, softmax_update, supports_head_dim

MAX_SPLITS = 32  # the merge loads every split of a head at once: [32, D] fp32 at most


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, block_table_stride, num_kv_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_h < GROUP
    q_head = kv_head * GROUP + offs_h  # rows of q / out: query heads of this group
    bh_row = b * (num_kv_heads * GROUP) + q_head

    tile_ok = _tile_mask(row_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, False)
    q = tl.load(q_ptr + bh_row[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_ok, other=0.0)

    # This split's tiles: the sequence's own tiles shared evenly, so a long sequence in a batch
    # sized for a much longer context still spreads over every split.
    seq_len = tl.load(seq_lens_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    tile_start = split * per_split
    tile_end = tl.minimum(tile_start + per_split, n_tiles)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_P2], tl.float32)
    row_stride = num_kv_heads * HEAD_DIM
    table_row = block_table_ptr + b * block_table_stride
    for tile in range(tile_start, tile_end):
        idx = tile * BLOCK_N + offs_n
        key_ok = idx < seq_len
        # Table entries past the sequence may be garbage (-1, huge): masked, never read.
        page = tl.load(table_row + idx // BLOCK_SIZE, mask=key_ok, other=0)
        token = page.to(tl.int64) * BLOCK_SIZE + idx % BLOCK_SIZE
        kv_off = token * row_stride + kv_head * HEAD_DIM
        k_t = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None],
                      mask=_tile_mask(key_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, True), other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :],
                    mask=_tile_mask(key_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, False), other=0.0)

        s = tl.dot(q, k_t, input_precision="ieee") * qk_scale  # log2 domain
        s = tl.where(key_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = softmax_update(s, v, acc, m_i, l_i)

    if DIRECT:
        # One split: it saw the whole sequence (seq_len >= 1), so l_i > 0 on real rows.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + bh_row[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        part = bh_row * num_splits + split
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=tile_ok)


@triton.jit
def _decode_merge_kernel(
    out_ptr, m_ptr, l_ptr, acc_ptr, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    bh_row = tl.program_id(0)  # b * Hq + query head
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    split_ok = offs_s < num_splits
    part = bh_row * num_splits + offs_s
    m = tl.load(m_ptr + part, mask=split_ok, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=_tile_mask(split_ok, offs_d, HEAD_DIM, HEAD_DIM_P2, False), other=0.0)
    m_max = tl.max(m, axis=0)
    # All splits empty only if seq_len == 0 (a padded graph slot): give zeros, not NaN.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    if HEAD_DIM == HEAD_DIM_P2:
        tl.store(out_ptr + bh_row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + bh_row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# configs


def _config(capability: int | None, head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_N, num_warps, num_stages. Decode is bandwidth-bound: 64-key tiles give long
    contiguous row loads; fp32 rows are twice as wide, so 32 keys. 8 warps keep the gathered
    K/V pointer tensors in registers (no spills at D=128). num_stages=3 lets Triton's pipeliner
    fetch the page ids two tiles ahead and K/V one tile ahead (more stages add nothing for
    these indirect loads); occupancy (several CTAs per SM) covers the rest of HBM latency.
    Hopper (90) and Ampere (80) share these values until measured otherwise. head_dim 256 (and
    the dims padded to it) halves the tile, for the same registers per K/V tile."""
    if capability is None:  # the interpreter ignores warps and stages
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    block_n = 32 if dtype == torch.float32 else 64
    if padded_head_dim(head_dim) > 128:
        block_n //= 2
    return {"BLOCK_N": block_n, "num_warps": 8, "num_stages": 3}


def padded_head_dim(head_dim: int) -> int:
    """Tile width: a power of two, at least tl.dot's 16 columns; the padding is masked."""
    return max(16, triton.next_power_of_2(head_dim))


def choose_num_splits(batch: int, kv_heads: int, max_context: int, block_n: int, sm_count: int) -> int:
    """Splits per (sequence, KV head) so that about two waves of programs cover the SMs, without
    splitting the context upper bound finer than one tile per split."""
    max_tiles = max(1, triton.cdiv(max_context, block_n))
    want = triton.cdiv(2 * sm_count, max(1, batch * kv_heads))
    return max(1, min(want, max_tiles, MAX_SPLITS))


def gqa_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits=None):
    """q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_table int32 [B, max_blocks];
    seq_lens int32 [B] (>= 1, on the device). Inputs are validated by pixtral_fast.ops.
    num_splits=None: chosen from the shapes and the SM count (never from seq_lens)."""
    batch, q_heads, head_dim = q.shape
    if not supports_head_dim(head_dim):
        raise ValueError(f"head_dim {head_dim}: the decode kernel takes multiples of 8 up to {MAX_HEAD_DIM}")
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    head_dim_p2 = padded_head_dim(head_dim)
    capability = None if INTERPRETING else arch(q.device)
    cfg = _config(capability, head_dim, q.dtype)
    max_context = block_table.shape[1] * block_size
    if num_splits is None:
        if INTERPRETING:  # a few splits, so that CPU tests exercise the merge
            num_splits = min(4, max(1, triton.cdiv(max_context, cfg["BLOCK_N"])))
        else:
            num_splits = choose_num_splits(batch, kv_heads, max_context, cfg["BLOCK_N"], sm_count(q.device))
    num_splits = int(num_splits)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    direct = num_splits == 1
    if direct:
        m_ws = l_ws = acc_ws = out  # unused: the kernel writes out itself
    else:
        m_ws = torch.empty(batch, q_heads, num_splits, device=q.device, dtype=torch.float32)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty(batch, q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(batch * kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, m_ws, l_ws, acc_ws,
        float(scale) * LOG2E, block_table.stride(0), kv_heads, num_splits,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"], DIRECT=direct, HEAD_DIM_P2=head_dim_p2,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        _decode_merge_kernel[(batch * q_heads,)](
            out, m_ws, l_ws, acc_ws, num_splits,
            HEAD_DIM=head_dim, SPLITS_P2=triton.next_power_of_2(num_splits), HEAD_DIM_P2=head_dim_p2,
            num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs

# The launch the specs stand for: Pixtral-12B's decoder (8 KV heads) over pages of 16 tokens, a
# block table sized for a 131072-token context (8192 pages a row), at batch 1 (its split count,
# the largest, sizes the merge), on an H100 / H200 (132 SMs) or an A100 (108).
_SPEC_KV_HEADS, _SPEC_MAX_CONTEXT, _SPEC_BATCH = 8, 131072, 1
_SPEC_SMS = {90: 132, 80: 108}


def compile_specs(capability: int) -> list[dict]:
    """Every shipped config for one arch: per (dtype, head_dim), the split kernel (NeMo's group
    of 4, block size 16 so tiles span several pages) writing split-K partials or, with one
    split, the output directly; and the merge at the largest split count. Head dims: 64 and 128
    (the models'), and in bf16 (fp16 compiles the same code with another element type) and fp32
    256 (half-width key tiles) and 160 (padded to 256, column masks), in bf16 also 80 (-> 128).
    Dims padded to 16..64 hold fewer registers than the D=64 variant.
    Each is specialized as the JIT specializes it at the launch above (jit_specialized): 16-byte
    aligned tensors, the block-table stride and the split count where divisible by 16, and in
    the direct variant num_splits == 1 compiled in (a direct launch always has one split; its
    workspaces are `out` itself)."""
    specs = []
    extra = {torch.float32: (256, 160), torch.bfloat16: (256, 160, 80), torch.float16: ()}
    block_size = 16
    for dtype, name in TRITON_DTYPE.items():
        head_dims = (64, 128) + extra[dtype]
        for head_dim, direct in itertools.product(head_dims, (False, True)):
            cfg = _config(capability, head_dim, dtype)
            width = padded_head_dim(head_dim)
            ptr = f"*{name}"
            splits = 1 if direct else choose_num_splits(_SPEC_BATCH, _SPEC_KV_HEADS, _SPEC_MAX_CONTEXT,
                                                        cfg["BLOCK_N"], _SPEC_SMS[capability])
            ws = ptr if direct else "*fp32"
            signature = {
                "q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "block_table_ptr": "*i32",
                "seq_lens_ptr": "*i32", "out_ptr": ptr, "m_ptr": ws, "l_ptr": ws,
                "acc_ptr": ws, "qk_scale": "fp32", "block_table_stride": "i32",
                "num_kv_heads": "i32", "num_splits": "i32", "GROUP": "constexpr",
                "BLOCK_H": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_SIZE": "constexpr",
                "BLOCK_N": "constexpr", "DIRECT": "constexpr", "HEAD_DIM_P2": "constexpr",
            }
            constexprs = {"GROUP": 4, "BLOCK_H": 16, "HEAD_DIM": head_dim, "BLOCK_SIZE": block_size,
                          "BLOCK_N": cfg["BLOCK_N"], "DIRECT": direct, "HEAD_DIM_P2": width}
            values = {"block_table_stride": _SPEC_MAX_CONTEXT // block_size, "num_kv_heads": _SPEC_KV_HEADS,
                      "num_splits": splits}
            specs.append({
                "name": f"decode_split_{name}_d{head_dim}_n{cfg['BLOCK_N']}{'_direct' if direct else ''}",
                "fn": _decode_split_kernel,
                **jit_specialized(_decode_split_kernel, signature, constexprs, values),
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            })
            if direct:
                continue
            specs.append({
                "name": f"decode_merge_{name}_d{head_dim}",
                "fn": _decode_merge_kernel,
                **jit_specialized(
                    _decode_merge_kernel,
                    {"out_ptr": ptr, "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
                     "num_splits": "i32", "HEAD_DIM": "constexpr", "SPLITS_P2": "constexpr",
                     "HEAD_DIM_P2": "constexpr"},
                    {"HEAD_DIM": head_dim, "SPLITS_P2": MAX_SPLITS, "HEAD_DIM_P2": width},
                    {"num_splits": splits}),
                "num_warps": 4, "num_stages": 1,
            })
    return specs
