// fastreg::batch_norm_update_stats_: a training step's update of the running statistics.
// The CPU kernel is here; batch_norm_ops_cuda.cpp has the CUDA one and shares the checks and
// the ATen path below. The formula, its rounding and the messages are the reference's
// (fastreg/reference/batch_norm.py); the schema is defined in fastreg/ops/batch_norm.py.
// Why a loop rather than ATen calls: running_mean.mul_(...).add_(...) and the same for the
// variance were four dispatches (four launches on a GPU) for a few hundred numbers; on the CPU
// the op took 6.9 us of host time, longer than the training forward of a small layer.
#include <torch/library.h>

#include "../common/tensor_glue.h"
#include "batch_norm_glue.h"

namespace fastreg {
namespace {

constexpr const char* kOp = "fastreg.batch_norm_update_stats_";

void check_running_stat(const at::Tensor& running, const at::Tensor& batch, const char* name) {
  TORCH_CHECK(running.layout() == at::kStrided && running.dim() == 1 && running.sizes() == batch.sizes(), kOp, ": ",
              name, " has shape ", running.sizes(), ", the batch statistic ", batch.sizes());
  TORCH_CHECK(running.device() == batch.device(), kOp, ": ", name, " is on ", running.device(),
              " but the batch statistic on ", batch.device());
  TORCH_CHECK_TYPE(at::isFloatingType(running.scalar_type()), kOp, ": ", name, " has dtype ", running.scalar_type(),
                   "; expected a floating-point dtype");
  // Updated in place element by element: elements sharing memory would be updated twice.
  TORCH_CHECK(running.numel() <= 1 || running.stride(0) != 0, kOp, ": ", name,
              " has stride 0 (an expanded tensor), so its elements share memory; pass a tensor of its own");
}

// Stored through a volatile, a product is rounded to T: the compiler may not fuse it into the
// addition that follows (a fused multiply-add rounds once fewer than the reference's formula).
template <typename T>
T rounded(T x) {
  volatile T v = x;
  return v;
}

template <typename R, typename A>
void blend_cpu(const at::Tensor& running, const at::Tensor& batch, double momentum, double batch_scale) {
  const A keep = static_cast<A>(1.0 - momentum);
  const A weight = static_cast<A>(momentum * batch_scale);
  R* r = running.mutable_data_ptr<R>();
  const A* b = batch.const_data_ptr<A>();
  const int64_t rs = running.stride(0), bs = batch.stride(0);
  for (int64_t i = 0, n = running.numel(); i < n; ++i) {
    const A kept = rounded(static_cast<A>(r[i * rs]) * keep);
    const A added = rounded(b[i * bs] * weight);
    r[i * rs] = static_cast<R>(kept + added);
  }
}

void blend(const at::Tensor& running, const at::Tensor& batch, double momentum, double batch_scale) {
  if (!batch_norm_update_has_kernel(running.scalar_type(), batch.scalar_type())) {
    batch_norm_blend_running_aten(running, batch, momentum, batch_scale);
    return;
  }
  switch (running.scalar_type()) {
    case at::kDouble:
      return blend_cpu<double, double>(running, batch, momentum, batch_scale);
    case at::kFloat:
      return blend_cpu<float, float>(running, batch, momentum, batch_scale);
    case at::kHalf:
      return blend_cpu<at::Half, float>(running, batch, momentum, batch_scale);
    case at::kBFloat16:
      return blend_cpu<at::BFloat16, float>(running, batch, momentum, batch_scale);
    default:
      TORCH_INTERNAL_ASSERT(false, kOp, ": batch_norm_update_has_kernel and blend disagree on ", running.scalar_type());
  }
}

}  // namespace

bool batch_norm_update_has_kernel(at::ScalarType running, at::ScalarType batch) {
  if (batch == at::kDouble) return running == at::kDouble;
  return batch == at::kFloat && (running == at::kFloat || running == at::kHalf || running == at::kBFloat16);
}

void batch_norm_check_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                                   const at::Tensor& var) {
  check_running_stat(running_mean, mean, "running_mean");
  check_running_stat(running_var, var, "running_var");
  TORCH_CHECK(running_var.device() == running_mean.device(), kOp, ": running_var is on ", running_var.device(),
              " but running_mean on ", running_mean.device());
  // One value per channel in all four (the CUDA kernel walks them with one count).
  TORCH_CHECK(running_var.numel() == running_mean.numel(), kOp, ": running_var has ", running_var.numel(),
              " elements but running_mean ", running_mean.numel(), "; both hold one value per channel");
}

void batch_norm_blend_running_aten(const at::Tensor& running, const at::Tensor& batch, double momentum,
                                   double batch_scale) {
  const at::NoGradGuard no_grad;
  running.copy_(running.to(batch.scalar_type()) * (1.0 - momentum) + batch * (momentum * batch_scale));
}

double batch_norm_var_scale(std::optional<int64_t> count) {
  if (!count.has_value()) return 1.0;
  TORCH_CHECK(*count >= 2, kOp, ": count is ", *count,
              "; the variance of fewer than 2 values per channel has no unbiased estimate");
  return static_cast<double>(*count) / static_cast<double>(*count - 1);
}

void batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                             const at::Tensor& var, double momentum, std::optional<int64_t> count) {
  batch_norm_check_update_stats(running_mean, running_var, mean, var);
  const double var_scale = batch_norm_var_scale(count);
  blend(running_mean, mean, momentum, 1.0);
  blend(running_var, var, momentum, var_scale);
  // torch bumps versions at the ADInplaceOrView key, which a custom op's kernel runs below
  // when autograd's fallback reaches it: bump here, as the reference does.
  bump_version(running_mean);
  bump_version(running_var);
}

TORCH_LIBRARY_IMPL(fastreg, CPU, m) { m.impl("batch_norm_update_stats_", &batch_norm_update_stats); }

}  // namespace fastreg
