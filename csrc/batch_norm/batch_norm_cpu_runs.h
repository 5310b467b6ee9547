// CPU batch norm: the vector loops of the reductions over one contiguous run of elements (sums,
// centred sums, backward sums), the per-channel backward coefficients, and the rule for
// non-temporal stores on whole cache lines.
// Private to batch_norm_cpu.cpp, its only includer: internal linkage on purpose, so that
// the per-ISA clones of everything here stay inside that one translation unit.
#pragma once

#include "batch_norm_cpu_simd.h"

namespace fastreg {
namespace {

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

// Per-channel coefficients of the backward element-wise formula.
template <typename A>
struct BackwardCoefs {
  A mean, mean_dy, proj, scale;
};

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
};

}  // namespace
}  // namespace fastreg
