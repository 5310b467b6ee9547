// CPU batch norm, vector layer: per-ISA pieces (half conversions, non-temporal stores) and
// Io<Isa, T>, the loads and stores of one vector or one element of T in the compute type.
// GCC/Clang vector extensions; the intrinsics carry target attributes, so this compiles with
// baseline flags and runs where batch_norm_cpu_isa_entries.h picks the ISA.
// Private to batch_norm_cpu.cpp, its only includer: internal linkage on purpose, so that
// the per-ISA clones of everything here stay inside that one translation unit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/bf16_convert_avx512.h"
#include "../common/compute_type.h"
// No fused multiply-adds: the element-wise results are those of the reference
// (fastreg/reference/batch_norm.py), bit for bit, given the statistics.
#include "../common/no_fp_contract.h"

#if defined(__GNUC__) && !defined(__clang__)
// Vector-typed helpers are only ever inlined into the per-ISA entry points; GCC's note about
// their out-of-line ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fastreg {
namespace {

template <typename To, typename From>
__attribute__((always_inline)) inline To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// 16-bit lanes widened to / narrowed from 32-bit lanes.
typedef uint16_t u16x4 __attribute__((vector_size(8)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
inline u32x4 widen(u16x4 v) { return __builtin_convertvector(v, u32x4); }
inline u32x8 widen(u16x8 v) { return __builtin_convertvector(v, u32x8); }
inline u32x16 widen(u16x16 v) { return __builtin_convertvector(v, u32x16); }
inline u16x4 narrow(u32x4 v) { return __builtin_convertvector(v, u16x4); }
inline u16x8 narrow(u32x8 v) { return __builtin_convertvector(v, u16x8); }
inline u16x16 narrow(u32x16 v) { return __builtin_convertvector(v, u16x16); }

// A vector of kBytes bytes of E. (A typedef with vector_size inside a class template loses
// the attribute when E does not depend on a template parameter; here it always does.)
template <typename E, int kBytes>
struct VecOf {
  typedef E type __attribute__((vector_size(kBytes)));
};

// ---- per-ISA pieces

struct IsaBase {
  static constexpr bool kBf16Convert = false;  // see IsaAvx512Bf16
  static constexpr int kBytes = 32;
  static constexpr int kStripVecs = 2;  // vectors per row-walk strip: its 3 arrays of accumulators fit the registers
  template <typename U32, typename U16>
  static inline U32 widen16(const U16& v) {
    return widen(v);
  }
  template <typename U16, typename U32>
  static inline U16 narrow32(const U32& v) {
    return narrow(v);
  }
  template <typename VD, typename VH>
  static inline VD to_doubles(const VH& v) {
    return __builtin_convertvector(v, VD);
  }
  template <int N>
  static inline void stream(void* p, const void* v) {
    std::memcpy(p, v, N);
  }
  static inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
  static inline uint16_t float_to_half(float f) { return c10::Half(f).x; }
  template <typename V, typename H>
  static inline V halves_to_floats(const H& h) {
    V v;
    for (int k = 0; k < static_cast<int>(sizeof(V) / 4); ++k) v[k] = half_to_float(h[k]);
    return v;
  }
  template <typename H, typename V>
  static inline H floats_to_halves(const V& v) {
    H h;
    for (int k = 0; k < static_cast<int>(sizeof(V) / 4); ++k) h[k] = float_to_half(v[k]);
    return h;
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTREG_BN_X86 1

// Single-value half conversions of every x86 ISA here (F16C comes with AVX2).
struct F16cScalar {
  __attribute__((target("f16c"))) static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  __attribute__((target("f16c"))) static inline uint16_t float_to_half(float f) {
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct IsaAvx2 : F16cScalar {
  static constexpr bool kBf16Convert = false;
  static constexpr int kBytes = 32;
  static constexpr int kStripVecs = 4;
  // GCC splits and re-joins these conversions when written with __builtin_convertvector.
  template <typename U32, typename U16>
  __attribute__((target("avx2"))) static inline U32 widen16(const U16& v) {
    if constexpr (sizeof(U16) == 16) {
      return bits_as<U32>(_mm256_cvtepu16_epi32(bits_as<__m128i>(v)));
    } else {
      return widen(v);
    }
  }
  template <typename U16, typename U32>
  __attribute__((target("avx2"))) static inline U16 narrow32(const U32& v) {
    if constexpr (sizeof(U32) == 32) {
      const __m256i w = bits_as<__m256i>(v);  // lanes <= 0xFFFF: unsigned saturation is exact
      return bits_as<U16>(_mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    } else {
      return narrow(v);
    }
  }
  template <typename VD, typename VH>
  __attribute__((target("avx2"))) static inline VD to_doubles(const VH& v) {
    return bits_as<VD>(_mm256_cvtps_pd(bits_as<__m128>(v)));
  }
  template <int N>
  __attribute__((target("avx2"))) static inline void stream(void* p, const void* v) {
    if constexpr (N == 32) {
      _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_loadu_si256(static_cast<const __m256i*>(v)));
    } else if constexpr (N == 16) {
      _mm_stream_si128(static_cast<__m128i*>(p), _mm_loadu_si128(static_cast<const __m128i*>(v)));
    } else {
      std::memcpy(p, v, N);
    }
  }
  template <typename V, typename H>
  __attribute__((target("avx2,f16c"))) static inline V halves_to_floats(const H& h) {
    static_assert(sizeof(V) == 32, "8 lanes");
    return bits_as<V>(_mm256_cvtph_ps(bits_as<__m128i>(h)));
  }
  template <typename H, typename V>
  __attribute__((target("avx2,f16c"))) static inline H floats_to_halves(const V& v) {
    return bits_as<H>(_mm256_cvtps_ph(bits_as<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct IsaAvx512 : F16cScalar {
  static constexpr bool kBf16Convert = false;
  static constexpr int kBytes = 64;
  static constexpr int kStripVecs = 8;
  template <typename U32, typename U16>
  __attribute__((target("avx512f"))) static inline U32 widen16(const U16& v) {
    if constexpr (sizeof(U16) == 32) {
      return bits_as<U32>(_mm512_cvtepu16_epi32(bits_as<__m256i>(v)));
    } else {
      return widen(v);
    }
  }
  template <typename U16, typename U32>
  __attribute__((target("avx512f"))) static inline U16 narrow32(const U32& v) {
    if constexpr (sizeof(U32) == 64) {
      return bits_as<U16>(_mm512_cvtepi32_epi16(bits_as<__m512i>(v)));
    } else {
      return narrow(v);
    }
  }
  template <typename VD, typename VH>
  __attribute__((target("avx512f"))) static inline VD to_doubles(const VH& v) {
    return bits_as<VD>(_mm512_cvtps_pd(bits_as<__m256>(v)));
  }
  template <int N>
  __attribute__((target("avx512f"))) static inline void stream(void* p, const void* v) {
    if constexpr (N == 64) {
      _mm512_stream_si512(static_cast<__m512i*>(p), _mm512_loadu_si512(v));
    } else if constexpr (N == 32) {
      _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_loadu_si256(static_cast<const __m256i*>(v)));
    } else {
      std::memcpy(p, v, N);
    }
  }
  template <typename V, typename H>
  __attribute__((target("avx512f"))) static inline V halves_to_floats(const H& h) {
    static_assert(sizeof(V) == 64, "16 lanes");
    return bits_as<V>(_mm512_cvtph_ps(bits_as<__m256i>(h)));
  }
  template <typename H, typename V>
  __attribute__((target("avx512f"))) static inline H floats_to_halves(const V& v) {
    return bits_as<H>(_mm512_cvtps_ph(bits_as<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// AVX-512 plus AVX512_BF16 (csrc/common/bf16_convert_avx512.h), for bfloat16 data only: its
// one-instruction rounding made bf16 the slowest dtype before (eval (32,64,56,56)
// channels_last: bf16 535-556 us, fp16 300-304 us).
struct IsaAvx512Bf16 : IsaAvx512 {
  static constexpr bool kBf16Convert = true;
  template <typename V>
  static inline bool bf16_convert_exact(const V& v) {
    return fastreg::bf16_convert_exact(bits_as<__m512>(v));
  }
  template <typename U16, typename V>
  static inline U16 floats_to_bf16(const V& v) {
    return bits_as<U16>(bf16_convert(bits_as<__m512>(v)));
  }
};
#endif

// ---- loads and stores of one vector (or one element) of T, in the compute type A

template <class Isa, typename T>
struct Io {
  using Elem = T;
  using A = typename ComputeType<T>::type;
  static constexpr int kLanes = Isa::kBytes / static_cast<int>(sizeof(A));
  using V = typename VecOf<A, Isa::kBytes>::type;
  using U16 = typename VecOf<uint16_t, kLanes * 2>::type;
  using U32 = typename VecOf<uint32_t, kLanes * 4>::type;
  // Native double vectors; a float vector widens into kHalves of them.
  using VD = typename VecOf<double, Isa::kBytes>::type;
  using VH = typename VecOf<A, Isa::kBytes / 2>::type;
  static constexpr int kDLanes = Isa::kBytes / 8;
  static constexpr int kHalves = std::is_same_v<A, double> ? 1 : 2;
  static constexpr int kStoreBytes = kLanes * static_cast<int>(sizeof(T));
  static constexpr int kStripVecs = Isa::kStripVecs;

  static inline V splat(A a) { return V{} + a; }

  static inline V load(const T* p) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      V v;
      std::memcpy(&v, p, sizeof(V));
      return v;
    } else {
      U16 bits;
      std::memcpy(&bits, p, sizeof(bits));
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        return bits_as<V>(Isa::template widen16<U32>(bits) << 16);  // bfloat16 is a float's top half
      } else {
        return Isa::template halves_to_floats<V>(bits);
      }
    }
  }

  template <bool kStream>
  static inline void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      if constexpr (kStream) {
        Isa::template stream<sizeof(V)>(p, &v);
      } else {
        std::memcpy(p, &v, sizeof(V));
      }
    } else {
      U16 out;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if constexpr (Isa::kBf16Convert) {
          if (Isa::bf16_convert_exact(v)) {
            out = Isa::template floats_to_bf16<U16>(v);
          } else {
            out = rounded_bf16(v);
          }
        } else {
          out = rounded_bf16(v);
        }
      } else {
        out = Isa::template floats_to_halves<U16>(v);
      }
      if constexpr (kStream) {
        Isa::template stream<sizeof(U16)>(p, &out);
      } else {
        std::memcpy(p, &out, sizeof(U16));
      }
    }
  }

  // Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16(float), branch-free.
  static inline U16 rounded_bf16(const V& v) {
    const U32 bits = bits_as<U32>(v);
    const U32 nan = bits_as<U32>(v != v);
    const U32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    return Isa::template narrow32<U16>((rounded & ~nan) | (0x7FC0u & nan));
  }

  static inline A load1(const T* p) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return bits_as<float>(static_cast<uint32_t>(p->x) << 16);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      return Isa::half_to_float(p->x);
    } else {
      return *p;
    }
  }

  static inline void store1(T* p, A v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const uint32_t bits = bits_as<uint32_t>(v);
      const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
      p->x = static_cast<uint16_t>(nan ? 0x7FC0u : (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      p->x = Isa::float_to_half(v);
    } else {
      *p = v;
    }
  }

  // Compute-type arrays (column arrays, accumulators): plain unaligned vector loads/stores.
  static inline V loada(const A* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void storea(A* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

  // The lanes of a vector as doubles, in lane order: kHalves registers. (One double vector of
  // kLanes lanes instead would be wider than a register, and GCC keeps those on the stack.)
  static inline void wide(const V& v, VD (&out)[kHalves]) {
    if constexpr (kHalves == 1) {
      out[0] = v;
    } else {
      VH lo, hi;
      std::memcpy(&lo, &v, sizeof(VH));
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(VH), sizeof(VH));
      out[0] = Isa::template to_doubles<VD>(lo);
      out[1] = Isa::template to_doubles<VD>(hi);
    }
  }
  // Lanes summed in double by halving the vector (a fixed tree: the same bits every time). The
  // order walk folds its accumulators once per run; lane by lane, the folds cost more than the
  // run's arithmetic (14 x 14 fp32 runs are 12 AVX-512 vectors).
  template <int kBytes>
  static inline double sum_lanes(const typename VecOf<double, kBytes>::type& v) {
    if constexpr (kBytes == 8) {
      return v[0];
    } else {
      using Half = typename VecOf<double, kBytes / 2>::type;
      Half lo, hi;
      std::memcpy(&lo, &v, sizeof(Half));
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
      return sum_lanes<kBytes / 2>(lo + hi);
    }
  }
  static inline double foldd(const VD& acc) { return sum_lanes<static_cast<int>(sizeof(VD))>(acc); }
  static inline double fold(const V& acc) {
    VD h[kHalves];
    wide(acc, h);
    if constexpr (kHalves == 2) return foldd(h[0] + h[1]);
    return foldd(h[0]);
  }
  static inline VD loadd(const double* p) {
    VD v;
    std::memcpy(&v, p, sizeof(VD));
    return v;
  }
  static inline void stored(double* p, const VD& v) { std::memcpy(p, &v, sizeof(VD)); }
};

}  // namespace
}  // namespace fastreg
