// Host-side plan of the paged GQA decode attention (decode_attention.cuh): parameters, launch
// geometry and the (dtype, head_dim, heads per CTA) dispatch. Plain C++ shared by the launcher
// (decode_attention.cu) and the CPU emulation harness (tests/support/decode_attention_emu.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "decode_attention_api.h"

namespace pf_decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadsPerCta = 8;
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* block_table;
  const int32_t* seq_lens;
  void* out;
  float* partial_o;    // [batch * q_heads * num_splits, D], normalised per split
  float* partial_lse;  // [batch * q_heads * num_splits], log2 domain; -inf for an empty split
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h;
  int64_t kv_stride_block, kv_stride_token, kv_stride_head, table_stride;
  int dtype, batch, q_heads, kv_heads, head_dim, max_blocks, num_splits;
  int group, heads_per_cta, head_chunks, block_shift;
  float qk_scale;  // scale * log2(e): scores live in the log2 domain, so exp2 is one instruction
};

// Query heads per CTA: the group rounded up to a power of two, at most 8 (larger groups take
// several chunks, which re-read K/V from L2 rather than hold 16+ accumulator rows per lane).
inline int heads_per_cta(int group) {
  int h = 1;
  while (h < group && h < kMaxHeadsPerCta) h *= 2;
  return h;
}

// Argument checks the launcher repeats after bindings.cpp (cheap, and the emulator has no torch).
inline int check_args(const PfDecodeArgs& a) {
  if (a.dtype != PF_DTYPE_FP16 && a.dtype != PF_DTYPE_BF16) return -1;
  if (a.head_dim != 64 && a.head_dim != 128) return -2;
  if (a.kv_heads < 1 || a.q_heads < 1 || a.q_heads % a.kv_heads) return -3;
  if (a.block_size < 1 || (a.block_size & (a.block_size - 1))) return -4;
  if (a.num_splits < 1 || a.num_splits > PF_DECODE_MAX_SPLITS) return -5;
  if (a.batch < 0 || a.max_blocks < 1) return -6;
  if (a.num_splits > 1 && a.workspace == nullptr) return -7;
  return 0;
}

inline DecodeParams make_params(const PfDecodeArgs& a) {
  DecodeParams p;
  p.q = a.q; p.k = a.k_cache; p.v = a.v_cache;
  p.block_table = a.block_table; p.seq_lens = a.seq_lens; p.out = a.out;
  const int64_t rows = int64_t(a.batch) * a.q_heads * a.num_splits;
  p.partial_o = a.workspace;
  p.partial_lse = a.workspace ? a.workspace + rows * a.head_dim : nullptr;
  p.q_stride_b = a.q_stride_b; p.q_stride_h = a.q_stride_h;
  p.out_stride_b = a.out_stride_b; p.out_stride_h = a.out_stride_h;
  p.kv_stride_block = a.kv_stride_block; p.kv_stride_token = a.kv_stride_token;
  p.kv_stride_head = a.kv_stride_head; p.table_stride = a.block_table_stride;
  p.dtype = a.dtype; p.batch = a.batch; p.q_heads = a.q_heads; p.kv_heads = a.kv_heads;
  p.head_dim = a.head_dim; p.max_blocks = a.max_blocks; p.num_splits = a.num_splits;
  p.group = a.q_heads / a.kv_heads;
  p.heads_per_cta = heads_per_cta(p.group);
  p.head_chunks = (p.group + p.heads_per_cta - 1) / p.heads_per_cta;
  p.block_shift = 0;
  while ((1 << p.block_shift) < a.block_size) ++p.block_shift;
  p.qk_scale = a.scale * kLog2e;
  return p;
}

template <int D, int HEADS>
struct SplitShape {
  static constexpr int kLanesPerKey = D / 8;              // 16 B of a row per lane
  static constexpr int kKeysPerLoad = 32 / kLanesPerKey;  // key slots of a warp
  // Loads in flight per lane per step, traded against the HEADS x 8 fp32 q and acc registers so
  // that kMinBlocks CTAs fit on an SM without spills (ptxas -v: 140-160 registers, 210-225 at 8
  // heads). 3 CTAs x 4 warps x 4-8 KiB per warp-step keep >= 48 KiB per SM in flight.
  static constexpr int kUnroll = HEADS >= 8 ? 2 : (HEADS >= 4 ? 4 : (HEADS >= 2 ? 6 : 8));
  static constexpr int kMinBlocks = HEADS >= 8 ? 2 : 3;
  static constexpr int kWarpKeys = kKeysPerLoad * kUnroll;
  static constexpr int kCtaKeys = kWarps * kWarpKeys;  // one step of the CTA; the split unit
};

template <int D>
struct MergeShape {
  static constexpr int kThreadsPerRow = D / 4;  // float4 each
  static constexpr int kRowsPerCta = kThreads / kThreadsPerRow;
};

// ---------------------------------------------------------------------------------------------
// host plan: launch geometry and the (dtype, D, heads) dispatch, shared with the emulator

template <typename T> struct TypeTag { using type = T; };
template <int N> struct IntTag { static constexpr int value = N; };

struct Grid3 { unsigned x, y, z; };

inline Grid3 split_grid(const DecodeParams& p) {
  return {unsigned(p.num_splits), unsigned(p.kv_heads * p.head_chunks), unsigned(p.batch)};
}

inline Grid3 merge_grid(const DecodeParams& p) {
  const int rows_per_cta = p.head_dim == 64 ? MergeShape<64>::kRowsPerCta : MergeShape<128>::kRowsPerCta;
  return {unsigned((p.batch * p.q_heads + rows_per_cta - 1) / rows_per_cta), 1u, 1u};
}

// Calls f(TypeTag<T>, IntTag<D>) for the params' dtype and head_dim; false if unsupported.
template <class F>
bool dispatch_type_dim(const DecodeParams& p, F&& f) {
  auto by_dim = [&](auto t) {
    if (p.head_dim == 64) return f(t, IntTag<64>{}), true;
    if (p.head_dim == 128) return f(t, IntTag<128>{}), true;
    return false;
  };
  if (p.dtype == PF_DTYPE_FP16) return by_dim(TypeTag<__half>{});
  if (p.dtype == PF_DTYPE_BF16) return by_dim(TypeTag<__nv_bfloat16>{});
  return false;
}

// Calls f(TypeTag<T>, IntTag<D>, IntTag<HEADS>) for the split kernel's instantiation.
template <class F>
bool dispatch_split(const DecodeParams& p, F&& f) {
  bool ok = false;
  dispatch_type_dim(p, [&](auto t, auto d) {
    switch (p.heads_per_cta) {
      case 1: f(t, d, IntTag<1>{}); ok = true; break;
      case 2: f(t, d, IntTag<2>{}); ok = true; break;
      case 4: f(t, d, IntTag<4>{}); ok = true; break;
      case 8: f(t, d, IntTag<8>{}); ok = true; break;
      default: break;
    }
  });
  return ok;
}

}  // namespace pf_decode
