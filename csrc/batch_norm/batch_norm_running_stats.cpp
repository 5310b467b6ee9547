// fastreg::batch_norm_update_stats_: a training step's update of the running statistics, for
// CPU and CUDA tensors alike (ATen calls): registered here for CPU, and for CUDA by
// batch_norm_ops_cuda.cpp in builds with CUDA kernels.
// The formulas, their rounding and the messages are those of the reference
// (fastreg/reference/batch_norm.py); the schema is defined in fastreg/ops/batch_norm.py.
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
}

// running = (1 - momentum) * running + momentum * scale * batch, in the running tensor's dtype
// when it is the batch's; else computed in the batch's dtype and copied back.
void blend(const at::Tensor& running, const at::Tensor& batch, double momentum, double batch_scale) {
  if (running.scalar_type() == batch.scalar_type()) {
    running.mul_(1.0 - momentum).add_(batch, momentum * batch_scale);
  } else {
    const at::Tensor scaled = batch_scale == 1.0 ? batch : batch * batch_scale;
    running.copy_(running.to(batch.scalar_type()) * (1.0 - momentum) + scaled * momentum);
  }
  // torch bumps versions at the ADInplaceOrView key, which a custom op's kernel runs below
  // when autograd's fallback reaches it: bump here, as the reference does.
  bump_version(running);
}

}  // namespace

void batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                             const at::Tensor& var, double momentum, double var_scale) {
  check_running_stat(running_mean, mean, "running_mean");
  check_running_stat(running_var, var, "running_var");
  const at::NoGradGuard no_grad;
  blend(running_mean, mean, momentum, 1.0);
  blend(running_var, var, momentum, var_scale);
}

TORCH_LIBRARY_IMPL(fastreg, CPU, m) { m.impl("batch_norm_update_stats_", &batch_norm_update_stats); }

}  // namespace fastreg
