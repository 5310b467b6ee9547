// The widest x86 instruction set the CPU kernels use, chosen once per process.
//
// Kernels with hand-written vector code (batch norm, dropout) keep one version per level and
// call the one this returns. FASTREG_CPU_ISA=avx512|avx2|base caps the choice, so that the C++
// tests run the narrower versions on a machine that has the wider ones (CMakeLists.txt).
#pragma once

#include <cstdlib>
#include <cstring>

namespace fastreg {

enum class CpuIsa {
  Base,    // no assumptions past the compiler's default target
  Avx2,    // AVX2, FMA, F16C, BMI2 (the x86-64-v3 level)
  Avx512,  // AVX-512 F, BW, DQ, VL (the x86-64-v4 level) and the above
};

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::Base;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi2")) {
      best = CpuIsa::Avx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        best = CpuIsa::Avx512;
      }
    }
#endif
    const char* cap = std::getenv("FASTREG_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "base") == 0) best = CpuIsa::Base;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == CpuIsa::Avx512) best = CpuIsa::Avx2;
    return best;
  }();
  return isa;
}

// AVX512_BF16 (vcvtneps2bf16, float -> bfloat16 in one instruction) on top of the Avx512
// level; FASTREG_CPU_ISA=avx512 (or any lower cap) leaves it out.
inline bool cpu_has_avx512_bf16() {
  static const bool yes = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const char* cap = std::getenv("FASTREG_CPU_ISA");
    return cpu_isa() == CpuIsa::Avx512 && __builtin_cpu_supports("avx512bf16") &&
           !(cap != nullptr && std::strcmp(cap, "avx512") == 0);
#else
    return false;
#endif
  }();
  return yes;
}

}  // namespace fastreg
