// CUDA implementations of the fastreg weight-penalty ops: tensor lists to kernel arguments.
// Scratch comes from torch's caching allocator and its size depends on shapes only, and
// nothing waits for the device, so the ops can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>

#include "weight_penalty_glue.h"

namespace fastreg {
namespace {

void run_cuda(const PenaltyBatch& batch, PenaltyMode mode, const PenaltyScalars& scalars, const at::Tensor& anchor,
              at::Tensor* value) {
  const int64_t count = static_cast<int64_t>(batch.tensors.size());
  const int64_t blocks = mode == PenaltyMode::Backward ? 0 : weight_penalty_cuda_blocks(batch.tensors.data(), count);
  at::Tensor partials = at::empty({2 * blocks}, anchor.options().dtype(at::kDouble));
  void* value_out = value == nullptr ? nullptr : value->data_ptr();
  const DType value_dtype = value == nullptr ? DType::Float32 : kernel_dtype(*value, "fastreg.weight_penalty");
  const char* error = weight_penalty_cuda(batch.tensors.data(), count, mode, scalars, partials.data_ptr<double>(), value_out,
                                          value_dtype, at::cuda::getCurrentCUDAStream(anchor.device().index()).stream());
  TORCH_CHECK(error == nullptr, "fastreg.weight_penalty: CUDA launch failed: ", error);
}

// The device the kernels run on: that of the first CUDA tensor. Called after the checks, which
// put every tensor on one device; taking the guard before them would fail on a list whose first
// tensor is on the CPU (the dispatcher picks this kernel when any tensor is on CUDA) with an
// internal error instead of the message naming the tensor.
at::Device penalty_cuda_device(std::initializer_list<at::TensorList> lists) {
  for (const at::TensorList list : lists) {
    for (const at::Tensor& t : list) {
      if (t.is_cuda()) return t.device();
    }
  }
  TORCH_CHECK(false, "fastreg.weight_penalty: no CUDA tensor in the arguments of a CUDA kernel");
}

at::Tensor weight_penalty_value_cuda(at::TensorList params, double l1, double l2) {
  check_penalty_coefficients(l1, l2);
  TORCH_CHECK(!params.empty(), "fastreg.weight_penalty: no parameters");
  check_penalty_params(params);
  const c10::cuda::CUDAGuard guard(penalty_cuda_device({params}));
  const PenaltyBatch batch = penalty_value_batch(params);
  at::Tensor value = at::empty({}, penalty_value_options(params));
  run_cuda(batch, PenaltyMode::Value, penalty_scalars(l1, l2), params[0], &value);
  return value;
}

at::Tensor weight_penalty_grad_cuda(at::TensorList grads, at::TensorList params, double l1, double l2) {
  check_penalty_coefficients(l1, l2);
  TORCH_CHECK(!params.empty(), "fastreg.weight_penalty: no parameters");
  check_penalty_params(params);
  check_penalty_grads(grads, params);
  for (const at::Tensor& g : grads) bump_version(g);
  const c10::cuda::CUDAGuard guard(penalty_cuda_device({params, grads}));
  const PenaltyBatch batch = penalty_accumulate_batch(grads, params);
  at::Tensor value = at::empty({}, penalty_value_options(params));
  run_cuda(batch, PenaltyMode::Accumulate, penalty_scalars(l1, l2), params[0], &value);
  return value;
}

std::vector<at::Tensor> weight_penalty_backward_cuda(const at::Tensor& grad_output, at::TensorList params, double l1,
                                                     double l2) {
  check_penalty_coefficients(l1, l2);
  check_penalty_params(params);
  const at::TensorOptions value_options = penalty_value_options(params);
  // Before the empty-list check: a CUDA grad_output with no parameters (which count as CPU
  // ones) reaches this kernel and must get the reference's device message.
  check_penalty_grad_output(grad_output, value_options);
  TORCH_CHECK(!params.empty(), "fastreg.weight_penalty_backward: no parameters");
  const c10::cuda::CUDAGuard guard(penalty_cuda_device({params}));
  std::vector<at::Tensor> outputs;
  const PenaltyBatch batch = penalty_backward_batch(params, outputs);
  const at::Tensor go = penalty_grad_output(grad_output, value_options);
  PenaltyScalars scalars = penalty_scalars(l1, l2);
  scalars.grad_output = go.data_ptr();  // read by the kernel: no host synchronisation
  scalars.grad_output_dtype = kernel_dtype(go, "fastreg.weight_penalty_backward");
  run_cuda(batch, PenaltyMode::Backward, scalars, params[0], nullptr);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("weight_penalty_value", &weight_penalty_value_cuda);
  m.impl("weight_penalty_grad_", &weight_penalty_grad_cuda);
  m.impl("weight_penalty_backward", &weight_penalty_backward_cuda);
  // l1 and l2 as CPU tensors, read on the host (no device synchronisation); a CUDA coefficient
  // tensor lands here too and is refused by name
  m.impl("weight_penalty_value_tensor_coefficients", &value_with_tensor_coefficients<&weight_penalty_value_cuda>);
  m.impl("weight_penalty_grad_tensor_coefficients_", &grad_with_tensor_coefficients<&weight_penalty_grad_cuda>);
  m.impl("weight_penalty_backward_tensor_coefficients", &backward_with_tensor_coefficients<&weight_penalty_backward_cuda>);
}

}  // namespace fastreg
