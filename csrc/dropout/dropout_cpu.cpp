// CPU dropout: random bits, output and mask in one pass over memory. Free of torch types
// except c10's header-only half/bfloat16 conversions; dropout_ops.cpp parallelises.
#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/compute_type.h"
#include "../common/cpu_cache.h"
#include "../common/cpu_isa.h"
#include "dropout_cpu_avx512.h"
#include "dropout_kernels.h"

// Functions cloned per ISA (AVX-512, AVX2, baseline), the best picked at load time; the
// hand-written AVX-512 steps are in dropout_cpu_avx512.cpp, chosen by cpu_isa().
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTREG_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTREG_ISA_CLONES
#endif

namespace fastreg {
namespace {

constexpr int kBlockGroups = kDropoutCpuBlockGroups;  // Philox calls computed side by side, in SIMD lanes

// Keep bits of groups [group0, group0 + kBlockGroups): the scalar philox4x32_10 rewritten
// structure-of-arrays so that each round is one vector loop. Cloned per ISA, picked at load.
FASTREG_ISA_CLONES void keep_bits_block(DropoutRngState rng, uint64_t group0, uint32_t threshold, uint8_t* out) {
  using namespace philox_detail;
  uint32_t c0[kBlockGroups], c1[kBlockGroups], c2[kBlockGroups], c3[kBlockGroups];
  for (int k = 0; k < kBlockGroups; ++k) {
    const uint64_t group = group0 + k;
    c0[k] = static_cast<uint32_t>(group);
    c1[k] = static_cast<uint32_t>(group >> 32);
    c2[k] = static_cast<uint32_t>(rng.offset);
    c3[k] = static_cast<uint32_t>(rng.offset >> 32);
  }
  uint32_t key0 = dropout_key0(rng.seed), key1 = dropout_key1(rng.seed);
  for (int round = 0; round < 10; ++round) {
    for (int k = 0; k < kBlockGroups; ++k) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0[k];
      const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2[k];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[k] ^ key0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[k] ^ key1;
      c1[k] = static_cast<uint32_t>(p1);
      c3[k] = static_cast<uint32_t>(p0);
      c0[k] = n0;
      c2[k] = n2;
    }
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  for (int k = 0; k < kBlockGroups; ++k) {  // straight-line, so this loop vectorises too
    out[k] = static_cast<uint8_t>(
        static_cast<uint32_t>((c0[k] & 0xFFFFu) < threshold) | static_cast<uint32_t>((c0[k] >> 16) < threshold) << 1 |
        static_cast<uint32_t>((c1[k] & 0xFFFFu) < threshold) << 2 | static_cast<uint32_t>((c1[k] >> 16) < threshold) << 3 |
        static_cast<uint32_t>((c2[k] & 0xFFFFu) < threshold) << 4 | static_cast<uint32_t>((c2[k] >> 16) < threshold) << 5 |
        static_cast<uint32_t>((c3[k] & 0xFFFFu) < threshold) << 6 | static_cast<uint32_t>((c3[k] >> 16) < threshold) << 7);
  }
}

void keep_bits(DropoutRngState rng, uint64_t group0, uint32_t threshold, uint8_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() == CpuIsa::Avx512) return dropout_keep_bits_avx512(rng, group0, threshold, out);
#endif
  keep_bits_block(rng, group0, threshold, out);
}

template <typename T>
using Compute = ComputeType<T>;

template <typename T>
typename Compute<T>::type keep_scale(const DropoutArgs& args) {
  if constexpr (std::is_same_v<T, double>) {
    return args.scale_f64;
  } else {
    return args.scale;
  }
}

// Element conversions. bfloat16 is rounded branch-free (nearest-even, NaN -> 0x7FC0, the
// same bits as c10::BFloat16) so the group loop vectorises; c10's version branches on NaN.
template <typename Acc, typename T>
inline Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T, typename Acc>
inline T from_acc(Acc v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// multipliers[b][j] = (bit j of b) ? scale : 0: one table row turns a keep byte into the
// eight factors of its group, so applying a group is one SIMD multiply. x * 0 (not a
// select) keeps torch's semantics for NaN and inf inputs.
template <typename Acc>
struct MultiplierTable {
  alignas(64) Acc row[256][kDropoutGroup];
  explicit MultiplierTable(Acc scale) {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < kDropoutGroup; ++j) row[b][j] = ((b >> j) & 1) ? scale : Acc(0);
  }
};

// Stores one group with non-temporal 16-byte writes: for outputs too large to stay in cache,
// this spares the read-for-ownership of every cache line (a third of the traffic).
template <typename T>
inline void store_group(T* dst, const T (&src)[kDropoutGroup]) {
#if defined(__SSE2__)
  static_assert(sizeof(src) % 16 == 0, "a group is a whole number of 16-byte words");
  for (size_t w = 0; w < sizeof(src) / 16; ++w) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst) + w, _mm_load_si128(reinterpret_cast<const __m128i*>(src) + w));
  }
#else
  std::memcpy(dst, src, sizeof(src));
#endif
}

// Full groups of one block, any dtype: a table row per keep byte, one multiply per group.
template <typename T, typename Acc>
void apply_groups(const T* in, T* out, const MultiplierTable<Acc>& table, const uint8_t* bits, int64_t full_groups,
                  bool streaming) {
  for (int64_t g = 0; g < full_groups; ++g) {
    const Acc* multiplier = table.row[bits[g]];
    alignas(16) T result[kDropoutGroup];
    for (int j = 0; j < kDropoutGroup; ++j) result[j] = from_acc<T>(to_acc<Acc>(in[g * kDropoutGroup + j]) * multiplier[j]);
    if (streaming) {
      store_group(out + g * kDropoutGroup, result);
    } else {
      std::memcpy(out + g * kDropoutGroup, result, sizeof(result));
    }
  }
}

// Full groups of a bfloat16 block on raw 16-bit words, portable form: widen, multiply, round
// to nearest-even (NaN -> 0x7FC0, c10's bits), narrow.
void apply_bf16_groups_generic(const uint16_t* in, uint16_t* out, const uint8_t* bits, int64_t groups,
                               const float (*rows)[kDropoutGroup]) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* multiplier = rows[bits[g]];
    for (int j = 0; j < kDropoutGroup; ++j) {
      const uint32_t widened = static_cast<uint32_t>(in[g * kDropoutGroup + j]) << 16;
      float value;
      std::memcpy(&value, &widened, sizeof(value));
      value *= multiplier[j];
      uint32_t b;
      std::memcpy(&b, &value, sizeof(b));
      const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
      out[g * kDropoutGroup + j] = static_cast<uint16_t>(nan ? 0x7FC0u : (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same, one group per 256-bit register. GCC vectorises the portable loop across groups
// and assembles each group's table row lane by lane (hundreds of inserts per 16 groups); one
// group per register needs one row load. Each group is loaded before it is stored, so in place
// (in == out) is fine.
__attribute__((target("avx2"))) void apply_bf16_groups_avx2(const uint16_t* in, uint16_t* out, const uint8_t* bits,
                                                            int64_t groups, const float (*rows)[kDropoutGroup]) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i round_bias = _mm256_set1_epi32(0x7FFF);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i infinity = _mm256_set1_epi32(0x7F800000);
  const __m256i quiet_nan = _mm256_set1_epi32(0x7FC0);
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + g * kDropoutGroup));
    const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    const __m256i b = _mm256_castps_si256(_mm256_mul_ps(x, _mm256_load_ps(rows[bits[g]])));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, round_bias), lsb), 16);
    r = _mm256_blendv_epi8(r, quiet_nan, _mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), infinity));
    const __m128i narrowed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * kDropoutGroup), narrowed);
  }
}

void apply_bf16_groups(const uint16_t* in, uint16_t* out, const uint8_t* bits, int64_t groups,
                       const float (*rows)[kDropoutGroup]) {
  if (cpu_isa() >= CpuIsa::Avx2) {
    apply_bf16_groups_avx2(in, out, bits, groups, rows);
  } else {
    apply_bf16_groups_generic(in, out, bits, groups, rows);
  }
}

// float16 the same way with the F16C conversions (IEEE nearest-even, as c10::Half's): the
// portable path converts element by element through c10::Half and ran 5x slower than bf16.
__attribute__((target("avx2,f16c"))) void apply_fp16_groups_f16c(const uint16_t* in, uint16_t* out,
                                                                 const uint8_t* bits, int64_t groups,
                                                                 const float (*rows)[kDropoutGroup]) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + g * kDropoutGroup));
    const __m256 y = _mm256_mul_ps(_mm256_cvtph_ps(raw), _mm256_load_ps(rows[bits[g]]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * kDropoutGroup),
                     _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Whether apply_fp16_groups can run here; else the portable loop of apply_groups does.
bool has_f16c() { return cpu_isa() >= CpuIsa::Avx2; }
#else
void apply_bf16_groups(const uint16_t* in, uint16_t* out, const uint8_t* bits, int64_t groups,
                       const float (*rows)[kDropoutGroup]) {
  apply_bf16_groups_generic(in, out, bits, groups, rows);
}
void apply_fp16_groups_f16c(const uint16_t*, uint16_t*, const uint8_t*, int64_t, const float (*)[kDropoutGroup]) {}
bool has_f16c() { return false; }
#endif

// Elements [e0, e1) of one block whose keep bits are bits[(e - e0) / 8] >> ((e - e0) % 8).
template <typename T>
void apply_block(const DropoutArgs& args, const MultiplierTable<typename Compute<T>::type>& table, const uint8_t* bits,
                 int64_t e0, int64_t e1) {
  using Acc = typename Compute<T>::type;
  const T* in = static_cast<const T*>(args.input) + e0;
  T* out = static_cast<T*>(args.output) + e0;
  const int64_t full_groups = (e1 - e0) / kDropoutGroup;
  // Non-temporal stores need 16-byte alignment, and pay only when input and output overflow
  // the cache together (csrc/common/cpu_cache.h).
  const bool streaming = (reinterpret_cast<uintptr_t>(out) & 15u) == 0 &&
                         bypass_cache_for(2 * args.n * static_cast<int64_t>(sizeof(T)), CachePass::ComputeBound);
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() == CpuIsa::Avx512) {  // the whole range, partial last group included
    return dropout_apply_avx512(in, out, bits, e1 - e0, keep_scale<T>(args), streaming);
  }
#endif
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    apply_bf16_groups(reinterpret_cast<const uint16_t*>(in), reinterpret_cast<uint16_t*>(out), bits, full_groups,
                      table.row);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) {
      apply_fp16_groups_f16c(reinterpret_cast<const uint16_t*>(in), reinterpret_cast<uint16_t*>(out), bits,
                             full_groups, table.row);
    } else {
      apply_groups(in, out, table, bits, full_groups, streaming);
    }
  } else {
    apply_groups(in, out, table, bits, full_groups, streaming);
  }
  for (int64_t local = full_groups * kDropoutGroup; local < e1 - e0; ++local) {
    out[local] = from_acc<T>(to_acc<Acc>(in[local]) * table.row[bits[local >> 3]][local & 7]);
  }
}

// Runs `body(apply)` where apply(bits, e0, e1) applies one block in the args' dtype.
template <typename Body>
void with_dtype(const DropoutArgs& args, Body&& body) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Compute<T>::type;
    const MultiplierTable<Acc> table(keep_scale<T>(args));
    body([&](const uint8_t* bits, int64_t e0, int64_t e1) { apply_block<T>(args, table, bits, e0, e1); });
  };
  switch (args.dtype) {
    case DType::Float64: return run(double{});
    case DType::Float32: return run(float{});
    case DType::Float16: return run(c10::Half{});
    case DType::BFloat16: return run(c10::BFloat16{});
  }
}

// Non-temporal stores are weakly ordered: fence before other threads may read the output.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Zeroes the bits of a partial last group, so packed masks carry no garbage past n.
uint8_t tail_clipped(uint8_t bits, int64_t group, int64_t n) {
  const int64_t valid = n - group * kDropoutGroup;
  return valid >= kDropoutGroup ? bits : static_cast<uint8_t>(bits & ((1u << valid) - 1u));
}

// Bool masks: bools[e] = bit e of bits for e in [0, count), and back (nonzero = kept).
void write_bools(const uint8_t* bits, int64_t count, uint8_t* bools) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() == CpuIsa::Avx512) return dropout_bits_to_bools_avx512(bits, count, bools);
#endif
  for (int64_t e = 0; e < count; ++e) bools[e] = (bits[e >> 3] >> (e & 7)) & 1;
}

void read_bools(const uint8_t* bools, int64_t count, uint8_t* bits) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() == CpuIsa::Avx512) return dropout_bools_to_bits_avx512(bools, count, bits);
#endif
  std::memset(bits, 0, static_cast<size_t>((count + 7) / 8));
  for (int64_t e = 0; e < count; ++e) bits[e >> 3] |= static_cast<uint8_t>((bools[e] != 0) << (e & 7));
}

}  // namespace

void dropout_forward_cpu(const DropoutArgs& args, DropoutRngState rng, int64_t group_begin, int64_t group_end) {
  with_dtype(args, [&](auto&& apply) {
    uint8_t bits[kBlockGroups];
    for (int64_t g0 = group_begin; g0 < group_end; g0 += kBlockGroups) {
      const int64_t groups = std::min<int64_t>(kBlockGroups, group_end - g0);
      keep_bits(rng, static_cast<uint64_t>(g0), args.threshold, bits);
      for (int64_t k = 0; k < groups; ++k) bits[k] = tail_clipped(bits[k], g0 + k, args.n);
      const int64_t e0 = g0 * kDropoutGroup;
      const int64_t e1 = std::min<int64_t>(args.n, (g0 + groups) * kDropoutGroup);
      apply(bits, e0, e1);
      if (args.mask_mode == MaskMode::Bits) {
        std::memcpy(args.mask + g0, bits, groups);
      } else if (args.mask_mode == MaskMode::Bool) {
        write_bools(bits, e1 - e0, args.mask + e0);
      }
    }
  });
  store_fence();
}

void dropout_backward_cpu(const DropoutArgs& args, DropoutRngState rng, int64_t group_begin, int64_t group_end) {
  with_dtype(args, [&](auto&& apply) {
    uint8_t bits[kBlockGroups];
    for (int64_t g0 = group_begin; g0 < group_end; g0 += kBlockGroups) {
      const int64_t groups = std::min<int64_t>(kBlockGroups, group_end - g0);
      const int64_t e0 = g0 * kDropoutGroup;
      const int64_t e1 = std::min<int64_t>(args.n, (g0 + groups) * kDropoutGroup);
      if (args.mask_mode == MaskMode::Regenerate) {
        keep_bits(rng, static_cast<uint64_t>(g0), args.threshold, bits);
      } else if (args.mask_mode == MaskMode::Bits) {
        std::memcpy(bits, args.mask + g0, groups);
      } else {
        read_bools(args.mask + e0, e1 - e0, bits);
      }
      apply(bits, e0, e1);
    }
  });
  store_fence();
}

}  // namespace fastreg
