// CUDA dropout: one Philox4x32-10 call gives the keep bits of 8 elements (dropout_rng.h),
// so each thread owns whole groups of 8 and moves them with 16-byte loads and stores.
// Framework-free: plain pointers, sizes and a stream; dropout_ops_cuda.cpp is the glue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../common/compute_type_cuda.cuh"
#include "dropout_group.h"
#include "dropout_kernels.h"

namespace fastreg {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

__device__ __forceinline__ DropoutRngState resolve(const DropoutRngSource& src) {
  DropoutRngState s = src.value;
  if (src.seed_ptr) s.seed = static_cast<uint64_t>(*src.seed_ptr);
  if (src.offset_ptr) s.offset = static_cast<uint64_t>(*src.offset_ptr) + src.offset_extra;
  return s;
}

// The grid strides over the groups; dropout_group.h has what one thread does with each.
template <typename T, bool Backward, bool Aligned>
__global__ void __launch_bounds__(kThreads) dropout_kernel(DropoutArgs args, DropoutRngSource src) {
  const DropoutRngState rng = resolve(src);
  if (!Backward && src.state_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    src.state_out[0] = static_cast<int64_t>(rng.seed);
    src.state_out[1] = static_cast<int64_t>(rng.offset);
  }
  using A = typename ComputeType<T>::type;
  const A scale = sizeof(T) == 8 ? static_cast<A>(args.scale_f64) : static_cast<A>(args.scale);
  const int64_t groups = (args.n + kDropoutGroup - 1) / kDropoutGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    dropout_group<T, Backward, Aligned>(args, rng, scale, g);
  }
}

// SMs of the current device (the glue's guard made it the tensor's), asked at each launch:
// a value cached from the first device would size grids wrongly on hosts with mixed GPUs.
// cudaDeviceGetAttribute reads the runtime's cached attributes (unlike cudaGetDeviceProperties,
// which CUDA's documentation warns is slow).
int sm_count() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

// Blocks of `kernel` that fit on one SM of the current device at once, at most kBlocksPerSm.
// The registers decide: at 32 per thread all 8 blocks of 256 fit, but the aligned kernels, which
// hold a group's input while the Philox rounds run, take 38-48 (sm_90), so 5-6 fit. The grid
// strides, so a grid larger than what fits would run its last blocks as a second, part-empty
// wave. Asked once per kernel and device (devices of a host may differ): the template
// parameters make one cache per kernel, as every instantiation has the same pointer type.
template <typename T, bool Backward, bool Aligned>
int resident_blocks(cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0: not asked yet
  const auto kernel = dropout_kernel<T, Backward, Aligned>;
  int device = 0;
  cudaGetDevice(&device);
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  // A first launch inside CUDA-graph capture does not query (in the global capture mode a call
  // the runtime deems unsafe would invalidate the capture); it takes the upper bound, uncached.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    cudaGetLastError();
    return kBlocksPerSm;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1) {
    cudaGetLastError();  // a failed query must not be reported as the launch's error
    blocks = 1;
  }
  blocks = blocks < kBlocksPerSm ? blocks : kBlocksPerSm;
  if (cacheable) cached[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <typename T, bool Backward, bool Aligned>
void launch_kernel(const DropoutArgs& args, const DropoutRngSource& src, cudaStream_t stream) {
  const int64_t groups = (args.n + kDropoutGroup - 1) / kDropoutGroup;
  const int64_t wanted = (groups + kThreads - 1) / kThreads;
  const int64_t most = static_cast<int64_t>(sm_count()) * resident_blocks<T, Backward, Aligned>(stream);
  const int blocks = static_cast<int>(wanted < 1 ? 1 : (wanted < most ? wanted : most));
  dropout_kernel<T, Backward, Aligned><<<blocks, kThreads, 0, stream>>>(args, src);
}

template <typename T, bool Backward>
int launch_typed(const DropoutArgs& args, const DropoutRngSource& src, cudaStream_t stream) {
  if (dropout_groups_aligned(args)) {
    launch_kernel<T, Backward, true>(args, src, stream);
  } else {
    launch_kernel<T, Backward, false>(args, src, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

template <bool Backward>
int launch(const DropoutArgs& args, const DropoutRngSource& src, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::Float64: return launch_typed<double, Backward>(args, src, s);
    case DType::Float32: return launch_typed<float, Backward>(args, src, s);
    case DType::Float16: return launch_typed<__half, Backward>(args, src, s);
    case DType::BFloat16: return launch_typed<__nv_bfloat16, Backward>(args, src, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int dropout_forward_cuda(const DropoutArgs& args, const DropoutRngSource& rng, void* stream) {
  return launch<false>(args, rng, stream);
}

int dropout_backward_cuda(const DropoutArgs& args, const DropoutRngSource& rng, void* stream) {
  return launch<true>(args, rng, stream);
}

}  // namespace fastreg
