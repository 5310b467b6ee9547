// Framework-free entry points of the batch-norm kernels: plain pointers, sizes and a stream.
// batch_norm_ops.cpp / batch_norm_ops_cuda.cpp turn tensors into these calls.
//
// Layout. A dense input of shape (N, C, *) is walked as [outer][channels][inner]:
//   NCHW-like (contiguous):  outer = N, inner = prod(*)         element (o, c, i) at (o*C + c)*inner + i
//   channels-last (stride(1) == 1): outer = N * prod(*), inner = 1
// Outputs (y, grad_input) have the input's layout; grad_output is given in that layout too.
//
// Types. x, y, dy, dx have the tensor's dtype. Every per-channel array (mean, var, invstd,
// weight, bias, sum_dy, sum_dy_xmu) has C elements of the compute type of compute_type.h:
// float for fp32/fp16/bf16 tensors, double for fp64. The glue converts weight and bias.
// Reductions accumulate in double on the CPU; the per-channel results are stored rounded to
// the compute type. Statistics are numerically stable for inputs with a large mean (shifted
// or Welford sums, never sum(x^2) - sum(x)^2 on the raw values).
//
// Formulas (w = 1 and b = 0 when weight / bias are nullptr; count = outer * inner, or the
// global count across processes for SyncBatchNorm):
//   stats:            mean = sum x / count,  var = sum (x - mean)^2 / count   (biased)
//   train forward:    stats, then invstd = 1 / sqrt(var + eps), then elemt
//   elemt:            y = (x - mean) * (invstd * w) + b        (x - mean first: exact near the mean)
//   backward_reduce:  sum_dy = sum dy,  sum_dy_xmu = sum dy * (x - mean)
//   backward_elemt:   training: dx = (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count) * invstd * w
//                     eval (sum_dy == nullptr): dx = dy * invstd * w
// grad_weight = sum_dy_xmu * invstd and grad_bias = sum_dy are formed by the glue.
#pragma once

#include <cstdint>

#include "../dropout/dropout_kernels.h"  // fastreg::DType, shared by every op family

namespace fastreg {

struct BatchNormLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;

  int64_t count() const { return outer * inner; }  // elements per channel
  int64_t numel() const { return outer * channels * inner; }
};

// Per-channel arrays of the compute type. Inputs are const; nullptr weight means 1, bias 0.
struct BatchNormAffine {
  const void* mean;
  const void* invstd;
  const void* weight;
  const void* bias;
};

// ---- CPU (multi-threaded with at::parallel_for inside; results independent of the thread count)

void batch_norm_stats_cpu(const BatchNormLayout& layout, DType dtype, const void* input, void* mean, void* var);

// Writes mean, var (biased) and invstd; y may not alias x.
void batch_norm_train_forward_cpu(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                                  const void* weight, const void* bias, double eps, void* mean, void* var, void* invstd);

void batch_norm_elemt_cpu(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                          const BatchNormAffine& affine);

// invstd = 1 / sqrt(var + eps), each step rounded in `compute` (Float32 or Float64; var and
// invstd hold `channels` values of it): the eval forward's invstd, as batch_norm_invstd_cuda
// and the reference compute it.
void batch_norm_invstd_cpu(int64_t channels, DType compute, const void* var, double eps, void* invstd);

void batch_norm_backward_reduce_cpu(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                    const void* input, const void* mean, void* sum_dy, void* sum_dy_xmu);

// sum_dy == nullptr (and sum_dy_xmu == nullptr): the eval formula. affine.bias is unused.
void batch_norm_backward_elemt_cpu(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                   const void* input, void* grad_input, const BatchNormAffine& affine,
                                   const void* sum_dy, const void* sum_dy_xmu, int64_t count);

// Training backward in one call: backward_reduce (writes sum_dy, sum_dy_xmu), then
// backward_elemt with count = layout.count().
void batch_norm_backward_train_cpu(const BatchNormLayout& layout, DType dtype, const void* grad_output, const void* input,
                                   void* grad_input, const BatchNormAffine& affine, void* sum_dy, void* sum_dy_xmu);

// ---- CUDA: everything on `stream` (a cudaStream_t), no host synchronisation, graph-capturable.
// `workspace` is device scratch of batch_norm_cuda_workspace_bytes(layout) bytes (may be
// nullptr when that is 0). Each returns nullptr, or the CUDA error message of a failed launch.
// Reductions are deterministic: fixed partitions, fixed-order merges, no float atomics.

int64_t batch_norm_cuda_workspace_bytes(const BatchNormLayout& layout, DType dtype);

const char* batch_norm_stats_cuda(const BatchNormLayout& layout, DType dtype, const void* input, void* mean, void* var,
                                  void* workspace, void* stream);

const char* batch_norm_train_forward_cuda(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                                          const void* weight, const void* bias, double eps, void* mean, void* var,
                                          void* invstd, void* workspace, void* stream);

const char* batch_norm_elemt_cuda(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                                  const BatchNormAffine& affine, void* stream);

const char* batch_norm_backward_reduce_cuda(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                            const void* input, const void* mean, void* sum_dy, void* sum_dy_xmu,
                                            void* workspace, void* stream);

const char* batch_norm_backward_elemt_cuda(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                           const void* input, void* grad_input, const BatchNormAffine& affine,
                                           const void* sum_dy, const void* sum_dy_xmu, int64_t count, void* stream);

}  // namespace fastreg
