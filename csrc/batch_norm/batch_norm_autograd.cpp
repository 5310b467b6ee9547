// Autograd of fastreg::batch_norm_train, batch_norm_eval and batch_norm_backward in C++, for
// the compiled kernels: the same formulas as fastreg/ops/batch_norm.py, registered to the
// runtime keys AutogradCPU and AutogradCUDA, which take precedence over the Python ones (the
// Autograd alias key) wherever this library is loaded. Why: see csrc/dropout/dropout_autograd.cpp.
// fastreg.BatchNorm2d's training forward on a small input took 69-113 us of host time through
// the Python kernels, 41-46 us through these (2-core VM); the GPU set's (128,512,7,7) fp32 layer
// needs about 30 us for forward + backward at an H100's memory bound. The pieces SyncBatchNorm composes (stats, elemt,
// backward_reduce, backward_elemt) keep the Python formulas: a collective runs between them.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/forward_ad.h"
#include "../common/op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
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

// The gradients of (input, weight, bias) that autograd asks for, from one batch_norm_backward.
// needs_input_grad counts only the tensor arguments that were given: weight_at is where the
// weight's would be, and the bias follows it when the weight was given.
variable_list batch_norm_grads(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
                               bool training, size_t weight_at) {
  const bool needs_input = ctx->needs_input_grad(0);
  const bool needs_weight = weight.defined() && ctx->needs_input_grad(weight_at);
  const bool needs_bias =
      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(weight.defined() ? weight_at + 1 : weight_at);
  if (!grad_output.defined() || !(needs_input || needs_weight || needs_bias)) return {at::Tensor(), at::Tensor(), at::Tensor()};
  const std::optional<at::Tensor> w = weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
  // Through the dispatcher, so that create_graph=True meets the no-double-backward error below.
  auto [grad_input, grad_weight, grad_bias] = backward_op().call(grad_output, input, mean, invstd, w, training);
  return {needs_input ? grad_input : at::Tensor(), needs_weight ? grad_weight : at::Tensor(),
          needs_bias ? grad_bias : at::Tensor()};
}

// Saved mean / invstd / var are statistics, not differentiable outputs (as in
// torch.native_batch_norm): gradients flowing into them are ignored.
struct BatchNormTrainFunction : torch::autograd::Function<BatchNormTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, invstd, var] = train_op().call(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean, invstd});
    ctx->saved_data["has_bias"] = bias.has_value();
    // Gradients of the statistics are ignored: materialised, they would be three zero-filled
    // tensors (three memsets on a GPU) per backward.
    ctx->set_materialize_grads(false);
    return {output, mean, invstd, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    variable_list out = batch_norm_grads(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], true, 1);
    out.emplace_back();  // eps
    return out;
  }
};

struct BatchNormEvalFunction : torch::autograd::Function<BatchNormEvalFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& running_mean,
                            const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
    TORCH_CHECK(!running_mean.requires_grad() && !running_var.requires_grad(),
                "fastreg.batch_norm: gradients with respect to the running statistics are not supported");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output = eval_op().call(input, running_mean, running_var, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), running_mean, running_var});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["eps"] = eps;
    return output;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::ScalarType compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor invstd = at::rsqrt(saved[3].to(compute) + ctx->saved_data["eps"].toDouble());
    variable_list g = batch_norm_grads(ctx, grads[0], input, saved[1], saved[2].to(compute), invstd, false, 3);
    return {g[0], at::Tensor(), at::Tensor(), g[1], g[2], at::Tensor()};
  }
};

// batch_norm_backward is not differentiable, and the saved statistics carry no gradient: without
// this node a double backward would run through them and give zeros, silently.
struct BatchNormBackwardFunction : torch::autograd::Function<BatchNormBackwardFunction> {
  static variable_list forward(AutogradContext*, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                               bool training) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_weight, grad_bias] = backward_op().call(grad_output, input, mean, invstd, weight, training);
    return {grad_input, grad_weight, grad_bias};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastreg.batch_norm: double backward is not supported");
  }
};

// Without a gradient to record, the op goes straight to its kernel (see dropout_autograd.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_autograd(const at::Tensor& input,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps) {
  refuse_tangents("fastreg.batch_norm_train", input, weight, bias);
  if (!at::GradMode::is_enabled() || !(wants_grad(input) || wants_grad(weight) || wants_grad(bias))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return train_op().call(input, weight, bias, eps);
  }
  variable_list out = BatchNormTrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor eval_autograd(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  refuse_tangents("fastreg.batch_norm_eval", input, running_mean, running_var, weight, bias);
  if (!at::GradMode::is_enabled() || !(wants_grad(input) || wants_grad(running_mean) || wants_grad(running_var) ||
                                       wants_grad(weight) || wants_grad(bias))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return eval_op().call(input, running_mean, running_var, weight, bias, eps);
  }
  return BatchNormEvalFunction::apply(input, running_mean, running_var, weight, bias, eps);
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
  variable_list out = BatchNormBackwardFunction::apply(grad_output, input, mean, invstd, weight, training);
  return {out[0], out[1], out[2]};
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
