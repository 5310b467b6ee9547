// CUDA implementations of the fastreg batch-norm ops: tensors to kernel arguments. Mirrors
// batch_norm_ops.cpp: the same checks in the same order (the messages of
// fastreg/reference/batch_norm.py), all before the device guard and any allocation.
// Outputs and scratch come from torch's caching allocator, the workspace size depends on the
// shape only, and nothing waits for the device, so every op can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "batch_norm_cuda.h"
#include "batch_norm_glue.h"

namespace fastreg {
namespace {

at::Tensor channel_tensor(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(batch_norm_compute_dtype(input.scalar_type())));
}

// The device of the kernels: the input's. The dispatcher picks these kernels when any tensor
// argument is on CUDA; the checks put every tensor on the input's device, so this only fails
// for calls the checks let through with a CPU input, which none do.
at::Device cuda_device(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA input, got one on ", input.device());
  return input.device();
}

void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Scratch of the reductions (partials per channel and split), undefined when none is needed.
at::Tensor workspace(const BatchNormLayout& layout, DType dtype, const at::Tensor& like) {
  const int64_t bytes = batch_norm_cuda_workspace_bytes(layout, dtype);
  return bytes > 0 ? at::empty({bytes}, like.options().dtype(at::kByte)) : at::Tensor();
}

void check_launch(const char* error, const char* op) { TORCH_CHECK(error == nullptr, op, ": CUDA kernel failed: ", error); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cuda(const at::Tensor& input,
                                                                                 const std::optional<at::Tensor>& weight,
                                                                                 const std::optional<at::Tensor>& bias,
                                                                                 double eps) {
  const char* op = "fastreg.batch_norm";
  const DType dtype = batch_norm_check_train_args(input, weight, bias, eps);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const BatchNormLayout layout = batch_norm_layout(dense);
  const at::Tensor w = batch_norm_channel_array(weight, compute);
  const at::Tensor b = batch_norm_channel_array(bias, compute);
  at::Tensor output = at::empty_like(dense);
  at::Tensor mean = channel_tensor(input), invstd = channel_tensor(input), var = channel_tensor(input);
  at::Tensor scratch = workspace(layout, dtype, dense);
  check_launch(batch_norm_train_forward_cuda(layout, dtype, dense.data_ptr(), output.data_ptr(), data_or_null(w),
                                             data_or_null(b), eps, mean.data_ptr(), var.data_ptr(), invstd.data_ptr(),
                                             scratch.defined() ? scratch.data_ptr() : nullptr,
                                             current_stream()),
               op);
  return {output, mean, invstd, var};
}

at::Tensor batch_norm_eval_cuda(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                double eps) {
  const char* op = "fastreg.batch_norm";
  const DType dtype = batch_norm_check_eval_args(input, running_mean, running_var, weight, bias, eps);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, running_mean, std::nullopt, weight, bias);
  const at::Tensor var = batch_norm_channel_array(running_var, compute);
  arrays.invstd = channel_tensor(input);
  at::Tensor output = at::empty_like(dense);
  void* stream = current_stream();
  // 1 / sqrt(var + eps) in the compute dtype, on the device, rounded as the reference rounds it.
  check_launch(batch_norm_invstd_cuda(input.size(1), batch_norm_compute_kernel_dtype(compute), var.data_ptr(), eps,
                                      arrays.invstd.data_ptr(), stream),
               op);
  check_launch(batch_norm_elemt_cuda(batch_norm_layout(dense), dtype, dense.data_ptr(), output.data_ptr(),
                                     arrays.affine(), stream),
               op);
  return output;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda_op(const at::Tensor& input) {
  const char* op = "fastreg.batch_norm_stats";
  const DType dtype = batch_norm_check_input(input, op);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::Tensor dense = memory_dense(input);
  const BatchNormLayout layout = batch_norm_layout(dense);
  at::Tensor mean = channel_tensor(input), var = channel_tensor(input);
  at::Tensor scratch = workspace(layout, dtype, dense);
  check_launch(batch_norm_stats_cuda(layout, dtype, dense.data_ptr(), mean.data_ptr(), var.data_ptr(),
                                     scratch.defined() ? scratch.data_ptr() : nullptr, current_stream()),
               op);
  return {mean, var};
}

at::Tensor batch_norm_elemt_cuda_op(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fastreg.batch_norm_elemt";
  const DType dtype = batch_norm_check_elemt_args(input, mean, invstd, weight, bias);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, mean, invstd, weight, bias);
  at::Tensor output = at::empty_like(dense);
  check_launch(batch_norm_elemt_cuda(batch_norm_layout(dense), dtype, dense.data_ptr(), output.data_ptr(),
                                     arrays.affine(), current_stream()),
               op);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(const at::Tensor& grad_output,
                                                                        const at::Tensor& input, const at::Tensor& mean,
                                                                        const at::Tensor& invstd,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        bool training) {
  const char* op = "fastreg.batch_norm_backward";
  const DType dtype = batch_norm_check_backward_args(grad_output, input, mean, invstd, weight);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor dy = batch_norm_match_layout(grad_output, dense);
  const BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, mean, invstd, weight);
  const BatchNormAffine affine = arrays.affine();
  const BatchNormLayout layout = batch_norm_layout(dense);
  at::Tensor grad_input = at::empty_like(dense);
  at::Tensor sum_dy = channel_tensor(input), sum_dy_xmu = channel_tensor(input);
  const at::ScalarType out_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : compute;
  at::Tensor grad_weight = at::empty({input.size(1)}, input.options().dtype(out_dtype));
  at::Tensor grad_bias = at::empty({input.size(1)}, input.options().dtype(out_dtype));
  at::Tensor scratch = workspace(layout, dtype, dense);
  void* stream = current_stream();
  // Both forms reduce (grad_weight and grad_bias need the sums); eval's dx needs no sums.
  check_launch(batch_norm_backward_reduce_cuda(layout, dtype, dy.data_ptr(), dense.data_ptr(), affine.mean,
                                               sum_dy.data_ptr(), sum_dy_xmu.data_ptr(),
                                               scratch.defined() ? scratch.data_ptr() : nullptr, stream),
               op);
  check_launch(batch_norm_backward_elemt_cuda(layout, dtype, dy.data_ptr(), dense.data_ptr(), grad_input.data_ptr(),
                                              affine, training ? sum_dy.data_ptr() : nullptr,
                                              training ? sum_dy_xmu.data_ptr() : nullptr,
                                              training ? layout.count() : 0, stream),
               op);
  check_launch(batch_norm_grad_affine_cuda(input.size(1), batch_norm_compute_kernel_dtype(compute), kernel_dtype(grad_weight, op),
                                           sum_dy.data_ptr(), sum_dy_xmu.data_ptr(), affine.invstd,
                                           grad_weight.data_ptr(), grad_bias.data_ptr(), stream),
               op);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda_op(const at::Tensor& grad_output,
                                                                      const at::Tensor& input, const at::Tensor& mean) {
  const char* op = "fastreg.batch_norm_backward_reduce";
  const DType dtype = batch_norm_check_backward_reduce_args(grad_output, input, mean);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor dy = batch_norm_match_layout(grad_output, dense);
  const at::Tensor m = batch_norm_channel_array(mean, compute);
  const BatchNormLayout layout = batch_norm_layout(dense);
  at::Tensor sum_dy = channel_tensor(input), sum_dy_xmu = channel_tensor(input);
  at::Tensor scratch = workspace(layout, dtype, dense);
  check_launch(batch_norm_backward_reduce_cuda(layout, dtype, dy.data_ptr(), dense.data_ptr(), m.data_ptr(),
                                               sum_dy.data_ptr(), sum_dy_xmu.data_ptr(),
                                               scratch.defined() ? scratch.data_ptr() : nullptr, current_stream()),
               op);
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cuda_op(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& mean, const at::Tensor& invstd,
                                             const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                                             const at::Tensor& sum_dy_xmu, int64_t count) {
  const char* op = "fastreg.batch_norm_backward_elemt";
  const DType dtype =
      batch_norm_check_backward_elemt_args(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const c10::cuda::CUDAGuard guard(cuda_device(input, op));
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor dy = batch_norm_match_layout(grad_output, dense);
  const BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, mean, invstd, weight);
  const at::Tensor sdy = batch_norm_channel_array(sum_dy, compute);
  const at::Tensor sdyx = batch_norm_channel_array(sum_dy_xmu, compute);
  at::Tensor grad_input = at::empty_like(dense);
  check_launch(batch_norm_backward_elemt_cuda(batch_norm_layout(dense), dtype, dy.data_ptr(), dense.data_ptr(),
                                              grad_input.data_ptr(), arrays.affine(), sdy.data_ptr(), sdyx.data_ptr(),
                                              count, current_stream()),
               op);
  return grad_input;
}

// batch_norm_update_running_cuda updates both statistics in one launch: the two running
// statistics share a dtype, the two batch ones too, and the pair has a kernel.
bool running_stats_kernel_dtypes(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var) {
  const at::ScalarType running = running_mean.scalar_type(), batch = mean.scalar_type();
  return running_var.scalar_type() == running && var.scalar_type() == batch &&
         batch_norm_update_has_kernel(running, batch);
}

void batch_norm_update_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, double momentum, std::optional<int64_t> count) {
  const char* op = "fastreg.batch_norm_update_stats_";
  batch_norm_check_update_stats(running_mean, running_var, mean, var);
  const double var_scale = batch_norm_var_scale(count);
  const c10::cuda::CUDAGuard guard(cuda_device(running_mean, op));
  if (running_stats_kernel_dtypes(running_mean, running_var, mean, var)) {
    const RunningStatsArgs args{running_mean.numel(), running_mean.data_ptr(), running_var.data_ptr(),
                                mean.data_ptr(),      var.data_ptr(),          running_mean.stride(0),
                                running_var.stride(0), mean.stride(0),         var.stride(0)};
    check_launch(batch_norm_update_running_cuda(args, kernel_dtype(running_mean, op), kernel_dtype(mean, op), momentum,
                                                var_scale, current_stream()),
                 op);
  } else {
    batch_norm_blend_running_aten(running_mean, mean, momentum, 1.0);
    batch_norm_blend_running_aten(running_var, var, momentum, var_scale);
  }
  // As on the CPU (batch_norm_running_stats.cpp): autograd's fallback does not bump versions.
  bump_version(running_mean);
  bump_version(running_var);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("batch_norm_train", &batch_norm_train_cuda);
  m.impl("batch_norm_eval", &batch_norm_eval_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda_op);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cuda_op);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda_op);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda_op);
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_cuda);
}

}  // namespace fastreg
