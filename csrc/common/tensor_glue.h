// Helpers for the thin .cpp files that turn tensors into kernel arguments.
#pragma once

#include <ATen/ATen.h>

#include <vector>

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

// The ops that overwrite a tensor record no backward: fastreg's wrappers that need one call
// them with grad mode off. Called directly, they refuse a tensor whose backward they would
// lose, as torch's in-place ops refuse a leaf that requires grad (fastreg/reference/in_place.py
// has the same check and message).
// The name comes in parts (e.g. "grads[", i, "]"), joined only when the check fails.
template <typename... NameParts>
void check_overwritable(const at::Tensor& t, const char* op, const char* differentiable_form, const NameParts&... name) {
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), op, ": overwrites ", name...,
              ", which requires grad here, and records no backward; use ", differentiable_form,
              ", or call it under torch.no_grad()");
}

// What torch's ADInplaceOrView kernels do for its own in-place ops, and a custom op does not
// get: autograd then refuses a backward that needs values saved before the overwrite.
inline void bump_version(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

// A tensor whose elements fill one block of memory (any dimension order): kernels walk it
// linearly, and empty_like() of it has the same strides, so outputs keep the memory format.
// Any other tensor (a slice with gaps, an expanded one) is copied into the layout empty_like()
// gives it, which keeps its order of dimensions (clone()'s default, preserve_format): the
// layout torch's own ops give their outputs. fastreg/memory_format.py has the same rule.
inline at::Tensor memory_dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.clone(); }

// memory_dense(t)'s strides, without copying anything.
inline std::vector<int64_t> memory_dense_strides(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t.strides().vec();
  return at::empty_like(t, t.options().device(at::kMeta)).strides().vec();
}

}  // namespace fastreg
