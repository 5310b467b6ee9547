// The AVX-512 half of the CPU dropout kernel (dropout_cpu_avx512.cpp): keep bits of a block of
// groups and the multiply by the kept scale, for the CPUs cpu_isa() finds AVX-512 on. Only
// dropout_cpu.cpp calls these, after that check; the rest of the kernel is in dropout_cpu.cpp.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dropout_rng.h"

namespace fastreg {

// Groups whose keep bits the CPU kernel draws at once (one Philox call per group).
constexpr int kDropoutCpuBlockGroups = 64;

// Keep bits of groups [group0, group0 + kDropoutCpuBlockGroups): out[k] for group0 + k, bit j
// for element j of the group, as dropout_keep_bits gives them.
void dropout_keep_bits_avx512(DropoutRngState rng, uint64_t group0, uint32_t threshold, uint8_t* out);

// out[e] = in[e] * (bit e of bits ? scale : 0) for e in [0, count), computed in float (double
// for double) and rounded once to the element type, as the portable loop does. `stream` asks
// for non-temporal stores, which the float and double forms use where `out` is 64-byte
// aligned. out may be in.
void dropout_apply_avx512(const float* in, float* out, const uint8_t* bits, int64_t count, float scale, bool stream);
void dropout_apply_avx512(const double* in, double* out, const uint8_t* bits, int64_t count, double scale, bool stream);
void dropout_apply_avx512(const c10::Half* in, c10::Half* out, const uint8_t* bits, int64_t count, float scale,
                          bool stream);
void dropout_apply_avx512(const c10::BFloat16* in, c10::BFloat16* out, const uint8_t* bits, int64_t count, float scale,
                          bool stream);

// Bool masks (mask_mode "bool"): bools[e] = bit e of bits, and back (a nonzero byte is kept),
// for e in [0, count); the bits past count in the last byte are written as 0.
void dropout_bits_to_bools_avx512(const uint8_t* bits, int64_t count, uint8_t* bools);
void dropout_bools_to_bits_avx512(const uint8_t* bools, int64_t count, uint8_t* bits);

}  // namespace fastreg
