// The CUDA batch-norm element-wise kernels (batch_norm_elemt_cuda.cu) as host+device code:
// their arguments, launch plans and what one thread does, so that csrc/tests/ can run every
// thread of every block on the host and compare with the CPU kernels without a GPU.
//
//  - NCHW-like (inner > 1): a flat walk over 16-byte packs (one element per pack when a
//    pointer is not 16-byte aligned). One block per tile of kUnroll * 256 packs; a thread
//    finds the (column, channel) of its first pack with two multiply-shift divisions and
//    steps to the next ones by additions. A pack inside one row of inner elements (the usual
//    case) reads its channel's coefficients once; a pack across rows (inner % V != 0) goes
//    element by element.
//  - channels-last (inner == 1): a 2-D grid, (channel tiles) x (row blocks). A thread owns V
//    channels (one 16-byte pack when C allows it), holds their coefficients in registers and
//    walks rows; threads along C read whole rows.
//
// Arithmetic is explicitly rounded in the compute type, in the reference's order, so with the
// same per-channel inputs the results have the reference's bits. The includer declares
// to_compute/from_compute for its element types first (compute_type_cuda.cuh on the device).
#pragma once

#include <cstdint>

#include "batch_norm_device.h"

namespace fastreg {
namespace bn_cuda {

constexpr int kUnroll = 4;                      // packs per thread and tensor in flight
constexpr int64_t kClBlockElements = 32768;     // channels-last: elements of one tensor per block

enum class Mode { Forward, BackwardTrain, BackwardEval };

struct ElemtArgs {
  const void* x;   // Forward, BackwardTrain
  const void* dy;  // BackwardTrain, BackwardEval
  void* out;
  const void* mean;
  const void* invstd;
  const void* weight;  // nullptr: 1
  const void* bias;    // nullptr: 0 (Forward)
  const void* sum_dy;  // BackwardTrain
  const void* sum_dy_xmu;
  int64_t count;  // BackwardTrain
  int64_t numel, channels, inner, outer;
  // NCHW-like
  DivU64 div_inner, div_channels;
  int64_t step_cols, step_channels;  // kThreads packs = this many columns and channels further
  // channels-last
  int log2_tc;
  int64_t rows_per_block;
};

// Per-channel coefficients, formed as the reference forms them.
template <typename A, Mode M>
struct Coef;
template <typename A>
struct Coef<A, Mode::Forward> {
  A mean, scale, bias;
};
template <typename A>
struct Coef<A, Mode::BackwardTrain> {
  A mean, mean_dy, proj, scale;
};
template <typename A>
struct Coef<A, Mode::BackwardEval> {
  A scale;
};

template <typename A, Mode M>
FASTREG_HOST_DEVICE Coef<A, M> load_coef(const ElemtArgs& a, int64_t c) {
  const A invstd = static_cast<const A*>(a.invstd)[c];
  const A scale = a.weight != nullptr ? mul_rn(invstd, static_cast<const A*>(a.weight)[c]) : invstd;
  if constexpr (M == Mode::Forward) {
    const A bias = a.bias != nullptr ? static_cast<const A*>(a.bias)[c] : A(0);
    return Coef<A, M>{static_cast<const A*>(a.mean)[c], scale, bias};
  } else if constexpr (M == Mode::BackwardTrain) {
    const A n = static_cast<A>(a.count);
    const A mean_dy = div_rn(static_cast<const A*>(a.sum_dy)[c], n);
    const A proj = div_rn(mul_rn(mul_rn(invstd, invstd), static_cast<const A*>(a.sum_dy_xmu)[c]), n);
    return Coef<A, M>{static_cast<const A*>(a.mean)[c], mean_dy, proj, scale};
  } else {
    return Coef<A, M>{scale};
  }
}

//   Forward:       (x - mean) * scale [+ bias]
//   BackwardTrain: ((dy - mean_dy) - (x - mean) * proj) * scale
//   BackwardEval:  dy * scale
template <typename A, Mode M>
FASTREG_HOST_DEVICE A apply(const Coef<A, M>& k, A x, A g, bool has_bias) {
  if constexpr (M == Mode::Forward) {
    const A y = mul_rn(sub_rn(x, k.mean), k.scale);
    return has_bias ? add_rn(y, k.bias) : y;
  } else if constexpr (M == Mode::BackwardTrain) {
    return mul_rn(sub_rn(sub_rn(g, k.mean_dy), mul_rn(sub_rn(x, k.mean), k.proj)), k.scale);
  } else {
    return mul_rn(g, k.scale);
  }
}

template <Mode M>
constexpr bool kReadsX = M != Mode::BackwardEval;
template <Mode M>
constexpr bool kReadsDy = M != Mode::Forward;

// ---- NCHW-like: flat tiles of kUnroll * kThreads packs

// Thread `thread` of flat tile `tile` (tiles are kUnroll * kThreads packs; the kernel runs
// the last tile first).
template <typename T, int V, Mode M>
FASTREG_HOST_DEVICE void elemt_flat_thread(const ElemtArgs& a, int64_t tile, uint32_t thread) {
  using A = Acc<T>;
  constexpr bool kVector = V > 1;  // V > 1 only when every pointer is 16-byte aligned
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ g = static_cast<const T*>(a.dy);
  T* __restrict__ out = static_cast<T*>(a.out);
  const bool has_bias = a.bias != nullptr;
  const int64_t numel = a.numel;
  const int64_t packs = (numel + V - 1) / V;
  const int64_t first = tile * (int64_t{kUnroll} * kThreads) + thread;
  if (first >= packs) return;

  T xv[kUnroll][V], gv[kUnroll][V];
FASTREG_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first + int64_t{u} * kThreads;
    if (p < packs) {
      const int64_t e = p * V;
      if (!kVector || e + V <= numel) {
        if constexpr (kReadsX<M>) load_pack<T, V, kVector>(x + e, xv[u]);
        if constexpr (kReadsDy<M>) load_pack<T, V, kVector>(g + e, gv[u]);
      } else {  // the tensor's last, partial pack
FASTREG_UNROLL
        for (int k = 0; k < V; ++k) {
          if (e + k < numel) {
            if constexpr (kReadsX<M>) xv[u][k] = x[e + k];
            if constexpr (kReadsDy<M>) gv[u][k] = g[e + k];
          }
        }
      }
    }
  }

  // (column, channel) of the first pack: e = (row * inner + col), channel = row % C.
  const int64_t inner = a.inner, channels = a.channels;
  const uint64_t e0 = static_cast<uint64_t>(first) * V;
  const uint64_t row0 = a.div_inner.div(e0);
  int64_t col = static_cast<int64_t>(e0 - row0 * static_cast<uint64_t>(inner));
  int64_t c = static_cast<int64_t>(row0 - a.div_channels.div(row0) * static_cast<uint64_t>(channels));
FASTREG_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first + int64_t{u} * kThreads;
    if (p < packs) {
      const int64_t e = p * V;
      T yv[V];
      if (col + V <= inner) {  // one channel
        const Coef<A, M> k = load_coef<A, M>(a, c);
FASTREG_UNROLL
        for (int j = 0; j < V; ++j) {
          const A xj = kReadsX<M> ? to_compute(xv[u][j]) : A(0);
          const A gj = kReadsDy<M> ? to_compute(gv[u][j]) : A(0);
          yv[j] = from_compute<T>(apply<A, M>(k, xj, gj, has_bias));
        }
      } else {  // across rows: the channel moves on each time the column reaches inner
        int64_t ch = c, cc = col;
        Coef<A, M> k = load_coef<A, M>(a, ch);
FASTREG_UNROLL
        for (int j = 0; j < V; ++j) {
          if (cc == inner) {
            cc = 0;
            ch = ch + 1 == channels ? 0 : ch + 1;
            k = load_coef<A, M>(a, ch);
          }
          const A xj = kReadsX<M> ? to_compute(xv[u][j]) : A(0);
          const A gj = kReadsDy<M> ? to_compute(gv[u][j]) : A(0);
          yv[j] = from_compute<T>(apply<A, M>(k, xj, gj, has_bias));
          ++cc;
        }
      }
      if (!kVector || e + V <= numel) {
        store_pack<T, V, kVector>(out + e, yv);
      } else {
FASTREG_UNROLL
        for (int j = 0; j < V; ++j) {
          if (e + j < numel) out[e + j] = yv[j];
        }
      }
    }
    // The next pack is kThreads * V elements further: step_cols columns and step_channels
    // channels, plus one channel when the column passes the end of the row.
    col += a.step_cols;
    c += a.step_channels;
    if (col >= inner) {
      col -= inner;
      ++c;
    }
    if (c >= channels) c -= channels;
  }
}

// ---- channels-last

// Thread `thread` of the block for channel tile `tile` and row block `block_row` (the kernel
// runs the last row block first).
template <typename T, int V, Mode M>
FASTREG_HOST_DEVICE void elemt_cl_thread(const ElemtArgs& a, uint32_t tile, int64_t block_row, uint32_t thread) {
  using A = Acc<T>;
  constexpr bool kVector = V > 1;  // V > 1 only when C % V == 0 and every pointer is aligned
  const int tc = 1 << a.log2_tc;
  const int col = static_cast<int>(thread) & (tc - 1);
  const int row_lane = static_cast<int>(thread) >> a.log2_tc;
  const int rows_per_pass = kThreads >> a.log2_tc;
  const int64_t C = a.channels;
  const int64_t c0 = (static_cast<int64_t>(tile) * tc + col) * V;
  if (c0 >= C) return;
  const int64_t r_begin = block_row * a.rows_per_block;
  const int64_t r_end = r_begin + a.rows_per_block < a.outer ? r_begin + a.rows_per_block : a.outer;
  const T* __restrict__ x = kReadsX<M> ? static_cast<const T*>(a.x) + c0 : nullptr;
  const T* __restrict__ g = kReadsDy<M> ? static_cast<const T*>(a.dy) + c0 : nullptr;
  T* __restrict__ out = static_cast<T*>(a.out) + c0;
  const bool has_bias = a.bias != nullptr;

  Coef<A, M> k[V];
FASTREG_UNROLL
  for (int v = 0; v < V; ++v) k[v] = load_coef<A, M>(a, c0 + v);

  const int64_t step = int64_t{kUnroll} * rows_per_pass;
  for (int64_t r = r_begin + row_lane; r < r_end; r += step) {
    T xv[kUnroll][V], gv[kUnroll][V];
FASTREG_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + int64_t{u} * rows_per_pass;
      if (rr < r_end) {
        if constexpr (kReadsX<M>) load_pack<T, V, kVector>(x + rr * C, xv[u]);
        if constexpr (kReadsDy<M>) load_pack<T, V, kVector>(g + rr * C, gv[u]);
      }
    }
FASTREG_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + int64_t{u} * rows_per_pass;
      if (rr < r_end) {
        T yv[V];
FASTREG_UNROLL
        for (int v = 0; v < V; ++v) {
          const A xj = kReadsX<M> ? to_compute(xv[u][v]) : A(0);
          const A gj = kReadsDy<M> ? to_compute(gv[u][v]) : A(0);
          yv[v] = from_compute<T>(apply<A, M>(k[v], xj, gj, has_bias));
        }
        store_pack<T, V, kVector>(out + rr * C, yv);
      }
    }
  }
}

// ---- launch plans

// Which pack width the kernels may use: 16-byte packs need every pointer they touch aligned
// (and, channels-last, whole packs of channels per row).
template <typename T, Mode M>
inline bool elemt_vectorized(const ElemtArgs& a) {
  const bool aligned = (!kReadsX<M> || aligned16(a.x)) && (!kReadsDy<M> || aligned16(a.dy)) && aligned16(a.out);
  return a.inner == 1 ? aligned && a.channels % kVec<T> == 0 : aligned;
}

// The flat kernel's grid: sets the divisors and steps in `a`; returns the blocks (tiles).
template <int V>
inline int64_t elemt_flat_plan(ElemtArgs& a) {
  const int64_t packs = ceil_div(a.numel, V);
  a.div_inner = DivU64::make(static_cast<uint64_t>(a.inner));
  a.div_channels = DivU64::make(static_cast<uint64_t>(a.channels));
  const int64_t step = int64_t{kThreads} * V;
  a.step_cols = step % a.inner;
  a.step_channels = (step / a.inner) % a.channels;
  return ceil_div(packs, int64_t{kUnroll} * kThreads);
}

struct ClGrid {
  int64_t tiles, row_blocks;
};

// The channels-last kernel's grid: sets the tile width and rows per block in `a`.
template <int V>
inline ClGrid elemt_cl_plan(ElemtArgs& a) {
  const int64_t cols = ceil_div(a.channels, V);
  a.log2_tc = ceil_log2(cols < kMaxTileThreads ? cols : kMaxTileThreads);
  const int64_t tc = int64_t{1} << a.log2_tc;
  const int64_t rows_per_pass = kThreads / tc;
  const int64_t tiles = ceil_div(a.channels, tc * V);
  const int64_t tile_channels = a.channels < tc * V ? a.channels : tc * V;
  const int64_t quantum = rows_per_pass * kUnroll;  // rows one pass of the block covers
  int64_t rows = ceil_div(kClBlockElements, tile_channels);
  if (rows < ceil_div(a.outer, kMaxGridY)) rows = ceil_div(a.outer, kMaxGridY);
  a.rows_per_block = ceil_div(rows, quantum) * quantum;
  return ClGrid{tiles, ceil_div(a.outer, a.rows_per_block)};
}

// The arguments of batch_norm_elemt_cuda and batch_norm_backward_elemt_cuda (sum_dy == nullptr:
// the eval backward, BackwardEval; else BackwardTrain), before elemt_set_layout.
inline ElemtArgs elemt_forward_args(const void* input, void* output, const BatchNormAffine& affine) {
  ElemtArgs a{};
  a.x = input;
  a.out = output;
  a.mean = affine.mean;
  a.invstd = affine.invstd;
  a.weight = affine.weight;
  a.bias = affine.bias;
  return a;
}

inline ElemtArgs elemt_backward_args(const void* grad_output, const void* input, void* grad_input,
                                     const BatchNormAffine& affine, const void* sum_dy, const void* sum_dy_xmu,
                                     int64_t count) {
  ElemtArgs a{};
  a.x = input;
  a.dy = grad_output;
  a.out = grad_input;
  a.mean = affine.mean;
  a.invstd = affine.invstd;
  a.weight = affine.weight;
  a.sum_dy = sum_dy;
  a.sum_dy_xmu = sum_dy_xmu;
  a.count = count;
  return a;
}

inline void elemt_set_layout(ElemtArgs& a, const BatchNormLayout& layout) {
  a.numel = layout.numel();
  a.channels = layout.channels;
  a.inner = layout.inner;
  a.outer = layout.outer;
}

}  // namespace bn_cuda
}  // namespace fastreg
