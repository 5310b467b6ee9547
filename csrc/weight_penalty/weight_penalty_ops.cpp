// CPU implementations of the fastreg weight-penalty ops. The schemas are defined in
// fastreg/ops/weight_penalty.py (so the ops exist, on the reference, without a compiler).
#include <limits>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "weight_penalty_glue.h"

namespace fastreg {
namespace {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Runs `mode` over every tensor and returns (S1, S2). Chunks are fixed slices of each tensor
// and their partial sums are added in chunk order, so the result does not depend on the
// number of threads or on how at::parallel_for splits the work.
std::pair<double, double> run_cpu(const PenaltyBatch& batch, PenaltyMode mode, const PenaltyScalars& scalars) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(batch.tensors.size()); ++t) {
    const int64_t n = batch.tensors[t].numel;
    for (int64_t b = 0; b < n; b += kPenaltyChunkCpu) chunks.push_back(Chunk{t, b, std::min(n, b + kPenaltyChunkCpu)});
  }
  std::vector<double> partials(2 * chunks.size(), 0.0);
  constexpr int64_t kChunksPerTask = 2;  // >= 64K elements per task: enough to amortise a thread wake-up
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kChunksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& chunk = chunks[c];
      weight_penalty_range_cpu(batch.tensors[chunk.tensor], mode, scalars, chunk.begin, chunk.end, &partials[2 * c]);
    }
  });
  double s1 = 0.0, s2 = 0.0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    s1 += partials[2 * c];
    s2 += partials[2 * c + 1];
  }
  return {s1, s2};
}

at::Tensor value_tensor(at::TensorList params, double l1, double l2, std::pair<double, double> sums) {
  at::Tensor value = at::empty({}, penalty_value_options(params));
  const double total = l1 * sums.first + l2 * sums.second;
  // One rounding to the value's dtype, done here: fill_ refuses a finite double beyond float's
  // range, where the naive formula (a float32 sum) gives inf, as IEEE 754 rounding does.
  static_assert(std::numeric_limits<float>::is_iec559, "IEEE 754 float: out-of-range doubles round to inf");
  if (value.scalar_type() == at::kFloat) {
    value.fill_(static_cast<float>(total));
  } else {
    value.fill_(total);
  }
  return value;
}

at::Tensor weight_penalty_value_cpu(at::TensorList params, double l1, double l2) {
  check_penalty_coefficients(l1, l2);
  check_penalty_params(params);
  const PenaltyBatch batch = penalty_value_batch(params);
  return value_tensor(params, l1, l2, run_cpu(batch, PenaltyMode::Value, penalty_scalars(l1, l2)));
}

at::Tensor weight_penalty_grad_cpu(at::TensorList grads, at::TensorList params, double l1, double l2) {
  check_penalty_coefficients(l1, l2);
  check_penalty_params(params);
  check_penalty_grads(grads, params);
  for (const at::Tensor& g : grads) bump_version(g);
  const PenaltyBatch batch = penalty_accumulate_batch(grads, params);
  return value_tensor(params, l1, l2, run_cpu(batch, PenaltyMode::Accumulate, penalty_scalars(l1, l2)));
}

std::vector<at::Tensor> weight_penalty_backward_cpu(const at::Tensor& grad_output, at::TensorList params, double l1,
                                                    double l2) {
  check_penalty_coefficients(l1, l2);
  check_penalty_params(params);
  const at::TensorOptions value_options = penalty_value_options(params);
  check_penalty_grad_output(grad_output, value_options);
  std::vector<at::Tensor> outputs;
  const PenaltyBatch batch = penalty_backward_batch(params, outputs);
  const at::Tensor go = penalty_grad_output(grad_output, value_options);
  PenaltyScalars scalars = penalty_scalars(l1, l2);
  scalars.grad_output = go.data_ptr();
  scalars.grad_output_dtype = kernel_dtype(go, "fastreg.weight_penalty_backward");
  run_cpu(batch, PenaltyMode::Backward, scalars);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("weight_penalty_value", &weight_penalty_value_cpu);
  m.impl("weight_penalty_grad_", &weight_penalty_grad_cpu);
  m.impl("weight_penalty_backward", &weight_penalty_backward_cpu);
  // l1 and l2 as CPU tensors, read on the host
  m.impl("weight_penalty_value_tensor_coefficients", &value_with_tensor_coefficients<&weight_penalty_value_cpu>);
  m.impl("weight_penalty_grad_tensor_coefficients_", &grad_with_tensor_coefficients<&weight_penalty_grad_cpu>);
  m.impl("weight_penalty_backward_tensor_coefficients", &backward_with_tensor_coefficients<&weight_penalty_backward_cpu>);
}

}  // namespace fastreg
