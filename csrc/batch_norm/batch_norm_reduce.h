// The CUDA batch-norm reductions' plan, arguments, merges and per-thread code
// (batch_norm_reduce_cuda.cu) as host+device code, so that csrc/tests/ can run every thread of
// every block on the host without a GPU. What stays in the .cu: the block merges (warp
// shuffles, shared memory), the finalize kernels and the launches.
//
// The includer declares to_compute for its element types first (compute_type_cuda.cuh on the
// device).
#pragma once

#include <cstdint>

#include "batch_norm_device.h"

namespace fastreg {
namespace bn_cuda {

constexpr int kVectorUnroll = 4;   // 16-byte packs per thread and tensor in flight
constexpr int kScalarUnroll = 8;   // one-element packs per thread and tensor in flight
constexpr int64_t kBlockBytes = 64 * 1024;     // aim: one block reads this much of one input
constexpr int64_t kMinBlockBytes = 8 * 1024;   // ...and at least this much when splitting further
constexpr int64_t kTargetBlocks = 1024;        // split further while the grid has fewer blocks
constexpr int64_t kMaxSplits = 1024;           // finalize: at most 32 sequential merges per lane

// ---- the plan: shape and dtype only (the workspace size and the summation order follow it)

struct ReducePlan {
  bool channels_last;
  int vec;            // elements per pack
  int log2_tc;        // channels-last: 1 << log2_tc threads along C
  int64_t tiles;      // grid.x: C (NCHW-like) or channel tiles (channels-last)
  int64_t splits;     // grid.y; 0 for an empty input
  int64_t split_len;  // NCHW-like: packs of one channel per split; channels-last: rows per split
};

inline ReducePlan reduce_plan(const BatchNormLayout& layout, DType dtype) {
  ReducePlan p{};
  const int64_t es = element_size(dtype);
  const int64_t vmax = 16 / es;
  const int64_t channels = layout.channels;
  const int64_t count = layout.count();
  p.channels_last = layout.inner == 1;
  int64_t units = 0, unit_bytes = 0;  // one block column: `units` of `unit_bytes` each
  if (p.channels_last) {
    p.vec = static_cast<int>(channels % vmax == 0 ? vmax : 1);
    const int64_t cols = channels / p.vec;
    p.log2_tc = ceil_log2(cols < kMaxTileThreads ? (cols < 1 ? 1 : cols) : kMaxTileThreads);
    const int64_t width = int64_t{p.vec} << p.log2_tc;
    p.tiles = ceil_div(channels, width);
    units = count;  // rows
    unit_bytes = (channels < width ? channels : width) * es;
  } else {
    p.vec = static_cast<int>(layout.inner % vmax == 0 ? vmax : 1);
    p.log2_tc = 0;
    p.tiles = channels;
    units = count / p.vec;  // packs of one channel
    unit_bytes = p.vec * es;
  }
  if (count == 0 || channels == 0 || units == 0) {
    p.splits = 0;
    p.split_len = 0;
    return p;
  }
  const int64_t bytes = units * unit_bytes;
  int64_t splits = ceil_div(bytes, kBlockBytes);
  if (p.tiles * splits < kTargetBlocks) {
    const int64_t more = ceil_div(kTargetBlocks, p.tiles);
    const int64_t most = ceil_div(bytes, kMinBlockBytes);
    const int64_t wanted = more < most ? more : most;
    if (wanted > splits) splits = wanted;
  }
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits > units) splits = units;
  if (splits < 1) splits = 1;
  p.split_len = ceil_div(units, splits);
  p.splits = ceil_div(units, p.split_len);  // no empty split
  return p;
}

// ---- merges

// (count, mean, M2) of a set of values; count 0 means empty (mean and M2 are then 0).
struct Welford {
  double n, mean, m2;
};

// Chan et al.: exact in exact arithmetic, stable in floating point. Branch-free: an empty
// side leaves the other unchanged (r = 0, or r = 1 with mean_a = m2_a = 0).
FASTREG_HOST_DEVICE Welford merge(const Welford& a, const Welford& b) {
  const double n = a.n + b.n;
  const double r = n > 0.0 ? b.n / n : 0.0;
  const double delta = b.mean - a.mean;
  return Welford{n, a.mean + delta * r, a.m2 + b.m2 + delta * delta * a.n * r};
}

// A thread's running statistics of one channel in the compute type, shifted by its first
// value: count n, d = mean - K, M2.
template <typename A>
struct Running {
  int64_t n = 0;
  A shift = 0, d = 0, m2 = 0;

  FASTREG_HOST_DEVICE Welford to_double() const {
    return Welford{static_cast<double>(n), static_cast<double>(shift) + static_cast<double>(d),
                   static_cast<double>(m2)};
  }
};

// Merges a batch (nb values, shifted mean bm, sum of squared deviations b2; r = nb / (n + nb))
// into a running state.
template <typename A>
FASTREG_HOST_DEVICE void absorb(Running<A>& s, int64_t nb, A bm, A b2, A r) {
  const A delta = bm - s.d;
  s.d += delta * r;
  s.m2 += b2 + delta * delta * (static_cast<A>(s.n) * r);
  s.n += nb;
}

struct ReduceArgs {
  const void* x;
  const void* dy;    // backward only
  const void* mean;  // backward only: compute type
  double* partials;
  int64_t channels, inner, outer;
  int64_t splits, split_len;
  int64_t inner_packs;           // NCHW-like: inner / V
  int64_t step_rows, step_cols;  // NCHW-like: kThreads packs as whole rows plus packs
  int log2_tc;                   // channels-last
};

// The arguments of either reduce kernel for plan p (x, and for the backward sums dy and the
// per-channel mean in the compute type; partials: the workspace).
inline ReduceArgs reduce_args(const BatchNormLayout& layout, const ReducePlan& p, const void* x, const void* dy,
                              const void* mean, double* partials) {
  ReduceArgs a{};
  a.x = x;
  a.dy = dy;
  a.mean = mean;
  a.partials = partials;
  a.channels = layout.channels;
  a.inner = layout.inner;
  a.outer = layout.outer;
  a.splits = p.splits;
  a.split_len = p.split_len;
  a.log2_tc = p.log2_tc;
  if (!p.channels_last) {
    a.inner_packs = layout.inner / p.vec;
    a.step_rows = kThreads / a.inner_packs;
    a.step_cols = kThreads % a.inner_packs;
  }
  return a;
}

// Whether the kernels for plan p may read 16-byte packs with single loads (p.vec > 1 and the
// inputs aligned); otherwise a pack of p.vec elements is read element by element, in the same
// order, so the sums do not depend on the alignment.
inline bool reduce_vector_loads(const ReducePlan& p, const ReduceArgs& a, bool backward) {
  return p.vec > 1 && aligned16(a.x) && (!backward || aligned16(a.dy));
}

// ---- NCHW-like: block (c, s)

// Thread `thread` of block (c, s): its share of split s of channel c, in sequence, into st
// (statistics) or sum_dy and sum_dy_xmu (Backward). The arguments are taken by value: by
// reference, nvcc compiles the kernels with a few more instructions and registers.
template <typename T, int V, bool Vector, bool Backward>
FASTREG_HOST_DEVICE void reduce_nchw_thread(const ReduceArgs a, int64_t c, int64_t s, uint32_t thread,
                                            Running<Acc<T>>& st, double& sum_dy, double& sum_dy_xmu) {
  using A = Acc<T>;
  constexpr int U = V == 1 ? kScalarUnroll : kVectorUnroll;
  const int64_t packs = a.outer * a.inner_packs;
  const int64_t q_begin = s * a.split_len;
  const int64_t q_end = q_begin + a.split_len < packs ? q_begin + a.split_len : packs;
  const int64_t row_stride = a.channels * a.inner;
  const T* __restrict__ x = static_cast<const T*>(a.x) + c * a.inner;
  const T* __restrict__ g = Backward ? static_cast<const T*>(a.dy) + c * a.inner : nullptr;

  A mean_c = 0;
  if constexpr (Backward) mean_c = static_cast<const A*>(a.mean)[c];

  int64_t q = q_begin + thread;
  int64_t row = q / a.inner_packs;
  int64_t col = q - row * a.inner_packs;
  for (; q < q_end; q += int64_t{U} * kThreads) {
    T xv[U][V], gv[U][V];
    int nv = 0;  // packs of this batch in range: a prefix of the U
FASTREG_UNROLL
    for (int u = 0; u < U; ++u) {
      if (q + int64_t{u} * kThreads < q_end) {
        const int64_t off = row * row_stride + col * V;
        load_pack<T, V, Vector>(x + off, xv[u]);
        if constexpr (Backward) load_pack<T, V, Vector>(g + off, gv[u]);
        nv = u + 1;
      }
      col += a.step_cols;
      row += a.step_rows;
      if (col >= a.inner_packs) {
        col -= a.inner_packs;
        ++row;
      }
    }
    if constexpr (Backward) {
      A b_dy = 0, b_dyx = 0;
FASTREG_UNROLL
      for (int u = 0; u < U; ++u) {
        if (u < nv) {
FASTREG_UNROLL
          for (int k = 0; k < V; ++k) {
            const A gk = to_compute(gv[u][k]);
            b_dy += gk;
            b_dyx += gk * (to_compute(xv[u][k]) - mean_c);
          }
        }
      }
      sum_dy += static_cast<double>(b_dy);
      sum_dy_xmu += static_cast<double>(b_dyx);
    } else {
      if (st.n == 0) st.shift = to_compute(xv[0][0]);
      A bs = 0;
FASTREG_UNROLL
      for (int u = 0; u < U; ++u) {
        if (u < nv) {
FASTREG_UNROLL
          for (int k = 0; k < V; ++k) bs += to_compute(xv[u][k]) - st.shift;
        }
      }
      const int64_t nb = int64_t{nv} * V;
      const A bm = bs / static_cast<A>(nb);
      A b2 = 0;
FASTREG_UNROLL
      for (int u = 0; u < U; ++u) {
        if (u < nv) {
FASTREG_UNROLL
          for (int k = 0; k < V; ++k) {
            const A t = (to_compute(xv[u][k]) - st.shift) - bm;
            b2 += t * t;
          }
        }
      }
      absorb(st, nb, bm, b2, static_cast<A>(nb) / static_cast<A>(st.n + nb));
    }
  }

}

// ---- channels-last: block (tile, s); thread (col, row lane) owns channels c0 .. c0 + V - 1

// What a channels-last thread holds for its V channels: the row count they share and their
// shifted running statistics, or the backward sums.
template <typename A, int V>
struct ClThreadState {
  int64_t n;
  A shift[V], d[V], m2[V];
  double sdy[V], sdyx[V];
};

// Thread `thread` of block (tile, s): channels c0 .. c0 + V - 1 of the tile, rows of split s,
// in sequence, into t.
template <typename T, int V, bool Vector, bool Backward>
FASTREG_HOST_DEVICE void reduce_cl_thread(const ReduceArgs& a, uint32_t tile, int64_t s, uint32_t thread,
                                          ClThreadState<Acc<T>, V>& t) {
  using A = Acc<T>;
  constexpr int U = V == 1 ? kScalarUnroll : kVectorUnroll;
  const int tc = 1 << a.log2_tc;
  const int col = static_cast<int>(thread) & (tc - 1);
  const int row_lane = static_cast<int>(thread) >> a.log2_tc;
  const int rows_per_pass = kThreads >> a.log2_tc;
  const int64_t c0 = (static_cast<int64_t>(tile) * tc + col) * V;
  const int64_t r_begin = s * a.split_len;
  const int64_t r_end = r_begin + a.split_len < a.outer ? r_begin + a.split_len : a.outer;
  const int64_t C = a.channels;

  int64_t& n = t.n;
  A(&shift)[V] = t.shift;
  A(&d)[V] = t.d;
  A(&m2)[V] = t.m2;
  double(&sdy)[V] = t.sdy;
  double(&sdyx)[V] = t.sdyx;
  n = 0;
  A mean_c[V];
FASTREG_UNROLL
  for (int v = 0; v < V; ++v) {
    shift[v] = d[v] = m2[v] = A(0);
    sdy[v] = sdyx[v] = 0.0;
    mean_c[v] = A(0);
  }

  if (c0 < C) {
    const T* __restrict__ x = static_cast<const T*>(a.x) + c0;
    const T* __restrict__ g = Backward ? static_cast<const T*>(a.dy) + c0 : nullptr;
    if constexpr (Backward) {
FASTREG_UNROLL
      for (int v = 0; v < V; ++v) mean_c[v] = static_cast<const A*>(a.mean)[c0 + v];
    }
    const int64_t step = int64_t{U} * rows_per_pass;
    for (int64_t r = r_begin + row_lane; r < r_end; r += step) {
      T xv[U][V], gv[U][V];
      int nv = 0;
FASTREG_UNROLL
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + int64_t{u} * rows_per_pass;
        if (rr < r_end) {
          load_pack<T, V, Vector>(x + rr * C, xv[u]);
          if constexpr (Backward) load_pack<T, V, Vector>(g + rr * C, gv[u]);
          nv = u + 1;
        }
      }
      if constexpr (Backward) {
FASTREG_UNROLL
        for (int v = 0; v < V; ++v) {
          A b_dy = 0, b_dyx = 0;
FASTREG_UNROLL
          for (int u = 0; u < U; ++u) {
            if (u < nv) {
              const A gk = to_compute(gv[u][v]);
              b_dy += gk;
              b_dyx += gk * (to_compute(xv[u][v]) - mean_c[v]);
            }
          }
          sdy[v] += static_cast<double>(b_dy);
          sdyx[v] += static_cast<double>(b_dyx);
        }
      } else {
        if (n == 0) {
FASTREG_UNROLL
          for (int v = 0; v < V; ++v) shift[v] = to_compute(xv[0][v]);
        }
        const A inv_nb = A(1) / static_cast<A>(nv);
        const A r_merge = static_cast<A>(nv) / static_cast<A>(n + nv);
        const A n_r = static_cast<A>(n) * r_merge;
FASTREG_UNROLL
        for (int v = 0; v < V; ++v) {
          A bs = 0;
FASTREG_UNROLL
          for (int u = 0; u < U; ++u) {
            if (u < nv) bs += to_compute(xv[u][v]) - shift[v];
          }
          const A bm = bs * inv_nb;
          A b2 = 0;
FASTREG_UNROLL
          for (int u = 0; u < U; ++u) {
            if (u < nv) {
              const A t = (to_compute(xv[u][v]) - shift[v]) - bm;
              b2 += t * t;
            }
          }
          const A delta = bm - d[v];
          d[v] += delta * r_merge;
          m2[v] += b2 + delta * delta * n_r;
        }
        n += nv;
      }
    }
  }
}

}  // namespace bn_cuda
}  // namespace fastreg
