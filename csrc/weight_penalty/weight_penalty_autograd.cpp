// Autograd of fastreg::weight_penalty_value in C++, for the compiled kernels: the formula of
// fastreg/ops/weight_penalty.py, registered to the runtime keys AutogradCPU and AutogradCUDA,
// which take precedence over the Python one (the Autograd alias key) wherever this library is
// loaded. Why: see csrc/dropout/dropout_autograd.cpp. The Python kernel handles each of the
// list's tensors in Python (flattening the inputs, saving them, routing their gradients):
// fastreg.weight_penalty forward + backward over 161 two-element tensors took 1050-1064 us of
// host time on the 2-core VM, 675-680 us with this file (forward 266-323 -> 117-119 us), where
// an H100 needs about 0.2 ms for ResNet-50's 25.6M parameters at its memory bound (an
// estimate). weight_penalty_backward keeps its Python autograd: only a double backward
// (gradient penalties) reaches it.
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "../common/forward_ad.h"
#include "../common/op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ValueSig = at::Tensor(at::TensorList, double, double);
using BackwardSig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, double, double);

const c10::TypedOperatorHandle<ValueSig>& value_op() {
  static const auto handle = fastreg_op<ValueSig>("fastreg::weight_penalty_value");
  return handle;
}
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto handle = fastreg_op<BackwardSig>("fastreg::weight_penalty_backward");
  return handle;
}

struct WeightPenaltyValueFunction : torch::autograd::Function<WeightPenaltyValueFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList params, double l1, double l2) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor value = value_op().call(params, l1, l2);
    ctx->save_for_backward(params.vec());
    ctx->saved_data["l1"] = l1;
    ctx->saved_data["l2"] = l2;
    return value;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list params = ctx->get_saved_variables();
    // One gradient per parameter, then none for l1 and l2.
    variable_list out(params.size() + 2);
    if (!grads[0].defined()) return out;
    const double l1 = ctx->saved_data["l1"].toDouble(), l2 = ctx->saved_data["l2"].toDouble();
    std::vector<at::Tensor> param_grads;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: through the Python autograd of weight_penalty_backward, which
      // records the double backward.
      param_grads = backward_op().call(grads[0], params, l1, l2);
    } else {
      // Nothing to record: straight to the kernel, not through that Python autograd kernel,
      // which would only pass the call on (after walking the list in Python).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      param_grads = backward_op().call(grads[0], params, l1, l2);
    }
    std::move(param_grads.begin(), param_grads.end(), out.begin());
    return out;
  }
};

// Without a gradient to record, the op goes straight to its kernel (see dropout_autograd.cpp).
at::Tensor value_autograd(at::TensorList params, double l1, double l2) {
  refuse_tangents("fastreg.weight_penalty_value", params);
  bool any_requires_grad = false;
  for (const at::Tensor& p : params) any_requires_grad = any_requires_grad || p.requires_grad();
  if (!at::GradMode::is_enabled() || !any_requires_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return value_op().call(params, l1, l2);
  }
  return WeightPenaltyValueFunction::apply(params, l1, l2);
}

void register_weight_penalty_autograd(torch::Library& m) { m.impl("weight_penalty_value", &value_autograd); }

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, AutogradCPU, m) { register_weight_penalty_autograd(m); }
TORCH_LIBRARY_IMPL(fastreg, AutogradCUDA, m) { register_weight_penalty_autograd(m); }

}  // namespace fastreg
