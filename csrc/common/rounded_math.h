// Explicitly rounded float/double arithmetic for host+device code: one IEEE rounding per
// operation, never contracted into a fused multiply-add, so kernels and the reference (which
// rounds every product and sum) agree bit for bit. On the device these are the _rn intrinsics;
// a host build must turn contraction off (no_fp_contract.h): GCC contracts a * b + c by default.
#pragma once

#include <cmath>

#include "host_device.h"

namespace fastreg {

#if defined(__CUDA_ARCH__)
FASTREG_HOST_DEVICE float add_rn(float a, float b) { return __fadd_rn(a, b); }
FASTREG_HOST_DEVICE double add_rn(double a, double b) { return __dadd_rn(a, b); }
FASTREG_HOST_DEVICE float sub_rn(float a, float b) { return __fsub_rn(a, b); }
FASTREG_HOST_DEVICE double sub_rn(double a, double b) { return __dsub_rn(a, b); }
FASTREG_HOST_DEVICE float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FASTREG_HOST_DEVICE double mul_rn(double a, double b) { return __dmul_rn(a, b); }
FASTREG_HOST_DEVICE float div_rn(float a, float b) { return __fdiv_rn(a, b); }
FASTREG_HOST_DEVICE double div_rn(double a, double b) { return __ddiv_rn(a, b); }
FASTREG_HOST_DEVICE float sqrt_rn(float a) { return __fsqrt_rn(a); }
FASTREG_HOST_DEVICE double sqrt_rn(double a) { return __dsqrt_rn(a); }
#else
FASTREG_HOST_DEVICE float add_rn(float a, float b) { return a + b; }
FASTREG_HOST_DEVICE double add_rn(double a, double b) { return a + b; }
FASTREG_HOST_DEVICE float sub_rn(float a, float b) { return a - b; }
FASTREG_HOST_DEVICE double sub_rn(double a, double b) { return a - b; }
FASTREG_HOST_DEVICE float mul_rn(float a, float b) { return a * b; }
FASTREG_HOST_DEVICE double mul_rn(double a, double b) { return a * b; }
FASTREG_HOST_DEVICE float div_rn(float a, float b) { return a / b; }
FASTREG_HOST_DEVICE double div_rn(double a, double b) { return a / b; }
FASTREG_HOST_DEVICE float sqrt_rn(float a) { return std::sqrt(a); }
FASTREG_HOST_DEVICE double sqrt_rn(double a) { return std::sqrt(a); }
#endif

}  // namespace fastreg
