// torch bindings of the CUDA decode attention: schema, argument checks, and a call through the C
// ABI of decode_attention_api.h. Only torch/extension.h (no ATen/cuda, c10/cuda headers), so the
// extension builds and imports with a CPU-only torch; the launch stream is passed from Python.
#include <torch/extension.h>

#include "decode_attention_api.h"

namespace {

constexpr const char* kOp = "pixtral_fast::gqa_decode_attention_cuda";

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

void check_vector_rows(const at::Tensor& t, const char* name) {
  // Rows are read 16 bytes at a time.
  TORCH_CHECK(t.stride(-1) == 1, kOp, ": ", name, " must be contiguous in its last dimension");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0, kOp, ": ", name, " stride ", d, " (", t.stride(d),
                ") must be a multiple of 8 elements");
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, kOp, ": ", name, " must be 16-byte aligned");
}

void gqa_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                               int64_t num_splits, const at::Tensor& out, const at::Tensor& workspace,
                               int64_t stream) {
  check_tensor(q, "q", q);
  check_tensor(k_cache, "k_cache", q);
  check_tensor(v_cache, "v_cache", q);
  check_tensor(block_table, "block_table", q);
  check_tensor(seq_lens, "seq_lens", q);
  check_tensor(out, "out", q);
  check_tensor(workspace, "workspace", q);

  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
              ": q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3, kOp, ": q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, kOp, ": k_cache must be [num_blocks, block_size, kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(), kOp,
              ": k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(), " must have one shape and layout");
  for (const auto* t : {&k_cache, &v_cache, &out}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kOp, ": k_cache, v_cache and out must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(out.sizes() == q.sizes(), kOp, ": out ", out.sizes(), " must have q's shape ", q.sizes());
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, kOp, ": head_dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK(k_cache.size(3) == head_dim, kOp, ": k_cache head_dim ", k_cache.size(3), " != q head_dim ", head_dim);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, kOp, ": q heads (", q_heads,
              ") must be a multiple of k_cache heads (", kv_heads, ")");
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, kOp,
              ": block_size must be a power of two, got ", block_size);
  check_vector_rows(q, "q");
  check_vector_rows(k_cache, "k_cache");
  check_vector_rows(v_cache, "v_cache");
  check_vector_rows(out, "out");

  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == batch &&
                  block_table.size(1) > 0 && block_table.stride(1) == 1,
              kOp, ": block_table must be int32 [batch, max_blocks] with unit column stride, got ",
              block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == batch &&
                  seq_lens.is_contiguous(),
              kOp, ": seq_lens must be contiguous int32 [batch], got ", seq_lens.scalar_type(), " ", seq_lens.sizes());
  TORCH_CHECK(num_splits >= 1 && num_splits <= PF_DECODE_MAX_SPLITS, kOp, ": num_splits must be in [1, ",
              int(PF_DECODE_MAX_SPLITS), "], got ", num_splits);
  const int64_t ws_needed = num_splits > 1 ? batch * q_heads * num_splits * (head_dim + 1) : 0;
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() && workspace.numel() >= ws_needed,
              kOp, ": workspace must be contiguous float32 with at least ", ws_needed, " elements, got ",
              workspace.scalar_type(), " with ", workspace.numel());
  TORCH_CHECK(ws_needed == 0 || reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0, kOp,
              ": workspace must be 16-byte aligned");
  TORCH_CHECK(batch <= 65535, kOp, ": batch must be <= 65535, got ", batch);

  PfDecodeArgs a{};
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.workspace = ws_needed ? workspace.data_ptr<float>() : nullptr;
  a.dtype = q.scalar_type() == at::kHalf ? PF_DTYPE_FP16 : PF_DTYPE_BF16;
  a.batch = int32_t(batch);
  a.q_heads = int32_t(q_heads);
  a.kv_heads = int32_t(kv_heads);
  a.head_dim = int32_t(head_dim);
  a.block_size = int32_t(block_size);
  a.max_blocks = int32_t(block_table.size(1));
  a.num_splits = int32_t(num_splits);
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.out_stride_b = out.stride(0);
  a.out_stride_h = out.stride(1);
  a.kv_stride_block = k_cache.stride(0);
  a.kv_stride_token = k_cache.stride(1);
  a.kv_stride_head = k_cache.stride(2);
  a.block_table_stride = block_table.stride(0);
  a.scale = float(scale);
  const int rc = pf_gqa_decode_attention(&a, reinterpret_cast<void*>(stream), int(q.get_device()));
  TORCH_CHECK(rc == 0, kOp, ": launch failed: ", pf_decode_error_string(rc));
}

// Fake tensors: the op only writes its outputs in place.
void gqa_decode_attention_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, int64_t, const at::Tensor&, const at::Tensor&, int64_t) {}

}  // namespace

TORCH_LIBRARY(pixtral_fast, m) {
  m.def(
      "gqa_decode_attention_cuda(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor seq_lens, float scale, int num_splits, Tensor(a!) out, Tensor(b!) workspace, int stream) -> ()");
}

// CPU tensors reach the same checks, which name the first argument not on a CUDA device.
TORCH_LIBRARY_IMPL(pixtral_fast, CUDA, m) { m.impl("gqa_decode_attention_cuda", &gqa_decode_attention_cuda); }
TORCH_LIBRARY_IMPL(pixtral_fast, CPU, m) { m.impl("gqa_decode_attention_cuda", &gqa_decode_attention_cuda); }
TORCH_LIBRARY_IMPL(pixtral_fast, Meta, m) { m.impl("gqa_decode_attention_cuda", &gqa_decode_attention_meta); }

// `import pixtral_fast._C` loads the library (and so registers the op); it exports no functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "pixtral_fast CUDA kernels: see torch.ops.pixtral_fast"; }
