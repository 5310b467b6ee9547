// CPU batch norm, channel walk (inner >= kRowInnerMax, e.g. NCHW): a channel's blocks of runs,
// and the in-order walk for element-wise passes that follow no reduction of their channel.
// Private to batch_norm_cpu.cpp, its only includer: internal linkage on purpose, so that
// the per-ISA clones of everything here stay inside that one translation unit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "batch_norm_cpu_runs.h"
#include "batch_norm_kernels.h"

namespace fastreg {
namespace {

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

}  // namespace
}  // namespace fastreg
