// Autograd of fastreg::dropout, dropout_seeded and dropout_backward in C++, for the compiled
// kernels.
//
// fastreg/ops/dropout.py registers the same formulas with torch.library.register_autograd, to
// the Autograd alias key: they serve every backend, the reference included. Through those
// Python kernels a forward + backward took 94-143 us of host time on the 2-core VM, through
// these 58-79 us (torch: 30-50 us; 64 elements, so all of it is host time). An H100 moves
// 16M bf16 elements in and out twice in about 40 us at its memory bound (computed, not yet
// measured), so with the Python kernels the GPU would wait for the host. Registered to the
// runtime keys AutogradCPU and AutogradCUDA, these take precedence wherever the compiled
// library is loaded; both are tested by the same tests (the default run takes these,
// FASTREG_BACKEND=reference the Python ones).
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using DropoutSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t,
                                                                   std::optional<at::Generator>);
using SeededSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, const at::Tensor&, int64_t);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t);

const c10::TypedOperatorHandle<DropoutSig>& dropout_op() {
  static const auto handle = fastreg_op<DropoutSig>("fastreg::dropout");
  return handle;
}
const c10::TypedOperatorHandle<SeededSig>& seeded_op() {
  static const auto handle = fastreg_op<SeededSig>("fastreg::dropout_seeded");
  return handle;
}
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto handle = fastreg_op<BackwardSig>("fastreg::dropout_backward");
  return handle;
}

// Backward of all three is dropout_backward with the forward's mask and rng_state, on a
// gradient laid out like the forward's output: the mask follows that memory order.
void save_for_dropout_grad(AutogradContext* ctx, const at::Tensor& output, const at::Tensor& mask,
                           const at::Tensor& rng_state, double p, int64_t mask_mode) {
  ctx->save_for_backward({mask, rng_state});
  // The mask and rng_state outputs get no gradient. Materialised, theirs would be zero-filled
  // tensors made in every backward: a full-size bool mask's worth of memset in bool mode.
  ctx->set_materialize_grads(false);
  ctx->saved_data["p"] = p;
  ctx->saved_data["mask_mode"] = mask_mode;
  ctx->saved_data["sizes"] = output.sizes().vec();
  ctx->saved_data["strides"] = output.strides().vec();
}

at::Tensor dropout_grad(AutogradContext* ctx, const at::Tensor& grad_output) {
  if (!grad_output.defined()) return at::Tensor();
  const variable_list saved = ctx->get_saved_variables();
  const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
  const std::vector<int64_t> strides = ctx->saved_data["strides"].toIntVector();
  at::Tensor grad = grad_output;
  if (grad.strides() != at::IntArrayRef(strides)) {
    grad = at::empty_strided(sizes, strides, grad.options()).copy_(grad);
  }
  // Through the dispatcher, so that a double backward (create_graph=True) is recorded.
  return backward_op().call(grad, saved[0], saved[1], ctx->saved_data["p"].toDouble(),
                            ctx->saved_data["mask_mode"].toInt());
}

struct DropoutFunction : torch::autograd::Function<DropoutFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, double p, int64_t mask_mode,
                               std::optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mask, rng_state] = dropout_op().call(input, p, mask_mode, std::move(generator));
    save_for_dropout_grad(ctx, output, mask, rng_state, p, mask_mode);
    ctx->mark_non_differentiable({mask, rng_state});
    return {output, mask, rng_state};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_grad(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct DropoutSeededFunction : torch::autograd::Function<DropoutSeededFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, double p, const at::Tensor& rng_state,
                               int64_t mask_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mask] = seeded_op().call(input, p, rng_state, mask_mode);
    save_for_dropout_grad(ctx, output, mask, rng_state, p, mask_mode);
    ctx->mark_non_differentiable({mask});
    return {output, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_grad(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// backward is linear in grad_output with the same mask: its gradient is itself.
struct DropoutBackwardFunction : torch::autograd::Function<DropoutBackwardFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& mask,
                            const at::Tensor& rng_state, double p, int64_t mask_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor grad_input = backward_op().call(grad_output, mask, rng_state, p, mask_mode);
    save_for_dropout_grad(ctx, grad_input, mask, rng_state, p, mask_mode);
    return grad_input;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_grad(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Without a gradient to record, the op goes straight to its kernel: no autograd node, and no
// torch::autograd::Function, which functorch transforms (vmap's per-sample fallback) refuse.
bool records_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, int64_t mask_mode,
                                                                std::optional<at::Generator> generator) {
  if (!records_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dropout_op().call(input, p, mask_mode, std::move(generator));
  }
  variable_list out = DropoutFunction::apply(input, p, mask_mode, std::move(generator));
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> dropout_seeded_autograd(const at::Tensor& input, double p,
                                                           const at::Tensor& rng_state, int64_t mask_mode) {
  if (!records_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return seeded_op().call(input, p, rng_state, mask_mode);
  }
  variable_list out = DropoutSeededFunction::apply(input, p, rng_state, mask_mode);
  return {out[0], out[1]};
}

at::Tensor dropout_backward_autograd(const at::Tensor& grad_output, const at::Tensor& mask,
                                     const at::Tensor& rng_state, double p, int64_t mask_mode) {
  if (!records_grad(grad_output)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op().call(grad_output, mask, rng_state, p, mask_mode);
  }
  return DropoutBackwardFunction::apply(grad_output, mask, rng_state, p, mask_mode);
}

void register_dropout_autograd(torch::Library& m) {
  m.impl("dropout", &dropout_autograd);
  m.impl("dropout_seeded", &dropout_seeded_autograd);
  m.impl("dropout_backward", &dropout_backward_autograd);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, AutogradCPU, m) { register_dropout_autograd(m); }
TORCH_LIBRARY_IMPL(fastreg, AutogradCUDA, m) { register_dropout_autograd(m); }

}  // namespace fastreg
