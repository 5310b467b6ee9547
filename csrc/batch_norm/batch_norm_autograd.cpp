// Autograd of fastreg::batch_norm_train, batch_norm_eval and batch_norm_backward in C++, for
// the compiled kernels: the same formulas as fastreg/ops/batch_norm.py, registered to the
// runtime keys AutogradCPU and AutogradCUDA, which take precedence over the Python ones (the
// Autograd alias key) wherever this library is loaded. Why: see csrc/dropout/dropout_autograd.cpp.
// fastreg.BatchNorm2d's training forward on a small input took 69-113 us of host time through
// the Python kernels, 41-46 us through a torch::autograd::Function (2-core VM); the GPU set's
// (128,512,7,7) fp32 layer needs about 30 us for forward + backward at an H100's memory bound.
// The node is hand-written (common/autograd_node.h), as dropout's is: a BatchNorm2d forward +
// backward on a (2,4,2,2) input took 77.6-78.1 us through the torch::autograd::Function it
// replaced and 61.4-62.0 us through it (torch 51-54 us); in eval 70.3-70.5 -> 58.2-59.0 us
// (torch 42-44 us). The pieces SyncBatchNorm composes (stats, elemt, backward_reduce,
// backward_elemt) keep the Python formulas: a collective runs between them.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/autograd_node.h"
#include "../common/forward_ad.h"
#include "../common/op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using TrainSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                             const std::optional<at::Tensor>&,
                                                                             const std::optional<at::Tensor>&, double);
using EvalSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const std::optional<at::Tensor>&, bool);

const c10::TypedOperatorHandle<TrainSig>& train_op() {
  static const auto handle = fastreg_op<TrainSig>("fastreg::batch_norm_train");
  return handle;
}
const c10::TypedOperatorHandle<EvalSig>& eval_op() {
  static const auto handle = fastreg_op<EvalSig>("fastreg::batch_norm_eval");
  return handle;
}
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto handle = fastreg_op<BackwardSig>("fastreg::batch_norm_backward");
  return handle;
}

bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool wants_grad(const std::optional<at::Tensor>& t) { return t.has_value() && wants_grad(*t); }

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// What a backward needs, in compiled autograd's packed form too: (input, weight, mean, invstd in
// training or the running variance in evaluation, training, eps, has_bias).
enum State : size_t { kInput, kWeight, kMean, kInvstdOrVar, kTraining, kEps, kHasBias, kStateSize };

// The gradients of (input, weight, bias) that `wanted` asks for, from one batch_norm_backward.
// In evaluation the running statistics are converted here, not at every forward.
variable_list batch_norm_grads(const at::Tensor& grad_output, const std::vector<c10::IValue>& state,
                               std::array<bool, 3> wanted) {
  const at::Tensor& input = state[kInput].toTensor();
  const at::Tensor& weight = state[kWeight].toTensor();
  const bool training = state[kTraining].toBool();
  wanted[1] = wanted[1] && weight.defined();
  wanted[2] = wanted[2] && state[kHasBias].toBool();
  if (!grad_output.defined() || !(wanted[0] || wanted[1] || wanted[2])) {
    return {at::Tensor(), at::Tensor(), at::Tensor()};
  }
  at::Tensor mean = state[kMean].toTensor(), invstd = state[kInvstdOrVar].toTensor();
  if (!training) {
    const at::ScalarType compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    mean = mean.to(compute);
    // 1 / sqrt, each step rounded, as the forward computed it: at::rsqrt is approximate on CUDA.
    invstd = (invstd.to(compute) + state[kEps].toDouble()).sqrt_().reciprocal_();
  }
  const std::optional<at::Tensor> w = weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
  // Through the dispatcher, so that create_graph=True meets the no-double-backward error below.
  auto [grad_input, grad_weight, grad_bias] = backward_op().call(grad_output, input, mean, invstd, w, training);
  return {wanted[0] ? grad_input : at::Tensor(), wanted[1] ? grad_weight : at::Tensor(),
          wanted[2] ? grad_bias : at::Tensor()};
}

#if FASTREG_COMPILED_AUTOGRAD
// Compiled autograd's form of the node's backward: the state, then the three wanted flags.
variable_list batch_norm_grads_functional(const variable_list& grads, const std::vector<c10::IValue>& packed) {
  const std::vector<c10::IValue> state(packed.begin(), packed.begin() + kStateSize);
  return batch_norm_grads(grads[0], state,
                          {packed[kStateSize].toBool(), packed[kStateSize + 1].toBool(), packed[kStateSize + 2].toBool()});
}
#endif  // FASTREG_COMPILED_AUTOGRAD

// The backward of batch_norm_train and batch_norm_eval, with edges to (input, weight, bias).
// Only the normalised output gets it: the batch statistics get no gradient (as
// torch.native_batch_norm ignores theirs), so they are not differentiable outputs.
struct BatchNormGradNode final : torch::autograd::Node {
  BatchNormGradNode(const char* name, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
                    const at::Tensor& invstd_or_var, bool training, double eps, bool has_bias)
      : name_(name),
        input_(input, false),
        weight_(weight, false),
        mean_(mean, false),
        invstd_or_var_(invstd_or_var, false),
        training_(training),
        eps_(eps),
        has_bias_(has_bias) {}

  std::string name() const override { return name_; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // a retained graph may run backward on several threads
    // unpack() raises torch's "backward through the graph a second time" once released
    return batch_norm_grads(grads[0], state(), wanted());
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : saved_variables()) saved->reset_data();
  }

#if FASTREG_COMPILED_AUTOGRAD
  // Compiled autograd: what its cached graph depends on, then the backward recorded as a call
  // of batch_norm_grads_functional (common/autograd_node.h).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(std::string(name_));
    for (const SavedVariable* saved : {&input_, &weight_, &mean_, &invstd_or_var_}) args.collect(*saved, false);
    args.collect(training_);
    args.collect(eps_);
    args.collect(has_bias_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (SavedVariable* saved : saved_variables()) swap.before(*saved);
    std::vector<c10::IValue> packed = state();
    for (bool flag : wanted()) packed.emplace_back(flag);
    variable_list result = record_functional_backward(*this, swap, &batch_norm_grads_functional, grads, packed);
    for (SavedVariable* saved : saved_variables()) swap.after(*saved);
    return result;
  }
#endif  // FASTREG_COMPILED_AUTOGRAD

 private:
  std::array<SavedVariable*, 4> saved_variables() { return {&input_, &weight_, &mean_, &invstd_or_var_}; }
  std::vector<c10::IValue> state() {
    return {input_.unpack(), weight_.unpack(), mean_.unpack(), invstd_or_var_.unpack(), training_, eps_, has_bias_};
  }
  std::array<bool, 3> wanted() const {
    return {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)};
  }

  const char* name_;
  SavedVariable input_, weight_, mean_, invstd_or_var_;
  bool training_;
  double eps_;
  bool has_bias_;
};

void record(const char* name, const at::Tensor& output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
            const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd_or_var,
            bool training, double eps) {
  const at::Tensor w = or_undefined(weight), b = or_undefined(bias);
  NodePtr node = make_node<BatchNormGradNode>(name, input, w, mean, invstd_or_var, training, eps, b.defined());
  node->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  torch::autograd::set_history(output, node);
}

// batch_norm_backward is not differentiable, and the saved statistics carry no gradient: without
// a node on its outputs a double backward would run through them and give zeros, silently. The
// node is torch's Error node (a torch::autograd::Function would be refused inside torch.func,
// whose grad always records the backward). Only a create_graph=True backward reaches it.
void record_no_double_backward(const std::tuple<at::Tensor, at::Tensor, at::Tensor>& grads, const at::Tensor& grad_output,
                               const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                               const std::optional<at::Tensor>& weight) {
  NodePtr node = make_node<torch::autograd::Error>(
      "fastreg.batch_norm: double backward is not supported",
      torch::autograd::collect_next_edges(grad_output, input, mean, invstd, or_undefined(weight)));
  for (const at::Tensor& grad : {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)}) {
    if (grad.defined()) torch::autograd::set_history(grad, node);
  }
}

// Without a gradient to record, the op goes straight to its kernel (see dropout_autograd.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_autograd(const at::Tensor& input,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps) {
  refuse_tangents("fastreg.batch_norm_train", input, weight, bias);
  at::Tensor output, mean, invstd, var;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(output, mean, invstd, var) = train_op().call(input, weight, bias, eps);
  }
  if (at::GradMode::is_enabled() && (wants_grad(input) || wants_grad(weight) || wants_grad(bias))) {
    record("fastreg::BatchNormBackward", output, input, weight, bias, mean, invstd, /*training=*/true, eps);
  }
  return {output, mean, invstd, var};
}

at::Tensor eval_autograd(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  refuse_tangents("fastreg.batch_norm_eval", input, running_mean, running_var, weight, bias);
  const bool records = at::GradMode::is_enabled() && (wants_grad(input) || wants_grad(running_mean) ||
                                                      wants_grad(running_var) || wants_grad(weight) || wants_grad(bias));
  TORCH_CHECK(!records || !(running_mean.requires_grad() || running_var.requires_grad()),
              "fastreg.batch_norm: gradients with respect to the running statistics are not supported");
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = eval_op().call(input, running_mean, running_var, weight, bias, eps);
  }
  if (records) {
    record("fastreg::BatchNormEvalBackward", output, input, weight, bias, running_mean, running_var,
           /*training=*/false, eps);
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 const std::optional<at::Tensor>& weight, bool training) {
  refuse_tangents("fastreg.batch_norm_backward", grad_output, input, mean, invstd, weight);
  if (!at::GradMode::is_enabled() || !(wants_grad(grad_output) || wants_grad(input) || wants_grad(mean) ||
                                       wants_grad(invstd) || wants_grad(weight))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op().call(grad_output, input, mean, invstd, weight, training);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grads = backward_op().call(grad_output, input, mean, invstd, weight, training);
  }
  record_no_double_backward(grads, grad_output, input, mean, invstd, weight);
  return grads;
}

void register_batch_norm_autograd(torch::Library& m) {
  m.impl("batch_norm_train", &train_autograd);
  m.impl("batch_norm_eval", &eval_autograd);
  m.impl("batch_norm_backward", &backward_autograd);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, AutogradCPU, m) { register_batch_norm_autograd(m); }
TORCH_LIBRARY_IMPL(fastreg, AutogradCUDA, m) { register_batch_norm_autograd(m); }

}  // namespace fastreg
