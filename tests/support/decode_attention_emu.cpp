// csrc/decode_attention.cuh's kernels run on the CPU through cuda_host_emu.h, behind the same C
// ABI (and the same plan and dispatch code) as the real launcher in csrc/decode_attention.cu.
// Built and loaded with ctypes by tests/test_cuda_ext.py:
//   g++ -std=c++20 -O2 -fno-strict-aliasing -shared -fPIC -pthread -I<cuda>/include -Icsrc ...
#include "cuda_host_emu.h"

#include "decode_attention.cuh"

extern "C" int pf_emu_gqa_decode_attention(const PfDecodeArgs* args) {
  using namespace pf_decode;
  if (const int err = check_args(*args)) return err;
  if (args->batch == 0) return 0;
  const DecodeParams p = make_params(*args);
  auto dim = [](Grid3 g) { return dim3(g.x, g.y, g.z); };
  const bool ok = dispatch_split(p, [&](auto t, auto d, auto h) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value, HEADS = decltype(h)::value;
    emu::launch(decode_split_kernel<T, D, HEADS>, dim(split_grid(p)), dim3(kThreads), p);
  });
  if (!ok) return -1;
  if (p.num_splits > 1) {
    dispatch_type_dim(p, [&](auto t, auto d) {
      using T = typename decltype(t)::type;
      emu::launch(decode_merge_kernel<T, decltype(d)::value>, dim(merge_grid(p)), dim3(kThreads), p);
    });
  }
  return 0;
}

// Geometry the Python side mirrors (pixtral_fast/_cuda_decode.py), exported for a consistency test.
extern "C" int pf_emu_heads_per_cta(int group) { return pf_decode::heads_per_cta(group); }
extern "C" int pf_emu_args_size() { return int(sizeof(PfDecodeArgs)); }
extern "C" int pf_emu_min_blocks(int heads) {
  using pf_decode::SplitShape;
  switch (heads) {
    case 1: return SplitShape<128, 1>::kMinBlocks;
    case 2: return SplitShape<128, 2>::kMinBlocks;
    case 4: return SplitShape<128, 4>::kMinBlocks;
    case 8: return SplitShape<128, 8>::kMinBlocks;
    default: return -1;
  }
}
