// Helpers for the thin .cpp files that turn tensors into kernel arguments.
#pragma once

#include <ATen/ATen.h>

#include "../dropout/dropout_kernels.h"

namespace fastreg {

inline DType kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::Float64;
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": expected a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                       t.scalar_type());
  }
}

inline void check_strided(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor, got layout ", t.layout());
}

// A tensor whose elements fill one block of memory (any dimension order): kernels walk it
// linearly, and empty_like() of it has the same strides, so outputs keep the memory format.
inline at::Tensor memory_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(t.suggest_memory_format());
}

}  // namespace fastreg
