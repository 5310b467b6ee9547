// Device-side conversions to and from the compute type of compute_type.h: exact widening,
// round-to-nearest-even narrowing (the rounding the CPU kernels and the reference use).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "compute_type.h"

namespace fastreg {

__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ double to_compute(double x) { return x; }
__device__ __forceinline__ float to_compute(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_compute(typename ComputeType<T>::type x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_compute<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace fastreg
