// One thread's share of a chunk in the CUDA weight-penalty kernel (weight_penalty_cuda.cu).
// Written as host+device code so that a host build of the very same lines can be checked
// against the CPU kernel without a GPU (csrc/tests/test_weight_penalty_cuda_chunk.cpp): the
// gradients bit for bit, the sums to rounding, over tails and misaligned tensors.
//
// The includer declares, before this header, to_compute(T) and from_compute<T>(compute type)
// for the element types it instantiates: compute_type_cuda.cuh on the device, c10's
// conversions in the host test. A host build must not contract a * b + c into a fused
// multiply-add (the device uses explicitly rounded intrinsics): the test turns contraction off.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/compute_type.h"
#include "../common/host_device.h"
#include "../common/rounded_math.h"  // mul_rn, add_rn: no FMA, so gradients have autograd's bits
#include "weight_penalty_coefficients.h"
#include "weight_penalty_kernels.h"

namespace fastreg {

constexpr int kPenaltyThreads = 256;  // threads per block, one block per chunk
constexpr int kPenaltyUnroll = 4;     // 16-byte packs per thread in flight: enough bytes in the air for HBM

template <typename A>
FASTREG_HOST_DEVICE A penalty_sign(A x) {
  return static_cast<A>(x > A(0)) - static_cast<A>(x < A(0));  // 0 for +-0 and NaN, like torch.sign
}

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Pack `index` of a chunk of `len` elements: one 16-byte access when whole and aligned, else
// element by element (missing elements read as 0 and are never written).
template <typename T>
FASTREG_HOST_DEVICE void load_pack(const T* p, int64_t index, int64_t len, bool aligned, Pack<T>& pack) {
  constexpr int V = Pack<T>::kSize;
  const int64_t e = index * V;
  if (aligned && e + V <= len) {
#if defined(__CUDA_ARCH__)
    const uint4 raw = *reinterpret_cast<const uint4*>(p + e);  // one 128-bit load, whatever T is
    memcpy(&pack, &raw, sizeof(raw));
#else
    std::memcpy(&pack, p + e, sizeof(pack));
#endif
  } else {
    FASTREG_UNROLL
    for (int k = 0; k < V; ++k) pack.v[k] = e + k < len ? p[e + k] : from_compute<T>(0);
  }
}

template <typename T>
FASTREG_HOST_DEVICE void store_pack(T* p, int64_t index, int64_t len, bool aligned, const Pack<T>& pack) {
  constexpr int V = Pack<T>::kSize;
  const int64_t e = index * V;
  if (aligned && e + V <= len) {
#if defined(__CUDA_ARCH__)
    uint4 raw;
    memcpy(&raw, &pack, sizeof(raw));
    *reinterpret_cast<uint4*>(p + e) = raw;
#else
    std::memcpy(p + e, &pack, sizeof(pack));
#endif
  } else {
    FASTREG_UNROLL
    for (int k = 0; k < V; ++k) {
      if (e + k < len) p[e + k] = pack.v[k];
    }
  }
}

// One chunk of `len` elements: `thread` (of kPenaltyThreads) handles packs thread,
// thread + kPenaltyThreads, ... in increasing order, kPenaltyUnroll at a time, adding its
// share of S1 = sum |w| and S2 = sum w^2 to s1, s2 and updating g per the mode.
template <typename T, PenaltyMode M>
FASTREG_HOST_DEVICE void penalty_chunk(const T* __restrict__ w, T* __restrict__ g, int64_t len,
                                       typename ComputeType<T>::type c1, typename ComputeType<T>::type c2x2, double& s1,
                                       double& s2, uint32_t thread) {
  using A = typename ComputeType<T>::type;
  constexpr int V = Pack<T>::kSize;
  const int64_t packs = (len + V - 1) / V;
  const bool aligned = ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(g)) & 15) == 0;
  for (int64_t base = thread; base < packs; base += int64_t{kPenaltyUnroll} * kPenaltyThreads) {
    Pack<T> wp[kPenaltyUnroll], gp[kPenaltyUnroll];
    FASTREG_UNROLL
    for (int u = 0; u < kPenaltyUnroll; ++u) {  // all loads first: kPenaltyUnroll independent requests in flight
      const int64_t index = base + int64_t{u} * kPenaltyThreads;
      if (index < packs) {
        load_pack(w, index, len, aligned, wp[u]);
        if constexpr (M == PenaltyMode::Accumulate) load_pack(g, index, len, aligned, gp[u]);
      }
    }
    A t1 = 0, t2 = 0;
    FASTREG_UNROLL
    for (int u = 0; u < kPenaltyUnroll; ++u) {
      const int64_t index = base + int64_t{u} * kPenaltyThreads;
      if (index >= packs) continue;
      FASTREG_UNROLL
      for (int k = 0; k < V; ++k) {
        if (index * V + k >= len) continue;
        const A x = to_compute(wp[u].v[k]);
        if constexpr (M != PenaltyMode::Backward) {
          t1 = add_rn(t1, x < A(0) ? -x : x);
          t2 = add_rn(t2, mul_rn(x, x));
        }
        if constexpr (M != PenaltyMode::Value) {
          const A step = add_rn(mul_rn(c1, penalty_sign(x)), mul_rn(c2x2, x));
          const A out = M == PenaltyMode::Accumulate ? add_rn(to_compute(gp[u].v[k]), step) : step;
          gp[u].v[k] = from_compute<T>(out);
        }
      }
      if constexpr (M != PenaltyMode::Value) store_pack(g, index, len, aligned, gp[u]);
    }
    s1 += t1;  // short fp32 runs, then double: tiny rounding error at no bandwidth cost
    s2 += t2;
  }
}

}  // namespace fastreg
