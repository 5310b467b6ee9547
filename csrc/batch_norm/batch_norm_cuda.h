// CUDA-only helpers of batch_norm_ops_cuda.cpp, beside the contract of batch_norm_kernels.h:
// the small per-channel steps the glue would otherwise do with several ATen launches.
// Same conventions: plain pointers, `stream` is a cudaStream_t, nullptr or an error message.
#pragma once

#include <cstdint>

#include "batch_norm_kernels.h"

namespace fastreg {

// invstd = 1 / sqrt(var + eps), each step rounded in the compute type (`compute` is Float32 or
// Float64; var and invstd hold `channels` values of it). The eval forward's invstd.
const char* batch_norm_invstd_cuda(int64_t channels, DType compute, const void* var, double eps, void* invstd,
                                   void* stream);

// grad_weight = sum_dy_xmu * invstd (product in the compute type), grad_bias = sum_dy, both
// rounded to `out` (the weight's dtype, or the compute type without weight). Inputs are
// `channels` values of the compute type.
const char* batch_norm_grad_affine_cuda(int64_t channels, DType compute, DType out, const void* sum_dy,
                                        const void* sum_dy_xmu, const void* invstd, void* grad_weight, void* grad_bias,
                                        void* stream);

// The training step's running-statistics update, mean and variance in one launch. Element c of
// each array is at c * its stride. mean and var hold the batch statistics in the compute type;
// running_mean and running_var are of `running`: the compute type, or Float16/BFloat16 with a
// Float32 compute type (other pairs return an error; the glue sends them to ATen).
//   running = (1 - momentum) * running + momentum * scale * batch   (scale = 1 for the mean,
//   var_scale for the variance), each product and the sum rounded in the compute type.
struct RunningStatsArgs {
  int64_t channels;
  void* running_mean;
  void* running_var;
  const void* mean;
  const void* var;
  int64_t running_mean_stride;
  int64_t running_var_stride;
  int64_t mean_stride;
  int64_t var_stride;
};

const char* batch_norm_update_running_cuda(const RunningStatsArgs& args, DType running, DType compute,
                                          double momentum, double var_scale, void* stream);

}  // namespace fastreg
