// CUDA batch-norm element-wise kernels: y = (x - mean) * (invstd * w) + b, and the backward
// dx in its training and eval forms (batch_norm_kernels.h). The per-thread code, arguments and
// launch plans are host+device code in batch_norm_elemt.h; this file has the grids and launches.
// Framework-free: plain pointers, sizes and a stream; batch_norm_ops_cuda.cpp is the glue.
#include "batch_norm_cuda.cuh"
#include "batch_norm_elemt.h"

namespace fastreg {
namespace {

using namespace bn_cuda;

// The grids run the last tile / row block first: the reduction before these kernels reads
// from the start to the end, so the tensor's tail is still in L2 when they begin.
template <typename T, int V, Mode M>
__global__ void __launch_bounds__(kThreads) elemt_flat_kernel(const ElemtArgs a) {
  elemt_flat_thread<T, V, M>(a, static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x, threadIdx.x);
}

template <typename T, int V, Mode M>
__global__ void __launch_bounds__(kThreads) elemt_cl_kernel(const ElemtArgs a) {
  elemt_cl_thread<T, V, M>(a, blockIdx.x, static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y, threadIdx.x);
}

// ---- launch

const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename T, int V, Mode M>
const char* launch_flat(ElemtArgs a, cudaStream_t stream) {
  const int64_t blocks = elemt_flat_plan<V>(a);
  if (blocks > kMaxGridX) return "fastreg.batch_norm: tensor too large for one CUDA grid";
  elemt_flat_kernel<T, V, M><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return last_error();
}

template <typename T, int V, Mode M>
const char* launch_cl(ElemtArgs a, cudaStream_t stream) {
  const ClGrid grid = elemt_cl_plan<V>(a);
  if (grid.tiles > kMaxGridX || grid.row_blocks > kMaxGridY) return "fastreg.batch_norm: tensor too large for one CUDA grid";
  const dim3 blocks(static_cast<unsigned>(grid.tiles), static_cast<unsigned>(grid.row_blocks));
  elemt_cl_kernel<T, V, M><<<blocks, kThreads, 0, stream>>>(a);
  return last_error();
}

template <typename T, Mode M>
const char* launch_typed(const ElemtArgs& a, cudaStream_t stream) {
  constexpr int VM = kVec<T>;
  const bool vectorized = elemt_vectorized<T, M>(a);
  if (a.inner == 1) return vectorized ? launch_cl<T, VM, M>(a, stream) : launch_cl<T, 1, M>(a, stream);
  return vectorized ? launch_flat<T, VM, M>(a, stream) : launch_flat<T, 1, M>(a, stream);
}

template <Mode M>
const char* launch(const BatchNormLayout& layout, DType dtype, ElemtArgs a, void* stream) {
  if (layout.numel() == 0 || layout.channels == 0) return nullptr;  // nothing to write
  elemt_set_layout(a, layout);
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
  return launch<Mode::Forward>(layout, dtype, elemt_forward_args(input, output, affine), stream);
}

const char* batch_norm_backward_elemt_cuda(const BatchNormLayout& layout, DType dtype, const void* grad_output,
                                           const void* input, void* grad_input, const BatchNormAffine& affine,
                                           const void* sum_dy, const void* sum_dy_xmu, int64_t count, void* stream) {
  const ElemtArgs a = elemt_backward_args(grad_output, input, grad_input, affine, sum_dy, sum_dy_xmu, count);
  if (sum_dy == nullptr) return launch<Mode::BackwardEval>(layout, dtype, a, stream);
  return launch<Mode::BackwardTrain>(layout, dtype, a, stream);
}

}  // namespace fastreg
