// CPU implementations of the fastreg batch-norm ops. The schemas are defined in
// fastreg/ops/batch_norm.py (so the ops exist, on the reference, without a compiler); the
// checks and their messages are those of fastreg/reference/batch_norm.py, in the same order.
#include <torch/library.h>

#include "../common/cpu_output_pool.h"
#include "batch_norm_glue.h"

namespace fastreg {
namespace {

at::Tensor channel_tensor(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(batch_norm_compute_dtype(input.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(const at::Tensor& input,
                                                                                const std::optional<at::Tensor>& weight,
                                                                                const std::optional<at::Tensor>& bias,
                                                                                double eps) {
  const DType dtype = batch_norm_check_train_args(input, weight, bias, eps);
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor w = batch_norm_channel_array(weight, compute);
  const at::Tensor b = batch_norm_channel_array(bias, compute);
  at::Tensor output = empty_like_pooled(dense);
  at::Tensor mean = channel_tensor(input), invstd = channel_tensor(input), var = channel_tensor(input);
  batch_norm_train_forward_cpu(batch_norm_layout(dense), dtype, dense.data_ptr(), output.data_ptr(), data_or_null(w),
                               data_or_null(b), eps, mean.data_ptr(), var.data_ptr(), invstd.data_ptr());
  return {output, mean, invstd, var};
}

at::Tensor batch_norm_eval_cpu(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps) {
  const DType dtype = batch_norm_check_eval_args(input, running_mean, running_var, weight, bias, eps);
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, running_mean, std::nullopt, weight, bias);
  const at::Tensor var = batch_norm_channel_array(running_var, compute);
  arrays.invstd = channel_tensor(input);
  batch_norm_invstd_cpu(input.size(1), batch_norm_compute_kernel_dtype(compute), var.data_ptr(), eps,
                        arrays.invstd.data_ptr());
  at::Tensor output = empty_like_pooled(dense);
  batch_norm_elemt_cpu(batch_norm_layout(dense), dtype, dense.data_ptr(), output.data_ptr(), arrays.affine());
  return output;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu_op(const at::Tensor& input) {
  const DType dtype = batch_norm_check_input(input, "fastreg.batch_norm_stats");
  const at::Tensor dense = memory_dense(input);
  at::Tensor mean = channel_tensor(input), var = channel_tensor(input);
  batch_norm_stats_cpu(batch_norm_layout(dense), dtype, dense.data_ptr(), mean.data_ptr(), var.data_ptr());
  return {mean, var};
}

at::Tensor batch_norm_elemt_cpu_op(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const DType dtype = batch_norm_check_elemt_args(input, mean, invstd, weight, bias);
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, mean, invstd, weight, bias);
  at::Tensor output = empty_like_pooled(dense);
  batch_norm_elemt_cpu(batch_norm_layout(dense), dtype, dense.data_ptr(), output.data_ptr(), arrays.affine());
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(const at::Tensor& grad_output,
                                                                       const at::Tensor& input, const at::Tensor& mean,
                                                                       const at::Tensor& invstd,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       bool training) {
  const DType dtype = batch_norm_check_backward_args(grad_output, input, mean, invstd, weight);
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor dy = batch_norm_match_layout(grad_output, dense);
  const BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, mean, invstd, weight);
  const BatchNormAffine affine = arrays.affine();
  const BatchNormLayout layout = batch_norm_layout(dense);
  at::Tensor grad_input = empty_like_pooled(dense);
  at::Tensor sum_dy = channel_tensor(input), sum_dy_xmu = channel_tensor(input);
  if (training) {
    batch_norm_backward_train_cpu(layout, dtype, dy.data_ptr(), dense.data_ptr(), grad_input.data_ptr(), affine,
                                  sum_dy.data_ptr(), sum_dy_xmu.data_ptr());
  } else {
    // Eval: the input gradient needs no reduction, grad_weight and grad_bias still do.
    batch_norm_backward_reduce_cpu(layout, dtype, dy.data_ptr(), dense.data_ptr(), affine.mean, sum_dy.data_ptr(),
                                   sum_dy_xmu.data_ptr());
    batch_norm_backward_elemt_cpu(layout, dtype, dy.data_ptr(), dense.data_ptr(), grad_input.data_ptr(), affine,
                                  nullptr, nullptr, 0);
  }
  const at::ScalarType out_dtype =
      weight.has_value() && weight->defined() ? weight->scalar_type() : compute;
  at::Tensor grad_weight = sum_dy_xmu.mul(arrays.invstd).to(out_dtype);
  at::Tensor grad_bias = sum_dy.to(out_dtype);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu_op(const at::Tensor& grad_output,
                                                                     const at::Tensor& input, const at::Tensor& mean) {
  const DType dtype = batch_norm_check_backward_reduce_args(grad_output, input, mean);
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor dy = batch_norm_match_layout(grad_output, dense);
  const at::Tensor m = batch_norm_channel_array(mean, compute);
  at::Tensor sum_dy = channel_tensor(input), sum_dy_xmu = channel_tensor(input);
  batch_norm_backward_reduce_cpu(batch_norm_layout(dense), dtype, dy.data_ptr(), dense.data_ptr(), m.data_ptr(),
                                 sum_dy.data_ptr(), sum_dy_xmu.data_ptr());
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cpu_op(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& mean, const at::Tensor& invstd,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                                            const at::Tensor& sum_dy_xmu, int64_t count) {
  const DType dtype =
      batch_norm_check_backward_elemt_args(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const at::ScalarType compute = batch_norm_compute_dtype(input.scalar_type());
  const at::Tensor dense = memory_dense(input);
  const at::Tensor dy = batch_norm_match_layout(grad_output, dense);
  const BatchNormChannelArrays arrays = batch_norm_channel_arrays(compute, mean, invstd, weight);
  const at::Tensor sdy = batch_norm_channel_array(sum_dy, compute);
  const at::Tensor sdyx = batch_norm_channel_array(sum_dy_xmu, compute);
  at::Tensor grad_input = empty_like_pooled(dense);
  batch_norm_backward_elemt_cpu(batch_norm_layout(dense), dtype, dy.data_ptr(), dense.data_ptr(),
                                grad_input.data_ptr(), arrays.affine(), sdy.data_ptr(), sdyx.data_ptr(), count);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu_op);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cpu_op);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu_op);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu_op);
}

}  // namespace fastreg
