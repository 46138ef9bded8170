// The C ABI between bindings.cpp (built by the host compiler against torch, no CUDA headers) and
// decode_attention.cu (built by nvcc, no torch headers). Plain C so that both sides, and the host
// emulation harness in tests/support, agree on one layout.
#ifndef PIXTRAL_FAST_DECODE_ATTENTION_API_H_
#define PIXTRAL_FAST_DECODE_ATTENTION_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { PF_DTYPE_FP16 = 0, PF_DTYPE_BF16 = 1 };
enum { PF_DECODE_MAX_SPLITS = 64 };

// Strides are in elements. K and V caches share one layout [num_blocks, block_size, kv_heads, D].
typedef struct PfDecodeArgs {
  const void* q;               // [batch, q_heads, head_dim]
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_table;  // [batch, max_blocks]
  const int32_t* seq_lens;     // [batch], read on the device only
  void* out;                   // [batch, q_heads, head_dim]
  float* workspace;            // num_splits > 1: batch*q_heads*num_splits*(head_dim + 1) floats
  int32_t dtype;               // PF_DTYPE_*
  int32_t batch, q_heads, kv_heads, head_dim, block_size, max_blocks, num_splits;
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h;
  int64_t kv_stride_block, kv_stride_token, kv_stride_head;
  int64_t block_table_stride;
  float scale;
} PfDecodeArgs;

// 0 on success; > 0 a cudaError_t; < 0 an argument error. pf_decode_error_string explains either.
int pf_gqa_decode_attention(const PfDecodeArgs* args, void* stream, int device);
const char* pf_decode_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif  // PIXTRAL_FAST_DECODE_ATTENTION_API_H_
