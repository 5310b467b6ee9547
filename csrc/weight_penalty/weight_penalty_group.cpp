// torch.classes.fastreg.WeightPenaltyGroup: the per-step loop of WeightPenalty.add_grad_
// (fastreg/penalty.py) for one parameter group, in C++.
//
// Why: on a GPU the penalty of ResNet-50's 161 tensors moves 307 MB, about 105 us at an H100's
// copy speed, so the host must queue the whole step in well under that. In Python the loop
// that reads each .grad, and the conversion of two 161-tensor lists into op arguments, took
// 96 us per call on the 2-core VM (1-element tensors: all of it host time). Here a call passes
// one list and two numbers; the ops it calls are the same ones, through the dispatcher, with the
// same checks and messages. Eager only: under torch.compile the Python loop runs, which Dynamo
// traces.
//
// It keeps no reference to the parameters between calls, strong or weak: torch.utils.swap_tensors
// (module.to() with swap_module_params_on_conversion, load_state_dict(assign=True)) refuses a
// tensor whose TensorImpl has either kind, and it keeps the Python object while putting another
// tensor under it, so tensors held from an earlier call could be the wrong ones. Taking the
// group's list at each call costs the conversion of one list.
#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <c10/util/MaybeOwned.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../common/op_handle.h"

namespace fastreg {
namespace {

using GradSig = at::Tensor(at::TensorList, at::TensorList, double, double);
using ValueSig = at::Tensor(at::TensorList, double, double);

const c10::TypedOperatorHandle<GradSig>& grad_op() {
  static const auto handle = fastreg_op<GradSig>("fastreg::weight_penalty_grad_");
  return handle;
}
const c10::TypedOperatorHandle<ValueSig>& value_op() {
  static const auto handle = fastreg_op<ValueSig>("fastreg::weight_penalty_value");
  return handle;
}

// One device's share of the group, in the order of the group's list.
struct DeviceShare {
  at::Device device;
  std::vector<at::Tensor> trainable;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> frozen;
};

// The parameter's .grad, a zero one allocated (as the Python loop does) where there is none.
const at::Tensor& grad_of(const at::Tensor& param) {
  at::Tensor& grad = param.mutable_grad();
  if (!grad.defined()) grad = at::zeros_like(param);
  return grad;
}

// Tensors that others own for the length of a call, borrowed rather than copied: a copy costs
// two atomic reference-count operations per tensor per step, about 5 us for 161 tensors on the
// 2-core VM, and the op needs its tensors side by side.
class BorrowedTensors {
  using Traits = c10::MaybeOwnedTraits<at::Tensor>;

 public:
  explicit BorrowedTensors(size_t count) { tensors_.reserve(count); }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) Traits::destroyBorrow(t);
  }
  void push_back(const at::Tensor& t) { tensors_.push_back(Traits::createBorrow(t)); }
  const std::vector<at::Tensor>& get() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

struct WeightPenaltyGroup : torch::CustomClassHolder {
  // For every parameter that requires grad: .grad += l1 * sign(p) + 2 * l2 * p, allocating a
  // zero .grad where there is none; frozen ones count in the value only. Returns one value per
  // device and kind (trainable, frozen), devices in order of first appearance: what the Python
  // loop returns, and it adds them up alike. `list` is the group's list, converted by the call:
  // it owns its tensors, and the parameters own their gradients, for the length of the call.
  std::vector<at::Tensor> add_grad_(const c10::List<at::Tensor>& list, double l1, double l2) const {
    const at::NoGradGuard no_grad;
    if (list.empty()) return {};
    BorrowedTensors params(list.size());
    for (size_t i = 0; i < list.size(); ++i) params.push_back(list.get(i));
    // The usual group, all on one device and all trainable, is passed as it is.
    BorrowedTensors grads(list.size());
    const at::Device device = params.get()[0].device();
    for (const at::Tensor& p : params.get()) {
      if (!p.requires_grad() || p.device() != device) return by_device(params.get(), l1, l2);
      grads.push_back(grad_of(p));
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see by_device
    return {grad_op().call(grads.get(), params.get(), l1, l2)};
  }

 private:
  static std::vector<at::Tensor> by_device(const std::vector<at::Tensor>& params, double l1, double l2) {
    std::vector<DeviceShare> shares;  // one or two devices: a linear search beats a map
    for (const at::Tensor& p : params) {
      const at::Device device = p.device();
      DeviceShare* share = nullptr;
      for (DeviceShare& s : shares) {
        if (s.device == device) share = &s;
      }
      if (share == nullptr) share = &shares.emplace_back(DeviceShare{device, {}, {}, {}});
      if (p.requires_grad()) {
        share->grads.push_back(grad_of(p));
        share->trainable.push_back(p);
      } else {
        share->frozen.push_back(p);
      }
    }
    // Straight to the device kernels: with grad mode off the autograd layer has nothing to
    // record, yet its fallback for these ops (they have no autograd kernel) would box both
    // lists, one IValue per tensor.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<at::Tensor> values;
    for (const DeviceShare& share : shares) {
      if (!share.trainable.empty()) values.push_back(grad_op().call(share.grads, share.trainable, l1, l2));
      if (!share.frozen.empty()) values.push_back(value_op().call(share.frozen, l1, l2));
    }
    return values;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastreg, m) {
  m.class_<WeightPenaltyGroup>("WeightPenaltyGroup")
      .def(torch::init<>())
      .def("add_grad_", &WeightPenaltyGroup::add_grad_);
}

}  // namespace fastreg
