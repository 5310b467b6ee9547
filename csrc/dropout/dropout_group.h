// One 8-element group of the CUDA dropout kernel (dropout_cuda.cu), forward or backward.
// It is written as host+device code so that a host build of the very same lines can be
// checked against the CPU kernel without a GPU (csrc/tests/test_dropout_cuda_group.cpp):
// tails, mask modes, the aligned and unaligned paths, in place.
//
// The includer declares, before this header, to_compute(T) and from_compute<T>(compute type)
// for the element types it instantiates: compute_type_cuda.cuh on the device, c10's
// conversions in the host test (both round to nearest even). A missing one fails to compile.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

#include "../common/compute_type.h"
#include "../common/host_device.h"
#include "dropout_kernels.h"

namespace fastreg {

// Eight elements as whole 16-byte words: 2 words for fp32, 1 for fp16/bf16, 4 for fp64.
template <typename T>
struct alignas(16) Group8 {
  T v[kDropoutGroup];
};

// A whole word (8 bool-mask bytes, a Group8) at an address the caller checked to be aligned
// for it: one wide access on the device; on the host a copy, as C++ aliasing rules require.
template <typename W>
FASTREG_HOST_DEVICE W load_word(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const W*>(p);
#else
  W word;
  std::memcpy(&word, p, sizeof(W));
  return word;
#endif
}

template <typename W>
FASTREG_HOST_DEVICE void store_word(void* p, const W& word) {
#if defined(__CUDA_ARCH__)
  *static_cast<W*>(p) = word;
#else
  std::memcpy(p, &word, sizeof(W));
#endif
}

// Whether dropout_group may take its Aligned path for these arguments.
inline bool dropout_groups_aligned(const DropoutArgs& args) {
  const auto misaligned = [](const void* p, uintptr_t alignment) {
    return (reinterpret_cast<uintptr_t>(p) & (alignment - 1)) != 0;
  };
  const bool bool_mask = args.mask != nullptr && args.mask_mode == MaskMode::Bool;
  return !misaligned(args.input, 16) && !misaligned(args.output, 16) && !(bool_mask && misaligned(args.mask, 8));
}

// Group g: elements [8g, min(8g + 8, n)). Backward=false: input -> output, writing the mask
// per args.mask_mode. Backward=true: grad_output -> grad_input, keep bits from the mask or
// regenerated. Aligned: input and output 16-byte aligned, a bool mask 8-byte aligned, so a
// full group moves as whole words. In place (output == input) each element is read once,
// here, before it is written.
template <typename T, bool Backward, bool Aligned>
FASTREG_HOST_DEVICE void dropout_group(const DropoutArgs& args, DropoutRngState rng,
                                       typename ComputeType<T>::type scale, int64_t g) {
  using A = typename ComputeType<T>::type;
  const T* in = static_cast<const T*>(args.input);
  T* out = static_cast<T*>(args.output);
  const int64_t n = args.n;
  const int64_t e0 = g * kDropoutGroup;
  const bool full = e0 + kDropoutGroup <= n;
  const uint32_t valid = full ? 0xFFu : ((1u << (n - e0)) - 1u);

  // A full group's input is loaded first, so that its memory latency overlaps the Philox rounds
  // (a dependent chain of multiplies) instead of following them. The compiler cannot move the
  // load up by itself: the mask stores below go through a uint8_t pointer, which may alias it.
  // In place this is still the one read of each element, before its write.
  Group8<T> x;
  if (Aligned && full) x = load_word<Group8<T>>(in + e0);

  uint32_t bits;
  if (!Backward || args.mask_mode == MaskMode::Regenerate) {
    bits = dropout_keep_bits(rng, static_cast<uint64_t>(g), args.threshold) & valid;
  } else if (args.mask_mode == MaskMode::Bits) {
    bits = args.mask[g];
  } else if (Aligned && full) {
    const uint64_t bytes = load_word<uint64_t>(args.mask + e0);
    bits = 0;
    FASTREG_UNROLL
    for (int j = 0; j < kDropoutGroup; ++j) bits |= static_cast<uint32_t>(((bytes >> (8 * j)) & 0xFFu) != 0) << j;
  } else {
    bits = 0;
    for (int j = 0; j < kDropoutGroup && e0 + j < n; ++j) bits |= static_cast<uint32_t>(args.mask[e0 + j] != 0) << j;
  }

  if (!Backward && args.mask_mode == MaskMode::Bits) {
    args.mask[g] = static_cast<uint8_t>(bits);
  } else if (!Backward && args.mask_mode == MaskMode::Bool) {
    if (Aligned && full) {
      uint64_t bytes = 0;
      FASTREG_UNROLL
      for (int j = 0; j < kDropoutGroup; ++j) bytes |= static_cast<uint64_t>((bits >> j) & 1u) << (8 * j);
      store_word(args.mask + e0, bytes);
    } else {
      for (int j = 0; j < kDropoutGroup && e0 + j < n; ++j) args.mask[e0 + j] = (bits >> j) & 1u;
    }
  }

  if (Aligned && full) {
    Group8<T> y;
    FASTREG_UNROLL
    for (int j = 0; j < kDropoutGroup; ++j) {
      y.v[j] = from_compute<T>(to_compute(x.v[j]) * (((bits >> j) & 1u) ? scale : A(0)));
    }
    store_word(out + e0, y);
  } else {
    for (int j = 0; j < kDropoutGroup && e0 + j < n; ++j) {
      out[e0 + j] = from_compute<T>(to_compute(in[e0 + j]) * (((bits >> j) & 1u) ? scale : A(0)));
    }
  }
}

}  // namespace fastreg
