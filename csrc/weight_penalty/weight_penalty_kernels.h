// Framework-free entry points of the L1/L2 weight-penalty kernels: plain pointers, sizes and
// a stream. weight_penalty_ops.cpp / weight_penalty_ops_cuda.cpp turn tensor lists into these.
//
// Per tensor w (and its gradient g) the kernels compute, in one pass over memory:
//   S1 = sum |w|,  S2 = sum w^2                         (the value is l1 * S1 + l2 * S2)
//   Accumulate: g <- g + (l1 * sign(w) + (2 * l2) * w)   (sign(0) = 0, as in PyTorch)
//   Backward:   out <- (go * l1) * sign(w) + (2 * (go * l2)) * w   (go * l in the value's dtype:
//                                                                  weight_penalty_coefficients.h)
// in fp32 for fp32/fp16/bf16 tensors and fp64 for fp64 tensors, with one rounding to the
// tensor's dtype at the end. The expressions and their order are those of autograd on the
// naive formula, so fp32 gradients match it bit for bit. Sums are reduced in a fixed order
// (chunk partials in double, then a fixed-order final sum): same inputs, same bits.
#pragma once

#include <cstdint>

#include "../dropout/dropout_kernels.h"  // fastreg::DType, shared by every op family

namespace fastreg {

enum class PenaltyMode : int {
  Value = 0,       // read w; sums only
  Accumulate = 1,  // read w, read g, write g; sums too
  Backward = 2,    // read w, write out; no sums
};

struct PenaltyTensor {
  const void* param;  // numel elements of dtype, dense, in memory order
  void* grad;         // Accumulate: the gradient (param's dtype and strides); Backward: the output; Value: nullptr
  int64_t numel;
  DType dtype;
};

struct PenaltyScalars {
  double l1;                  // >= 0
  double l2;                  // >= 0
  const void* grad_output;    // Backward: one element of grad_output_dtype (a host pointer on CPU, device on CUDA)
  DType grad_output_dtype;    // the value's dtype: Float32, or Float64 when any tensor is float64
};

// Elements per unit of work. Chunks are cut from each tensor independently of the thread
// count or the device, so the partial sums, and hence the bits of the result, never depend
// on how the work was scheduled.
constexpr int64_t kPenaltyChunkCpu = 32768;
constexpr int64_t kPenaltyChunkCuda = 16384;  // one thread block per chunk

// CPU: elements [begin, end) of one tensor; adds nothing up across calls, the caller stores
// sums[0] = S1 and sums[1] = S2 of this range (Backward: left at 0) and parallelises.
void weight_penalty_range_cpu(const PenaltyTensor& tensor, PenaltyMode mode, const PenaltyScalars& scalars, int64_t begin,
                              int64_t end, double sums[2]);

// CUDA: thread blocks (= partial-sum slots) one call over these tensors uses.
int64_t weight_penalty_cuda_blocks(const PenaltyTensor* tensors, int64_t count);

// CUDA: everything on `stream` (a cudaStream_t), no host synchronisation, graph-capturable.
// `partials` is device scratch of 2 * weight_penalty_cuda_blocks(...) doubles. Value and
// Accumulate write l1 * S1 + l2 * S2 to *value_out (a device scalar of value_dtype, Float32
// or Float64). Returns nullptr, or the CUDA error message of a failed launch.
const char* weight_penalty_cuda(const PenaltyTensor* tensors, int64_t count, PenaltyMode mode, const PenaltyScalars& scalars,
                                double* partials, void* value_out, DType value_dtype, void* stream);

}  // namespace fastreg
