// CPU weight penalty: sums and gradient in one pass over memory. Free of torch types except
// c10's header-only half/bfloat16 conversions; weight_penalty_ops.cpp cuts the chunks and
// parallelises.
#include <cmath>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/compute_type.h"
#include "weight_penalty_coefficients.h"
#include "weight_penalty_kernels.h"

#include "../common/no_fp_contract.h"  // gradients with autograd's bits on every machine

namespace fastreg {
namespace {

template <typename T>
using Compute = ComputeType<T>;

template <typename A>
inline A sign_of(A x) {
  return static_cast<A>(x > A(0)) - static_cast<A>(x < A(0));  // 0 for +-0 (and NaN), like torch.sign
}

// One element, scalar: the tail of a range, and the definition the vector code follows.
template <typename T, PenaltyMode M>
__attribute__((always_inline)) inline void update(const T* __restrict__ w, T* __restrict__ g, int64_t i,
                                                  typename Compute<T>::type c1, typename Compute<T>::type c2x2,
                                                  typename Compute<T>::type& a1, typename Compute<T>::type& a2) {
  using A = typename Compute<T>::type;
  const A x = static_cast<A>(w[i]);
  if constexpr (M != PenaltyMode::Backward) {
    a1 += std::abs(x);
    a2 += x * x;
  }
  if constexpr (M == PenaltyMode::Accumulate) {
    g[i] = static_cast<T>(static_cast<A>(g[i]) + (c1 * sign_of(x) + c2x2 * x));
  } else if constexpr (M == PenaltyMode::Backward) {
    g[i] = static_cast<T>(c1 * sign_of(x) + c2x2 * x);
  }
}

// 32-byte vectors written with GCC/Clang vector extensions: the compiler maps them onto each
// clone's ISA (one AVX register, two SSE registers), and the lane order, hence the rounding,
// is the same on every machine. Auto-vectorising the scalar loop instead reduces lanes in an
// order of the compiler's choosing (and GCC transposes them with permutes).
template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
  static constexpr int width = 4;
};
typedef uint16_t u16x8 __attribute__((vector_size(16)));

template <typename To, typename From>
__attribute__((always_inline)) inline To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename T, typename V = typename Vec<typename Compute<T>::type>::type>
__attribute__((always_inline)) inline void load(const T* p, V& v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    std::memcpy(&v, p, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    u16x8 bits;  // bfloat16 is the top half of a float: widening is a shift
    std::memcpy(&bits, p, sizeof(bits));
    v = bits_as<V>(__builtin_convertvector(bits, u32x8) << 16);
  } else {
    for (int k = 0; k < 8; ++k) v[k] = static_cast<float>(p[k]);
  }
}

template <typename T, typename V = typename Vec<typename Compute<T>::type>::type>
__attribute__((always_inline)) inline void store(T* p, const V& v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    std::memcpy(p, &v, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16(float) lane by lane.
    const u32x8 bits = bits_as<u32x8>(v);
    const u32x8 nan = bits_as<u32x8>(v != v);
    const u32x8 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    const u16x8 out = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), u16x8);
    std::memcpy(p, &out, sizeof(out));
  } else {
    for (int k = 0; k < 8; ++k) p[k] = static_cast<T>(v[k]);
  }
}

// The scalar update() on one vector of elements.
template <typename T, PenaltyMode M, typename A = typename Compute<T>::type, typename V = typename Vec<A>::type>
__attribute__((always_inline)) inline void update_vec(const T* __restrict__ w, T* __restrict__ g, A c1, A c2x2, V& a1, V& a2) {
  using Mask = typename Vec<A>::mask;
  V x;
  load(w, x);
  if constexpr (M != PenaltyMode::Backward) {
    const Mask sign_bit = (Mask{} + 1) << (sizeof(A) * 8 - 1);
    a1 += bits_as<V>(bits_as<Mask>(x) & ~sign_bit);  // |x|
    a2 += x * x;
  }
  if constexpr (M != PenaltyMode::Value) {
    // Comparisons give -1 where true, so (x < 0) - (x > 0) is sign(x), 0 for +-0 and NaN.
    const V sign = __builtin_convertvector((x < A(0)) - (x > A(0)), V);
    const V step = c1 * sign + c2x2 * x;
    V out;
    if constexpr (M == PenaltyMode::Accumulate) {
      V old;
      load(g, old);
      out = old + step;
    } else {
      out = step;
    }
    store(g, out);
  }
}

// kVectors independent accumulators per sum run for kRows rows, then fold into double in
// lane order: short fp32 runs keep the rounding error tiny, and the order is fixed.
constexpr int kVectors = 2;
constexpr int kRows = 16;

// Always inlined into the per-ISA clones below, so each clone compiles it for its ISA.
template <typename T, PenaltyMode M>
__attribute__((always_inline)) inline void penalty_span(const T* __restrict__ w, T* __restrict__ g, int64_t n, double c1_in,
                                                        double c2x2_in, double* sums) {
  using A = typename Compute<T>::type;
  using V = typename Vec<A>::type;
  constexpr int kWidth = Vec<A>::width;
  constexpr int64_t kBlock = int64_t{kWidth} * kVectors * kRows;
  const A c1 = static_cast<A>(c1_in), c2x2 = static_cast<A>(c2x2_in);  // exact: computed in A
  double s1 = 0.0, s2 = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    V a1[kVectors] = {}, a2[kVectors] = {};
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        const int64_t e = i + (int64_t{r} * kVectors + v) * kWidth;
        update_vec<T, M>(w + e, g == nullptr ? nullptr : g + e, c1, c2x2, a1[v], a2[v]);
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      for (int k = 0; k < kWidth; ++k) {
        s1 += a1[v][k];
        s2 += a2[v][k];
      }
    }
  }
  A t1 = 0, t2 = 0;
  for (; i < n; ++i) update<T, M>(w, g, i, c1, c2x2, t1, t2);
  sums[0] = s1 + t1;
  sums[1] = s2 + t2;
}

using SpanFn = void (*)(const void*, void*, int64_t, double, double, double*);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTREG_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTREG_SIMD_CLONES
#endif

#define FASTREG_DEFINE_SPAN(NAME, T, MODE)                                                       \
  FASTREG_SIMD_CLONES void NAME(const void* w, void* g, int64_t n, double c1, double c2x2, double* sums) { \
    penalty_span<T, MODE>(static_cast<const T*>(w), static_cast<T*>(g), n, c1, c2x2, sums);   \
  }

FASTREG_DEFINE_SPAN(span_f64_value, double, PenaltyMode::Value)
FASTREG_DEFINE_SPAN(span_f64_accumulate, double, PenaltyMode::Accumulate)
FASTREG_DEFINE_SPAN(span_f64_backward, double, PenaltyMode::Backward)
FASTREG_DEFINE_SPAN(span_f32_value, float, PenaltyMode::Value)
FASTREG_DEFINE_SPAN(span_f32_accumulate, float, PenaltyMode::Accumulate)
FASTREG_DEFINE_SPAN(span_f32_backward, float, PenaltyMode::Backward)
FASTREG_DEFINE_SPAN(span_f16_value, c10::Half, PenaltyMode::Value)
FASTREG_DEFINE_SPAN(span_f16_accumulate, c10::Half, PenaltyMode::Accumulate)
FASTREG_DEFINE_SPAN(span_f16_backward, c10::Half, PenaltyMode::Backward)
FASTREG_DEFINE_SPAN(span_bf16_value, c10::BFloat16, PenaltyMode::Value)
FASTREG_DEFINE_SPAN(span_bf16_accumulate, c10::BFloat16, PenaltyMode::Accumulate)
FASTREG_DEFINE_SPAN(span_bf16_backward, c10::BFloat16, PenaltyMode::Backward)

// [dtype][mode], in the order of DType and PenaltyMode.
constexpr SpanFn kSpans[4][3] = {
    {span_f64_value, span_f64_accumulate, span_f64_backward},
    {span_f32_value, span_f32_accumulate, span_f32_backward},
    {span_f16_value, span_f16_accumulate, span_f16_backward},
    {span_bf16_value, span_bf16_accumulate, span_bf16_backward},
};

// (c1, c2x2) in the compute type A, by the rule the CUDA kernel and the reference share.
template <typename A>
void coefficients(PenaltyMode mode, const PenaltyScalars& scalars, double& c1, double& c2x2) {
  A a1, a2;
  penalty_coefficients<A>(mode, scalars, a1, a2);
  c1 = a1;  // exact: penalty_span casts them back to A
  c2x2 = a2;
}

}  // namespace

void weight_penalty_range_cpu(const PenaltyTensor& tensor, PenaltyMode mode, const PenaltyScalars& scalars, int64_t begin,
                              int64_t end, double sums[2]) {
  double c1 = 0.0, c2x2 = 0.0;
  if (tensor.dtype == DType::Float64) {
    coefficients<double>(mode, scalars, c1, c2x2);
  } else {
    coefficients<float>(mode, scalars, c1, c2x2);
  }
  const int64_t element_size = tensor.dtype == DType::Float64 ? 8 : tensor.dtype == DType::Float32 ? 4 : 2;
  const char* w = static_cast<const char*>(tensor.param) + begin * element_size;
  char* g = tensor.grad == nullptr ? nullptr : static_cast<char*>(tensor.grad) + begin * element_size;
  kSpans[static_cast<int>(tensor.dtype)][static_cast<int>(mode)](w, g, end - begin, c1, c2x2, sums);
}

}  // namespace fastreg
