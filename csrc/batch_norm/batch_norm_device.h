// Helpers of the CUDA batch-norm kernels that are plain C++ too (host+device, no CUDA headers):
// launch arithmetic, 16-byte packs, a fast divider. batch_norm_cuda.cuh brings them to the
// kernels; csrc/tests/ runs the kernels' per-thread code on the host with them.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/compute_type.h"
#include "../common/host_device.h"
#include "../common/rounded_math.h"
#include "batch_norm_kernels.h"

namespace fastreg {
namespace bn_cuda {

constexpr int kThreads = 256;  // every batch-norm kernel runs blocks of 256 threads
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTileThreads = 32;          // channels-last: threads along C per block
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

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

// V consecutive elements: one 16-byte access when Vector (V * sizeof(T) == 16 and p aligned),
// else V scalar accesses. Either way the same elements land in the same slots.
template <typename T, int V, bool Vector>
FASTREG_HOST_DEVICE void load_pack(const T* p, T (&v)[V]) {
  if constexpr (Vector) {
    static_assert(V * sizeof(T) == 16, "a vector pack is 16 bytes");
#if defined(__CUDA_ARCH__)
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(&v[0], &raw, sizeof(raw));
#else
    std::memcpy(&v[0], p, 16);
#endif
  } else {
    FASTREG_UNROLL
    for (int k = 0; k < V; ++k) v[k] = p[k];
  }
}

template <typename T, int V, bool Vector>
FASTREG_HOST_DEVICE void store_pack(T* p, const T (&v)[V]) {
  if constexpr (Vector) {
    static_assert(V * sizeof(T) == 16, "a vector pack is 16 bytes");
#if defined(__CUDA_ARCH__)
    uint4 raw;
    memcpy(&raw, &v[0], sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
#else
    std::memcpy(p, &v[0], 16);
#endif
  } else {
    FASTREG_UNROLL
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

  FASTREG_HOST_DEVICE uint64_t div(uint64_t n) const {
#if defined(__CUDA_ARCH__)
    return (__umul64hi(magic, n) + n) >> shift;
#else
    return (static_cast<uint64_t>((static_cast<unsigned __int128>(magic) * n) >> 64) + n) >> shift;
#endif
  }
};

}  // namespace bn_cuda
}  // namespace fastreg
