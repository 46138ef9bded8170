// Launcher of the paged GQA decode attention kernels (decode_attention.cuh) behind a C ABI.
// No torch headers here: the stream comes from Python as a raw cudaStream_t, so this file builds
// with nvcc alone and the launches are captured by CUDA graphs like any other work on the stream.
#include <cuda_runtime.h>

#include "decode_attention.cuh"

namespace {

// The extension may carry its own (static) CUDA runtime, whose current device is independent of
// torch's: make q's device current for the launch and restore the caller's afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device_) status_ = cudaSetDevice(device_);
  }
  ~DeviceScope() {
    if (status_ == cudaSuccess && previous_ != device_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int device_;
  int previous_ = -1;
  cudaError_t status_;
};

dim3 to_dim3(pf_decode::Grid3 g) { return dim3(g.x, g.y, g.z); }

}  // namespace

extern "C" int pf_gqa_decode_attention(const PfDecodeArgs* args, void* stream, int device) {
  using namespace pf_decode;
  if (args == nullptr) return -100;
  if (const int err = check_args(*args)) return err;
  if (args->batch == 0) return 0;
  DeviceScope scope(device);
  if (scope.status() != cudaSuccess) return scope.status();
  const DecodeParams p = make_params(*args);
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  const bool ok = dispatch_split(p, [&](auto t, auto d, auto h) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value, HEADS = decltype(h)::value;
    decode_split_kernel<T, D, HEADS><<<to_dim3(split_grid(p)), kThreads, 0, s>>>(p);
  });
  if (!ok) return -1;
  if (p.num_splits > 1) {
    dispatch_type_dim(p, [&](auto t, auto d) {
      using T = typename decltype(t)::type;
      decode_merge_kernel<T, decltype(d)::value><<<to_dim3(merge_grid(p)), kThreads, 0, s>>>(p);
    });
  }
  return cudaGetLastError();
}

extern "C" const char* pf_decode_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case -1: return "dtype must be float16 or bfloat16";
    case -2: return "head_dim must be 64 or 128";
    case -3: return "q_heads must be a positive multiple of kv_heads";
    case -4: return "block_size must be a power of two";
    case -5: return "num_splits must be in [1, 64]";
    case -6: return "batch must be >= 0 and the block table must have at least one column";
    case -7: return "num_splits > 1 needs a workspace";
    case -100: return "null argument struct";
    default: break;
  }
  return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown argument error";
}
