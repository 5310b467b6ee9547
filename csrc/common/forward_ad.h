// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) carries a tangent in a tensor's
// autograd metadata. An autograd kernel that sends a call without a gradient to record straight
// to its kernel would drop that tangent without a word: these find it, and refuse it for ops
// that do not propagate tangents.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastreg {

// Strided tensors only: reading a sparse tensor's tangent trips an internal assert in torch, and
// the kernels refuse sparse inputs with their own message anyway.
inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && t._fw_grad(/*level=*/0).defined();
}
inline bool has_tangent(const std::optional<at::Tensor>& t) { return t.has_value() && has_tangent(*t); }
inline bool has_tangent(at::TensorList ts) {
  for (const at::Tensor& t : ts) {
    if (has_tangent(t)) return true;
  }
  return false;
}

template <typename... Tensors>
void refuse_tangents(const char* op, const Tensors&... tensors) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(has_tangent(tensors) || ...), op,
                              ": forward-mode AD is not supported (an input carries a tangent); "
                              "use reverse mode (backward, torch.autograd.grad)");
}

}  // namespace fastreg
