// torch.classes.fastreg.WeightPenaltyGroup: the per-step loop of WeightPenalty.add_grad_
// (fastreg/penalty.py) for one parameter group, in C++.
//
// Why: on a GPU the penalty of ResNet-50's 161 tensors moves 307 MB, about 105 us at an H100's
// copy speed, so the host must queue the whole step in well under that. In Python the loop
// that reads each .grad, and the conversion of two 161-tensor lists into op arguments, took
// 96 us per call on the 2-core VM (1-element tensors: all of it host time). This object holds
// the parameters, so a call passes two numbers; the ops it calls are the same ones, through
// the dispatcher, with the same checks and messages. Eager only: under torch.compile the
// Python loop runs, which Dynamo traces.
#include <ATen/ATen.h>
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

struct WeightPenaltyGroup : torch::CustomClassHolder {
  explicit WeightPenaltyGroup(std::vector<at::Tensor> params) : params_(std::move(params)) {}

  // For every parameter that requires grad: .grad += l1 * sign(p) + 2 * l2 * p, allocating a
  // zero .grad where there is none; frozen ones count in the value only. Returns one value per
  // device and kind (trainable, frozen), devices in order of first appearance: what the Python
  // loop returns, and it adds them up alike.
  std::vector<at::Tensor> add_grad_(double l1, double l2) const {
    const at::NoGradGuard no_grad;
    if (params_.empty()) return {};
    // The usual group, all on one device and all trainable, is passed as it is held.
    std::vector<at::Tensor> grads;
    grads.reserve(params_.size());
    const at::Device device = params_[0].device();
    for (const at::Tensor& p : params_) {
      if (!p.requires_grad() || p.device() != device) return by_device(l1, l2);
      grads.push_back(grad_of(p));
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see by_device
    return {grad_op().call(grads, params_, l1, l2)};
  }

 private:
  std::vector<at::Tensor> by_device(double l1, double l2) const {
    std::vector<DeviceShare> shares;  // one or two devices: a linear search beats a map
    for (const at::Tensor& p : params_) {
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

  std::vector<at::Tensor> params_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastreg, m) {
  m.class_<WeightPenaltyGroup>("WeightPenaltyGroup")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("add_grad_", &WeightPenaltyGroup::add_grad_);
}

}  // namespace fastreg
