// CPU batch norm, order walk (inner >= kRowInnerMax, e.g. NCHW): every pass goes through the
// [outer][C][inner] tensor in memory order. Reductions cover work items of a unit of rows times
// a slab of neighbouring channels; element-wise passes cover flat ranges.
//
// Why memory order: the channel walk this replaced gave a thread one channel at a time, so it
// read `outer` runs of `inner` elements that lie C * inner apart, and fused the element-wise
// pass behind the reduction, from L2. NCHW's runs are short (14 x 14 fp32: 784 bytes), and that
// access pattern was slow: on the 2-core EPYC, (64,256,14,14) fp32, the backward reduction
// took 0.9-1.5 ms that way and 0.7-0.9 ms in memory order, the whole backward 2.2-2.4 ms and
// 1.4-2.1 ms, although two in-order passes read the inputs twice.
//
// Private to batch_norm_cpu.cpp, its only includer: internal linkage on purpose, so that
// the per-ISA clones of everything here stay inside that one translation unit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "batch_norm_cpu_runs.h"
#include "batch_norm_kernels.h"

namespace fastreg {
namespace {

constexpr int64_t kOrderUnitElems = 1024;   // per channel and unit: partial results are < 1% of the data
constexpr int64_t kOrderItemElems = 32768;  // per work item: read twice, the second time from L2
constexpr int64_t kOrderAccBytes = 256;     // per channel of an item's scratch

// The reductions' results are per (unit, channel), each a function of the layout alone, merged
// over the units in order: the same bits for any number of threads. A unit is a group of
// `unit_rows` rows (runs up to kOrderItemElems) or one piece of one row's runs (longer runs,
// `pieces` per run). Work item i covers unit i / slabs and the channels of slab i % slabs: per
// row, slab_channels runs (or pieces) one after the other in memory.
struct OrderWalk {
  int64_t outer = 0, channels = 0, inner = 0;
  int64_t unit_rows = 1, pieces = 1, piece = 0, units = 0;
  int64_t slab_channels = 1, slabs = 0;

  explicit OrderWalk(const BatchNormLayout& layout)
      : outer(layout.outer), channels(layout.channels), inner(layout.inner) {
    if (layout.count() == 0) return;
    pieces = (inner + kOrderItemElems - 1) / kOrderItemElems;
    piece = (inner + pieces - 1) / pieces;
    unit_rows = pieces > 1 ? 1 : std::clamp<int64_t>((kOrderUnitElems + inner - 1) / inner, 1, outer);
    units = (outer + unit_rows - 1) / unit_rows * pieces;
    slab_channels = std::clamp<int64_t>(kOrderItemElems / (unit_rows * piece), 1, channels);
    slabs = (channels + slab_channels - 1) / slab_channels;
  }

  int64_t items() const { return units * slabs; }
  // Rows [row_begin, row_end) and elements [elem_begin, elem_end) of each run, of unit u.
  int64_t row_begin(int64_t u) const { return u / pieces * unit_rows; }
  int64_t row_end(int64_t u) const { return std::min(outer, row_begin(u) + unit_rows); }
  int64_t elem_begin(int64_t u) const { return u % pieces * piece; }
  int64_t elem_end(int64_t u) const { return std::min(inner, elem_begin(u) + piece); }
  int64_t unit_count(int64_t u) const { return (row_end(u) - row_begin(u)) * (elem_end(u) - elem_begin(u)); }
  int64_t slab_begin(int64_t s) const { return s * slab_channels; }
  int64_t slab_end(int64_t s) const { return std::min(channels, (s + 1) * slab_channels); }

  // f(j, pointer offset, length) for each run piece of item i, in memory order; j is the channel's
  // index within the slab.
  template <class F>
  __attribute__((always_inline)) inline void item_runs(int64_t i, F&& f) const {
    const int64_t u = i / slabs, s = i % slabs;
    const int64_t c0 = slab_begin(s), width = slab_end(s) - c0;
    const int64_t e0 = elem_begin(u), len = elem_end(u) - e0;
    for (int64_t o = row_begin(u); o < row_end(u); ++o) {
      for (int64_t j = 0; j < width; ++j) f(j, (o * channels + c0 + j) * inner + e0, len);
    }
  }
};

// Chan's merge of (nb, mb, m2b) into (n, mu, m2).
inline void chan_merge(double& n, double& mu, double& m2, double nb, double mb, double m2b) {
  if (n == 0.0) {
    n = nb;
    mu = mb;
    m2 = m2b;
    return;
  }
  const double total = n + nb, delta = mb - mu;
  mu += delta * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

// (mean, M2) per channel of item i, into mean_out / m2_out at [unit * C + channel]: the sum,
// then sums of x - mean and (x - mean)^2 around the resulting mean (a second pass over the
// item, from L2), corrected by the centred sum's residue. Per-channel vector accumulators in
// `scratch` (kOrderAccBytes per channel, 64-byte aligned): no horizontal sum per run.
template <class IO>
void order_stats_item(const OrderWalk& walk, const void* input, int64_t i, double* mean_out, double* m2_out,
                      void* scratch) {
  using R = RunOps<IO>;
  using A = typename IO::A;
  using V = typename IO::V;
  struct Acc {
    V sum, s1, s2;
    A tail, t1, t2, mean;
  };
  static_assert(sizeof(Acc) <= kOrderAccBytes, "scratch per channel");
  const auto* x = static_cast<const typename IO::Elem*>(input);
  const int64_t u = i / walk.slabs, c0 = walk.slab_begin(i % walk.slabs);
  const int64_t width = walk.slab_end(i % walk.slabs) - c0;
  auto* acc = static_cast<Acc*>(scratch);
  for (int64_t j = 0; j < width; ++j) acc[j] = Acc{};
  walk.item_runs(i, [&](int64_t j, int64_t offset, int64_t len) {
    V a[4] = {acc[j].sum, V{}, V{}, V{}};
    R::sum(x + offset, len, a, acc[j].tail);
    acc[j].sum = (a[0] + a[1]) + (a[2] + a[3]);
  });
  const double n = static_cast<double>(walk.unit_count(u));
  for (int64_t j = 0; j < width; ++j) {
    acc[j].mean = static_cast<A>((IO::fold(acc[j].sum) + static_cast<double>(acc[j].tail)) / n);
  }
  walk.item_runs(i, [&](int64_t j, int64_t offset, int64_t len) {
    V s1[2] = {acc[j].s1, V{}}, s2[2] = {acc[j].s2, V{}};
    R::centered(x + offset, len, acc[j].mean, s1, s2, acc[j].t1, acc[j].t2);
    acc[j].s1 = s1[0] + s1[1];
    acc[j].s2 = s2[0] + s2[1];
  });
  for (int64_t j = 0; j < width; ++j) {
    const double d1 = IO::fold(acc[j].s1) + static_cast<double>(acc[j].t1);
    const double d2 = IO::fold(acc[j].s2) + static_cast<double>(acc[j].t2);
    mean_out[u * walk.channels + c0 + j] = static_cast<double>(acc[j].mean) + d1 / n;
    m2_out[u * walk.channels + c0 + j] = std::max(0.0, d2 - d1 * d1 / n);
  }
}

// (sum dy, sum dy * (x - mean)) per channel of item i, into sdy_out / sdyx_out at
// [unit * C + channel], with per-channel accumulators in `scratch` as above.
template <class IO>
void order_reduce_item(const OrderWalk& walk, const void* grad_output, const void* input, int64_t i,
                       const typename IO::A* mean, double* sdy_out, double* sdyx_out, void* scratch) {
  using VD = typename IO::VD;
  constexpr int H = IO::kHalves;
  struct Acc {
    VD sdy, sdyx;
    double t1, t2;
  };
  static_assert(sizeof(Acc) <= kOrderAccBytes, "scratch per channel");
  const auto* dy = static_cast<const typename IO::Elem*>(grad_output);
  const auto* x = static_cast<const typename IO::Elem*>(input);
  const int64_t u = i / walk.slabs, c0 = walk.slab_begin(i % walk.slabs);
  const int64_t width = walk.slab_end(i % walk.slabs) - c0;
  auto* acc = static_cast<Acc*>(scratch);
  for (int64_t j = 0; j < width; ++j) acc[j] = Acc{};
  walk.item_runs(i, [&](int64_t j, int64_t offset, int64_t len) {
    VD a1[2 * H] = {acc[j].sdy}, a2[2 * H] = {acc[j].sdyx};
    RunOps<IO>::reduce(dy + offset, x + offset, len, mean[c0 + j], a1, a2, acc[j].t1, acc[j].t2);
    for (int h = 1; h < 2 * H; ++h) {
      a1[0] += a1[h];
      a2[0] += a2[h];
    }
    acc[j].sdy = a1[0];
    acc[j].sdyx = a2[0];
  });
  for (int64_t j = 0; j < width; ++j) {
    sdy_out[u * walk.channels + c0 + j] = IO::foldd(acc[j].sdy) + acc[j].t1;
    sdyx_out[u * walk.channels + c0 + j] = IO::foldd(acc[j].sdyx) + acc[j].t2;
  }
}

// ---- element-wise passes: flat ranges in memory order, one vector after another across run
// boundaries. A vector that straddles the end of a run (inner >= 32 >= lanes: at most one end)
// takes its lanes' coefficients from both channels. The per-run loops this replaced ended each
// run with scalar code, and with non-temporal stores also began it so, up to the next cache line:
// at 7 x 7 (49-element runs) about a third of the elements. (128,512,7,7) fp32 on the 2-core
// EPYC: elemt 1.35-1.47 -> 0.50-0.57 ms (a copy: 0.42-0.69), backward_elemt 1.71-1.75 -> 0.68-0.89.

template <class IO, int K>
struct Splats {
  typename IO::V v[K];
};

// Flat elements [f0, f1) of the [outer][C][inner] layout: vec(stream_tag, f, splats) per vector,
// one(f, c) per remaining element, with splat_of(c) the K coefficient vectors of channel c. When
// `stream`, the vectors that fill whole cache lines of `out` get stream_tag true.
template <class IO, int K, class SplatOf, class Vec, class One>
inline void flat_walk(int64_t inner, int64_t channels, int64_t f0, int64_t f1, const typename IO::Elem* out,
                      bool stream, SplatOf&& splat_of, Vec&& vec, One&& one) {
  using A = typename IO::A;
  using V = typename IO::V;
  constexpr int64_t L = IO::kLanes;
  int64_t f = f0;
  int64_t r = f / inner;
  int64_t c = r % channels, run_end = (r + 1) * inner;
  auto next_channel = [&] { return c + 1 == channels ? 0 : c + 1; };
  auto scalars_to = [&](int64_t end) {
    for (; f < end; ++f) {
      if (f == run_end) {
        c = next_channel();
        run_end += inner;
      }
      one(f, c);
    }
  };
  int64_t stream_end = f;
  if (stream) {
    constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(typename IO::Elem));
    const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + f0) % 64) /
                            static_cast<int64_t>(sizeof(typename IO::Elem));
    scalars_to(std::min(f1, f0 + (misaligned == 0 ? 0 : kLine - misaligned)));
    stream_end = f + (f1 - f) / kLine * kLine;
  }
  if (f == run_end) {
    c = next_channel();
    run_end += inner;
  }
  V lane;
  for (int k = 0; k < L; ++k) lane[k] = static_cast<A>(k);
  Splats<IO, K> cur = splat_of(c);
  auto vectors_to = [&](auto stream_tag, int64_t end) {
    while (f + L <= end) {
      const Splats<IO, K> k = cur;  // a local copy: the compiler keeps it in registers
      const int64_t stop = std::min(end, run_end);
      for (; f + L <= stop; f += L) vec(stream_tag, f, k);
      if (f + L > end) break;
      const int64_t c2 = next_channel();
      const Splats<IO, K> next = splat_of(c2);
      if (f < run_end) {  // the vector straddles the run's end
        const V first = IO::splat(static_cast<A>(run_end - f));
        Splats<IO, K> mixed;
        for (int j = 0; j < K; ++j) mixed.v[j] = lane < first ? k.v[j] : next.v[j];
        vec(stream_tag, f, mixed);
        f += L;
      }
      c = c2;
      cur = next;
      run_end += inner;
    }
  };
  vectors_to(std::true_type{}, stream_end);
  vectors_to(std::false_type{}, f1);
  scalars_to(f1);
}

template <class IO>
void elemt_in_order(const BatchNormLayout& layout, const void* input, void* output, int64_t f0, int64_t f1,
                    const typename IO::A* mean, const typename IO::A* a, const typename IO::A* b, bool stream) {
  using T = typename IO::Elem;
  const T* x = static_cast<const T*>(input);
  T* y = static_cast<T*>(output);
  flat_walk<IO, 3>(
      layout.inner, layout.channels, f0, f1, y, stream,
      [&](int64_t c) { return Splats<IO, 3>{{IO::splat(mean[c]), IO::splat(a[c]), IO::splat(b[c])}}; },
      [&](auto stream_tag, int64_t f, const Splats<IO, 3>& k) {
        IO::template store<decltype(stream_tag)::value>(y + f, (IO::load(x + f) - k.v[0]) * k.v[1] + k.v[2]);
      },
      [&](int64_t f, int64_t c) { IO::store1(y + f, (IO::load1(x + f) - mean[c]) * a[c] + b[c]); });
}

// training: dx = (dy - mean_dy - (x - mean) * proj) * scale;  eval: dx = dy * scale
template <class IO>
void backward_in_order(const BatchNormLayout& layout, const void* grad_output, const void* input, void* grad_input,
                       int64_t f0, int64_t f1, const BackwardCoefs<typename IO::A>* coefs, bool training, bool stream) {
  using T = typename IO::Elem;
  using A = typename IO::A;
  const T* dy = static_cast<const T*>(grad_output);
  const T* x = static_cast<const T*>(input);
  T* dx = static_cast<T*>(grad_input);
  auto splat_of = [&](int64_t c) {
    const BackwardCoefs<A>& k = coefs[c];
    return Splats<IO, 4>{{IO::splat(k.mean), IO::splat(k.mean_dy), IO::splat(k.proj), IO::splat(k.scale)}};
  };
  auto go = [&](auto training_tag) {
    constexpr bool kTraining = decltype(training_tag)::value;
    flat_walk<IO, 4>(
        layout.inner, layout.channels, f0, f1, dx, stream, splat_of,
        [&](auto stream_tag, int64_t f, const Splats<IO, 4>& k) {
          constexpr bool kStream = decltype(stream_tag)::value;
          const typename IO::V g = IO::load(dy + f);
          if constexpr (kTraining) {
            IO::template store<kStream>(dx + f, (g - k.v[1] - (IO::load(x + f) - k.v[0]) * k.v[2]) * k.v[3]);
          } else {
            IO::template store<kStream>(dx + f, g * k.v[3]);
          }
        },
        [&](int64_t f, int64_t c) {
          const BackwardCoefs<A>& k = coefs[c];
          const A g = IO::load1(dy + f);
          IO::store1(dx + f, kTraining ? (g - k.mean_dy - (IO::load1(x + f) - k.mean) * k.proj) * k.scale : g * k.scale);
        });
  };
  training ? go(std::true_type{}) : go(std::false_type{});
}

}  // namespace
}  // namespace fastreg
