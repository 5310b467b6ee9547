// CPU batch norm: statistics, forward and backward for every layout of batch_norm_kernels.h.
// Free of torch types except at::parallel_for and c10's header-only half/bfloat16.
//
// Two walks of the [outer][C][inner] layout:
//  - order walk (inner >= kRowInnerMax, e.g. NCHW): runs of `inner` contiguous elements in
//    memory order; reductions over items of (unit: group of rows or piece of a long run) x
//    (slab of channels), partial results per (unit, channel) merged over the units in order;
//    element-wise passes over flat ranges.
//  - row walk (small inner, e.g. channels_last): rows of W = C * inner contiguous elements;
//    per-column accumulators, rows cut into fixed groups whose partial results are merged in
//    group order.
// Determinism: reductions run over fixed blocks (a function of the layout and dtype only)
// whose partial results are merged in block order, whatever the number of threads.
// Stability: sums of squares are taken around a mean, never of raw values: an order-walk
// item is reduced twice, the second time from L2 (its mean, then sums of x - mean); a row-walk
// block is centred on the previous block's mean (the first block of a group on its own, read
// twice); blocks are merged with Chan's formulas in double.
//
// The vector code lives in the private headers batch_norm_cpu_*.h (simd, runs, order_walk,
// row_walk, isa_entries); this file holds the drivers: which walk, how the work is split among
// threads, the merges of block results, and the entry points of batch_norm_kernels.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "../common/cpu_cache.h"
#include "batch_norm_cpu_isa_entries.h"
#include "batch_norm_kernels.h"

namespace fastreg {
namespace {

// ---- tuning constants (all independent of the thread count; the row walk's are in its header)

constexpr int64_t kBlockBytes = 16 << 10;        // row-walk block: sums in the compute type, then a merge in double
constexpr int64_t kRowInnerMax = 32;              // inner below this (and a bounded row): the row walk
constexpr int64_t kRowWidthMax = int64_t{1} << 20;
constexpr int64_t kTaskElems = int64_t{1} << 15;  // less work than this per task is not split

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

// Float32/64 outputs bypass the caches when the pass's `streams` tensors of numel elements are
// too large to stay in cache (csrc/common/cpu_cache.h has the rule and its measurements).
// 16-bit outputs never do: streaming made the bf16 NCHW pass 1.6-1.7x slower (its half-size
// output stays in L3).
template <typename T>
bool should_stream(const BatchNormLayout& layout, int64_t streams) {
  const int64_t bytes_touched = streams * layout.numel() * static_cast<int64_t>(sizeof(T));
  return sizeof(T) >= 4 && bypass_cache_for(bytes_touched, CachePass::MemoryBound);
}

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, work_per_item));
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

// Per-channel values repeated over the channel's columns, extended periodically.
// Filled channel by channel, then copied forward: with a division per entry this took 3 us of
// a small call (3 arrays of width + kPad entries, two 64-bit divisions each).
template <typename A, typename F>
std::vector<A> column_array(const RowWalk& walk, F&& per_channel) {
  std::vector<A> out(walk.width + kPad);
  for (int64_t c = 0, j = 0; j < walk.width; ++c) {
    const A value = per_channel(c);
    for (int64_t i = 0; i < walk.inner; ++i) out[j++] = value;
  }
  for (int64_t j = walk.width; j < walk.width + kPad; ++j) out[j] = out[j - walk.width];
  return out;
}

// Per-channel (sum_dy, sum_dy_xmu) in double over the row walk.
template <typename T>
void row_reduce(const BatchNormLayout& layout, const void* dy, const void* x, const typename ComputeType<T>::type* mean,
                std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  using A = typename ComputeType<T>::type;
  const Kernels<T>& k = kernels<T>();
  const RowWalk walk(layout, block_elems<T>());
  const int64_t width = walk.width;
  const std::vector<double> mean_ext = column_array<double>(walk, [&](int64_t c) { return double(mean[c]); });
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

// The element-wise passes of the row walk go over the reduction's groups, split among the
// threads as the reduction split them, each thread's in reverse order: the rows a thread
// reduced last are still in its caches.
template <typename T>
void row_elemt_all(const BatchNormLayout& layout, const void* x, void* y, const RowArrays<typename ComputeType<T>::type>& arr) {
  const Kernels<T>& k = kernels<T>();
  const RowWalk walk(layout, block_elems<T>());
  const bool stream = should_stream<T>(layout, 2);
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
  const bool stream = should_stream<T>(layout, 3);
  at::parallel_for(0, walk.groups, grain_for(2 * walk.group_rows * walk.width), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g1 - 1; g >= g0; --g) {
      k.row_backward(walk, dy, x, dx, walk.group_begin(g) * walk.width, walk.group_end(g) * walk.width, arr, training,
                     stream);
    }
    if (stream) store_fence();
  });
}

// Per-channel (mean, var) in double over the order walk: items in parallel, then each
// channel's unit results merged in unit order.
template <typename T>
void order_stats(const BatchNormLayout& layout, const void* x, std::vector<double>& mean, std::vector<double>& var) {
  const Kernels<T>& k = kernels<T>();
  const OrderWalk walk(layout);
  const int64_t channels = layout.channels;
  std::vector<double> umean(walk.units * channels), um2(walk.units * channels);
  at::parallel_for(0, walk.items(), grain_for(kOrderItemElems), [&](int64_t i0, int64_t i1) {
    AlignedScratch<char> scratch(walk.slab_channels * kOrderAccBytes);
    for (int64_t i = i0; i < i1; ++i) k.order_stats_item(walk, x, i, umean.data(), um2.data(), scratch.data);
  });
  mean.assign(channels, 0.0);
  var.assign(channels, 0.0);
  for (int64_t c = 0; c < channels; ++c) {
    double n = 0.0, mu = 0.0, m2 = 0.0;
    for (int64_t u = 0; u < walk.units; ++u) {
      chan_merge(n, mu, m2, static_cast<double>(walk.unit_count(u)), umean[u * channels + c], um2[u * channels + c]);
    }
    mean[c] = mu;
    var[c] = n > 0 ? m2 / n : 0.0;
  }
}

// Per-channel (sum_dy, sum_dy_xmu) in double over the order walk: unit results added in order.
template <typename T>
void order_reduce(const BatchNormLayout& layout, const void* dy, const void* x, const typename ComputeType<T>::type* mean,
                  std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  const Kernels<T>& k = kernels<T>();
  const OrderWalk walk(layout);
  const int64_t channels = layout.channels;
  std::vector<double> udy(walk.units * channels), udyx(walk.units * channels);
  at::parallel_for(0, walk.items(), grain_for(2 * kOrderItemElems), [&](int64_t i0, int64_t i1) {
    AlignedScratch<char> scratch(walk.slab_channels * kOrderAccBytes);
    for (int64_t i = i0; i < i1; ++i) k.order_reduce_item(walk, dy, x, i, mean, udy.data(), udyx.data(), scratch.data);
  });
  sum_dy.assign(channels, 0.0);
  sum_dyx.assign(channels, 0.0);
  for (int64_t u = 0; u < walk.units; ++u) {
    for (int64_t c = 0; c < channels; ++c) {
      sum_dy[c] += udy[u * channels + c];
      sum_dyx[c] += udyx[u * channels + c];
    }
  }
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
  const bool stream = should_stream<T>(layout, 2);
  std::vector<A> scale(layout.channels), shift(layout.channels);
  for (int64_t c = 0; c < layout.channels; ++c) {
    scale[c] = scale_of(c);
    shift[c] = bias_of(c);
  }
  for_ranges_in_order(layout, 2, stream, [&](int64_t f0, int64_t f1) {
    k.elemt_in_order(layout, x, y, f0, f1, mean, scale.data(), shift.data(), stream);
  });
}

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
  };
  if (layout.count() == 0) {
    for (int64_t c = 0; c < channels; ++c) store(c, 0.0, 0.0);
    return;
  }
  const bool row = use_row_walk<T>(layout);
  std::vector<double> m, v;
  row ? row_stats<T>(layout, x, m, v) : order_stats<T>(layout, x, m, v);
  for (int64_t c = 0; c < channels; ++c) store(c, m[c], v[c]);
  if (with_forward) elemt_impl<T>(layout, x, y, BatchNormAffine{mean, invstd, weight, bias});
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
  const bool stream = should_stream<T>(layout, 3);
  const bool row = use_row_walk<T>(layout);
  if (reduce) {
    std::vector<double> sdy, sdyx;
    row ? row_reduce<T>(layout, dy, x, mean, sdy, sdyx) : order_reduce<T>(layout, dy, x, mean, sdy, sdyx);
    for (int64_t c = 0; c < channels; ++c) {
      out_dy[c] = static_cast<A>(sdy[c]);
      out_dyx[c] = static_cast<A>(sdyx[c]);
    }
  }
  if (dx == nullptr) return;
  std::vector<BackwardCoefs<A>> per(channels);
  for (int64_t c = 0; c < channels; ++c) per[c] = coefs(c);
  if (row) {
    const RowWalk walk(layout, block_elems<T>());
    const std::vector<A> am = column_array<A>(walk, [&](int64_t c) { return per[c].mean; });
    const std::vector<A> ad = column_array<A>(walk, [&](int64_t c) { return per[c].mean_dy; });
    const std::vector<A> ap = column_array<A>(walk, [&](int64_t c) { return per[c].proj; });
    const std::vector<A> as = column_array<A>(walk, [&](int64_t c) { return per[c].scale; });
    row_backward_all<T>(layout, dy, x, dx, RowArrays<A>{am.data(), ad.data(), ap.data(), as.data()}, training);
    return;
  }
  for_ranges_in_order(layout, 3, stream, [&](int64_t f0, int64_t f1) {
    k.backward_in_order(layout, dy, x, dx, f0, f1, per.data(), training, stream);
  });
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

template <typename A>
void invstd_impl(int64_t channels, const void* var, double eps, void* invstd) {
  const A* v = static_cast<const A*>(var);
  A* out = static_cast<A*>(invstd);
  for (int64_t c = 0; c < channels; ++c) out[c] = A(1) / std::sqrt(v[c] + static_cast<A>(eps));
}

// A plain loop, not ATen's add/sqrt/reciprocal: those three ops were half the host time of a
// small eval call.
void batch_norm_invstd_cpu(int64_t channels, DType compute, const void* var, double eps, void* invstd) {
  if (compute == DType::Float64) {
    invstd_impl<double>(channels, var, eps, invstd);
  } else {
    invstd_impl<float>(channels, var, eps, invstd);
  }
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
