// Argument checks and kernel arguments shared by the CPU and CUDA batch-norm glue.
// The messages match fastreg/reference/batch_norm.py, so both backends fail alike.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../common/tensor_glue.h"
#include "batch_norm_kernels.h"

namespace fastreg {

// float for fp32/fp16/bf16 inputs, double for fp64: per-channel arrays and statistics.
inline at::ScalarType batch_norm_compute_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype as Python prints it ("torch.float32"), as in the reference's messages.
// The same as the kernels' DType, from the input's or the compute dtype (the invstd and affine
// gradient kernels take it).
inline DType batch_norm_compute_kernel_dtype(at::ScalarType dtype) {
  return batch_norm_compute_dtype(dtype) == at::kDouble ? DType::Float64 : DType::Float32;
}

inline std::string batch_norm_dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(st);
  }
}

inline DType batch_norm_check_input(const at::Tensor& input, const char* op) {
  check_strided(input, op, "input");
  const DType dtype = kernel_dtype(input, op);
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": expected an input of shape (N, C, ...) with at least 2 dimensions, got ",
                    input.dim(), "-D");
  return dtype;
}

// A per-channel tensor (weight, bias, running stats, saved mean/invstd, sums): 1-D, C elements,
// on the input's device, of the input's dtype or the compute dtype (fp32 weights with 16-bit
// activations, as under autocast).
inline void batch_norm_check_channel(const at::Tensor& t, const at::Tensor& input, const char* op, const char* name) {
  check_strided(t, op, name);
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must be 1-D with ", channels,
              " elements (the input's channels), got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ", input.device());
  const at::ScalarType st = t.scalar_type(), own = input.scalar_type(), compute = batch_norm_compute_dtype(own);
  TORCH_CHECK_TYPE(st == own || st == compute, op, ": ", name, " has dtype ", batch_norm_dtype_name(st), "; expected ",
                   batch_norm_dtype_name(own), " (the input's)", compute == own ? "" : " or ",
                   compute == own ? "" : batch_norm_dtype_name(compute));
}

inline void batch_norm_check_optional_channel(const std::optional<at::Tensor>& t, const at::Tensor& input,
                                              const char* op, const char* name) {
  if (t.has_value() && t->defined()) batch_norm_check_channel(*t, input, op, name);
}

inline void batch_norm_check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < INFINITY, op, ": eps must be a finite number >= 0, got ", eps);
}

inline void batch_norm_check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  check_strided(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(),
              " but input is on ", input.device());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output has dtype ",
                   batch_norm_dtype_name(grad_output.scalar_type()), " but input has dtype ",
                   batch_norm_dtype_name(input.scalar_type()));
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
              " but input has shape ", input.sizes());
}

// Every argument check of each op, in the reference's order; the CPU and CUDA glue call these
// before any allocation or device guard. Each returns the input's kernel dtype.
inline DType batch_norm_check_train_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "fastreg.batch_norm";
  const DType dtype = batch_norm_check_input(input, op);
  batch_norm_check_optional_channel(weight, input, op, "weight");
  batch_norm_check_optional_channel(bias, input, op, "bias");
  batch_norm_check_eps(eps, op);
  return dtype;
}

inline DType batch_norm_check_eval_args(const at::Tensor& input, const at::Tensor& running_mean,
                                        const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "fastreg.batch_norm";
  const DType dtype = batch_norm_check_input(input, op);
  batch_norm_check_channel(running_mean, input, op, "running_mean");
  batch_norm_check_channel(running_var, input, op, "running_var");
  batch_norm_check_optional_channel(weight, input, op, "weight");
  batch_norm_check_optional_channel(bias, input, op, "bias");
  batch_norm_check_eps(eps, op);
  return dtype;
}

inline DType batch_norm_check_elemt_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fastreg.batch_norm_elemt";
  const DType dtype = batch_norm_check_input(input, op);
  batch_norm_check_channel(mean, input, op, "mean");
  batch_norm_check_channel(invstd, input, op, "invstd");
  batch_norm_check_optional_channel(weight, input, op, "weight");
  batch_norm_check_optional_channel(bias, input, op, "bias");
  return dtype;
}

inline DType batch_norm_check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& mean, const at::Tensor& invstd,
                                            const std::optional<at::Tensor>& weight) {
  const char* op = "fastreg.batch_norm_backward";
  const DType dtype = batch_norm_check_input(input, op);
  batch_norm_check_grad_output(grad_output, input, op);
  batch_norm_check_channel(mean, input, op, "mean");
  batch_norm_check_channel(invstd, input, op, "invstd");
  batch_norm_check_optional_channel(weight, input, op, "weight");
  return dtype;
}

inline DType batch_norm_check_backward_reduce_args(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& mean) {
  const char* op = "fastreg.batch_norm_backward_reduce";
  const DType dtype = batch_norm_check_input(input, op);
  batch_norm_check_grad_output(grad_output, input, op);
  batch_norm_check_channel(mean, input, op, "mean");
  return dtype;
}

inline DType batch_norm_check_backward_elemt_args(const at::Tensor& grad_output, const at::Tensor& input,
                                                  const at::Tensor& mean, const at::Tensor& invstd,
                                                  const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                                                  const at::Tensor& sum_dy_xmu, int64_t count) {
  const char* op = "fastreg.batch_norm_backward_elemt";
  const DType dtype = batch_norm_check_input(input, op);
  batch_norm_check_grad_output(grad_output, input, op);
  batch_norm_check_channel(mean, input, op, "mean");
  batch_norm_check_channel(invstd, input, op, "invstd");
  batch_norm_check_optional_channel(weight, input, op, "weight");
  batch_norm_check_channel(sum_dy, input, op, "sum_dy");
  batch_norm_check_channel(sum_dy_xmu, input, op, "sum_dy_xmu");
  TORCH_CHECK_VALUE(count > 0 || input.numel() == 0, op, ": count must be > 0, got ", count);
  return dtype;
}

// Per-channel array in the compute dtype, contiguous (a no-op when it already is). Undefined
// stays undefined (the kernels read nullptr as weight 1 / bias 0).
inline at::Tensor batch_norm_channel_array(const std::optional<at::Tensor>& t, at::ScalarType compute) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(compute).contiguous();
}

inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A call's per-channel arrays in the compute dtype, held here so that they outlive the kernel,
// and the BatchNormAffine that points at them (an absent one is nullptr).
struct BatchNormChannelArrays {
  at::Tensor mean, invstd, weight, bias;
  BatchNormAffine affine() const {
    return BatchNormAffine{data_or_null(mean), data_or_null(invstd), data_or_null(weight), data_or_null(bias)};
  }
};

inline BatchNormChannelArrays batch_norm_channel_arrays(at::ScalarType compute, const std::optional<at::Tensor>& mean,
                                                        const std::optional<at::Tensor>& invstd,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias = std::nullopt) {
  return BatchNormChannelArrays{batch_norm_channel_array(mean, compute), batch_norm_channel_array(invstd, compute),
                                batch_norm_channel_array(weight, compute), batch_norm_channel_array(bias, compute)};
}

// The [outer][C][inner] walk of a non-overlapping, dense tensor (see batch_norm_kernels.h):
// the dimensions laid out inside the channel dimension form one block of stride(1) elements,
// whatever the dimension order (contiguous, channels_last, other permutations).
inline BatchNormLayout batch_norm_layout(const at::Tensor& dense) {
  const int64_t channels = dense.size(1);
  const int64_t numel = dense.numel();
  if (numel == 0) return BatchNormLayout{0, channels, 0};
  if (channels == 1) return BatchNormLayout{1, 1, numel};
  const int64_t inner = dense.stride(1);
  return BatchNormLayout{numel / (channels * inner), channels, inner};
}

// grad_output in the memory layout of the dense input (a copy only when it differs).
inline at::Tensor batch_norm_match_layout(const at::Tensor& grad_output, const at::Tensor& dense_input) {
  if (grad_output.strides() == dense_input.strides() && grad_output.is_non_overlapping_and_dense()) return grad_output;
  return at::empty_like(dense_input).copy_(grad_output);
}

// fastreg::batch_norm_update_stats_ (batch_norm_running_stats.cpp): the argument checks, and
// the update with ATen calls for the dtype pairs the kernels leave out (say float64 running
// statistics with float32 batch statistics): running.copy_(running.to(batch's dtype) *
// (1 - momentum) + batch * (momentum * batch_scale)), the reference's formula.
void batch_norm_check_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                                   const at::Tensor& var);
void batch_norm_blend_running_aten(const at::Tensor& running, const at::Tensor& batch, double momentum,
                                   double batch_scale);
// The factor that makes the biased variance of `count` values per channel unbiased,
// count / (count - 1); 1 when count is not given (the variance passed is already unbiased).
// The op takes the count, not the factor: a float argument would be specialised by
// torch.compile (one graph per batch size), a SymInt stays symbolic.
double batch_norm_var_scale(std::optional<int64_t> count);
// Whether an update kernel (CPU loop, CUDA kernel) takes this (running, batch) dtype pair:
// float64 with float64, float32 with float32, float16 or bfloat16 running statistics with
// float32 batch statistics (autocast). Other pairs take batch_norm_blend_running_aten.
bool batch_norm_update_has_kernel(at::ScalarType running, at::ScalarType batch);

}  // namespace fastreg
