// What the tests of host+device kernel code (dropout_group.h, weight_penalty_chunk.h) need on
// the host: the element conversions compute_type_cuda.cuh gives the device (c10's here; both
// widen exactly and narrow to nearest even), and buffers with guard bytes at a chosen alignment.
// Include it before those headers: they look the conversions up where they are defined.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/compute_type.h"

namespace fastreg {
inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(c10::Half x) { return static_cast<float>(x); }
inline float to_compute(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
T from_compute(typename ComputeType<T>::type x) {
  return static_cast<T>(x);
}
}  // namespace fastreg

namespace fastreg_test {

// Bytes with kGuard guard bytes on each side that nothing may write; at(offset) is `offset`
// bytes past a 64-byte aligned start, so the same offsets give the same alignment in every buffer.
struct GuardedBuffer {
  static constexpr size_t kGuard = 32;
  static constexpr uint8_t kFill = 0xA5;
  std::vector<uint8_t> bytes;
  size_t size;
  explicit GuardedBuffer(size_t size_) : bytes(size_ + 2 * kGuard + 128, kFill), size(size_) {}
  uint8_t* at(size_t offset) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(bytes.data()) + kGuard;
    return reinterpret_cast<uint8_t*>((base + 63) / 64 * 64 + offset);
  }
  // The data (offsets up to 64) with the guard bytes around it, whatever the allocation's address.
  std::vector<uint8_t> window() { return std::vector<uint8_t>(at(0) - kGuard, at(0) + size + 64 + kGuard); }
};

}  // namespace fastreg_test
