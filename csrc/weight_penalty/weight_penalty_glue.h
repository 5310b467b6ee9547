// Argument checks and kernel arguments shared by the CPU and CUDA weight-penalty glue.
// The messages match fastreg/reference/weight_penalty.py, so both backends fail alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "../common/tensor_glue.h"
#include "weight_penalty_kernels.h"

namespace fastreg {

inline void check_penalty_coefficient(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, "fastreg.weight_penalty: ", name,
                    " must be a finite number >= 0, got ", value);
}

inline void check_penalty_coefficients(double l1, double l2) {
  check_penalty_coefficient(l1, "l1");
  check_penalty_coefficient(l2, "l2");
}

// The *_tensor_coefficients ops (torch.compile's form): l1 and l2 as one-element CPU tensors,
// read here on the host, then checked as numbers. Checks and messages: the reference's
// check_coefficient_tensors and coefficient_values.
inline double penalty_coefficient_value(const at::Tensor& c, const char* name) {
  TORCH_CHECK(c.layout() == at::kStrided && c.device().is_cpu(), "fastreg.weight_penalty: the ", name, " tensor is on ",
              c.device(), " with layout ", c.layout(),
              "; coefficient tensors must be dense CPU tensors (their values are read on the host)");
  TORCH_CHECK_TYPE(c.is_floating_point(), "fastreg.weight_penalty: the ", name, " tensor has dtype ", c.scalar_type(),
                   "; expected a floating-point tensor");
  TORCH_CHECK_VALUE(c.numel() == 1, "fastreg.weight_penalty: the ", name, " tensor must have one element, got ", c.numel());
  return c.item<double>();
}

inline std::pair<double, double> penalty_coefficient_values(const at::Tensor& l1, const at::Tensor& l2) {
  // The values are checked after both tensors, in the reference's order.
  const double v1 = penalty_coefficient_value(l1, "l1");
  const double v2 = penalty_coefficient_value(l2, "l2");
  check_penalty_coefficients(v1, v2);
  return {v1, v2};
}

// The *_tensor_coefficients kernels of a device: its float-coefficient kernel, given the values.
template <at::Tensor (*Kernel)(at::TensorList, double, double)>
at::Tensor value_with_tensor_coefficients(at::TensorList params, const at::Tensor& l1, const at::Tensor& l2) {
  const auto [c1, c2] = penalty_coefficient_values(l1, l2);
  return Kernel(params, c1, c2);
}

template <at::Tensor (*Kernel)(at::TensorList, at::TensorList, double, double)>
at::Tensor grad_with_tensor_coefficients(at::TensorList grads, at::TensorList params, const at::Tensor& l1,
                                         const at::Tensor& l2) {
  const auto [c1, c2] = penalty_coefficient_values(l1, l2);
  return Kernel(grads, params, c1, c2);
}

template <std::vector<at::Tensor> (*Kernel)(const at::Tensor&, at::TensorList, double, double)>
std::vector<at::Tensor> backward_with_tensor_coefficients(const at::Tensor& grad_output, at::TensorList params,
                                                          const at::Tensor& l1, const at::Tensor& l2) {
  const auto [c1, c2] = penalty_coefficient_values(l1, l2);
  return Kernel(grad_output, params, c1, c2);
}

inline void check_penalty_param(const at::Tensor& p, size_t i, const at::Tensor& first) {
  TORCH_CHECK(p.layout() == at::kStrided, "fastreg.weight_penalty: params[", i, "] has layout ", p.layout(),
              "; only strided (dense) parameters are supported");
  const at::ScalarType st = p.scalar_type();
  TORCH_CHECK_TYPE(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "fastreg.weight_penalty: params[", i, "] has dtype ", st,
                   "; expected a floating-point tensor (float64, float32, float16 or bfloat16)");
  TORCH_CHECK(p.device() == first.device(), "fastreg.weight_penalty: params[", i, "] is on ", p.device(),
              " but params[0] is on ", first.device(), "; pass the tensors of one device per call");
}

// Every parameter check, in the order of the reference's check_params.
inline void check_penalty_params(at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) check_penalty_param(params[i], i, params[0]);
}

// float64 when any parameter is float64, else float32: the value's dtype and accumulation.
inline at::ScalarType penalty_value_dtype(at::TensorList params) {
  for (const at::Tensor& p : params) {
    if (p.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline at::TensorOptions penalty_value_options(at::TensorList params) {
  const at::Device device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  return at::TensorOptions().dtype(penalty_value_dtype(params)).device(device);
}

// Kernel arguments, plus the dense copies made for them (the caller's own tensors outlive the
// op call; holding a reference to each would cost two atomic operations per tensor per step).
struct PenaltyBatch {
  std::vector<at::Tensor> copies;
  std::vector<PenaltyTensor> tensors;

  explicit PenaltyBatch(size_t count) { tensors.reserve(count); }

  // A tensor of the caller's.
  void add(const at::Tensor& param, void* grad) {
    if (param.numel() == 0) return;
    tensors.push_back(PenaltyTensor{param.data_ptr(), grad, param.numel(), kernel_dtype(param, "fastreg.weight_penalty")});
  }
  // A copy made for the kernels, kept alive with the batch.
  void add_copy(at::Tensor copy, void* grad) {
    add(copy, grad);
    copies.push_back(std::move(copy));
  }
};

// The batch builders below take lists that already passed check_penalty_params (and
// check_penalty_grads): the ops run every check before any allocation or device guard, so a
// mixed-device list fails with the message naming the tensor, as in the reference.
inline PenaltyBatch penalty_value_batch(at::TensorList params) {
  PenaltyBatch batch(params.size());
  for (const at::Tensor& p : params) {
    if (p.is_non_overlapping_and_dense()) {
      batch.add(p, nullptr);
    } else {
      batch.add_copy(memory_dense(p), nullptr);
    }
  }
  return batch;
}

// Backward: one new tensor per parameter, laid out like the (dense) parameter.
inline PenaltyBatch penalty_backward_batch(at::TensorList params, std::vector<at::Tensor>& outputs) {
  PenaltyBatch batch(params.size());
  outputs.clear();
  outputs.reserve(params.size());
  for (const at::Tensor& p : params) {
    if (p.is_non_overlapping_and_dense()) {
      outputs.push_back(at::empty_like(p));
      batch.add(p, outputs.back().data_ptr());
    } else {
      at::Tensor copy = memory_dense(p);
      outputs.push_back(at::empty_like(copy));
      batch.add_copy(std::move(copy), outputs.back().data_ptr());
    }
  }
  return batch;
}

inline void check_penalty_grad(const at::Tensor& g, const at::Tensor& p, size_t i) {
  TORCH_CHECK(g.layout() == at::kStrided, "fastreg.weight_penalty: grads[", i, "] is a sparse gradient (layout ",
              g.layout(), "); the in-place penalty needs dense gradients (e.g. an nn.Embedding with sparse=False)");
  TORCH_CHECK(g.device() == p.device(), "fastreg.weight_penalty: grads[", i, "] is on ", g.device(), " but params[", i,
              "] is on ", p.device());
  TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), "fastreg.weight_penalty: grads[", i, "] has dtype ", g.scalar_type(),
                   " but params[", i, "] has dtype ", p.scalar_type());
  TORCH_CHECK(g.sizes() == p.sizes(), "fastreg.weight_penalty: grads[", i, "] has shape ", g.sizes(), " but params[", i,
              "] has shape ", p.sizes());
  check_overwritable(g, "fastreg.weight_penalty_grad_",
                     "fastreg.functional.weight_penalty(params, l1, l2), which is differentiable", "grads[", i, "]");
  TORCH_CHECK(g.numel() == 0 || g.is_non_overlapping_and_dense(), "fastreg.weight_penalty: grads[", i,
              "] is a view with gaps or overlapping elements (strides ", g.strides(),
              "); the in-place update needs a dense gradient, e.g. torch.zeros_like(param)");
  TORCH_CHECK(g.numel() == 0 || g.data_ptr() != p.data_ptr(), "fastreg.weight_penalty: grads[", i,
              "] is the memory of params[", i, "]");
}

// The bytes [begin, end) a non-empty tensor's elements lie in (exactly its elements when it is dense).
inline std::pair<uintptr_t, uintptr_t> penalty_extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

// The kernels update the gradients in parallel while they read the parameters: a gradient that
// shares memory with another gradient or overlaps any parameter would be updated twice or
// change values still to be read. Gradients are dense, so sorted by address they overlap only
// if neighbours do; each parameter is then found by binary search. The order of the sort
// (begin, end, index) and so the pair named first are the reference's.
inline void check_penalty_grads_overlap(at::TensorList grads, at::TensorList params) {
  struct Range {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Range> ranges;
  ranges.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    const auto [begin, end] = penalty_extent(grads[i]);
    ranges.push_back(Range{begin, end, i});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return std::tie(a.begin, a.end, a.index) < std::tie(b.begin, b.end, b.index);
  });
  for (size_t k = 1; k < ranges.size(); ++k) {
    const Range& a = ranges[k - 1];
    const Range& b = ranges[k];
    const size_t later = std::max(a.index, b.index), earlier = std::min(a.index, b.index);
    TORCH_CHECK(b.begin != a.begin, "fastreg.weight_penalty: grads[", later, "] and grads[", earlier,
                "] share memory; list each parameter once");
    TORCH_CHECK(b.begin >= a.end, "fastreg.weight_penalty: grads[", later, "] and grads[", earlier,
                "] overlap in memory; each gradient needs memory of its own");
  }
  for (size_t j = 0; j < params.size(); ++j) {
    if (params[j].numel() == 0) continue;
    const auto [begin, end] = penalty_extent(params[j]);
    // The first gradient ending after the parameter begins (ends are sorted too: no overlaps).
    const auto it = std::partition_point(ranges.begin(), ranges.end(), [&](const Range& r) { return r.end <= begin; });
    TORCH_CHECK(it == ranges.end() || it->begin >= end, "fastreg.weight_penalty: grads[", it->index,
                "] overlaps params[", j, "] in memory; the in-place update would change a parameter while it is read");
  }
}

// Every gradient check, in the order of the reference's check_grads (parameters checked first).
inline void check_penalty_grads(at::TensorList grads, at::TensorList params) {
  TORCH_CHECK(grads.size() == params.size(), "fastreg.weight_penalty: got ", grads.size(), " gradients for ", params.size(),
              " parameters");
  for (size_t i = 0; i < params.size(); ++i) check_penalty_grad(grads[i], params[i], i);
  check_penalty_grads_overlap(grads, params);
}

// Accumulate: the kernels walk a parameter and its gradient in the same memory order, so a
// parameter laid out differently from its gradient is read through a copy in the gradient's layout.
inline PenaltyBatch penalty_accumulate_batch(at::TensorList grads, at::TensorList params) {
  PenaltyBatch batch(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    if (g.numel() == 0) continue;
    if (p.is_non_overlapping_and_dense() && p.strides() == g.strides()) {
      batch.add(p, g.data_ptr());
    } else {
      batch.add_copy(at::empty_strided(g.sizes(), g.strides(), g.options()).copy_(p), g.data_ptr());
    }
  }
  return batch;
}

inline PenaltyScalars penalty_scalars(double l1, double l2) {
  return PenaltyScalars{l1, l2, nullptr, DType::Float32};
}

// grad_output must be one element on the parameters' device (checked before any device guard).
inline void check_penalty_grad_output(const at::Tensor& grad_output, const at::TensorOptions& value_options) {
  TORCH_CHECK(grad_output.numel() == 1, "fastreg.weight_penalty_backward: grad_output must have one element, got ",
              grad_output.numel());
  TORCH_CHECK(grad_output.device() == value_options.device(), "fastreg.weight_penalty_backward: grad_output is on ",
              grad_output.device(), " but the parameters are on ", value_options.device());
}

// grad_output (checked) in the value's dtype; it stays a tensor on the parameters' device, so
// no host synchronisation is needed on CUDA.
inline at::Tensor penalty_grad_output(const at::Tensor& grad_output, const at::TensorOptions& value_options) {
  return grad_output.to(value_options.dtype().toScalarType()).contiguous();
}

}  // namespace fastreg
