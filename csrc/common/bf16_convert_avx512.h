// float -> bfloat16 for 16 floats with AVX512_BF16's vcvtneps2bf16, shared by the CPU batch
// norm and dropout kernels (called only where cpu_has_avx512_bf16(), cpu_isa.h).
//
// One instruction rounds to nearest even where the spelled-out rounding takes about ten. But
// it reads subnormal inputs as 0 and keeps the sign and payload of NaNs, where c10::BFloat16
// keeps subnormals and gives 0x7FC0: a register holding either must be rounded the long way.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstring>

namespace fastreg {

// Whether vcvtneps2bf16 gives c10::BFloat16's bits for every lane of v.
__attribute__((target("avx512f,avx512dq"))) inline bool bf16_convert_exact(__m512 v) {
  constexpr int kNanOrSubnormal = 0x01 | 0x80 | 0x20;  // quiet NaN, signalling NaN, subnormal
  return _mm512_fpclass_ps_mask(v, kNanOrSubnormal) == 0;
}

__attribute__((target("avx512f,avx512bf16"))) inline __m256i bf16_convert(__m512 v) {
  const __m256bh rounded = _mm512_cvtneps_pbh(v);
  __m256i out;
  std::memcpy(&out, &rounded, sizeof(out));
  return out;
}

}  // namespace fastreg
#endif
