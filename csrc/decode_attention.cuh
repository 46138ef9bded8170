// Paged GQA decode attention (flash-decoding), CUDA device code; its launch plan is in
// decode_plan.h, its launcher in decode_attention.cu.
//
// One CTA owns (split, KV head, chunk of its query heads, sequence). Each 16-byte load of a K or
// V row serves every query head of the chunk, so NeMo's 32/8 heads read each K/V byte from HBM
// once. Inside a warp, a key row is spread over D/8 lanes (16 B each); the warp covers 32/(D/8)
// keys per load and kUnroll loads per step, all issued before any arithmetic so that a step keeps
// 4-8 KiB per warp in flight. Each lane group (the lanes of one key slot) runs its own online
// softmax in fp32; groups merge by shuffles and warps through shared memory at the end.
// Splits divide the sequence's own tiles (from seq_lens, on the device), so the grid depends only
// on shapes and CUDA graphs replay with new lengths; empty splits write a neutral partial.
#pragma once

#include <math.h>

#include "decode_plan.h"

namespace pf_decode {

// ---------------------------------------------------------------------------------------------
// element helpers

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void store4(__half* dst, const float (&f)[4]) {
  __half2 h[2] = {__floats2half2_rn(f[0], f[1]), __floats2half2_rn(f[2], f[3])};
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(h);
}

__device__ __forceinline__ void store4(__nv_bfloat16* dst, const float (&f)[4]) {
  __nv_bfloat162 h[2] = {__floats2bfloat162_rn(f[0], f[1]), __floats2bfloat162_rn(f[2], f[3])};
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(h);
}

// Merges softmax state (m, l, acc) with another one; m == -inf marks "saw no key".
template <int N>
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[N], float m_o, float l_o,
                                            const float (&acc_o)[N]) {
  const float m_new = fmaxf(m, m_o);
  const float m_ref = m_new == -INFINITY ? 0.f : m_new;
  const float a = exp2f(m - m_ref), c = exp2f(m_o - m_ref);
  l = l * a + l_o * c;
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] = acc[j] * a + acc_o[j] * c;
  m = m_new;
}

// ---------------------------------------------------------------------------------------------
// kernels

// Grid (num_splits, kv_heads * head_chunks, batch), kThreads threads.
template <typename T, int D, int HEADS>
__global__ void __launch_bounds__(kThreads, (SplitShape<D, HEADS>::kMinBlocks))
    decode_split_kernel(const DecodeParams p) {
  using S = SplitShape<D, HEADS>;
  constexpr int LPK = S::kLanesPerKey, KPL = S::kKeysPerLoad, U = S::kUnroll;

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.head_chunks;
  const int head0 = kv_head * p.group + (blockIdx.y - kv_head * p.head_chunks) * HEADS;
  const int nheads = imin(HEADS, (kv_head + 1) * p.group - head0);
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / LPK, dlane = lane % LPK;

  // Clamped to the table's capacity: a bad length must not send us past the row.
  const int seq_len = imax(0, imin(p.seq_lens[b], p.max_blocks << p.block_shift));
  const int n_tiles = (seq_len + S::kCtaKeys - 1) / S::kCtaKeys;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int key_begin = split * per_split * S::kCtaKeys;
  const int key_end = imin(seq_len, key_begin + per_split * S::kCtaKeys);
  const int64_t row0 = int64_t(b) * p.q_heads + head0;  // (b, head0) row of partials

  if (key_begin >= key_end) {  // block-uniform: nothing to read
    if (p.num_splits > 1) {
      if (threadIdx.x < nheads) p.partial_lse[(row0 + threadIdx.x) * p.num_splits + split] = -INFINITY;
    } else {  // seq_len 0 (a padded slot): zeros rather than NaN
      for (int i = threadIdx.x; i < nheads * (D / 4); i += kThreads) {
        const float zero[4] = {0.f, 0.f, 0.f, 0.f};
        store4(static_cast<T*>(p.out) + b * p.out_stride_b + (head0 + i / (D / 4)) * p.out_stride_h +
                   (i % (D / 4)) * 4, zero);
      }
    }
    return;
  }

  float q[HEADS][8];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    if (h < nheads) {
      const T* src = static_cast<const T*>(p.q) + b * p.q_stride_b + (head0 + h) * p.q_stride_h + dlane * 8;
      unpack8(__ldg(reinterpret_cast<const uint4*>(src)), q[h], T());
#pragma unroll
      for (int j = 0; j < 8; ++j) q[h][j] *= p.qk_scale;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) q[h][j] = 0.f;
    }
  }

  float m[HEADS], l[HEADS], acc[HEADS][8];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[h][j] = 0.f;
  }

  const T* k_base = static_cast<const T*>(p.k) + kv_head * p.kv_stride_head + dlane * 8;
  const T* v_base = static_cast<const T*>(p.v) + kv_head * p.kv_stride_head + dlane * 8;
  const int32_t* table = p.block_table + b * p.table_stride;
  const int token_mask = (1 << p.block_shift) - 1;

  // Page ids of the next step are fetched while this step's K/V are in flight. Table entries
  // past the sequence may be garbage: they are neither loaded nor used.
  int page[U];
  const int first = key_begin + warp * S::kWarpKeys + slot;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int key = first + u * KPL;
    page[u] = key < key_end ? __ldg(table + (key >> p.block_shift)) : 0;
  }

  for (int base = key_begin + warp * S::kWarpKeys; base < key_end; base += S::kCtaKeys) {
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + slot + u * KPL;
      kr[u] = vr[u] = uint4{0u, 0u, 0u, 0u};
      if (key < key_end) {
        const int64_t off = int64_t(page[u]) * p.kv_stride_block + (key & token_mask) * p.kv_stride_token;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(k_base + off));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(v_base + off));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + S::kCtaKeys + slot + u * KPL;
      page[u] = key < key_end ? __ldg(table + (key >> p.block_shift)) : 0;
    }

    float s[HEADS][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8(kr[u], kf, T());
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) dot = fmaf(q[h][j], kf[j], dot);
        s[h][u] = dot;
      }
    }
    // Sum over the lanes of each key slot: every lane ends with the same score.
#pragma unroll
    for (int off = LPK / 2; off >= 1; off /= 2) {
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
#pragma unroll
        for (int u = 0; u < U; ++u) s[h][u] += __shfl_xor_sync(0xffffffffu, s[h][u], off);
      }
    }

#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (base + slot + u * KPL >= key_end) s[h][u] = -INFINITY;
        mx = fmaxf(mx, s[h][u]);
      }
      const float m_new = fmaxf(m[h], mx);
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // a slot that has seen no key yet
      const float alpha = exp2f(m[h] - m_ref);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[h][u] = exp2f(s[h][u] - m_ref);
        sum += s[h][u];
      }
      l[h] = l[h] * alpha + sum;
      m[h] = m_new;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[h][j] *= alpha;
    }

#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      unpack8(vr[u], vf, T());
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[h][j] = fmaf(s[h][u], vf[j], acc[h][j]);
      }
    }
  }

  // Key slots of the warp merge by shuffles (lanes dlane of every slot hold the same dims).
#pragma unroll
  for (int off = LPK; off < 32; off *= 2) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float acc_o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc_o[j] = __shfl_xor_sync(0xffffffffu, acc[h][j], off);
      const float m_o = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[h], off);
      merge_state(m[h], l[h], acc[h], m_o, l_o, acc_o);
    }
  }

  // Warps merge through shared memory.
  __shared__ float s_acc[kWarps][HEADS][D];
  __shared__ float s_m[kWarps][HEADS], s_l[kWarps][HEADS];
  if (slot == 0) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s_acc[warp][h][dlane * 8 + j] = acc[h][j];
      if (dlane == 0) {
        s_m[warp][h] = m[h];
        s_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < nheads * (D / 4); i += kThreads) {
    const int h = i / (D / 4), d = (i % (D / 4)) * 4;
    float mw = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mw = fmaxf(mw, s_m[w][h]);
    float lw = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = exp2f(s_m[w][h] - mw);  // the range is non-empty, so mw is finite
      lw += s_l[w][h] * c;
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] += s_acc[w][h][d + j] * c;
    }
    const float inv = 1.f / lw;
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] *= inv;
    if (p.num_splits == 1) {
      store4(static_cast<T*>(p.out) + b * p.out_stride_b + (head0 + h) * p.out_stride_h + d, o);
    } else {
      const int64_t row = (row0 + h) * p.num_splits + split;
      *reinterpret_cast<float4*>(p.partial_o + row * D + d) = float4{o[0], o[1], o[2], o[3]};
      if (d == 0) p.partial_lse[row] = mw + log2f(lw);
    }
  }
}

// Grid ceil(batch * q_heads / kRowsPerCta), kThreads threads: weighs each split's normalised
// partial by exp2(lse - max); empty splits (-inf) are skipped, so their o is never read.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeParams p) {
  using S = MergeShape<D>;
  const int row = blockIdx.x * S::kRowsPerCta + threadIdx.x / S::kThreadsPerRow;
  const int d = (threadIdx.x % S::kThreadsPerRow) * 4;
  if (row >= p.batch * p.q_heads) return;
  const int n = p.num_splits;
  const float* lse = p.partial_lse + int64_t(row) * n;
  float mx = -INFINITY;
  for (int s = 0; s < n; ++s) mx = fmaxf(mx, lse[s]);
  float o[4] = {0.f, 0.f, 0.f, 0.f}, sum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < n; ++s) {
      const float w = lse[s];
      if (w == -INFINITY) continue;
      const float c = exp2f(w - mx);
      const float4 v = *reinterpret_cast<const float4*>(p.partial_o + (int64_t(row) * n + s) * D + d);
      sum += c;
      o[0] += c * v.x; o[1] += c * v.y; o[2] += c * v.z; o[3] += c * v.w;
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) o[j] *= inv;
  const int b = row / p.q_heads, h = row - b * p.q_heads;
  store4(static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h + d, o);
}

}  // namespace pf_decode
