// Autograd of fastreg::dropout, dropout_seeded and dropout_backward in C++, for the compiled
// kernels.
//
// fastreg/ops/dropout.py registers the same formulas with torch.library.register_autograd, to
// the Autograd alias key: they serve every backend, the reference included, but cost tens of
// microseconds of Python per call. Registered to the runtime keys AutogradCPU and AutogradCUDA,
// these take precedence wherever the compiled library is loaded; both are tested by the same
// tests (the default run takes these, FASTREG_BACKEND=reference the Python ones).
//
// The node is hand-written (common/autograd_node.h), not a torch::autograd::Function: on the
// 2-core VM that took a forward + backward of 64 elements (all of it host time) from 40 to
// 29 us, level with torch's own dropout, whose host time an H100 waits on below a few million
// elements.
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/autograd_node.h"
#include "../common/forward_ad.h"
#include "../common/op_handle.h"
#include "../common/tensor_glue.h"

namespace fastreg {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using DropoutSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t,
                                                                   std::optional<at::Generator>);
using InplaceSig = std::tuple<at::Tensor, at::Tensor>(at::Tensor&, double, int64_t, std::optional<at::Generator>);
using SeededSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, const at::Tensor&, int64_t);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t);

const c10::TypedOperatorHandle<DropoutSig>& dropout_op() {
  static const auto handle = fastreg_op<DropoutSig>("fastreg::dropout");
  return handle;
}
const c10::TypedOperatorHandle<InplaceSig>& inplace_op() {
  static const auto handle = fastreg_op<InplaceSig>("fastreg::dropout_");
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

// What the three ops share: the output is the input times a fixed mask (from the saved mask
// or the rng_state), so the map is linear and its own transpose. The gradient, the tangent of
// forward-mode AD and the double backward are all dropout_backward with the same mask.
struct DropoutMap {
  double p;
  int64_t mask_mode;
  std::vector<int64_t> sizes, strides;  // the forward output's: the mask follows its memory order

  DropoutMap(const at::Tensor& output, double p, int64_t mask_mode)
      : p(p), mask_mode(mask_mode), sizes(output.sizes().vec()), strides(output.strides().vec()) {}
  DropoutMap(double p, int64_t mask_mode, std::vector<int64_t> sizes, std::vector<int64_t> strides)
      : p(p), mask_mode(mask_mode), sizes(std::move(sizes)), strides(std::move(strides)) {}

  // Through the dispatcher, so that a double backward (create_graph=True) is recorded.
  at::Tensor apply(const at::Tensor& t, const at::Tensor& mask, const at::Tensor& rng_state) const {
    if (t._is_zerotensor()) return t;  // autograd's memoryless zeros: nothing for a kernel to read
    at::Tensor laid_out = t;
    if (t.strides() != at::IntArrayRef(strides)) {
      laid_out = t.new_empty_strided(sizes, strides).copy_(t);  // a method: batched under vmap
    }
    return backward_op().call(laid_out, mask, rng_state, p, mask_mode);
  }
};

struct DropoutGradNode final : torch::autograd::Node {
  DropoutGradNode(const char* name, DropoutMap map, const at::Tensor& mask, const at::Tensor& rng_state)
      : name_(name), map_(std::move(map)), mask_(mask, false), rng_state_(rng_state, false) {}

  std::string name() const override { return name_; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // a retained graph may run backward on several threads
    if (!grads[0].defined()) return {at::Tensor()};
    // unpack() raises torch's "backward through the graph a second time" once released
    return {map_.apply(grads[0], mask_.unpack(), rng_state_.unpack())};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    mask_.reset_data();
    rng_state_.reset_data();
  }

#if FASTREG_COMPILED_AUTOGRAD
  // Compiled autograd: what its cached graph depends on, then the backward recorded as a
  // call of dropout_grad_functional (common/autograd_node.h).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(std::string(name_));
    args.collect(map_.p);
    args.collect(map_.mask_mode);
    args.collect(map_.sizes);
    args.collect(map_.strides);
    args.collect(mask_, /*is_output=*/false);
    args.collect(rng_state_, /*is_output=*/false);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override;
#endif  // FASTREG_COMPILED_AUTOGRAD

 private:
  const char* name_;
  DropoutMap map_;
  SavedVariable mask_, rng_state_;
};

#if FASTREG_COMPILED_AUTOGRAD
// The node's backward from packed state: (mask, rng_state, p, mask_mode, sizes, strides).
variable_list dropout_grad_functional(const variable_list& grads, const std::vector<c10::IValue>& state) {
  if (!grads[0].defined()) return {at::Tensor()};
  DropoutMap map(state[2].toDouble(), state[3].toInt(), state[4].toIntVector(), state[5].toIntVector());
  return {map.apply(grads[0], state[0].toTensor(), state[1].toTensor())};
}

variable_list DropoutGradNode::apply_with_saved(const variable_list& grads,
                                                torch::dynamo::autograd::SwapSavedVariables& saved) {
  saved.before(mask_);
  saved.before(rng_state_);
  const std::vector<c10::IValue> state{mask_.unpack(), rng_state_.unpack(), map_.p, map_.mask_mode, map_.sizes,
                                       map_.strides};
  variable_list result = record_functional_backward(*this, saved, &dropout_grad_functional, grads, state);
  saved.after(mask_);
  saved.after(rng_state_);
  return result;
}
#endif  // FASTREG_COMPILED_AUTOGRAD

bool records_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

// Gives `output` (the dropout of `input` with this mask) its history for backward and, for
// forward-mode AD, its tangent: the input's tangent through the same mask.
void record(const char* name, const at::Tensor& input, const at::Tensor& output, const at::Tensor& mask,
            const at::Tensor& rng_state, double p, int64_t mask_mode) {
  DropoutMap map(output, p, mask_mode);
  if (has_tangent(input)) {
    const at::Tensor& tangent = input._fw_grad(/*level=*/0);
    if (!tangent._is_zerotensor()) {  // an output without a tangent means a zero one
      output._set_fw_grad(map.apply(tangent, mask, rng_state), /*level=*/0, /*is_inplace_op=*/false);
    }
  }
  if (records_grad(input)) {
    NodePtr node = make_node<DropoutGradNode>(name, std::move(map), mask, rng_state);
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    torch::autograd::set_history(output, node);
  }
}

// Without a gradient or tangent to record, each op goes straight to its kernel.
bool differentiates(const at::Tensor& t) { return records_grad(t) || has_tangent(t); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_autograd(const at::Tensor& input, double p, int64_t mask_mode,
                                                                std::optional<at::Generator> generator) {
  at::Tensor output, mask, rng_state;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(output, mask, rng_state) = dropout_op().call(input, p, mask_mode, std::move(generator));
  }
  if (differentiates(input)) record("fastreg::DropoutBackward", input, output, mask, rng_state, p, mask_mode);
  return {output, mask, rng_state};
}

std::tuple<at::Tensor, at::Tensor> dropout_seeded_autograd(const at::Tensor& input, double p,
                                                           const at::Tensor& rng_state, int64_t mask_mode) {
  at::Tensor output, mask;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(output, mask) = seeded_op().call(input, p, rng_state, mask_mode);
  }
  if (differentiates(input)) record("fastreg::DropoutSeededBackward", input, output, mask, rng_state, p, mask_mode);
  return {output, mask};
}

// In place, as torch's own in-place ops: the input's history is rebased onto the node (through
// CopySlices when it is a view) and its tangent goes through the mask in place. A leaf that
// requires grad, or a view autograd cannot rebase, is refused by torch's check_inplace. It
// replaced a Python autograd.Function (now the reference's): fastreg.Dropout(inplace=True) on
// 64 elements, forward + backward 77.4-80.3 -> 52.6-52.7 us, forward without grad 16.9-17.2 ->
// 7.3-7.4 us (torch 42.4-43.9 and 7.7-8.1 us; 2-core VM).
std::tuple<at::Tensor, at::Tensor> dropout_inplace_autograd(at::Tensor& input, double p, int64_t mask_mode,
                                                            std::optional<at::Generator> generator) {
  const bool records = records_grad(input);
  torch::autograd::edge_list input_history;
  if (records) {
    torch::autograd::check_inplace(input, /*requires_grad=*/true);
    // Before the kernel bumps the version: a view's grad_fn read after it would be regenerated
    // then, on its base's old history, and kept once the base is rebased onto CopySlices.
    input_history = torch::autograd::collect_next_edges(input);
  }
  at::Tensor mask, rng_state;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::NoGradGuard no_grad;  // the kernel refuses to overwrite a tensor whose backward it would lose
    std::tie(mask, rng_state) = inplace_op().call(input, p, mask_mode, std::move(generator));
  }
  if (!records && !has_tangent(input)) return {mask, rng_state};
  // the kernel's mask follows the memory order of memory_dense(input)
  DropoutMap map(p, mask_mode, input.sizes().vec(), memory_dense_strides(input));
  if (has_tangent(input)) {
    at::Tensor tangent = input._fw_grad(/*level=*/0);
    if (!tangent._is_zerotensor()) tangent.copy_(map.apply(tangent, mask, rng_state));
  }
  if (records) {
    NodePtr node = make_node<DropoutGradNode>("fastreg::DropoutInplaceBackward", std::move(map), mask, rng_state);
    node->set_next_edges(std::move(input_history));
    torch::autograd::rebase_history(input, std::move(node));
  }
  return {mask, rng_state};
}

at::Tensor dropout_backward_autograd(const at::Tensor& grad_output, const at::Tensor& mask,
                                     const at::Tensor& rng_state, double p, int64_t mask_mode) {
  at::Tensor grad_input;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_input = backward_op().call(grad_output, mask, rng_state, p, mask_mode);
  }
  if (differentiates(grad_output)) {
    record("fastreg::DropoutBackwardBackward", grad_output, grad_input, mask, rng_state, p, mask_mode);
  }
  return grad_input;
}

void register_dropout_autograd(torch::Library& m) {
  m.impl("dropout", &dropout_autograd);
  m.impl("dropout_", &dropout_inplace_autograd);
  m.impl("dropout_seeded", &dropout_seeded_autograd);
  m.impl("dropout_backward", &dropout_backward_autograd);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, AutogradCPU, m) { register_dropout_autograd(m); }
TORCH_LIBRARY_IMPL(fastreg, AutogradCUDA, m) { register_dropout_autograd(m); }

}  // namespace fastreg
