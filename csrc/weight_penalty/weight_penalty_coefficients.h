// (c1, c2x2) of weight_penalty_kernels.h's formulas: the one rule of the CPU kernel, the CUDA
// kernel (host+device code) and fastreg/reference/weight_penalty.py, rounded as autograd rounds
// them on the naive formula l1 * sum(|w|) + l2 * sum(w^2), so that gradients match its bits.
//
//   Value, Accumulate: c1 = l1, c2x2 = 2 * l2, in the compute type A.
//   Backward: the value is a tensor of the value dtype V (float64 when any parameter is float64,
//   else float32), so autograd forms each coefficient's gradient go * l in V and casts it to
//   the parameter's dtype where the float32 and float64 sums meet: c1 = A(go * l1),
//   c2x2 = 2 * A(go * l2), with the products in V (the dtype of grad_output, which the glue
//   converts to V). A float32 parameter in a list with a float64 one thus gets float(double(go)
//   * l1), not float(go) * float(l1).
//
// mul_rn: one rounding per product, never contracted (rounded_math.h).
#pragma once

#include "../common/host_device.h"
#include "../common/rounded_math.h"
#include "weight_penalty_kernels.h"

namespace fastreg {

template <typename A>
FASTREG_HOST_DEVICE void penalty_coefficients(PenaltyMode mode, const PenaltyScalars& s, A& c1, A& c2x2) {
  if (mode != PenaltyMode::Backward) {
    c1 = static_cast<A>(s.l1);
    c2x2 = mul_rn(A(2), static_cast<A>(s.l2));
  } else if (s.grad_output_dtype == DType::Float64) {
    const double go = *static_cast<const double*>(s.grad_output);  // device memory on CUDA: no sync
    c1 = static_cast<A>(mul_rn(go, s.l1));
    c2x2 = mul_rn(A(2), static_cast<A>(mul_rn(go, s.l2)));
  } else {
    const float go = *static_cast<const float*>(s.grad_output);
    c1 = static_cast<A>(mul_rn(go, static_cast<float>(s.l1)));
    c2x2 = mul_rn(A(2), static_cast<A>(mul_rn(go, static_cast<float>(s.l2))));
  }
}

}  // namespace fastreg
