// Fixed-order sums of two doubles across a warp and a block: the same inputs give the same
// bits on every run (no atomics, no order that depends on scheduling). Used by the reductions
// of the weight penalty and of batch norm.
#pragma once

namespace fastreg {

// Lane 0 gets the sums over the warp's 32 lanes.
__device__ __forceinline__ void warp_sum(double& a, double& b) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
}

// Thread 0 gets the sums over the block; every thread of the block must call it.
template <int kBlockThreads>
__device__ __forceinline__ void block_sum(double& a, double& b) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads <= 1024, "whole warps, at most 32");
  constexpr int kWarpsPerBlock = kBlockThreads / 32;
  __shared__ double warp_a[kWarpsPerBlock], warp_b[kWarpsPerBlock];
  warp_sum(a, b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_a[warp] = a;
    warp_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarpsPerBlock ? warp_a[lane] : 0.0;
    b = lane < kWarpsPerBlock ? warp_b[lane] : 0.0;
    warp_sum(a, b);
  }
}

}  // namespace fastreg
