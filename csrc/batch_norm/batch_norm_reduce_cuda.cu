// CUDA batch-norm reductions: per-channel statistics (stats, train forward) and the backward
// sums, plus the small per-channel kernels of batch_norm_cuda.h. Framework-free: plain
// pointers, sizes and a stream; batch_norm_ops_cuda.cpp is the glue.
//
// Two passes, both deterministic:
//  1. reduce: a grid of (channel tiles) x (splits). The splits cut the rows of each channel
//     into contiguous ranges; their number comes from the shape only (reduce_plan), never from
//     the device, so the same input gives the same bits on every GPU. Each thread reduces a
//     fixed sequence of packs, the block merges its threads in a fixed shuffle/shared-memory
//     tree, and the block's partial goes to its own workspace slot (no atomics).
//     - NCHW-like (inner > 1): block (c, s) walks packs [s*L, (s+1)*L) of channel c's
//       outer*inner elements (pack = 16 bytes when inner allows it, else one element).
//     - channels-last (inner == 1): block (t, s) covers 32 * V channels (V per thread, one
//       16-byte pack when C allows it) and rows [s*L, (s+1)*L); threads along C read whole
//       rows, so every warp reads contiguous memory.
//  2. finalize: one warp per channel merges its splits in a fixed order and writes the
//     per-channel results in the compute type.
// The pack width, and so the summation order, depends on the shape only: a misaligned
// pointer reads the same packs element by element.
//
// Statistics are stable for large means: every thread shifts its values by the first value it
// reads (K), reduces batches of U packs exactly (batch mean, then the batch's sum of squared
// deviations from it) and merges them into its running (count, mean - K, M2) with Chan's
// formula; blocks and splits merge (count, mean, M2) in double. Nothing forms
// sum(x^2) - sum(x)^2. Backward sums run in the compute type over one batch, then in double.
//
// Workspace: splits * C partials of 3 doubles, partial (c, s) at [(c * splits + s) * 3]:
// (count, mean, M2) for the statistics, (sum_dy, sum_dy_xmu, unused) for the backward sums.
#include "../common/block_sum_cuda.cuh"
#include "batch_norm_cuda.cuh"
#include "batch_norm_cuda.h"
#include "batch_norm_reduce.h"

namespace fastreg {
namespace {

using namespace bn_cuda;

__device__ __forceinline__ Welford shfl_down(const Welford& w, int offset) {
  return Welford{__shfl_down_sync(0xffffffffu, w.n, offset), __shfl_down_sync(0xffffffffu, w.mean, offset),
                 __shfl_down_sync(0xffffffffu, w.m2, offset)};
}

// Fixed-order block merge; thread 0 gets the result. Every thread of the block calls it.
__device__ __forceinline__ Welford block_merge(Welford w) {
  __shared__ Welford warp_state[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) w = merge(w, shfl_down(w, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < kWarps ? warp_state[lane] : Welford{0.0, 0.0, 0.0};
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) w = merge(w, shfl_down(w, offset));
  }
  return w;
}

// ---- NCHW-like: block (c, s)

template <typename T, int V, bool Vector, bool Backward>
__global__ void __launch_bounds__(kThreads) reduce_nchw_kernel(const ReduceArgs a) {
  using A = Acc<T>;
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  Running<A> st;
  double sum_dy = 0.0, sum_dy_xmu = 0.0;
  reduce_nchw_thread<T, V, Vector, Backward>(a, c, s, threadIdx.x, st, sum_dy, sum_dy_xmu);

  double* out = a.partials + (c * a.splits + s) * 3;
  if constexpr (Backward) {
    block_sum<kThreads>(sum_dy, sum_dy_xmu);
    if (threadIdx.x == 0) {
      out[0] = sum_dy;
      out[1] = sum_dy_xmu;
      out[2] = 0.0;
    }
  } else {
    const Welford w = block_merge(st.to_double());
    if (threadIdx.x == 0) {
      out[0] = w.n;
      out[1] = w.mean;
      out[2] = w.m2;
    }
  }
}

// ---- channels-last: block (tile, s); thread (col, row lane) owns channels c0 .. c0 + V - 1

template <typename T, int V, bool Vector, bool Backward>
__global__ void __launch_bounds__(kThreads) reduce_cl_kernel(const ReduceArgs a) {
  using A = Acc<T>;
  const int tc = 1 << a.log2_tc;
  const int64_t s = blockIdx.y;
  const int64_t C = a.channels;
  ClThreadState<A, V> t;
  reduce_cl_thread<T, V, Vector, Backward>(a, blockIdx.x, s, threadIdx.x, t);
  const int64_t n = t.n;
  const A(&shift)[V] = t.shift;
  const A(&d)[V] = t.d;
  const A(&m2)[V] = t.m2;
  double(&sdy)[V] = t.sdy;
  double(&sdyx)[V] = t.sdyx;

  // Merge the row lanes of each column: shuffles inside the warp (lanes tc apart share the
  // column), then the warps in order through shared memory.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (Backward) {
    __shared__ double sh_dy[kWarps][32][V], sh_dyx[kWarps][32][V];
    for (int offset = 16; offset >= tc; offset /= 2) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        sdy[v] += __shfl_down_sync(0xffffffffu, sdy[v], offset);
        sdyx[v] += __shfl_down_sync(0xffffffffu, sdyx[v], offset);
      }
    }
    if (lane < tc) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        sh_dy[warp][lane][v] = sdy[v];
        sh_dyx[warp][lane][v] = sdyx[v];
      }
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < tc * V) {
      const int cc = threadIdx.x / V, v = threadIdx.x % V;
      double t_dy = 0.0, t_dyx = 0.0;
      for (int w = 0; w < kWarps; ++w) {
        t_dy += sh_dy[w][cc][v];
        t_dyx += sh_dyx[w][cc][v];
      }
      const int64_t c = (static_cast<int64_t>(blockIdx.x) * tc + cc) * V + v;
      if (c < C) {
        double* out = a.partials + (c * a.splits + s) * 3;
        out[0] = t_dy;
        out[1] = t_dyx;
        out[2] = 0.0;
      }
    }
  } else {
    __shared__ double sh_n[kWarps][32];
    __shared__ double sh_mean[kWarps][32][V], sh_m2[kWarps][32][V];
    double wn = static_cast<double>(n);
    double wmean[V], wm2[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      wmean[v] = static_cast<double>(shift[v]) + static_cast<double>(d[v]);
      wm2[v] = static_cast<double>(m2[v]);
    }
    for (int offset = 16; offset >= tc; offset /= 2) {
      const double on = __shfl_down_sync(0xffffffffu, wn, offset);
      const double nn = wn + on;
      const double r = nn > 0.0 ? on / nn : 0.0;
      const double n_r = wn * r;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const double om = __shfl_down_sync(0xffffffffu, wmean[v], offset);
        const double om2 = __shfl_down_sync(0xffffffffu, wm2[v], offset);
        const double delta = om - wmean[v];
        wmean[v] += delta * r;
        wm2[v] += om2 + delta * delta * n_r;
      }
      wn = nn;
    }
    if (lane < tc) {
      sh_n[warp][lane] = wn;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        sh_mean[warp][lane][v] = wmean[v];
        sh_m2[warp][lane][v] = wm2[v];
      }
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < tc * V) {
      const int cc = threadIdx.x / V, v = threadIdx.x % V;
      Welford w{0.0, 0.0, 0.0};
      for (int k = 0; k < kWarps; ++k) w = merge(w, Welford{sh_n[k][cc], sh_mean[k][cc][v], sh_m2[k][cc][v]});
      const int64_t c = (static_cast<int64_t>(blockIdx.x) * tc + cc) * V + v;
      if (c < C) {
        double* out = a.partials + (c * a.splits + s) * 3;
        out[0] = w.n;
        out[1] = w.mean;
        out[2] = w.m2;
      }
    }
  }
}

// ---- finalize: one warp per channel, splits merged lane-strided then by a shuffle tree

template <typename A>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const double* __restrict__ partials, int64_t channels, int64_t splits, double eps,
                          A* __restrict__ mean, A* __restrict__ var, A* __restrict__ invstd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // uniform per warp
  Welford w{0.0, 0.0, 0.0};
  for (int64_t s = lane; s < splits; s += 32) {
    const double* p = partials + (c * splits + s) * 3;
    w = merge(w, Welford{p[0], p[1], p[2]});
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) w = merge(w, shfl_down(w, offset));
  if (lane == 0) {
    // Empty channel (count 0): mean = var = 0, invstd = 1 / sqrt(eps); nothing divides by 0.
    const A mean_c = static_cast<A>(w.n > 0.0 ? w.mean : 0.0);
    const A var_c = static_cast<A>(w.n > 0.0 ? w.m2 / w.n : 0.0);
    mean[c] = mean_c;
    var[c] = var_c;
    if (invstd != nullptr) invstd[c] = div_rn(A(1), sqrt_rn(add_rn(var_c, static_cast<A>(eps))));
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    sums_finalize_kernel(const double* __restrict__ partials, int64_t channels, int64_t splits, A* __restrict__ sum_dy,
                         A* __restrict__ sum_dy_xmu) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;
  double a = 0.0, b = 0.0;
  for (int64_t s = lane; s < splits; s += 32) {
    const double* p = partials + (c * splits + s) * 3;
    a += p[0];
    b += p[1];
  }
  warp_sum(a, b);
  if (lane == 0) {
    sum_dy[c] = static_cast<A>(a);
    sum_dy_xmu[c] = static_cast<A>(b);
  }
}

// ---- the per-channel helpers of batch_norm_cuda.h

template <typename A>
__global__ void __launch_bounds__(kThreads)
    invstd_kernel(const A* __restrict__ var, double eps, A* __restrict__ invstd, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < channels) invstd[c] = div_rn(A(1), sqrt_rn(add_rn(var[c], static_cast<A>(eps))));
}

template <typename A, typename O>
__global__ void __launch_bounds__(kThreads)
    grad_affine_kernel(const A* __restrict__ sum_dy, const A* __restrict__ sum_dy_xmu, const A* __restrict__ invstd,
                       O* __restrict__ grad_weight, O* __restrict__ grad_bias, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  grad_weight[c] = from_compute<O>(mul_rn(sum_dy_xmu[c], invstd[c]));
  grad_bias[c] = from_compute<O>(sum_dy[c]);
}

// The running-statistics update of a training step, mean and variance in one launch:
// running = (1 - momentum) * running + momentum * scale * batch, each product and the sum
// rounded in the compute type A (the reference's formula), the result rounded to R.
template <typename A, typename R>
__global__ void __launch_bounds__(kThreads) running_stats_kernel(const RunningStatsArgs a, A keep, A mean_weight,
                                                                 A var_weight) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.channels) return;
  R* running_mean = static_cast<R*>(a.running_mean) + c * a.running_mean_stride;
  R* running_var = static_cast<R*>(a.running_var) + c * a.running_var_stride;
  const A mean = static_cast<const A*>(a.mean)[c * a.mean_stride];
  const A var = static_cast<const A*>(a.var)[c * a.var_stride];
  *running_mean = from_compute<R>(add_rn(mul_rn(to_compute(*running_mean), keep), mul_rn(mean, mean_weight)));
  *running_var = from_compute<R>(add_rn(mul_rn(to_compute(*running_var), keep), mul_rn(var, var_weight)));
}

// ---- launchers

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename T, int V, bool Vector, bool Backward>
void launch_reduce_kernel(const ReducePlan& p, const ReduceArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.splits));
  if (p.channels_last) {
    reduce_cl_kernel<T, V, Vector, Backward><<<grid, kThreads, 0, stream>>>(a);
  } else {
    reduce_nchw_kernel<T, V, Vector, Backward><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <typename T, bool Backward>
void launch_reduce_typed(const ReducePlan& p, const ReduceArgs& a, cudaStream_t stream) {
  constexpr int VM = kVec<T>;
  if (p.vec == 1) {
    launch_reduce_kernel<T, 1, false, Backward>(p, a, stream);
  } else if (reduce_vector_loads(p, a, Backward)) {
    launch_reduce_kernel<T, VM, true, Backward>(p, a, stream);
  } else {
    launch_reduce_kernel<T, VM, false, Backward>(p, a, stream);
  }
}

// Pass 1 of either reduction; returns an error message for shapes the grid cannot hold.
template <bool Backward>
const char* launch_reduce(const BatchNormLayout& layout, DType dtype, const ReducePlan& p, const void* x,
                          const void* dy, const void* mean, void* workspace, cudaStream_t stream) {
  if (p.splits == 0) return nullptr;
  if (p.tiles > kMaxGridX) return "fastreg.batch_norm: too many channels for one CUDA grid";
  if (workspace == nullptr) return "fastreg.batch_norm: missing workspace";
  const ReduceArgs a = reduce_args(layout, p, x, dy, mean, static_cast<double*>(workspace));
  switch (dtype) {
    case DType::Float64: launch_reduce_typed<double, Backward>(p, a, stream); break;
    case DType::Float32: launch_reduce_typed<float, Backward>(p, a, stream); break;
    case DType::Float16: launch_reduce_typed<__half, Backward>(p, a, stream); break;
    case DType::BFloat16: launch_reduce_typed<__nv_bfloat16, Backward>(p, a, stream); break;
  }
  return nullptr;
}

int64_t finalize_blocks(int64_t channels) { return ceil_div(channels, kWarps); }

const char* check_channels(const BatchNormLayout& layout) {
  if (layout.channels < 0 || finalize_blocks(layout.channels) > kMaxGridX) {
    return "fastreg.batch_norm: too many channels for one CUDA grid";
  }
  return nullptr;
}

// Statistics into mean / var (and invstd when not nullptr).
const char* run_stats(const BatchNormLayout& layout, DType dtype, const void* input, void* mean, void* var,
                      void* invstd, double eps, void* workspace, cudaStream_t stream) {
  if (const char* e = check_channels(layout)) return e;
  if (layout.channels == 0) return nullptr;
  const ReducePlan p = reduce_plan(layout, dtype);
  if (const char* e = launch_reduce<false>(layout, dtype, p, input, nullptr, nullptr, workspace, stream)) return e;
  const double* partials = static_cast<const double*>(workspace);
  const auto blocks = static_cast<unsigned>(finalize_blocks(layout.channels));
  if (dtype == DType::Float64) {
    stats_finalize_kernel<double><<<blocks, kThreads, 0, stream>>>(
        partials, layout.channels, p.splits, eps, static_cast<double*>(mean), static_cast<double*>(var),
        static_cast<double*>(invstd));
  } else {
    stats_finalize_kernel<float><<<blocks, kThreads, 0, stream>>>(partials, layout.channels, p.splits, eps,
                                                                  static_cast<float*>(mean), static_cast<float*>(var),
                                                                  static_cast<float*>(invstd));
  }
  return last_error();
}

template <typename A>
void launch_grad_affine(int64_t channels, DType out, const void* sum_dy, const void* sum_dy_xmu, const void* invstd,
                        void* grad_weight, void* grad_bias, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(channels, kThreads));
  const A* a = static_cast<const A*>(sum_dy);
  const A* b = static_cast<const A*>(sum_dy_xmu);
  const A* i = static_cast<const A*>(invstd);
  switch (out) {
    case DType::Float64:
      grad_affine_kernel<A, double><<<blocks, kThreads, 0, stream>>>(a, b, i, static_cast<double*>(grad_weight),
                                                                     static_cast<double*>(grad_bias), channels);
      break;
    case DType::Float32:
      grad_affine_kernel<A, float><<<blocks, kThreads, 0, stream>>>(a, b, i, static_cast<float*>(grad_weight),
                                                                    static_cast<float*>(grad_bias), channels);
      break;
    case DType::Float16:
      grad_affine_kernel<A, __half><<<blocks, kThreads, 0, stream>>>(a, b, i, static_cast<__half*>(grad_weight),
                                                                     static_cast<__half*>(grad_bias), channels);
      break;
    case DType::BFloat16:
      grad_affine_kernel<A, __nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          a, b, i, static_cast<__nv_bfloat16*>(grad_weight), static_cast<__nv_bfloat16*>(grad_bias), channels);
      break;
  }
}

template <typename A, typename R>
void launch_running_stats(const RunningStatsArgs& a, double momentum, double var_scale, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(a.channels, kThreads));
  running_stats_kernel<A, R><<<blocks, kThreads, 0, stream>>>(a, static_cast<A>(1.0 - momentum), static_cast<A>(momentum),
                                                              static_cast<A>(momentum * var_scale));
}

}  // namespace

int64_t batch_norm_cuda_workspace_bytes(const BatchNormLayout& layout, DType dtype) {
  const ReducePlan p = reduce_plan(layout, dtype);
  return p.splits * layout.channels * 3 * static_cast<int64_t>(sizeof(double));
}

const char* batch_norm_stats_cuda(const BatchNormLayout& layout, DType dtype, const void* input, void* mean, void* var,
                                  void* workspace, void* stream) {
  return run_stats(layout, dtype, input, mean, var, nullptr, 0.0, workspace, static_cast<cudaStream_t>(stream));
}

const char* batch_norm_train_forward_cuda(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                                          const void* weight, const void* bias, double eps, void* mean, void* var,
                                          void* invstd, void* workspace, void* stream) {
  if (const char* e = run_stats(layout, dtype, input, mean, var, invstd, eps, workspace,
                                static_cast<cudaStream_t>(stream))) {
    return e;
  }
  if (layout.numel() == 0) return nullptr;
  const BatchNormAffine affine{mean, invstd, weight, bias};
  return batch_norm_elemt_cuda(layout, dtype, input, output, affine, stream);
}

const char* batch_norm_backward_reduce_cuda(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                            const void* input, const void* mean, void* sum_dy, void* sum_dy_xmu,
                                            void* workspace, void* stream) {
  if (const char* e = check_channels(layout)) return e;
  if (layout.channels == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const ReducePlan p = reduce_plan(layout, dtype);
  if (const char* e = launch_reduce<true>(layout, dtype, p, input, grad_output, mean, workspace, s)) return e;
  const double* partials = static_cast<const double*>(workspace);
  const auto blocks = static_cast<unsigned>(finalize_blocks(layout.channels));
  if (dtype == DType::Float64) {
    sums_finalize_kernel<double><<<blocks, kThreads, 0, s>>>(partials, layout.channels, p.splits,
                                                             static_cast<double*>(sum_dy),
                                                             static_cast<double*>(sum_dy_xmu));
  } else {
    sums_finalize_kernel<float><<<blocks, kThreads, 0, s>>>(partials, layout.channels, p.splits,
                                                            static_cast<float*>(sum_dy),
                                                            static_cast<float*>(sum_dy_xmu));
  }
  return last_error();
}

const char* batch_norm_invstd_cuda(int64_t channels, DType compute, const void* var, double eps, void* invstd,
                                   void* stream) {
  if (channels <= 0) return nullptr;
  if (ceil_div(channels, kThreads) > kMaxGridX) return "fastreg.batch_norm: too many channels for one CUDA grid";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const auto blocks = static_cast<unsigned>(ceil_div(channels, kThreads));
  if (compute == DType::Float64) {
    invstd_kernel<double><<<blocks, kThreads, 0, s>>>(static_cast<const double*>(var), eps, static_cast<double*>(invstd),
                                                      channels);
  } else {
    invstd_kernel<float><<<blocks, kThreads, 0, s>>>(static_cast<const float*>(var), eps, static_cast<float*>(invstd),
                                                     channels);
  }
  return last_error();
}

const char* batch_norm_grad_affine_cuda(int64_t channels, DType compute, DType out, const void* sum_dy,
                                        const void* sum_dy_xmu, const void* invstd, void* grad_weight, void* grad_bias,
                                        void* stream) {
  if (channels <= 0) return nullptr;
  if (ceil_div(channels, kThreads) > kMaxGridX) return "fastreg.batch_norm: too many channels for one CUDA grid";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (compute == DType::Float64) {
    launch_grad_affine<double>(channels, out, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias, s);
  } else {
    launch_grad_affine<float>(channels, out, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias, s);
  }
  return last_error();
}

const char* batch_norm_update_running_cuda(const RunningStatsArgs& args, DType running, DType compute,
                                          double momentum, double var_scale, void* stream) {
  if (args.channels <= 0) return nullptr;
  if (ceil_div(args.channels, kThreads) > kMaxGridX) return "fastreg.batch_norm: too many channels for one CUDA grid";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (compute == DType::Float64 && running == DType::Float64) {
    launch_running_stats<double, double>(args, momentum, var_scale, s);
  } else if (compute == DType::Float32 && running == DType::Float32) {
    launch_running_stats<float, float>(args, momentum, var_scale, s);
  } else if (compute == DType::Float32 && running == DType::Float16) {
    launch_running_stats<float, __half>(args, momentum, var_scale, s);
  } else if (compute == DType::Float32 && running == DType::BFloat16) {
    launch_running_stats<float, __nv_bfloat16>(args, momentum, var_scale, s);
  } else {
    return "fastreg.batch_norm_update_stats_: no CUDA kernel for this pair of dtypes";
  }
  return last_error();
}

}  // namespace fastreg
