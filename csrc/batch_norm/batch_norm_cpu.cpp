// CPU batch norm: statistics, forward and backward for every layout of batch_norm_kernels.h.
// Free of torch types except at::parallel_for and c10's header-only half/bfloat16.
//
// Two walks of the [outer][C][inner] layout:
//  - channel walk (inner >= kRowInnerMax, e.g. NCHW): a channel is `outer` runs of `inner`
//    contiguous elements. The training forward and backward give one thread a whole channel:
//    the reduction reads it from memory, the element-wise pass finds it in L2.
//  - row walk (small inner, e.g. channels_last): rows of W = C * inner contiguous elements;
//    per-column accumulators, rows cut into fixed groups whose partial results are merged in
//    group order.
// Determinism: reductions run over fixed blocks (a function of the layout and dtype only)
// whose partial results are merged in block order, whatever the number of threads.
// Stability: each block is reduced twice from L1 (mean, then sums of x - mean), and blocks are
// merged with Chan's formulas in double: no sum(x^2) - sum(x)^2 on raw values.
//
// Vector code: GCC/Clang vector extensions, compiled three times (AVX-512, AVX2+F16C, baseline)
// into `flatten` entry points picked at run time; the small per-ISA pieces (half conversions,
// non-temporal stores) are intrinsics in the Isa structs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/compute_type.h"
#include "batch_norm_kernels.h"

// No fused multiply-adds: GCC contracts a * b + c by default, and only on the clones whose ISA
// has FMA, so results would depend on the machine; without them the element-wise results are
// those of the reference (fastreg/reference/batch_norm.py), bit for bit, given the statistics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
// Vector-typed helpers are only ever inlined into the per-ISA entry points; GCC's note about
// their out-of-line ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace fastreg {
namespace {

// ---- tuning constants (all independent of the thread count)

constexpr int64_t kBlockBytes = 16 << 10;        // one reduction block: read twice, the second time from L1
constexpr int64_t kRowInnerMax = 32;              // inner below this (and a bounded row): the row walk
constexpr int64_t kRowWidthMax = int64_t{1} << 20;
constexpr int64_t kMaxBlockRows = 128;            // rows per fp32 column sum in a row block
constexpr int64_t kGroupElems = int64_t{1} << 16; // row groups: the unit of parallel reduction
constexpr int64_t kTaskElems = int64_t{1} << 15;  // less work than this per task is not split
constexpr int64_t kStreamBytes = int64_t{4} << 20;  // float outputs this large bypass the caches
constexpr int64_t kPad = 64;                      // extension of periodic column arrays (>= any vector width)

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
  static constexpr int kBytes = 32;
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

struct IsaAvx2 {
  static constexpr int kBytes = 32;
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
  __attribute__((target("f16c"))) static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  __attribute__((target("f16c"))) static inline uint16_t float_to_half(float f) {
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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

struct IsaAvx512 {
  static constexpr int kBytes = 64;
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
  __attribute__((target("f16c"))) static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  __attribute__((target("f16c"))) static inline uint16_t float_to_half(float f) {
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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
        // Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16(float), branch-free.
        const U32 bits = bits_as<U32>(v);
        const U32 nan = bits_as<U32>(v != v);
        const U32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
        out = Isa::template narrow32<U16>((rounded & ~nan) | (0x7FC0u & nan));
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

  // Lanes of `acc` added in lane order, in double.
  template <typename W>
  static inline double fold(const W& acc) {
    double s = 0.0;
    for (int k = 0; k < kLanes; ++k) s += static_cast<double>(acc[k]);
    return s;
  }

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
  static inline double foldd(const VD& acc) {
    double s = 0.0;
    for (int k = 0; k < kDLanes; ++k) s += acc[k];
    return s;
  }
  static inline VD loadd(const double* p) {
    VD v;
    std::memcpy(&v, p, sizeof(VD));
    return v;
  }
  static inline void stored(double* p, const VD& v) { std::memcpy(p, &v, sizeof(VD)); }
};

// Non-temporal stores only on whole cache lines of `out` (n elements): `span(nt, i0, i1)`
// writes elements [i0, i1), with non-temporal stores when nt is true. A line written partly by
// non-temporal and partly by ordinary stores (at the ends of a run) is flushed half-filled, which
// costs far more than the store saves (bf16 NCHW element-wise pass, runs of 392 bytes: 2.1 ms
// with half lines, 1.0 ms with whole lines; 16-bit outputs no longer stream, see should_stream).
template <class IO, typename Span>
inline void on_whole_lines(const void* out, int64_t n, Span&& span) {
  constexpr int64_t kLine = 64;
  constexpr int64_t kElem = sizeof(typename IO::Elem);
  static_assert(kLine % IO::kStoreBytes == 0, "vector stores tile a cache line");
  const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kLine);
  const int64_t head = std::min(n, misaligned == 0 ? 0 : (kLine - misaligned) / kElem);
  const int64_t body = head + (n - head) / (kLine / kElem) * (kLine / kElem);
  span(std::false_type{}, int64_t{0}, head);
  span(std::true_type{}, head, body);
  span(std::false_type{}, body, n);
}

// ---- the two walks

// Channel walk: block b of channel c is a list of runs (offset, length); all blocks of a
// channel together are its `outer` runs of `inner` elements, in memory order.
struct ChannelWalk {
  int64_t outer = 0, channels = 0, inner = 0;
  int64_t segments = 1;  // runs per block when a run fits in a block
  int64_t pieces = 1;    // blocks per run when it does not
  int64_t piece = 0;     // elements per piece
  int64_t blocks = 0;    // per channel
  int64_t ahead = 1;     // runs between a run and the one prefetched with it

  ChannelWalk(const BatchNormLayout& layout, int64_t block_elems)
      : outer(layout.outer), channels(layout.channels), inner(layout.inner) {
    if (layout.count() == 0) return;
    if (inner <= block_elems) {
      segments = std::max<int64_t>(1, block_elems / inner);
      ahead = std::clamp<int64_t>(block_elems / 4 / inner, 1, 8);  // about 4 KB ahead
      piece = inner;
      blocks = (outer + segments - 1) / segments;
    } else {
      const int64_t want = (inner + block_elems - 1) / block_elems;
      piece = ((inner + want - 1) / want + 63) / 64 * 64;  // whole cache lines of fp32 per piece
      pieces = (inner + piece - 1) / piece;
      blocks = outer * pieces;
    }
  }

  int64_t block_count(int64_t b) const {
    if (pieces == 1) return (std::min(outer, (b + 1) * segments) - b * segments) * inner;
    return std::min(piece, inner - (b % pieces) * piece);
  }

  // f(offset, length) for each run of block b of channel c; with kPrefetch, prefetch(offset,
  // length) first for the run `ahead` runs further along the channel. The runs of a channel
  // are `channels * inner` elements apart, short ones (NCHW with a small H x W) too short for
  // the hardware prefetcher to ramp up on.
  template <bool kPrefetch = false, class F, class P>
  __attribute__((always_inline)) inline void runs(int64_t c, int64_t b, F&& f, P&& prefetch) const {
    if (pieces == 1) {
      const int64_t o1 = std::min(outer, (b + 1) * segments);
      for (int64_t o = b * segments; o < o1; ++o) {
        if constexpr (kPrefetch) {
          if (o + ahead < outer) prefetch(((o + ahead) * channels + c) * inner, inner);
        }
        f((o * channels + c) * inner, inner);
      }
    } else {
      const int64_t o = b / pieces, start = (b % pieces) * piece;
      f((o * channels + c) * inner + start, std::min(piece, inner - start));
    }
  }
  template <class F>
  __attribute__((always_inline)) inline void runs(int64_t c, int64_t b, F&& f) const {
    runs<false>(c, b, f, [](int64_t, int64_t) {});
  }
};

// Up to 1 KB from p: the start of a run, whose rest the hardware prefetcher then follows.
template <typename T>
__attribute__((always_inline)) inline void prefetch_run(const T* p, int64_t len) {
  const int64_t bytes = std::min<int64_t>(len * static_cast<int64_t>(sizeof(T)), 1024);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 3);
}

// Row walk: rows of `width` = C * inner contiguous elements; column j belongs to channel
// j / inner. Blocks of block_rows rows, groups of group_blocks blocks.
struct RowWalk {
  int64_t rows = 0, width = 0, inner = 1;
  int64_t block_rows = 1, group_rows = 1, groups = 0;

  RowWalk(const BatchNormLayout& layout, int64_t block_elems)
      : rows(layout.outer), width(layout.channels * layout.inner), inner(layout.inner) {
    if (layout.count() == 0) return;
    block_rows = std::clamp<int64_t>(block_elems / width, 1, kMaxBlockRows);
    const int64_t group_blocks = std::max<int64_t>(1, kGroupElems / (block_rows * width));
    group_rows = block_rows * group_blocks;
    groups = (rows + group_rows - 1) / group_rows;
  }

  int64_t group_begin(int64_t g) const { return g * group_rows; }
  int64_t group_end(int64_t g) const { return std::min(rows, (g + 1) * group_rows); }
};

// Per-channel coefficients of the backward element-wise formula.
template <typename A>
struct BackwardCoefs {
  A mean, mean_dy, proj, scale;
};

// Column arrays of the row walk, extended periodically to width + kPad entries.
template <typename A>
struct RowArrays {
  const A* mean;
  const A* a;  // elemt: invstd * w; backward: mean_dy
  const A* b;  // elemt: bias; backward: proj
  const A* scale;  // backward only
};

// ---- vector loops over one contiguous run

template <class IO>
struct RunOps {
  using T = typename IO::Elem;
  using A = typename IO::A;
  using V = typename IO::V;
  using VD = typename IO::VD;
  static constexpr int L = IO::kLanes;

  static inline void sum(const T* x, int64_t n, V (&acc)[4], A& tail) {
    int64_t i = 0;
    for (; i + 4 * L <= n; i += 4 * L) {
      acc[0] += IO::load(x + i);
      acc[1] += IO::load(x + i + L);
      acc[2] += IO::load(x + i + 2 * L);
      acc[3] += IO::load(x + i + 3 * L);
    }
    for (; i + L <= n; i += L) acc[0] += IO::load(x + i);
    for (; i < n; ++i) tail += IO::load1(x + i);
  }

  // s1 += x - m, s2 += (x - m)^2.
  static inline void centered(const T* x, int64_t n, A m, V (&s1)[2], V (&s2)[2], A& t1, A& t2) {
    const V vm = IO::splat(m);
    int64_t i = 0;
    for (; i + 2 * L <= n; i += 2 * L) {
      const V d0 = IO::load(x + i) - vm, d1 = IO::load(x + i + L) - vm;
      s1[0] += d0;
      s1[1] += d1;
      s2[0] += d0 * d0;
      s2[1] += d1 * d1;
    }
    for (; i + L <= n; i += L) {
      const V d = IO::load(x + i) - vm;
      s1[0] += d;
      s2[0] += d * d;
    }
    for (; i < n; ++i) {
      const A d = IO::load1(x + i) - m;
      t1 += d;
      t2 += d * d;
    }
  }

  // sdy += dy, sdyx += dy * (x - mean), in double lanes: sum_dy_xmu cancels (it is about 0 when
  // dy does not depend on x), and fp32 products would leave errors of eps * sum |dy * (x - mean)|.
  // The loop reads two streams from memory, so the wider arithmetic costs no time.
  static constexpr int H = IO::kHalves;
  static inline void reduce_vec(const T* dy, const T* x, const VD& vm, VD* sdy, VD* sdyx) {
    VD g[H], xv[H];
    IO::wide(IO::load(dy), g);
    IO::wide(IO::load(x), xv);
    for (int h = 0; h < H; ++h) {
      sdy[h] += g[h];
      sdyx[h] += g[h] * (xv[h] - vm);
    }
  }
  static inline void reduce(const T* dy, const T* x, int64_t n, A mean, VD (&sdy)[2 * H], VD (&sdyx)[2 * H],
                            double& t1, double& t2) {
    const VD vm = VD{} + static_cast<double>(mean);
    int64_t i = 0;
    for (; i + 2 * L <= n; i += 2 * L) {
      reduce_vec(dy + i, x + i, vm, sdy, sdyx);
      reduce_vec(dy + i + L, x + i + L, vm, sdy + H, sdyx + H);
    }
    for (; i + L <= n; i += L) reduce_vec(dy + i, x + i, vm, sdy, sdyx);
    for (; i < n; ++i) {
      const double g = IO::load1(dy + i);
      t1 += g;
      t2 += g * (static_cast<double>(IO::load1(x + i)) - static_cast<double>(mean));
    }
  }

  // y = (x - mean) * a + b
  template <bool kStream>
  static inline void elemt_span(const T* x, T* y, int64_t n, A mean, A a, A b) {
    const V vm = IO::splat(mean), va = IO::splat(a), vb = IO::splat(b);
    int64_t i = 0;
    for (; i + 2 * L <= n; i += 2 * L) {
      const V x0 = IO::load(x + i), x1 = IO::load(x + i + L);
      IO::template store<kStream>(y + i, (x0 - vm) * va + vb);
      IO::template store<kStream>(y + i + L, (x1 - vm) * va + vb);
    }
    for (; i + L <= n; i += L) IO::template store<kStream>(y + i, (IO::load(x + i) - vm) * va + vb);
    for (; i < n; ++i) IO::store1(y + i, (IO::load1(x + i) - mean) * a + b);
  }
  template <bool kStream>
  static inline void elemt(const T* x, T* y, int64_t n, A mean, A a, A b) {
    if constexpr (kStream) {
      on_whole_lines<IO>(y, n, [&](auto nt, int64_t i0, int64_t i1) {
        elemt_span<decltype(nt)::value>(x + i0, y + i0, i1 - i0, mean, a, b);
      });
    } else {
      elemt_span<false>(x, y, n, mean, a, b);
    }
  }

  // training: dx = (dy - mean_dy - (x - mean) * proj) * scale;  eval: dx = dy * scale
  template <bool kTraining, bool kStream>
  static inline void backward_span(const T* dy, const T* x, T* dx, int64_t n, const BackwardCoefs<A>& k) {
    const V vm = IO::splat(k.mean), vd = IO::splat(k.mean_dy), vp = IO::splat(k.proj), vs = IO::splat(k.scale);
    auto vec = [&](int64_t j) {
      const V g = IO::load(dy + j);
      if constexpr (kTraining) {
        IO::template store<kStream>(dx + j, (g - vd - (IO::load(x + j) - vm) * vp) * vs);
      } else {
        IO::template store<kStream>(dx + j, g * vs);
      }
    };
    int64_t i = 0;
    for (; i + 2 * L <= n; i += 2 * L) {
      vec(i);
      vec(i + L);
    }
    for (; i + L <= n; i += L) vec(i);
    for (; i < n; ++i) {
      const A g = IO::load1(dy + i);
      IO::store1(dx + i, kTraining ? (g - k.mean_dy - (IO::load1(x + i) - k.mean) * k.proj) * k.scale : g * k.scale);
    }
  }
  template <bool kTraining, bool kStream>
  static inline void backward(const T* dy, const T* x, T* dx, int64_t n, const BackwardCoefs<A>& k) {
    if constexpr (kStream) {
      on_whole_lines<IO>(dx, n, [&](auto nt, int64_t i0, int64_t i1) {
        backward_span<kTraining, decltype(nt)::value>(dy + i0, x + i0, dx + i0, i1 - i0, k);
      });
    } else {
      backward_span<kTraining, false>(dy, x, dx, n, k);
    }
  }
};

// ---- channel-walk blocks

// (mean, M2) of block b of channel c: the sum, then centred sums around the block's mean
// (from L1), corrected by the centred sum's residue.
template <class IO>
void stats_block(const ChannelWalk& walk, const void* input, int64_t c, int64_t b, double* out) {
  using R = RunOps<IO>;
  using A = typename IO::A;
  using V = typename IO::V;
  const auto* x = static_cast<const typename IO::Elem*>(input);
  const double n = static_cast<double>(walk.block_count(b));
  V acc[4] = {};
  A tail = 0;
  walk.template runs<true>(
      c, b, [&](int64_t offset, int64_t len) { R::sum(x + offset, len, acc, tail); },
      [&](int64_t offset, int64_t len) { prefetch_run(x + offset, len); });
  const double total = IO::fold((acc[0] + acc[1]) + (acc[2] + acc[3])) + static_cast<double>(tail);
  const A m = static_cast<A>(total / n);
  V s1[2] = {}, s2[2] = {};
  A t1 = 0, t2 = 0;
  walk.runs(c, b, [&](int64_t offset, int64_t len) { R::centered(x + offset, len, m, s1, s2, t1, t2); });
  const double d1 = IO::fold(s1[0] + s1[1]) + static_cast<double>(t1);
  const double d2 = IO::fold(s2[0] + s2[1]) + static_cast<double>(t2);
  out[0] = static_cast<double>(m) + d1 / n;
  out[1] = std::max(0.0, d2 - d1 * d1 / n);
}

template <class IO>
void reduce_block(const ChannelWalk& walk, const void* grad_output, const void* input, int64_t c, int64_t b,
                  typename IO::A mean, double* out) {
  using VD = typename IO::VD;
  constexpr int H = IO::kHalves;
  const auto* dy = static_cast<const typename IO::Elem*>(grad_output);
  const auto* x = static_cast<const typename IO::Elem*>(input);
  VD sdy[2 * H] = {}, sdyx[2 * H] = {};
  double t1 = 0, t2 = 0;
  walk.template runs<true>(
      c, b, [&](int64_t offset, int64_t len) { RunOps<IO>::reduce(dy + offset, x + offset, len, mean, sdy, sdyx, t1, t2); },
      [&](int64_t offset, int64_t len) {
        prefetch_run(dy + offset, len);
        prefetch_run(x + offset, len);
      });
  double s1 = t1, s2 = t2;
  for (int h = 0; h < 2 * H; ++h) {
    s1 += IO::foldd(sdy[h]);
    s2 += IO::foldd(sdyx[h]);
  }
  out[0] = s1;
  out[1] = s2;
}

template <class IO>
void elemt_block(const ChannelWalk& walk, const void* input, void* output, int64_t c, int64_t b, typename IO::A mean,
                 typename IO::A a, typename IO::A bias, bool stream) {
  using T = typename IO::Elem;
  const T* x = static_cast<const T*>(input);
  T* y = static_cast<T*>(output);
  auto ahead = [&](int64_t o, int64_t len) { prefetch_run(x + o, len); };
  if (stream) {
    walk.template runs<true>(
        c, b, [&](int64_t o, int64_t len) { RunOps<IO>::template elemt<true>(x + o, y + o, len, mean, a, bias); }, ahead);
  } else {
    walk.template runs<true>(
        c, b, [&](int64_t o, int64_t len) { RunOps<IO>::template elemt<false>(x + o, y + o, len, mean, a, bias); }, ahead);
  }
}

template <class IO>
void backward_block(const ChannelWalk& walk, const void* grad_output, const void* input, void* grad_input, int64_t c,
                    int64_t b, const BackwardCoefs<typename IO::A>& k, bool training, bool stream) {
  using T = typename IO::Elem;
  const T* dy = static_cast<const T*>(grad_output);
  const T* x = static_cast<const T*>(input);
  T* dx = static_cast<T*>(grad_input);
  auto go = [&](auto training_tag, auto stream_tag) {
    constexpr bool kTraining = decltype(training_tag)::value;
    walk.template runs<true>(
        c, b,
        [&](int64_t o, int64_t len) {
          RunOps<IO>::template backward<kTraining, decltype(stream_tag)::value>(dy + o, x + o, dx + o, len, k);
        },
        [&](int64_t o, int64_t len) {
          prefetch_run(dy + o, len);
          if (kTraining) prefetch_run(x + o, len);
        });
  };
  if (training) {
    stream ? go(std::true_type{}, std::true_type{}) : go(std::true_type{}, std::false_type{});
  } else {
    stream ? go(std::false_type{}, std::true_type{}) : go(std::false_type{}, std::false_type{});
  }
}

// ---- in-order walk: element-wise passes that do not follow a reduction of the same channel
// go through memory in order, each run of `inner` elements with its channel's coefficients.
// (The channel walk would scatter their stores over `outer` places per block: backward_elemt of
// bf16 (64,256,14,14) NCHW took 2.5x the time of torch.add over the same tensors.)

// Flat elements [f0, f1) of the [outer][C][inner] layout: fn(offset, length, channel) per run.
template <typename F>
inline void runs_in_order(int64_t inner, int64_t channels, int64_t f0, int64_t f1, F&& fn) {
  int64_t r = f0 / inner, c = r % channels;
  for (int64_t f = f0; f < f1; ++r, c = c + 1 == channels ? 0 : c + 1) {
    const int64_t end = std::min(f1, (r + 1) * inner);
    fn(f, end - f, c);
    f = end;
  }
}

template <class IO>
void elemt_in_order(const BatchNormLayout& layout, const void* input, void* output, int64_t f0, int64_t f1,
                    const typename IO::A* mean, const typename IO::A* a, const typename IO::A* b, bool stream) {
  using T = typename IO::Elem;
  const T* x = static_cast<const T*>(input);
  T* y = static_cast<T*>(output);
  runs_in_order(layout.inner, layout.channels, f0, f1, [&](int64_t o, int64_t len, int64_t c) {
    if (stream) {
      RunOps<IO>::template elemt<true>(x + o, y + o, len, mean[c], a[c], b[c]);
    } else {
      RunOps<IO>::template elemt<false>(x + o, y + o, len, mean[c], a[c], b[c]);
    }
  });
}

template <class IO>
void backward_in_order(const BatchNormLayout& layout, const void* grad_output, const void* input, void* grad_input,
                       int64_t f0, int64_t f1, const BackwardCoefs<typename IO::A>* coefs, bool training, bool stream) {
  using T = typename IO::Elem;
  const T* dy = static_cast<const T*>(grad_output);
  const T* x = static_cast<const T*>(input);
  T* dx = static_cast<T*>(grad_input);
  auto go = [&](auto training_tag, auto stream_tag) {
    runs_in_order(layout.inner, layout.channels, f0, f1, [&](int64_t o, int64_t len, int64_t c) {
      RunOps<IO>::template backward<decltype(training_tag)::value, decltype(stream_tag)::value>(dy + o, x + o, dx + o,
                                                                                                 len, coefs[c]);
    });
  };
  if (training) {
    stream ? go(std::true_type{}, std::true_type{}) : go(std::true_type{}, std::false_type{});
  } else {
    stream ? go(std::false_type{}, std::true_type{}) : go(std::false_type{}, std::false_type{});
  }
}

// ---- row-walk pieces. Periodic column arrays: a vector starting at column `col` of a row uses
// entries [col, col + lanes) of arrays extended past `width` with the values of the next row's
// columns, so rows need not be a whole number of vectors.

// acc[j] (j < width) += acc[p] for every extended p >= width with p % width == j; clears them.
// Vectors of kLanes lanes starting at a column < width reach at most width + kLanes - 1; when
// rows are whole vectors they never pass width.
template <int kLanes, typename A>
inline void fold_periodic(A* acc, int64_t width) {
  if (width % kLanes == 0) return;
  for (int64_t p = width, j = 0; p < width + kLanes; ++p, j = j + 1 == width ? 0 : j + 1) {
    acc[j] += acc[p];
    acc[p] = A(0);
  }
}

template <int kLanes, typename A>
inline void extend_periodic(A* values, int64_t width) {
  if (width % kLanes == 0) return;
  for (int64_t p = width, j = 0; p < width + kLanes; ++p, j = j + 1 == width ? 0 : j + 1) values[p] = values[j];
}

// Column step of one vector, and the column after `col`.
inline int64_t next_col(int64_t col, int64_t step, int64_t width) {
  col += step;
  return col >= width ? col - width : col;
}

// Group g: per-column (mean, M2) of its rows, merged block by block (Chan) in double.
// scratch: 3 * (width + kPad) compute-type elements.
template <class IO>
void row_stats_group(const RowWalk& walk, const void* input, int64_t g, double* gmean, double* gm2, void* scratch) {
  using T = typename IO::Elem;
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  const T* x = static_cast<const T*>(input);
  const int64_t width = walk.width, step = L % width;
  A* acc = static_cast<A*>(scratch);
  A* m = acc + width + kPad;
  A* s2 = m + width + kPad;
  std::fill(acc, acc + 3 * (width + kPad), A(0));
  double rows_done = 0;
  for (int64_t r0 = walk.group_begin(g), r1 = walk.group_end(g); r0 < r1; r0 += walk.block_rows) {
    const int64_t nr = std::min(walk.block_rows, r1 - r0), len = nr * width;
    const T* xb = x + r0 * width;
    int64_t i = 0, col = 0;
    for (; i + L <= len; i += L, col = next_col(col, step, width)) IO::storea(acc + col, IO::loada(acc + col) + IO::load(xb + i));
    for (; i < len; ++i, col = col + 1 == width ? 0 : col + 1) acc[col] += IO::load1(xb + i);
    fold_periodic<L>(acc, width);
    const double n = static_cast<double>(nr);
    for (int64_t j = 0; j < width; ++j) {
      m[j] = static_cast<A>(static_cast<double>(acc[j]) / n);
      acc[j] = A(0);
    }
    extend_periodic<L>(m, width);
    for (i = 0, col = 0; i + L <= len; i += L, col = next_col(col, step, width)) {
      const V d = IO::load(xb + i) - IO::loada(m + col);
      IO::storea(acc + col, IO::loada(acc + col) + d);
      IO::storea(s2 + col, IO::loada(s2 + col) + d * d);
    }
    for (; i < len; ++i, col = col + 1 == width ? 0 : col + 1) {
      const A d = IO::load1(xb + i) - m[col];
      acc[col] += d;
      s2[col] += d * d;
    }
    fold_periodic<L>(acc, width);
    fold_periodic<L>(s2, width);
    const double total = rows_done + n, f1 = n / total, f2 = rows_done * n / total;
    for (int64_t j = 0; j < width; ++j) {
      const double d1 = acc[j];
      const double mean_b = static_cast<double>(m[j]) + d1 / n;
      const double m2_b = std::max(0.0, static_cast<double>(s2[j]) - d1 * d1 / n);
      if (rows_done == 0) {
        gmean[j] = mean_b;
        gm2[j] = m2_b;
      } else {
        const double delta = mean_b - gmean[j];
        gmean[j] += delta * f1;
        gm2[j] += m2_b + delta * delta * f2;
      }
      acc[j] = A(0);
      s2[j] = A(0);
    }
    rows_done = total;
  }
}

// Group g: per-column sums of dy and dy * (x - mean), in double (see RunOps::reduce). mean:
// periodic column array; scratch: 2 * (width + kPad) doubles.
template <class IO>
void row_reduce_group(const RowWalk& walk, const void* grad_output, const void* input, int64_t g, const double* mean,
                      double* gdy, double* gdyx, void* scratch) {
  using T = typename IO::Elem;
  using VD = typename IO::VD;
  constexpr int L = IO::kLanes;
  const int64_t width = walk.width, step = L % width;
  double* sdy = static_cast<double*>(scratch);
  double* sdyx = sdy + width + kPad;
  std::fill(sdy, sdy + 2 * (width + kPad), 0.0);
  const int64_t begin = walk.group_begin(g) * width, end = walk.group_end(g) * width;
  const T* dy = static_cast<const T*>(grad_output);
  const T* x = static_cast<const T*>(input);
  int64_t i = begin, col = 0;
  constexpr int H = IO::kHalves, DL = IO::kDLanes;
  for (; i + L <= end; i += L, col = next_col(col, step, width)) {
    VD gv[H], xv[H];
    IO::wide(IO::load(dy + i), gv);
    IO::wide(IO::load(x + i), xv);
    for (int h = 0; h < H; ++h) {
      const int64_t p = col + h * DL;
      IO::stored(sdy + p, IO::loadd(sdy + p) + gv[h]);
      IO::stored(sdyx + p, IO::loadd(sdyx + p) + gv[h] * (xv[h] - IO::loadd(mean + p)));
    }
  }
  for (; i < end; ++i, col = col + 1 == width ? 0 : col + 1) {
    const double gv = IO::load1(dy + i);
    sdy[col] += gv;
    sdyx[col] += gv * (static_cast<double>(IO::load1(x + i)) - mean[col]);
  }
  fold_periodic<L>(sdy, width);
  fold_periodic<L>(sdyx, width);
  std::copy(sdy, sdy + width, gdy);
  std::copy(sdyx, sdyx + width, gdyx);
}

// Elements [f0, f1) of the row walk: y = (x - mean) * a + b with periodic column arrays.
template <class IO, bool kStream>
inline void row_elemt_span(int64_t width, const typename IO::Elem* x, typename IO::Elem* y, int64_t f0, int64_t f1,
                           const RowArrays<typename IO::A>& arr) {
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  const int64_t step = L % width;
  int64_t i = f0, col = f0 % width;
  for (; i + L <= f1; i += L, col = next_col(col, step, width)) {
    const V v = (IO::load(x + i) - IO::loada(arr.mean + col)) * IO::loada(arr.a + col) + IO::loada(arr.b + col);
    IO::template store<kStream>(y + i, v);
  }
  for (; i < f1; ++i, col = col + 1 == width ? 0 : col + 1) {
    IO::store1(y + i, (IO::load1(x + i) - arr.mean[col]) * arr.a[col] + arr.b[col]);
  }
}

template <class IO>
void row_elemt(const RowWalk& walk, const void* input, void* output, int64_t f0, int64_t f1,
               const RowArrays<typename IO::A>& arr, bool stream) {
  using T = typename IO::Elem;
  const T* x = static_cast<const T*>(input);
  T* y = static_cast<T*>(output);
  if (stream) {
    on_whole_lines<IO>(y + f0, f1 - f0, [&](auto nt, int64_t i0, int64_t i1) {
      row_elemt_span<IO, decltype(nt)::value>(walk.width, x, y, f0 + i0, f0 + i1, arr);
    });
  } else {
    row_elemt_span<IO, false>(walk.width, x, y, f0, f1, arr);
  }
}

template <class IO, bool kTraining, bool kStream>
inline void row_backward_span(int64_t width, const typename IO::Elem* dy, const typename IO::Elem* x,
                              typename IO::Elem* dx, int64_t f0, int64_t f1, const RowArrays<typename IO::A>& arr) {
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  const int64_t step = L % width;
  int64_t i = f0, col = f0 % width;
  for (; i + L <= f1; i += L, col = next_col(col, step, width)) {
    const V g = IO::load(dy + i);
    const V s = IO::loada(arr.scale + col);
    if constexpr (kTraining) {
      const V xm = IO::load(x + i) - IO::loada(arr.mean + col);
      IO::template store<kStream>(dx + i, (g - IO::loada(arr.a + col) - xm * IO::loada(arr.b + col)) * s);
    } else {
      IO::template store<kStream>(dx + i, g * s);
    }
  }
  for (; i < f1; ++i, col = col + 1 == width ? 0 : col + 1) {
    const A g = IO::load1(dy + i);
    const A s = arr.scale[col];
    IO::store1(dx + i, kTraining ? (g - arr.a[col] - (IO::load1(x + i) - arr.mean[col]) * arr.b[col]) * s : g * s);
  }
}

template <class IO>
void row_backward(const RowWalk& walk, const void* grad_output, const void* input, void* grad_input, int64_t f0,
                  int64_t f1, const RowArrays<typename IO::A>& arr, bool training, bool stream) {
  using T = typename IO::Elem;
  const T* dy = static_cast<const T*>(grad_output);
  const T* x = static_cast<const T*>(input);
  T* dx = static_cast<T*>(grad_input);
  auto go = [&](auto training_tag) {
    constexpr bool kTraining = decltype(training_tag)::value;
    if (stream) {
      on_whole_lines<IO>(dx + f0, f1 - f0, [&](auto nt, int64_t i0, int64_t i1) {
        row_backward_span<IO, kTraining, decltype(nt)::value>(walk.width, dy, x, dx, f0 + i0, f0 + i1, arr);
      });
    } else {
      row_backward_span<IO, kTraining, false>(walk.width, dy, x, dx, f0, f1, arr);
    }
  };
  training ? go(std::true_type{}) : go(std::false_type{});
}

// ---- entry points per ISA: everything above inlined (flatten) and compiled for that ISA.

template <typename T>
struct Kernels {
  using A = typename ComputeType<T>::type;
  void (*stats_block)(const ChannelWalk&, const void*, int64_t, int64_t, double*);
  void (*reduce_block)(const ChannelWalk&, const void*, const void*, int64_t, int64_t, A, double*);
  void (*elemt_block)(const ChannelWalk&, const void*, void*, int64_t, int64_t, A, A, A, bool);
  void (*backward_block)(const ChannelWalk&, const void*, const void*, void*, int64_t, int64_t,
                         const BackwardCoefs<A>&, bool, bool);
  void (*row_stats_group)(const RowWalk&, const void*, int64_t, double*, double*, void*);
  void (*row_reduce_group)(const RowWalk&, const void*, const void*, int64_t, const double*, double*, double*, void*);
  void (*row_elemt)(const RowWalk&, const void*, void*, int64_t, int64_t, const RowArrays<A>&, bool);
  void (*row_backward)(const RowWalk&, const void*, const void*, void*, int64_t, int64_t, const RowArrays<A>&, bool,
                       bool);
  void (*elemt_in_order)(const BatchNormLayout&, const void*, void*, int64_t, int64_t, const A*, const A*, const A*,
                         bool);
  void (*backward_in_order)(const BatchNormLayout&, const void*, const void*, void*, int64_t, int64_t,
                            const BackwardCoefs<A>*, bool, bool);
};

#define FASTREG_BN_ENTRIES(NS, ISA, ATTRS)                                                                          \
  namespace NS {                                                                                                  \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void stats_block(const ChannelWalk& w, const void* x, int64_t c, int64_t b, double* out) {                \
    fastreg::stats_block<Io<ISA, T>>(w, x, c, b, out);                                                            \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void reduce_block(const ChannelWalk& w, const void* dy, const void* x, int64_t c, int64_t b, A mean,      \
                          double* out) {                                                                          \
    fastreg::reduce_block<Io<ISA, T>>(w, dy, x, c, b, mean, out);                                                 \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void elemt_block(const ChannelWalk& w, const void* x, void* y, int64_t c, int64_t b, A mean, A a, A bias, \
                         bool stream) {                                                                           \
    fastreg::elemt_block<Io<ISA, T>>(w, x, y, c, b, mean, a, bias, stream);                                       \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void backward_block(const ChannelWalk& w, const void* dy, const void* x, void* dx, int64_t c, int64_t b,   \
                            const BackwardCoefs<A>& k, bool training, bool stream) {                              \
    fastreg::backward_block<Io<ISA, T>>(w, dy, x, dx, c, b, k, training, stream);                                 \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_stats_group(const RowWalk& w, const void* x, int64_t g, double* gmean, double* gm2,              \
                             void* scratch) {                                                                     \
    fastreg::row_stats_group<Io<ISA, T>>(w, x, g, gmean, gm2, scratch);                                           \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_reduce_group(const RowWalk& w, const void* dy, const void* x, int64_t g, const double* mean,      \
                              double* gdy, double* gdyx, void* scratch) {                                         \
    fastreg::row_reduce_group<Io<ISA, T>>(w, dy, x, g, mean, gdy, gdyx, scratch);                                 \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_elemt(const RowWalk& w, const void* x, void* y, int64_t f0, int64_t f1, const RowArrays<A>& arr,  \
                       bool stream) {                                                                             \
    fastreg::row_elemt<Io<ISA, T>>(w, x, y, f0, f1, arr, stream);                                                 \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_backward(const RowWalk& w, const void* dy, const void* x, void* dx, int64_t f0, int64_t f1,      \
                          const RowArrays<A>& arr, bool training, bool stream) {                                  \
    fastreg::row_backward<Io<ISA, T>>(w, dy, x, dx, f0, f1, arr, training, stream);                               \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void elemt_in_order(const BatchNormLayout& l, const void* x, void* y, int64_t f0, int64_t f1,             \
                            const A* mean, const A* a, const A* b, bool stream) {                                 \
    fastreg::elemt_in_order<Io<ISA, T>>(l, x, y, f0, f1, mean, a, b, stream);                                     \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void backward_in_order(const BatchNormLayout& l, const void* dy, const void* x, void* dx, int64_t f0,      \
                               int64_t f1, const BackwardCoefs<A>* coefs, bool training, bool stream) {           \
    fastreg::backward_in_order<Io<ISA, T>>(l, dy, x, dx, f0, f1, coefs, training, stream);                        \
  }                                                                                                               \
  template <typename T>                                                                                           \
  Kernels<T> kernels() {                                                                                          \
    return Kernels<T>{&stats_block<T>,       &reduce_block<T>,      &elemt_block<T>, &backward_block<T>,          \
                      &row_stats_group<T>,   &row_reduce_group<T>,  &row_elemt<T>,   &row_backward<T>,            \
                      &elemt_in_order<T>,    &backward_in_order<T>};                                              \
  }                                                                                                               \
  }

FASTREG_BN_ENTRIES(isa_base, IsaBase, __attribute__((flatten)))
#if defined(FASTREG_BN_X86)
FASTREG_BN_ENTRIES(isa_avx2, IsaAvx2, __attribute__((target("arch=x86-64-v3"), flatten)))
FASTREG_BN_ENTRIES(isa_avx512, IsaAvx512, __attribute__((target("arch=x86-64-v4"), flatten)))
#endif

// The widest ISA this CPU runs; FASTREG_BN_CPU_ISA=avx2|base caps it (to test the other
// builds on an AVX-512 machine).
enum class Isa { Base, Avx2, Avx512 };

inline Isa chosen_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Base;
#if defined(FASTREG_BN_X86)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) best = Isa::Avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = Isa::Avx512;
    }
#endif
    const char* cap = std::getenv("FASTREG_BN_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "base") == 0) best = Isa::Base;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::Avx512) best = Isa::Avx2;
    return best;
  }();
  return isa;
}

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> chosen = [] {
#if defined(FASTREG_BN_X86)
    if (chosen_isa() == Isa::Avx512) return isa_avx512::kernels<T>();
    if (chosen_isa() == Isa::Avx2) return isa_avx2::kernels<T>();
#endif
    return isa_base::kernels<T>();
  }();
  return chosen;
}

// Non-temporal stores are weakly ordered: fence before other threads may read the output.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---- drivers (plain C++; the vector work happens in the entry points)

template <typename T>
constexpr int64_t block_elems() {
  return kBlockBytes / static_cast<int64_t>(sizeof(T));
}

template <typename T>
bool use_row_walk(const BatchNormLayout& layout) {
  return layout.inner < kRowInnerMax && layout.channels * layout.inner <= kRowWidthMax;
}

// Float32/64 outputs of 4 MB and more bypass the caches (fp32 NCHW element-wise pass 1.4-2x
// faster on a 2-core EPYC). 16-bit outputs never do: streaming made the bf16 NCHW pass 1.6-1.7x
// slower (its half-size output stays in L3).
template <typename T>
bool should_stream(const BatchNormLayout& layout) {
  return sizeof(T) >= 4 && layout.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
}

// Whole channels per thread when that balances the threads; else (few channels) blocks.
inline bool channel_per_thread(int64_t channels) {
  const int64_t threads = std::max<int>(1, at::get_num_threads());
  return channels >= threads && (channels % threads == 0 || channels >= 8 * threads);
}

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, work_per_item));
}

// Chan's merge of the channel's block results (mean, M2), in block order.
inline void merge_blocks(const ChannelWalk& walk, const double* blocks, double& mean, double& var) {
  double n = 0.0, mu = 0.0, m2 = 0.0;
  for (int64_t b = 0; b < walk.blocks; ++b) {
    const double nb = static_cast<double>(walk.block_count(b));
    const double mb = blocks[2 * b], m2b = blocks[2 * b + 1];
    if (b == 0) {
      n = nb;
      mu = mb;
      m2 = m2b;
      continue;
    }
    const double total = n + nb, delta = mb - mu;
    mu += delta * (nb / total);
    m2 += m2b + delta * delta * (n * nb / total);
    n = total;
  }
  mean = mu;
  var = n > 0 ? m2 / n : 0.0;
}

template <typename A>
struct ChannelStats {
  A mean, var, invstd;
};

template <typename A>
ChannelStats<A> finish_stats(double mean, double var, double eps) {
  const A v = static_cast<A>(var);
  return {static_cast<A>(mean), v, A(1) / std::sqrt(v + static_cast<A>(eps))};
}

template <typename A>
inline A at_or(const void* p, int64_t c, A otherwise) {
  return p == nullptr ? otherwise : static_cast<const A*>(p)[c];
}

// Scratch of n elements starting on a cache line: the row walk's vector accesses to its
// accumulators are then never split across lines.
template <typename E>
struct AlignedScratch {
  std::vector<E> storage;
  E* data;
  explicit AlignedScratch(int64_t n) : storage(n + 64 / sizeof(E)) {
    const auto address = reinterpret_cast<uintptr_t>(storage.data());
    data = reinterpret_cast<E*>((address + 63) & ~uintptr_t{63});
  }
};

// Per-channel (mean, var) in double over the row walk: groups in parallel, then merged in order
// (columns across groups, then the inner columns of each channel).
template <typename T>
void row_stats(const BatchNormLayout& layout, const void* x, std::vector<double>& mean, std::vector<double>& var) {
  using A = typename ComputeType<T>::type;
  const Kernels<T>& k = kernels<T>();
  const RowWalk walk(layout, block_elems<T>());
  const int64_t width = walk.width;
  std::vector<double> gmean(walk.groups * width), gm2(walk.groups * width);
  at::parallel_for(0, walk.groups, grain_for(walk.group_rows * width), [&](int64_t g0, int64_t g1) {
    AlignedScratch<A> scratch(3 * (width + kPad));
    for (int64_t g = g0; g < g1; ++g) k.row_stats_group(walk, x, g, &gmean[g * width], &gm2[g * width], scratch.data);
  });
  std::vector<double> cm(gmean.begin(), gmean.begin() + width), cm2(gm2.begin(), gm2.begin() + width);
  double n = static_cast<double>(walk.group_end(0) - walk.group_begin(0));
  for (int64_t g = 1; g < walk.groups; ++g) {
    const double ng = static_cast<double>(walk.group_end(g) - walk.group_begin(g)), total = n + ng;
    const double f1 = ng / total, f2 = n * ng / total;
    const double* gmg = &gmean[g * width];
    const double* gm2g = &gm2[g * width];
    for (int64_t j = 0; j < width; ++j) {
      const double delta = gmg[j] - cm[j];
      cm[j] += delta * f1;
      cm2[j] += gm2g[j] + delta * delta * f2;
    }
    n = total;
  }
  mean.assign(layout.channels, 0.0);
  var.assign(layout.channels, 0.0);
  for (int64_t c = 0; c < layout.channels; ++c) {
    double cn = n, mu = cm[c * walk.inner], m2 = cm2[c * walk.inner];
    for (int64_t i = 1; i < walk.inner; ++i) {
      const int64_t j = c * walk.inner + i;
      const double total = cn + n, delta = cm[j] - mu;
      mu += delta * (n / total);
      m2 += cm2[j] + delta * delta * (cn * n / total);
      cn = total;
    }
    mean[c] = mu;
    var[c] = m2 / cn;
  }
}

// Per-channel (sum_dy, sum_dy_xmu) in double over the row walk.
template <typename T>
void row_reduce(const BatchNormLayout& layout, const void* dy, const void* x, const typename ComputeType<T>::type* mean,
                std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  using A = typename ComputeType<T>::type;
  const Kernels<T>& k = kernels<T>();
  const RowWalk walk(layout, block_elems<T>());
  const int64_t width = walk.width;
  std::vector<double> mean_ext(width + kPad);
  for (int64_t j = 0; j < width + kPad; ++j) mean_ext[j] = mean[(j % width) / walk.inner];
  std::vector<double> gdy(walk.groups * width), gdyx(walk.groups * width);
  at::parallel_for(0, walk.groups, grain_for(2 * walk.group_rows * width), [&](int64_t g0, int64_t g1) {
    AlignedScratch<double> scratch(2 * (width + kPad));
    for (int64_t g = g0; g < g1; ++g) {
      k.row_reduce_group(walk, dy, x, g, mean_ext.data(), &gdy[g * width], &gdyx[g * width], scratch.data);
    }
  });
  std::vector<double> cdy(gdy.begin(), gdy.begin() + width), cdyx(gdyx.begin(), gdyx.begin() + width);
  for (int64_t g = 1; g < walk.groups; ++g) {
    for (int64_t j = 0; j < width; ++j) {
      cdy[j] += gdy[g * width + j];
      cdyx[j] += gdyx[g * width + j];
    }
  }
  sum_dy.assign(layout.channels, 0.0);
  sum_dyx.assign(layout.channels, 0.0);
  for (int64_t c = 0; c < layout.channels; ++c) {
    for (int64_t i = 0; i < walk.inner; ++i) {
      sum_dy[c] += cdy[c * walk.inner + i];
      sum_dyx[c] += cdyx[c * walk.inner + i];
    }
  }
}

// Per-channel values repeated over the channel's columns, extended periodically.
template <typename A, typename F>
std::vector<A> column_array(const RowWalk& walk, F&& per_channel) {
  std::vector<A> out(walk.width + kPad);
  for (int64_t j = 0; j < walk.width + kPad; ++j) out[j] = per_channel((j % walk.width) / walk.inner);
  return out;
}

// The element-wise passes of the row walk go over the reduction's groups, split among the
// threads as the reduction split them, each thread's in reverse order: the rows a thread
// reduced last are still in its caches.
template <typename T>
void row_elemt_all(const BatchNormLayout& layout, const void* x, void* y, const RowArrays<typename ComputeType<T>::type>& arr) {
  const Kernels<T>& k = kernels<T>();
  const RowWalk walk(layout, block_elems<T>());
  const bool stream = should_stream<T>(layout);
  at::parallel_for(0, walk.groups, grain_for(walk.group_rows * walk.width), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g1 - 1; g >= g0; --g) {
      k.row_elemt(walk, x, y, walk.group_begin(g) * walk.width, walk.group_end(g) * walk.width, arr, stream);
    }
    if (stream) store_fence();
  });
}

template <typename T>
void row_backward_all(const BatchNormLayout& layout, const void* dy, const void* x, void* dx,
                      const RowArrays<typename ComputeType<T>::type>& arr, bool training) {
  const Kernels<T>& k = kernels<T>();
  const RowWalk walk(layout, block_elems<T>());
  const bool stream = should_stream<T>(layout);
  at::parallel_for(0, walk.groups, grain_for(2 * walk.group_rows * walk.width), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g1 - 1; g >= g0; --g) {
      k.row_backward(walk, dy, x, dx, walk.group_begin(g) * walk.width, walk.group_end(g) * walk.width, arr, training,
                     stream);
    }
    if (stream) store_fence();
  });
}

// Block results of every (channel, block) pair, in parallel; pairs in block-major order, so
// that neighbouring tasks read neighbouring memory.
template <typename F>
void for_pairs(const ChannelWalk& walk, int64_t elems_per_block, F&& f) {
  const int64_t pairs = walk.channels * walk.blocks;
  at::parallel_for(0, pairs, grain_for(elems_per_block), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(p % walk.channels, p / walk.channels);
  });
}

// Flat ranges of the whole tensor, in parallel (`fence`: the tasks wrote with non-temporal stores).
template <typename F>
void for_ranges_in_order(const BatchNormLayout& layout, int64_t streams, bool fence, F&& f) {
  at::parallel_for(0, layout.numel(), grain_for(streams), [&](int64_t f0, int64_t f1) {
    f(f0, f1);
    if (fence) store_fence();
  });
}

// ---- the kernels of batch_norm_kernels.h, per element type

template <typename T>
void stats_impl(const BatchNormLayout& layout, const void* x, void* mean_out, void* var_out, bool with_forward,
                void* y, const void* weight, const void* bias, double eps, void* invstd_out) {
  using A = typename ComputeType<T>::type;
  A* mean = static_cast<A*>(mean_out);
  A* var = static_cast<A*>(var_out);
  A* invstd = static_cast<A*>(invstd_out);
  const int64_t channels = layout.channels;
  auto store = [&](int64_t c, double m, double v) {
    const ChannelStats<A> s = finish_stats<A>(m, v, eps);
    mean[c] = s.mean;
    var[c] = s.var;
    if (invstd != nullptr) invstd[c] = s.invstd;
    return s;
  };
  auto scale_of = [&](int64_t c) { return invstd[c] * at_or<A>(weight, c, A(1)); };
  auto bias_of = [&](int64_t c) { return at_or<A>(bias, c, A(-0.0)); };  // x + -0 == x for every x
  if (layout.count() == 0) {
    for (int64_t c = 0; c < channels; ++c) store(c, 0.0, 0.0);
    return;
  }
  const Kernels<T>& k = kernels<T>();
  const bool stream = should_stream<T>(layout);
  if (use_row_walk<T>(layout)) {
    std::vector<double> m, v;
    row_stats<T>(layout, x, m, v);
    for (int64_t c = 0; c < channels; ++c) store(c, m[c], v[c]);
    if (with_forward) {
      const RowWalk walk(layout, block_elems<T>());
      const std::vector<A> am = column_array<A>(walk, [&](int64_t c) { return mean[c]; });
      const std::vector<A> aa = column_array<A>(walk, scale_of);
      const std::vector<A> ab = column_array<A>(walk, bias_of);
      row_elemt_all<T>(layout, x, y, RowArrays<A>{am.data(), aa.data(), ab.data(), nullptr});
    }
    return;
  }
  const ChannelWalk walk(layout, block_elems<T>());
  if (channel_per_thread(channels)) {
    at::parallel_for(0, channels, grain_for(layout.count()), [&](int64_t c0, int64_t c1) {
      std::vector<double> blocks(2 * walk.blocks);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t b = 0; b < walk.blocks; ++b) k.stats_block(walk, x, c, b, &blocks[2 * b]);
        double m, v;
        merge_blocks(walk, blocks.data(), m, v);
        const ChannelStats<A> s = store(c, m, v);
        if (with_forward) {
          const A a = s.invstd * at_or<A>(weight, c, A(1));
          for (int64_t b = 0; b < walk.blocks; ++b) k.elemt_block(walk, x, y, c, b, s.mean, a, bias_of(c), stream);
        }
      }
      if (stream) store_fence();
    });
    return;
  }
  std::vector<double> blocks(2 * channels * walk.blocks);
  const int64_t per_block = block_elems<T>();
  for_pairs(walk, per_block,
            [&](int64_t c, int64_t b) { k.stats_block(walk, x, c, b, &blocks[2 * (c * walk.blocks + b)]); });
  for (int64_t c = 0; c < channels; ++c) {
    double m, v;
    merge_blocks(walk, &blocks[2 * c * walk.blocks], m, v);
    store(c, m, v);
  }
  if (with_forward) {
    std::vector<A> scale(channels), shift(channels);
    for (int64_t c = 0; c < channels; ++c) {
      scale[c] = scale_of(c);
      shift[c] = bias_of(c);
    }
    for_ranges_in_order(layout, 2, stream, [&](int64_t f0, int64_t f1) {
      k.elemt_in_order(layout, x, y, f0, f1, mean, scale.data(), shift.data(), stream);
    });
  }
}

template <typename T>
void elemt_impl(const BatchNormLayout& layout, const void* x, void* y, const BatchNormAffine& affine) {
  using A = typename ComputeType<T>::type;
  if (layout.count() == 0) return;
  const A* mean = static_cast<const A*>(affine.mean);
  const A* invstd = static_cast<const A*>(affine.invstd);
  auto scale_of = [&](int64_t c) { return invstd[c] * at_or<A>(affine.weight, c, A(1)); };
  auto bias_of = [&](int64_t c) { return at_or<A>(affine.bias, c, A(-0.0)); };
  if (use_row_walk<T>(layout)) {
    const RowWalk walk(layout, block_elems<T>());
    const std::vector<A> am = column_array<A>(walk, [&](int64_t c) { return mean[c]; });
    const std::vector<A> aa = column_array<A>(walk, scale_of);
    const std::vector<A> ab = column_array<A>(walk, bias_of);
    row_elemt_all<T>(layout, x, y, RowArrays<A>{am.data(), aa.data(), ab.data(), nullptr});
    return;
  }
  const Kernels<T>& k = kernels<T>();
  const bool stream = should_stream<T>(layout);
  std::vector<A> scale(layout.channels), shift(layout.channels);
  for (int64_t c = 0; c < layout.channels; ++c) {
    scale[c] = scale_of(c);
    shift[c] = bias_of(c);
  }
  for_ranges_in_order(layout, 2, stream, [&](int64_t f0, int64_t f1) {
    k.elemt_in_order(layout, x, y, f0, f1, mean, scale.data(), shift.data(), stream);
  });
}

// Sums in double per channel over the channel walk (per_thread: the caller's channel loop).
template <typename T>
void channel_sums(const Kernels<T>& k, const ChannelWalk& walk, const void* dy, const void* x, int64_t c,
                  typename ComputeType<T>::type mean, double& sdy, double& sdyx) {
  sdy = 0.0;
  sdyx = 0.0;
  for (int64_t b = 0; b < walk.blocks; ++b) {
    double out[2];
    k.reduce_block(walk, dy, x, c, b, mean, out);
    sdy += out[0];
    sdyx += out[1];
  }
}

template <typename A>
BackwardCoefs<A> backward_coefs(A mean, A invstd, A weight, A sum_dy, A sum_dy_xmu, int64_t count, bool training) {
  BackwardCoefs<A> k{mean, A(0), A(0), invstd * weight};
  if (training) {
    // The reference's order: sum_dy / count and invstd * invstd * sum_dy_xmu / count, in A.
    const A n = static_cast<A>(count);
    k.mean_dy = sum_dy / n;
    k.proj = invstd * invstd * sum_dy_xmu / n;
  }
  return k;
}

// reduce (when sums_out), then the element-wise backward (when dx != nullptr).
template <typename T>
void backward_impl(const BatchNormLayout& layout, const void* dy, const void* x, void* dx, const BatchNormAffine& affine,
                   const void* sum_dy_in, const void* sum_dyx_in, void* sum_dy_out, void* sum_dyx_out, int64_t count) {
  using A = typename ComputeType<T>::type;
  const int64_t channels = layout.channels;
  const A* mean = static_cast<const A*>(affine.mean);
  const A* invstd = static_cast<const A*>(affine.invstd);
  A* out_dy = static_cast<A*>(sum_dy_out);
  A* out_dyx = static_cast<A*>(sum_dyx_out);
  const bool reduce = out_dy != nullptr;
  const bool training = reduce || sum_dy_in != nullptr;
  if (layout.count() == 0) {
    for (int64_t c = 0; reduce && c < channels; ++c) out_dy[c] = out_dyx[c] = A(0);
    return;
  }
  const A* in_dy = reduce ? out_dy : static_cast<const A*>(sum_dy_in);
  const A* in_dyx = reduce ? out_dyx : static_cast<const A*>(sum_dyx_in);
  auto coefs = [&](int64_t c) {
    return backward_coefs<A>(mean[c], dx == nullptr ? A(1) : invstd[c], at_or<A>(affine.weight, c, A(1)),
                             training ? in_dy[c] : A(0), training ? in_dyx[c] : A(0), count, training);
  };
  const Kernels<T>& k = kernels<T>();
  const bool stream = should_stream<T>(layout);
  if (use_row_walk<T>(layout)) {
    if (reduce) {
      std::vector<double> sdy, sdyx;
      row_reduce<T>(layout, dy, x, mean, sdy, sdyx);
      for (int64_t c = 0; c < channels; ++c) {
        out_dy[c] = static_cast<A>(sdy[c]);
        out_dyx[c] = static_cast<A>(sdyx[c]);
      }
    }
    if (dx != nullptr) {
      const RowWalk walk(layout, block_elems<T>());
      std::vector<BackwardCoefs<A>> per(channels);
      for (int64_t c = 0; c < channels; ++c) per[c] = coefs(c);
      const std::vector<A> am = column_array<A>(walk, [&](int64_t c) { return per[c].mean; });
      const std::vector<A> ad = column_array<A>(walk, [&](int64_t c) { return per[c].mean_dy; });
      const std::vector<A> ap = column_array<A>(walk, [&](int64_t c) { return per[c].proj; });
      const std::vector<A> as = column_array<A>(walk, [&](int64_t c) { return per[c].scale; });
      row_backward_all<T>(layout, dy, x, dx, RowArrays<A>{am.data(), ad.data(), ap.data(), as.data()}, training);
    }
    return;
  }
  const ChannelWalk walk(layout, block_elems<T>());
  if (reduce && channel_per_thread(channels)) {
    at::parallel_for(0, channels, grain_for(2 * layout.count()), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sdy, sdyx;
        channel_sums(k, walk, dy, x, c, mean[c], sdy, sdyx);
        out_dy[c] = static_cast<A>(sdy);
        out_dyx[c] = static_cast<A>(sdyx);
        if (dx != nullptr) {
          const BackwardCoefs<A> kc = coefs(c);
          for (int64_t b = 0; b < walk.blocks; ++b) k.backward_block(walk, dy, x, dx, c, b, kc, training, stream);
        }
      }
      if (stream) store_fence();
    });
    return;
  }
  const int64_t per_block = 2 * block_elems<T>();
  if (reduce) {
    std::vector<double> blocks(2 * channels * walk.blocks);
    for_pairs(walk, per_block, [&](int64_t c, int64_t b) {
      k.reduce_block(walk, dy, x, c, b, mean[c], &blocks[2 * (c * walk.blocks + b)]);
    });
    for (int64_t c = 0; c < channels; ++c) {
      double sdy = 0.0, sdyx = 0.0;
      for (int64_t b = 0; b < walk.blocks; ++b) {
        sdy += blocks[2 * (c * walk.blocks + b)];
        sdyx += blocks[2 * (c * walk.blocks + b) + 1];
      }
      out_dy[c] = static_cast<A>(sdy);
      out_dyx[c] = static_cast<A>(sdyx);
    }
  }
  if (dx != nullptr) {
    std::vector<BackwardCoefs<A>> per(channels);
    for (int64_t c = 0; c < channels; ++c) per[c] = coefs(c);
    for_ranges_in_order(layout, 3, stream, [&](int64_t f0, int64_t f1) {
      k.backward_in_order(layout, dy, x, dx, f0, f1, per.data(), training, stream);
    });
  }
}

template <typename F>
void with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float64: return f(double{});
    case DType::Float32: return f(float{});
    case DType::Float16: return f(c10::Half{});
    case DType::BFloat16: return f(c10::BFloat16{});
  }
}

}  // namespace

void batch_norm_stats_cpu(const BatchNormLayout& layout, DType dtype, const void* input, void* mean, void* var) {
  with_type(dtype, [&](auto tag) {
    stats_impl<decltype(tag)>(layout, input, mean, var, false, nullptr, nullptr, nullptr, 0.0, nullptr);
  });
}

void batch_norm_train_forward_cpu(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                                  const void* weight, const void* bias, double eps, void* mean, void* var, void* invstd) {
  with_type(dtype, [&](auto tag) {
    stats_impl<decltype(tag)>(layout, input, mean, var, true, output, weight, bias, eps, invstd);
  });
}

void batch_norm_elemt_cpu(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                          const BatchNormAffine& affine) {
  with_type(dtype, [&](auto tag) { elemt_impl<decltype(tag)>(layout, input, output, affine); });
}

void batch_norm_backward_reduce_cpu(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                    const void* input, const void* mean, void* sum_dy, void* sum_dy_xmu) {
  const BatchNormAffine affine{mean, nullptr, nullptr, nullptr};
  with_type(dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(layout, grad_output, input, nullptr, affine, nullptr, nullptr, sum_dy, sum_dy_xmu, 0);
  });
}

void batch_norm_backward_elemt_cpu(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                   const void* input, void* grad_input, const BatchNormAffine& affine,
                                   const void* sum_dy, const void* sum_dy_xmu, int64_t count) {
  with_type(dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(layout, grad_output, input, grad_input, affine, sum_dy, sum_dy_xmu, nullptr, nullptr,
                                 count);
  });
}

void batch_norm_backward_train_cpu(const BatchNormLayout& layout, DType dtype, const void* grad_output, const void* input,
                                   void* grad_input, const BatchNormAffine& affine, void* sum_dy, void* sum_dy_xmu) {
  with_type(dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(layout, grad_output, input, grad_input, affine, nullptr, nullptr, sum_dy, sum_dy_xmu,
                                 layout.count());
  });
}

}  // namespace fastreg
