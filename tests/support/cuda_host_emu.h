// Host emulation of the small part of CUDA our kernels use, so that their unmodified source runs
// on the CPU (tests/test_cuda_ext.py): one std::thread per CUDA thread of a block, blocks one
// after another. threadIdx/blockIdx are thread_local; __syncthreads is a std::barrier over the
// block; __shfl_xor_sync goes through a per-warp exchange array between two warp barriers, so it
// is exact for full-warp (mask 0xffffffff), convergent shuffles, which is all the kernels use.
// __shared__ variables become function statics: one block runs at a time. Half/bf16 conversions
// are the host versions from cuda_fp16.h / cuda_bf16.h (round to nearest even, as on the GPU);
// exp2f/log2f are the C library's, more exact than the GPU's 2-ulp ones.
// Not emulated: memory ordering between warps without __syncthreads, divergent shuffles, timing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

// cuda_fp16.h defines the execution-space keywords as empty for host compilers; the kernels
// also need these.
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

struct BlockState {
  explicit BlockState(unsigned threads)
      : block(threads), xch((threads + 31) / 32) {
    if (threads % 32) throw std::invalid_argument("emulated blocks must be whole warps");
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<uint64_t, 32>> xch;
};

inline thread_local BlockState* tl_block = nullptr;

// Runs kernel<<<grid, block>>>(args...) to completion.
template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, const Args&... args) {
  if (block.y != 1 || block.z != 1) throw std::invalid_argument("1-D blocks only");
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        BlockState state(block.x);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t, x, y, z] {
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{x, y, z};
            tl_block = &state;
            kernel(args...);
          });
        }
        for (auto& th : threads) th.join();
      }
}

}  // namespace emu

inline void __syncthreads() { emu::tl_block->block.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled value too wide");
  if (mask != 0xffffffffu || width != 32) throw std::logic_error("emulator: full-warp shuffles only");
  emu::BlockState& s = *emu::tl_block;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::memcpy(&s.xch[warp][lane], &value, sizeof(T));
  s.warps[warp]->arrive_and_wait();
  T other;
  std::memcpy(&other, &s.xch[warp][(lane ^ unsigned(lane_mask)) & 31u], sizeof(T));
  s.warps[warp]->arrive_and_wait();  // nobody overwrites the slot before every lane has read it
  return other;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}
