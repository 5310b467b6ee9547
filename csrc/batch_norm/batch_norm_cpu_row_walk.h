// CPU batch norm, row walk (small inner, e.g. channels_last): rows of C * inner elements with
// per-column accumulators, the rows cut into fixed groups.
// Private to batch_norm_cpu.cpp, its only includer: internal linkage on purpose, so that
// the per-ISA clones of everything here stay inside that one translation unit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "batch_norm_cpu_runs.h"
#include "batch_norm_kernels.h"

namespace fastreg {
namespace {

constexpr int64_t kMaxBlockRows = 128;            // rows per fp32 column sum in a row block
constexpr int64_t kGroupElems = int64_t{1} << 16; // row groups: the unit of parallel reduction
constexpr int64_t kPad = 64;                      // extension of periodic column arrays (>= any vector width)

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

// Column arrays of the row walk, extended periodically to width + kPad entries.
template <typename A>
struct RowArrays {
  const A* mean;
  const A* a;  // elemt: invstd * w; backward: mean_dy
  const A* b;  // elemt: bias; backward: proj
  const A* scale;  // backward only
};

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

// Strip passes over the columns [c0, c0 + S * kLanes) of a block's nr rows, for rows that are
// whole vectors: the strip's accumulators stay in registers, where the generic loops below
// load and store an L1 array per vector. Each column still adds its rows in row order, so
// both give the same bits.
template <class IO, int S>
inline void strip_sum(const typename IO::Elem* xb, int64_t width, int64_t nr, int64_t c0, typename IO::A* acc) {
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  V a[S] = {};
  for (int64_t r = 0; r < nr; ++r) {
    const typename IO::Elem* row = xb + r * width + c0;
    for (int k = 0; k < S; ++k) a[k] += IO::load(row + k * L);
  }
  for (int k = 0; k < S; ++k) IO::storea(acc + c0 + k * L, a[k]);
}

template <class IO, int S>
inline void strip_centered(const typename IO::Elem* xb, int64_t width, int64_t nr, int64_t c0,
                           const typename IO::A* m, typename IO::A* acc, typename IO::A* s2) {
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  V vm[S], a1[S] = {}, a2[S] = {};
  for (int k = 0; k < S; ++k) vm[k] = IO::loada(m + c0 + k * L);
  for (int64_t r = 0; r < nr; ++r) {
    const typename IO::Elem* row = xb + r * width + c0;
    for (int k = 0; k < S; ++k) {
      const V d = IO::load(row + k * L) - vm[k];
      a1[k] += d;
      a2[k] += d * d;
    }
  }
  for (int k = 0; k < S; ++k) {
    IO::storea(acc + c0 + k * L, a1[k]);
    IO::storea(s2 + c0 + k * L, a2[k]);
  }
}

// f(strip tag, c0) over the columns of a row of whole vectors: strips of kMax vectors, then
// one each of half, a quarter... of that as the row's remaining vectors allow (64 fp32 columns
// on AVX-512: one strip of 4 vectors, not 4 of 1 each with its own walk over the rows). kMax:
// what the caller's accumulators leave of the registers.
template <class IO, int kMax = IO::kStripVecs, int S = kMax, class F>
__attribute__((always_inline)) inline void for_strips(int64_t width, F&& f, int64_t c0 = 0) {
  constexpr int64_t kWide = static_cast<int64_t>(S) * IO::kLanes;
  if constexpr (S == kMax) {
    for (; c0 + kWide <= width; c0 += kWide) f(std::integral_constant<int, S>{}, c0);
  } else if (c0 + kWide <= width) {
    f(std::integral_constant<int, S>{}, c0);
    c0 += kWide;
  }
  if constexpr (S > 1) for_strips<IO, kMax, S / 2>(width, f, c0);
}

// Whether rows [f0, f1) of the output can go strip by strip: rows of whole vectors and, with
// non-temporal stores, every vector store a whole cache line (see on_whole_lines).
template <class IO>
bool strips_fit(int64_t width, const void* out, int64_t f0, int64_t f1, bool stream) {
  if (width % IO::kLanes != 0 || f0 % width != 0 || f1 % width != 0) return false;
  constexpr int64_t kLine = 64;
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(typename IO::Elem));
  return !stream || (IO::kStoreBytes % kLine == 0 && row_bytes % kLine == 0 &&
                     reinterpret_cast<uintptr_t>(out) % kLine == 0);
}

// The passes that read their inputs from memory only once (element-wise forward, backward
// reduce, element-wise backward) go by strips only when one strip holds a whole row: with
// several, each strip's walk over a block reads memory in short strided pieces. Measured on
// fp32 channels_last, AVX-512, 2 threads: backward_reduce of (64,256,14,14) with 4 strips of 4
// vectors per row took 1.9x the generic loop's time, batch_norm_elemt of (8,256,56,56) with 2
// strips of 8 took 2.2x (1.17 -> 2.54 ms). The statistics go by strips at every width: they
// gained at every width measured (64 to 512 columns, fp32 and bf16, 1 and 2 threads) when
// each block was read twice, and their centred pass, which now reads most blocks from memory,
// still does: (64,256,14,14) fp32, 2 strips of 8 vectors per row, 0.19 ms, 0.29-0.41 ms with
// the generic loop.
//
// Strip width of the passes over two inputs (dy and x): their coefficients or double sums take
// twice the registers.
template <class IO>
constexpr int kTwoArrayStrip = IO::kStripVecs / 2 > 1 ? IO::kStripVecs / 2 : 1;

// Strip width of the plain sums: one array of accumulators, twice the vectors.
template <class IO>
constexpr int kSumStrip = 2 * IO::kStripVecs;

template <class IO, int kMax>
bool one_strip_rows(int64_t width) {
  return width % IO::kLanes == 0 && width <= static_cast<int64_t>(kMax) * IO::kLanes;
}

// f(r0, r1) over rows [rows0, rows1) in blocks of the walk's block_rows (the strips of a block
// then read it from L1 / L2).
template <class F>
__attribute__((always_inline)) inline void for_row_blocks(const RowWalk& walk, int64_t rows0, int64_t rows1, F&& f) {
  for (int64_t r0 = rows0; r0 < rows1; r0 += walk.block_rows) f(r0, std::min(rows1, r0 + walk.block_rows));
}

// The statistics of a group go block by block: each block's centred sums (d = x - m) added in
// the compute type, then merged into the group's in double. The shift m is the previous
// block's mean, so a block costs one read of memory (the group's first block takes its own
// mean first, from a plain sum over the block, which is then still in L1). When the mean jumps
// between blocks, the sums of d^2 carry the jump, and their rounding with it; but so does the
// channel's variance (the between-block part), so its relative error stays within a small
// multiple of the compute type's: measured on blocks alternating between +-1e4 + U(-1, 1),
// fp32, 5e-7 (a block's own mean as its shift: 4e-8; the tests allow 1e-5).

// m += acc / n: the shift moves to the mean of the block whose centred sums acc holds (from
// m = 0, acc holding plain sums: the block's mean).
template <class IO>
inline void recentre(const typename IO::A* acc, typename IO::A* m, int64_t width, int64_t nr) {
  using A = typename IO::A;
  constexpr int L = IO::kLanes;
  const A n = static_cast<A>(nr);
  int64_t j = 0;
  for (; j + L <= width; j += L) IO::storea(m + j, IO::loada(m + j) + IO::loada(acc + j) / IO::splat(n));
  for (; j < width; ++j) m[j] += acc[j] / n;
}

// Chan's merge of a block of n rows (shift m, centred sums d1 = acc, d2 = s2) into the group's
// (gmean, gm2) of rows_done rows, in double, column by column.
template <class IO>
inline void merge_block(const typename IO::A* acc, const typename IO::A* m, const typename IO::A* s2, int64_t width,
                        double n, double rows_done, double* gmean, double* gm2) {
  using VD = typename IO::VD;
  constexpr int L = IO::kLanes, H = IO::kHalves, DL = IO::kDLanes;
  const double total = rows_done + n, f1 = n / total, f2 = rows_done * n / total, inv_n = 1.0 / n;
  const bool first = rows_done == 0;
  int64_t j = 0;
  for (; j + L <= width; j += L) {
    VD d1[H], mv[H], d2[H];
    IO::wide(IO::loada(acc + j), d1);
    IO::wide(IO::loada(m + j), mv);
    IO::wide(IO::loada(s2 + j), d2);
    for (int h = 0; h < H; ++h) {
      const int64_t p = j + h * DL;
      const VD mean_b = mv[h] + d1[h] * inv_n;
      VD m2_b = d2[h] - d1[h] * d1[h] * inv_n;
      m2_b = m2_b > 0.0 ? m2_b : VD{};  // std::max(0.0, m2_b), NaN included
      if (first) {
        IO::stored(gmean + p, mean_b);
        IO::stored(gm2 + p, m2_b);
      } else {
        const VD gm = IO::loadd(gmean + p), delta = mean_b - gm;
        IO::stored(gmean + p, gm + delta * f1);
        IO::stored(gm2 + p, IO::loadd(gm2 + p) + (m2_b + delta * delta * f2));
      }
    }
  }
  for (; j < width; ++j) {
    const double d1 = acc[j];
    const double mean_b = static_cast<double>(m[j]) + d1 * inv_n;
    const double m2_b = std::max(0.0, static_cast<double>(s2[j]) - d1 * d1 * inv_n);
    if (first) {
      gmean[j] = mean_b;
      gm2[j] = m2_b;
    } else {
      const double delta = mean_b - gmean[j];
      gmean[j] += delta * f1;
      gm2[j] += m2_b + delta * delta * f2;
    }
  }
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
  // Strips store their sums; the generic loops add into accumulators, cleared after each use.
  const bool strips = width % L == 0;
  auto clear = [&] {
    if (!strips) {
      std::fill(acc, acc + width, A(0));
      std::fill(s2, s2 + width, A(0));
    }
  };
  auto sums = [&](const T* xb, int64_t nr) {  // acc = sum of x
    if (strips) {
      for_strips<IO, kSumStrip<IO>>(width, [&](auto vecs, int64_t c0) {
        strip_sum<IO, decltype(vecs)::value>(xb, width, nr, c0, acc);
      });
      return;
    }
    const int64_t len = nr * width;
    int64_t i = 0, col = 0;
    for (; i + L <= len; i += L, col = next_col(col, step, width)) IO::storea(acc + col, IO::loada(acc + col) + IO::load(xb + i));
    for (; i < len; ++i, col = col + 1 == width ? 0 : col + 1) acc[col] += IO::load1(xb + i);
    fold_periodic<L>(acc, width);
  };
  auto centred_sums = [&](const T* xb, int64_t nr) {  // acc = sum of d, s2 = sum of d^2, d = x - m
    if (strips) {
      for_strips<IO>(width, [&](auto vecs, int64_t c0) {
        strip_centered<IO, decltype(vecs)::value>(xb, width, nr, c0, m, acc, s2);
      });
      return;
    }
    extend_periodic<L>(m, width);
    const int64_t len = nr * width;
    int64_t i = 0, col = 0;
    for (; i + L <= len; i += L, col = next_col(col, step, width)) {
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
  };
  double rows_done = 0;
  for (int64_t r0 = walk.group_begin(g), r1 = walk.group_end(g); r0 < r1; r0 += walk.block_rows) {
    const int64_t nr = std::min(walk.block_rows, r1 - r0);
    const T* xb = x + r0 * width;
    if (rows_done == 0) {
      sums(xb, nr);
      recentre<IO>(acc, m, width, nr);
      clear();
    }
    centred_sums(xb, nr);
    const double n = static_cast<double>(nr);
    merge_block<IO>(acc, m, s2, width, n, rows_done, gmean, gm2);
    recentre<IO>(acc, m, width, nr);  // the next block's shift
    clear();
    rows_done += n;
  }
}

// Rows [r0, r1) of the strip at c0: sdy += dy, sdyx += dy * (x - mean), in double, the strip's
// sums in registers (added row by row, as the generic loop adds them).
template <class IO, int S>
inline void strip_reduce(const typename IO::Elem* dy, const typename IO::Elem* x, int64_t width, int64_t r0,
                         int64_t r1, int64_t c0, const double* mean, double* sdy, double* sdyx) {
  using VD = typename IO::VD;
  constexpr int L = IO::kLanes, H = IO::kHalves, DL = IO::kDLanes;
  VD m[S][H], a1[S][H], a2[S][H];
  for (int k = 0; k < S; ++k) {
    for (int h = 0; h < H; ++h) {
      const int64_t p = c0 + k * L + h * DL;
      m[k][h] = IO::loadd(mean + p);
      a1[k][h] = IO::loadd(sdy + p);
      a2[k][h] = IO::loadd(sdyx + p);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * width + c0;
    for (int k = 0; k < S; ++k) {
      VD gv[H], xv[H];
      IO::wide(IO::load(dy + o + k * L), gv);
      IO::wide(IO::load(x + o + k * L), xv);
      for (int h = 0; h < H; ++h) {
        a1[k][h] = a1[k][h] + gv[h];
        a2[k][h] = a2[k][h] + gv[h] * (xv[h] - m[k][h]);
      }
    }
  }
  for (int k = 0; k < S; ++k) {
    for (int h = 0; h < H; ++h) {
      const int64_t p = c0 + k * L + h * DL;
      IO::stored(sdy + p, a1[k][h]);
      IO::stored(sdyx + p, a2[k][h]);
    }
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
  if (one_strip_rows<IO, kTwoArrayStrip<IO>>(width)) {
    for_row_blocks(walk, walk.group_begin(g), walk.group_end(g), [&](int64_t r0, int64_t r1) {
      for_strips<IO, kTwoArrayStrip<IO>>(width, [&](auto vecs, int64_t c0) {
        strip_reduce<IO, decltype(vecs)::value>(dy, x, width, r0, r1, c0, mean, sdy, sdyx);
      });
    });
    std::copy(sdy, sdy + width, gdy);
    std::copy(sdyx, sdyx + width, gdyx);
    return;
  }
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

// Rows [r0, r1) of the strip at c0: y = (x - mean) * a + b, the strip's coefficients in
// registers (the generic loop loads three column arrays per vector).
template <class IO, int S, bool kStream>
inline void strip_elemt(const typename IO::Elem* x, typename IO::Elem* y, int64_t width, int64_t r0, int64_t r1,
                        int64_t c0, const RowArrays<typename IO::A>& arr) {
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  V vm[S], va[S], vb[S];
  for (int k = 0; k < S; ++k) {
    vm[k] = IO::loada(arr.mean + c0 + k * L);
    va[k] = IO::loada(arr.a + c0 + k * L);
    vb[k] = IO::loada(arr.b + c0 + k * L);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * width + c0;
    for (int k = 0; k < S; ++k) IO::template store<kStream>(y + o + k * L, (IO::load(x + o + k * L) - vm[k]) * va[k] + vb[k]);
  }
}

template <class IO>
void row_elemt(const RowWalk& walk, const void* input, void* output, int64_t f0, int64_t f1,
               const RowArrays<typename IO::A>& arr, bool stream) {
  using T = typename IO::Elem;
  const T* x = static_cast<const T*>(input);
  T* y = static_cast<T*>(output);
  const int64_t width = walk.width;
  if (one_strip_rows<IO, IO::kStripVecs>(width) && strips_fit<IO>(width, y, f0, f1, stream)) {
    auto go = [&](auto stream_tag) {
      for_row_blocks(walk, f0 / width, f1 / width, [&](int64_t r0, int64_t r1) {
        for_strips<IO>(width, [&](auto vecs, int64_t c0) {
          strip_elemt<IO, decltype(vecs)::value, decltype(stream_tag)::value>(x, y, width, r0, r1, c0, arr);
        });
      });
    };
    stream ? go(std::true_type{}) : go(std::false_type{});
    return;
  }
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

// Rows [r0, r1) of the strip at c0: the element-wise backward, the strip's four coefficient
// vectors in registers.
template <class IO, int S, bool kTraining, bool kStream>
inline void strip_backward(const typename IO::Elem* dy, const typename IO::Elem* x, typename IO::Elem* dx,
                           int64_t width, int64_t r0, int64_t r1, int64_t c0, const RowArrays<typename IO::A>& arr) {
  using V = typename IO::V;
  constexpr int L = IO::kLanes;
  V vs[S], vm[S], va[S], vb[S];
  for (int k = 0; k < S; ++k) {
    vs[k] = IO::loada(arr.scale + c0 + k * L);
    if constexpr (kTraining) {
      vm[k] = IO::loada(arr.mean + c0 + k * L);
      va[k] = IO::loada(arr.a + c0 + k * L);
      vb[k] = IO::loada(arr.b + c0 + k * L);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * width + c0;
    for (int k = 0; k < S; ++k) {
      const V g = IO::load(dy + o + k * L);
      if constexpr (kTraining) {
        const V xm = IO::load(x + o + k * L) - vm[k];
        IO::template store<kStream>(dx + o + k * L, (g - va[k] - xm * vb[k]) * vs[k]);
      } else {
        IO::template store<kStream>(dx + o + k * L, g * vs[k]);
      }
    }
  }
}

template <class IO>
void row_backward(const RowWalk& walk, const void* grad_output, const void* input, void* grad_input, int64_t f0,
                  int64_t f1, const RowArrays<typename IO::A>& arr, bool training, bool stream) {
  using T = typename IO::Elem;
  const T* dy = static_cast<const T*>(grad_output);
  const T* x = static_cast<const T*>(input);
  T* dx = static_cast<T*>(grad_input);
  const int64_t width = walk.width;
  if (one_strip_rows<IO, kTwoArrayStrip<IO>>(width) && strips_fit<IO>(width, dx, f0, f1, stream)) {
    auto go = [&](auto training_tag, auto stream_tag) {
      for_row_blocks(walk, f0 / width, f1 / width, [&](int64_t r0, int64_t r1) {
        for_strips<IO, kTwoArrayStrip<IO>>(width, [&](auto vecs, int64_t c0) {
          strip_backward<IO, decltype(vecs)::value, decltype(training_tag)::value, decltype(stream_tag)::value>(
              dy, x, dx, width, r0, r1, c0, arr);
        });
      });
    };
    if (training) {
      stream ? go(std::true_type{}, std::true_type{}) : go(std::true_type{}, std::false_type{});
    } else {
      stream ? go(std::false_type{}, std::true_type{}) : go(std::false_type{}, std::false_type{});
    }
    return;
  }
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

}  // namespace
}  // namespace fastreg
