// AVX-512 forms of the CPU dropout kernel's two steps (dropout_cpu_avx512.h). The file builds
// with the baseline flags: each function carries a target attribute (the 16-bit loop gets its
// entry's through `flatten`), and dropout_cpu.cpp calls them only where cpu_isa() found AVX-512.
#include "dropout_cpu_avx512.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstring>

#include "../common/bf16_convert_avx512.h"
#include "../common/cpu_isa.h"
#include "../common/philox.h"

#if !defined(__clang__)
// The vector-typed helpers are only ever inlined into the target-specific entries (flatten);
// GCC's note about their out-of-line ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FASTREG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")))

namespace fastreg {

// ---- keep bits ----------------------------------------------------------------------------
// One group per 64-bit lane, 8 per register. vpmuludq multiplies the low halves of 64-bit
// lanes into full 64-bit products, so with each counter word in the low half of its lane a
// Philox round is two multiplies, two shifts (the high halves) and two three-way xors per
// 8 groups. Packing 16 groups into 32-bit lanes instead needs a multiply for the even and one
// for the odd lanes plus shifts and blends to put the halves back: a third more instructions,
// on a step that limits the kernel below the memory bound. The upper halves of the lanes
// collect bits that nothing reads (multiplies ignore them, the compares mask them out).

constexpr int kGroupsPerRegister = 8;
constexpr int kPhiloxChains = 4;  // registers per word advanced together: independent dependency chains
static_assert(kDropoutCpuBlockGroups % (kGroupsPerRegister * kPhiloxChains) == 0, "whole register sets per block");

FASTREG_AVX512 void dropout_keep_bits_avx512(DropoutRngState rng, uint64_t group0, uint32_t threshold, uint8_t* out) {
  using namespace philox_detail;
  if (threshold == 0) {  // p = 1: nothing kept (the 16-bit compares below need threshold >= 1)
    std::memset(out, 0, kDropoutCpuBlockGroups);
    return;
  }
  const __m512i mul0 = _mm512_set1_epi64(kMul0);
  const __m512i mul1 = _mm512_set1_epi64(kMul1);
  const __m512i lane_index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  // lane < threshold <=> lane <= threshold - 1, which fits 16 bits for threshold in [1, 65536].
  const __m512i last_kept = _mm512_set1_epi16(static_cast<short>(threshold - 1));
  // Of the four 16-bit lanes in a 64-bit lane, the low two are the word's two decisions.
  constexpr __mmask32 kDecisionLanes = 0x33333333u;
  for (int first = 0; first < kDropoutCpuBlockGroups; first += kGroupsPerRegister * kPhiloxChains) {
    __m512i c0[kPhiloxChains], c1[kPhiloxChains], c2[kPhiloxChains], c3[kPhiloxChains];
    for (int v = 0; v < kPhiloxChains; ++v) {
      const uint64_t base = group0 + static_cast<uint64_t>(first + v * kGroupsPerRegister);
      const __m512i group = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(base)), lane_index);
      c0[v] = group;
      c1[v] = _mm512_srli_epi64(group, 32);
      c2[v] = _mm512_set1_epi64(static_cast<uint32_t>(rng.offset));
      c3[v] = _mm512_set1_epi64(static_cast<uint32_t>(rng.offset >> 32));
    }
    uint32_t key0 = dropout_key0(rng.seed), key1 = dropout_key1(rng.seed);
    for (int round = 0; round < 10; ++round) {
      const __m512i k0 = _mm512_set1_epi64(key0);
      const __m512i k1 = _mm512_set1_epi64(key1);
      for (int v = 0; v < kPhiloxChains; ++v) {
        const __m512i p0 = _mm512_mul_epu32(c0[v], mul0);
        const __m512i p1 = _mm512_mul_epu32(c2[v], mul1);
        c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[v], k0, 0x96);  // three-way xor
        c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[v], k1, 0x96);
        c1[v] = p1;
        c3[v] = p0;
      }
      key0 += kWeyl0;
      key1 += kWeyl1;
    }
    for (int v = 0; v < kPhiloxChains; ++v) {
      // Compare-mask bit 4k + h is half h of the word in group k. Two words share a 32-bit
      // mask, one shifted by two bits, so group k owns nibble k, which pdep moves to byte k.
      const uint64_t words01 = static_cast<uint64_t>(_mm512_mask_cmple_epu16_mask(kDecisionLanes, c0[v], last_kept)) |
                               static_cast<uint64_t>(_mm512_mask_cmple_epu16_mask(kDecisionLanes, c1[v], last_kept))
                                   << 2;
      const uint64_t words23 = static_cast<uint64_t>(_mm512_mask_cmple_epu16_mask(kDecisionLanes, c2[v], last_kept)) |
                               static_cast<uint64_t>(_mm512_mask_cmple_epu16_mask(kDecisionLanes, c3[v], last_kept))
                                   << 2;
      const uint64_t bytes = _pdep_u64(words01, 0x0F0F0F0F0F0F0F0FULL) | _pdep_u64(words23, 0xF0F0F0F0F0F0F0F0ULL);
      std::memcpy(out + first + v * kGroupsPerRegister, &bytes, sizeof(bytes));
    }
  }
}

// ---- apply --------------------------------------------------------------------------------
// Sixteen elements (two groups) per register: their 16 keep bits select the scale or 0 as the
// multiplier (x * 0, not a select, so that a dropped NaN or inf gives NaN, as in torch). The
// portable loop instead looks up a row of eight multipliers per group. A partial last
// register is a masked load and store.

namespace {

inline uint32_t keep_bits_at(const uint8_t* bits, int64_t e, int64_t valid) {  // of elements e, e + 1, ...
  const uint32_t low = bits[e / 8];
  return valid > 8 ? low | static_cast<uint32_t>(bits[e / 8 + 1]) << 8 : low;
}

inline __mmask16 first_lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

FASTREG_AVX512 inline __m512 widen(const c10::Half*, __m256i raw) { return _mm512_cvtph_ps(raw); }
FASTREG_AVX512 inline __m512 widen(const c10::BFloat16*, __m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

FASTREG_AVX512 inline __m256i narrow(c10::Half*, __m512 y) {
  return _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // IEEE nearest-even, as c10::Half
}
// Nearest-even with NaN -> 0x7FC0: c10::BFloat16's bits, spelled out. The rounding on CPUs
// without AVX512_BF16, and the fallback of the vcvtneps2bf16 path below.
FASTREG_AVX512 inline __m256i narrow(c10::BFloat16*, __m512 y) {
  const __m512i b = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}

// vcvtneps2bf16 where it gives c10's bits (csrc/common/bf16_convert_avx512.h), else the above.
struct Bf16Convert {};
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline __m256i narrow(Bf16Convert*, __m512 y) {
  return bf16_convert_exact(y) ? bf16_convert(y) : narrow(static_cast<c10::BFloat16*>(nullptr), y);
}

FASTREG_AVX512 inline __m512 kept_scale(uint16_t keep, float scale) {
  return _mm512_maskz_mov_ps(keep, _mm512_set1_ps(scale));
}

// The 16-bit loop, with the rounding of R (T itself, or Bf16Convert). It holds no intrinsics
// of its own, only calls to the target-specific helpers above, so that it compiles for the
// baseline and `flatten` inlines it, helpers and all, into each entry below with that entry's
// instructions. No non-temporal stores: 16-bit dropout is bound by its random numbers, not by
// memory (16M bf16 elements: 3.24-3.29 ms with or without them), and a normal store leaves the
// output in cache for the next layer. The partial end goes through a register-sized buffer.
template <typename T, typename R>
inline void apply_16bit(const T* in, T* out, const uint8_t* bits, int64_t count, float scale) {
  constexpr int kWidth = 16;
  int64_t e = 0;
  for (; e + kWidth <= count; e += kWidth) {
    uint16_t keep;
    std::memcpy(&keep, bits + e / 8, sizeof(keep));
    __m256i raw;
    std::memcpy(&raw, in + e, sizeof(raw));
    const __m256i y = narrow(static_cast<R*>(nullptr), widen(in, raw) * kept_scale(keep, scale));
    std::memcpy(out + e, &y, sizeof(y));
  }
  if (e < count) {
    T part[kWidth] = {};
    std::memcpy(part, in + e, (count - e) * sizeof(T));
    __m256i raw;
    std::memcpy(&raw, part, sizeof(raw));
    const uint16_t keep = static_cast<uint16_t>(keep_bits_at(bits, e, count - e));
    const __m256i y = narrow(static_cast<R*>(nullptr), widen(in, raw) * kept_scale(keep, scale));
    std::memcpy(part, &y, sizeof(y));
    std::memcpy(out + e, part, (count - e) * sizeof(T));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"), flatten)) void apply_fp16(
    const c10::Half* in, c10::Half* out, const uint8_t* bits, int64_t count, float scale) {
  apply_16bit<c10::Half, c10::Half>(in, out, bits, count, scale);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2"), flatten)) void apply_bf16(
    const c10::BFloat16* in, c10::BFloat16* out, const uint8_t* bits, int64_t count, float scale) {
  apply_16bit<c10::BFloat16, c10::BFloat16>(in, out, bits, count, scale);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2,avx512bf16"), flatten)) void apply_bf16_convert(
    const c10::BFloat16* in, c10::BFloat16* out, const uint8_t* bits, int64_t count, float scale) {
  apply_16bit<c10::BFloat16, Bf16Convert>(in, out, bits, count, scale);
}

}  // namespace

FASTREG_AVX512 void dropout_apply_avx512(const float* in, float* out, const uint8_t* bits, int64_t count, float scale,
                                         bool stream) {
  const __m512 s = _mm512_set1_ps(scale);
  stream = stream && (reinterpret_cast<uintptr_t>(out) & 63u) == 0;
  int64_t e = 0;
  for (; e + 16 <= count; e += 16) {
    uint16_t keep;
    std::memcpy(&keep, bits + e / 8, sizeof(keep));
    const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(in + e), _mm512_maskz_mov_ps(keep, s));
    if (stream) {
      _mm512_stream_ps(out + e, y);
    } else {
      _mm512_storeu_ps(out + e, y);
    }
  }
  if (e < count) {
    const __mmask16 valid = first_lanes(count - e);
    const __mmask16 keep = static_cast<__mmask16>(keep_bits_at(bits, e, count - e));
    _mm512_mask_storeu_ps(out + e, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, in + e), _mm512_maskz_mov_ps(keep, s)));
  }
}

FASTREG_AVX512 void dropout_apply_avx512(const double* in, double* out, const uint8_t* bits, int64_t count, double scale,
                                         bool stream) {
  const __m512d s = _mm512_set1_pd(scale);
  stream = stream && (reinterpret_cast<uintptr_t>(out) & 63u) == 0;
  int64_t e = 0;
  for (; e + 8 <= count; e += 8) {  // one group per register
    const __m512d y = _mm512_mul_pd(_mm512_loadu_pd(in + e), _mm512_maskz_mov_pd(bits[e / 8], s));
    if (stream) {
      _mm512_stream_pd(out + e, y);
    } else {
      _mm512_storeu_pd(out + e, y);
    }
  }
  if (e < count) {
    const __mmask8 valid = static_cast<__mmask8>(first_lanes(count - e));
    _mm512_mask_storeu_pd(out + e, valid, _mm512_mul_pd(_mm512_maskz_loadu_pd(valid, in + e), _mm512_maskz_mov_pd(bits[e / 8], s)));
  }
}

void dropout_apply_avx512(const c10::Half* in, c10::Half* out, const uint8_t* bits, int64_t count, float scale,
                          bool /*stream*/) {
  apply_fp16(in, out, bits, count, scale);
}

void dropout_apply_avx512(const c10::BFloat16* in, c10::BFloat16* out, const uint8_t* bits, int64_t count, float scale,
                          bool /*stream*/) {
  if (cpu_has_avx512_bf16()) {
    apply_bf16_convert(in, out, bits, count, scale);
  } else {
    apply_bf16(in, out, bits, count, scale);
  }
}

// ---- bool masks ---------------------------------------------------------------------------
// 64 elements per register: 8 bytes of keep bits are the byte mask that writes 1 or 0, and a
// byte test turns 64 bools back into 8 bytes of bits. The element-by-element loops these
// replace made the bool mode 2.7x slower than the others.

FASTREG_AVX512 void dropout_bits_to_bools_avx512(const uint8_t* bits, int64_t count, uint8_t* bools) {
  const __m512i one = _mm512_set1_epi8(1);
  int64_t e = 0;
  for (; e + 64 <= count; e += 64) {
    uint64_t keep;
    std::memcpy(&keep, bits + e / 8, sizeof(keep));
    _mm512_storeu_si512(bools + e, _mm512_maskz_mov_epi8(keep, one));
  }
  if (e < count) {
    const int64_t rest = count - e;
    uint64_t keep = 0;
    std::memcpy(&keep, bits + e / 8, static_cast<size_t>((rest + 7) / 8));
    _mm512_mask_storeu_epi8(bools + e, (uint64_t{1} << rest) - 1, _mm512_maskz_mov_epi8(keep, one));
  }
}

FASTREG_AVX512 void dropout_bools_to_bits_avx512(const uint8_t* bools, int64_t count, uint8_t* bits) {
  int64_t e = 0;
  for (; e + 64 <= count; e += 64) {
    const __m512i v = _mm512_loadu_si512(bools + e);
    const uint64_t keep = _mm512_test_epi8_mask(v, v);
    std::memcpy(bits + e / 8, &keep, sizeof(keep));
  }
  if (e < count) {
    const int64_t rest = count - e;
    const __m512i v = _mm512_maskz_loadu_epi8((uint64_t{1} << rest) - 1, bools + e);  // the rest read as 0
    const uint64_t keep = _mm512_test_epi8_mask(v, v);
    std::memcpy(bits + e / 8, &keep, static_cast<size_t>((rest + 7) / 8));
  }
}

}  // namespace fastreg
#endif
