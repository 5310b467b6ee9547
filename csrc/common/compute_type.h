// The arithmetic type of every fastreg kernel: fp32 for fp32/fp16/bf16 tensors, fp64 for fp64.
// Kernels and the reference agree on it, which is what makes their results bit-identical.
#pragma once

namespace fastreg {

template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

}  // namespace fastreg
