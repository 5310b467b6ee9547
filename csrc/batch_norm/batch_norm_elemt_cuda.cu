// CUDA batch-norm element-wise kernels: y = (x - mean) * (invstd * w) + b, and the backward
// dx in its training and eval forms (batch_norm_kernels.h). Framework-free: plain pointers,
// sizes and a stream; batch_norm_ops_cuda.cpp is the glue.
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
// Both walk memory from the end to the start: the reduction before them reads from the start
// to the end, so the tensor's tail is still in L2 when these kernels begin.
//
// Arithmetic is explicitly rounded in the compute type, in the reference's order, so with the
// same per-channel inputs the results have the reference's bits.
#include "batch_norm_cuda.cuh"

namespace fastreg {
namespace {

using namespace bn_cuda;

constexpr int kUnroll = 4;                      // packs per thread and tensor in flight
constexpr int64_t kClBlockElements = 32768;     // channels-last: elements of one tensor per block
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int kMaxTileThreads = 32;

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
__device__ __forceinline__ Coef<A, M> load_coef(const ElemtArgs& a, int64_t c) {
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
__device__ __forceinline__ A apply(const Coef<A, M>& k, A x, A g, bool has_bias) {
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

// ---- NCHW-like: flat tiles of kUnroll * kThreads packs, the last tile first

template <typename T, int V, Mode M>
__global__ void __launch_bounds__(kThreads) elemt_flat_kernel(const ElemtArgs a) {
  using A = Acc<T>;
  constexpr bool kVector = V > 1;  // V > 1 only when every pointer is 16-byte aligned
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ g = static_cast<const T*>(a.dy);
  T* __restrict__ out = static_cast<T*>(a.out);
  const bool has_bias = a.bias != nullptr;
  const int64_t numel = a.numel;
  const int64_t packs = (numel + V - 1) / V;
  const int64_t tile = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t first = tile * (int64_t{kUnroll} * kThreads) + threadIdx.x;
  if (first >= packs) return;

  T xv[kUnroll][V], gv[kUnroll][V];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first + int64_t{u} * kThreads;
    if (p < packs) {
      const int64_t e = p * V;
      if (!kVector || e + V <= numel) {
        if constexpr (kReadsX<M>) load_pack<T, V, kVector>(x + e, xv[u]);
        if constexpr (kReadsDy<M>) load_pack<T, V, kVector>(g + e, gv[u]);
      } else {  // the tensor's last, partial pack
#pragma unroll
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
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first + int64_t{u} * kThreads;
    if (p < packs) {
      const int64_t e = p * V;
      T yv[V];
      if (col + V <= inner) {  // one channel
        const Coef<A, M> k = load_coef<A, M>(a, c);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A xj = kReadsX<M> ? to_compute(xv[u][j]) : A(0);
          const A gj = kReadsDy<M> ? to_compute(gv[u][j]) : A(0);
          yv[j] = from_compute<T>(apply<A, M>(k, xj, gj, has_bias));
        }
      } else {  // across rows: the channel moves on each time the column reaches inner
        int64_t ch = c, cc = col;
        Coef<A, M> k = load_coef<A, M>(a, ch);
#pragma unroll
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
#pragma unroll
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

// ---- channels-last: block (tile, row block), the last row block first

template <typename T, int V, Mode M>
__global__ void __launch_bounds__(kThreads) elemt_cl_kernel(const ElemtArgs a) {
  using A = Acc<T>;
  constexpr bool kVector = V > 1;  // V > 1 only when C % V == 0 and every pointer is aligned
  const int tc = 1 << a.log2_tc;
  const int col = static_cast<int>(threadIdx.x) & (tc - 1);
  const int row_lane = static_cast<int>(threadIdx.x) >> a.log2_tc;
  const int rows_per_pass = kThreads >> a.log2_tc;
  const int64_t C = a.channels;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tc + col) * V;
  if (c0 >= C) return;
  const int64_t block_row = static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y;
  const int64_t r_begin = block_row * a.rows_per_block;
  const int64_t r_end = r_begin + a.rows_per_block < a.outer ? r_begin + a.rows_per_block : a.outer;
  const T* __restrict__ x = kReadsX<M> ? static_cast<const T*>(a.x) + c0 : nullptr;
  const T* __restrict__ g = kReadsDy<M> ? static_cast<const T*>(a.dy) + c0 : nullptr;
  T* __restrict__ out = static_cast<T*>(a.out) + c0;
  const bool has_bias = a.bias != nullptr;

  Coef<A, M> k[V];
#pragma unroll
  for (int v = 0; v < V; ++v) k[v] = load_coef<A, M>(a, c0 + v);

  const int64_t step = int64_t{kUnroll} * rows_per_pass;
  for (int64_t r = r_begin + row_lane; r < r_end; r += step) {
    T xv[kUnroll][V], gv[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + int64_t{u} * rows_per_pass;
      if (rr < r_end) {
        if constexpr (kReadsX<M>) load_pack<T, V, kVector>(x + rr * C, xv[u]);
        if constexpr (kReadsDy<M>) load_pack<T, V, kVector>(g + rr * C, gv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + int64_t{u} * rows_per_pass;
      if (rr < r_end) {
        T yv[V];
#pragma unroll
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

// ---- launch

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename T, int V, Mode M>
const char* launch_flat(ElemtArgs a, cudaStream_t stream) {
  const int64_t packs = ceil_div(a.numel, V);
  const int64_t blocks = ceil_div(packs, int64_t{kUnroll} * kThreads);
  if (blocks > kMaxGridX) return "fastreg.batch_norm: tensor too large for one CUDA grid";
  a.div_inner = DivU64::make(static_cast<uint64_t>(a.inner));
  a.div_channels = DivU64::make(static_cast<uint64_t>(a.channels));
  const int64_t step = int64_t{kThreads} * V;
  a.step_cols = step % a.inner;
  a.step_channels = (step / a.inner) % a.channels;
  elemt_flat_kernel<T, V, M><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return last_error();
}

template <typename T, int V, Mode M>
const char* launch_cl(ElemtArgs a, cudaStream_t stream) {
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
  const int64_t row_blocks = ceil_div(a.outer, a.rows_per_block);
  if (tiles > kMaxGridX || row_blocks > kMaxGridY) return "fastreg.batch_norm: tensor too large for one CUDA grid";
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks));
  elemt_cl_kernel<T, V, M><<<grid, kThreads, 0, stream>>>(a);
  return last_error();
}

template <typename T, Mode M>
const char* launch_typed(const ElemtArgs& a, cudaStream_t stream) {
  constexpr int VM = kVec<T>;
  const bool aligned = (!kReadsX<M> || aligned16(a.x)) && (!kReadsDy<M> || aligned16(a.dy)) && aligned16(a.out);
  if (a.inner == 1) {
    if (aligned && a.channels % VM == 0) return launch_cl<T, VM, M>(a, stream);
    return launch_cl<T, 1, M>(a, stream);
  }
  if (aligned) return launch_flat<T, VM, M>(a, stream);
  return launch_flat<T, 1, M>(a, stream);
}

template <Mode M>
const char* launch(const BatchNormLayout& layout, DType dtype, ElemtArgs a, void* stream) {
  if (layout.numel() == 0 || layout.channels == 0) return nullptr;  // nothing to write
  a.numel = layout.numel();
  a.channels = layout.channels;
  a.inner = layout.inner;
  a.outer = layout.outer;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float64: return launch_typed<double, M>(a, s);
    case DType::Float32: return launch_typed<float, M>(a, s);
    case DType::Float16: return launch_typed<__half, M>(a, s);
    case DType::BFloat16: return launch_typed<__nv_bfloat16, M>(a, s);
  }
  return "fastreg.batch_norm: unsupported dtype";
}

}  // namespace

const char* batch_norm_elemt_cuda(const BatchNormLayout& layout, DType dtype, const void* input, void* output,
                                  const BatchNormAffine& affine, void* stream) {
  ElemtArgs a{};
  a.x = input;
  a.out = output;
  a.mean = affine.mean;
  a.invstd = affine.invstd;
  a.weight = affine.weight;
  a.bias = affine.bias;
  return launch<Mode::Forward>(layout, dtype, a, stream);
}

const char* batch_norm_backward_elemt_cuda(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                           const void* input, void* grad_input, const BatchNormAffine& affine,
                                           const void* sum_dy, const void* sum_dy_xmu, int64_t count, void* stream) {
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
  if (sum_dy == nullptr) return launch<Mode::BackwardEval>(layout, dtype, a, stream);
  return launch<Mode::BackwardTrain>(layout, dtype, a, stream);
}

}  // namespace fastreg
