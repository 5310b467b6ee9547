// Device helpers shared by the CUDA batch-norm kernels (batch_norm_reduce_cuda.cu,
// batch_norm_elemt_cuda.cu). Framework-free: CUDA runtime and the project's conversions only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../common/compute_type_cuda.cuh"
#include "batch_norm_kernels.h"

namespace fastreg {
namespace bn_cuda {

constexpr int kThreads = 256;  // every batch-norm kernel runs blocks of 256 threads
constexpr int kWarps = kThreads / 32;

template <typename T>
using Acc = typename ComputeType<T>::type;

// Elements of T in one 16-byte pack.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

inline int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    case DType::Float16:
    case DType::BFloat16: return 2;
  }
  return 4;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest l with 2^l >= v (v >= 1).
inline int ceil_log2(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// Explicitly rounded arithmetic: no contraction into FMA, so element-wise results have the
// reference's bits (it rounds every product and sum in the compute type).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// V consecutive elements: one 16-byte access when Vector (V * sizeof(T) == 16 and p aligned),
// else V scalar accesses. Either way the same elements land in the same slots.
template <typename T, int V, bool Vector>
__device__ __forceinline__ void load_pack(const T* p, T (&v)[V]) {
  if constexpr (Vector) {
    static_assert(V * sizeof(T) == 16, "a vector pack is 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(&v[0], &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = p[k];
  }
}

template <typename T, int V, bool Vector>
__device__ __forceinline__ void store_pack(T* p, const T (&v)[V]) {
  if constexpr (Vector) {
    static_assert(V * sizeof(T) == 16, "a vector pack is 16 bytes");
    uint4 raw;
    memcpy(&raw, &v[0], sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = v[k];
  }
}

// Unsigned 64-bit division by a divisor fixed at launch: q = (umulhi(m, n) + n) >> l, the
// round-up multiply of Granlund & Montgomery (1994), with l = ceil(log2 d) and
// m = floor(2^64 (2^l - d) / d) + 1. Exact for every n < 2^63 (the sum cannot overflow)
// and 1 <= d < 2^62.
struct DivU64 {
  uint64_t divisor;
  uint64_t magic;
  uint32_t shift;

  static DivU64 make(uint64_t d) {
    DivU64 r{};
    r.divisor = d;
    r.shift = 0;
    while ((uint64_t{1} << r.shift) < d) ++r.shift;
    const unsigned __int128 numerator = static_cast<unsigned __int128>((uint64_t{1} << r.shift) - d) << 64;
    r.magic = static_cast<uint64_t>(numerator / d) + 1;
    return r;
  }

  __host__ __device__ __forceinline__ uint64_t div(uint64_t n) const {
#if defined(__CUDA_ARCH__)
    return (__umul64hi(magic, n) + n) >> shift;
#else
    return (static_cast<uint64_t>((static_cast<unsigned __int128>(magic) * n) >> 64) + n) >> shift;
#endif
  }
};

}  // namespace bn_cuda
}  // namespace fastreg
