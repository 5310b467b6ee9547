// Autograd of fastreg::weight_penalty_value in C++, for the compiled kernels: the formula of
// fastreg/ops/weight_penalty.py, registered to the runtime keys AutogradCPU and AutogradCUDA,
// which take precedence over the Python one (the Autograd alias key) wherever this library is
// loaded. Why: see csrc/dropout/dropout_autograd.cpp. The Python kernel handles each of the
// list's tensors in Python (flattening the inputs, saving them, routing their gradients):
// fastreg.weight_penalty forward + backward over 161 two-element tensors took 1050-1064 us of
// host time on the 2-core VM, 675-680 us with this file (forward 266-323 -> 117-119 us), where
// an H100 needs about 0.2 ms for ResNet-50's 25.6M parameters at its memory bound (an
// estimate). weight_penalty_backward keeps its Python autograd: only a double backward
// (gradient penalties) reaches it. The node is hand-written (common/autograd_node.h) so that
// compiled autograd traces it; the Function it replaced ran eagerly behind a graph break. Host
// time did not move beyond the VM's noise (best of 8 runs, 161 tensors: forward 115.6 ->
// 96.9 us, forward + backward 698 -> 653 us).
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <vector>

#include "../common/autograd_node.h"
#include "../common/forward_ad.h"
#include "../common/op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::SavedVariable;
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

// One gradient per parameter, from one weight_penalty_backward.
variable_list penalty_grads(const at::Tensor& grad_value, at::TensorList params, double l1, double l2) {
  if (!grad_value.defined()) return variable_list(params.size());
  if (at::GradMode::is_enabled()) {
    // create_graph=True: through the Python autograd of weight_penalty_backward, which records
    // the double backward.
    return backward_op().call(grad_value, params, l1, l2);
  }
  // Nothing to record: straight to the kernel, not through that Python autograd kernel, which
  // would only pass the call on (after walking the list in Python).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return backward_op().call(grad_value, params, l1, l2);
}

#if FASTREG_COMPILED_AUTOGRAD
// Compiled autograd's form of the node's backward: state is (params, l1, l2).
variable_list penalty_grads_functional(const variable_list& grads, const std::vector<c10::IValue>& state) {
  return penalty_grads(grads[0], state[0].toTensorVector(), state[1].toDouble(), state[2].toDouble());
}
#endif  // FASTREG_COMPILED_AUTOGRAD

// The backward of weight_penalty_value, hand-written (common/autograd_node.h), with an edge
// to each parameter.
struct WeightPenaltyGradNode final : torch::autograd::Node {
  WeightPenaltyGradNode(at::TensorList params, double l1, double l2) : l1_(l1), l2_(l2) {
    params_.reserve(params.size());
    for (const at::Tensor& p : params) params_.emplace_back(p, /*is_output=*/false);
  }

  std::string name() const override { return "fastreg::WeightPenaltyBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // a retained graph may run backward on several threads
    // unpack() raises torch's "backward through the graph a second time" once released
    return penalty_grads(grads[0], unpack(), l1_, l2_);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& p : params_) p.reset_data();
  }

#if FASTREG_COMPILED_AUTOGRAD
  // Compiled autograd: what its cached graph depends on, then the backward recorded as a call
  // of penalty_grads_functional.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(params_, /*is_output=*/false);
    args.collect(l1_);
    args.collect(l2_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    swap.before(params_);
    const std::vector<c10::IValue> state{c10::IValue(unpack()), l1_, l2_};
    variable_list result = record_functional_backward(*this, swap, &penalty_grads_functional, grads, state);
    swap.after(params_);
    return result;
  }
#endif  // FASTREG_COMPILED_AUTOGRAD

 private:
  std::vector<at::Tensor> unpack() {
    std::vector<at::Tensor> params;
    params.reserve(params_.size());
    for (SavedVariable& p : params_) params.push_back(p.unpack());
    return params;
  }

  std::vector<SavedVariable> params_;
  double l1_, l2_;
};

// Without a gradient to record, the op goes straight to its kernel (see dropout_autograd.cpp).
at::Tensor value_autograd(at::TensorList params, double l1, double l2) {
  refuse_tangents("fastreg.weight_penalty_value", params);
  at::Tensor value;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    value = value_op().call(params, l1, l2);
  }
  if (at::GradMode::is_enabled() && torch::autograd::compute_requires_grad(params)) {
    NodePtr node = make_node<WeightPenaltyGradNode>(params, l1, l2);
    node->set_next_edges(torch::autograd::collect_next_edges(params));
    torch::autograd::set_history(value, node);
  }
  return value;
}

void register_weight_penalty_autograd(torch::Library& m) { m.impl("weight_penalty_value", &value_autograd); }

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, AutogradCPU, m) { register_weight_penalty_autograd(m); }
TORCH_LIBRARY_IMPL(fastreg, AutogradCUDA, m) { register_weight_penalty_autograd(m); }

}  // namespace fastreg
