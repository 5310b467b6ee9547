// CUDA dropout: one Philox4x32-10 call gives the keep bits of 8 elements (dropout_rng.h),
// so each thread owns whole groups of 8 and moves them with 16-byte loads and stores.
// Framework-free: plain pointers, sizes and a stream; dropout_ops_cuda.cpp is the glue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/compute_type_cuda.cuh"
#include "dropout_kernels.h"

namespace fastreg {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

template <typename T>
using Acc = ComputeType<T>;

// Eight elements as whole 16-byte words: 2 words for fp32, 1 for fp16/bf16, 4 for fp64.
template <typename T>
struct alignas(16) Group8 {
  T v[kDropoutGroup];
};

__device__ __forceinline__ DropoutRngState resolve(const DropoutRngSource& src) {
  DropoutRngState s = src.value;
  if (src.seed_ptr) s.seed = static_cast<uint64_t>(*src.seed_ptr);
  if (src.offset_ptr) s.offset = static_cast<uint64_t>(*src.offset_ptr) + src.offset_extra;
  return s;
}

// In place (output == input): every element is read once, by the thread that then writes it.
// Backward=false: input -> output, mask written per args.mask_mode.
// Backward=true: grad_output -> grad_input, keep bits read per args.mask_mode.
// Aligned: every pointer allows 16-byte group access (checked at launch).
template <typename T, bool Backward, bool Aligned>
__global__ void __launch_bounds__(kThreads) dropout_kernel(DropoutArgs args, DropoutRngSource src) {
  using A = typename Acc<T>::type;
  const DropoutRngState rng = resolve(src);
  if (!Backward && src.state_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    src.state_out[0] = static_cast<int64_t>(rng.seed);
    src.state_out[1] = static_cast<int64_t>(rng.offset);
  }
  // Not __restrict__: in place they alias, and restrict would license loads through the
  // non-coherent cache and reordering that only happen to be harmless today.
  const T* in = static_cast<const T*>(args.input);
  T* out = static_cast<T*>(args.output);
  const A scale = sizeof(T) == 8 ? static_cast<A>(args.scale_f64) : static_cast<A>(args.scale);
  const int64_t n = args.n;
  const int64_t groups = (n + kDropoutGroup - 1) / kDropoutGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t e0 = g * kDropoutGroup;
    const bool full = e0 + kDropoutGroup <= n;
    const uint32_t valid = full ? 0xFFu : ((1u << (n - e0)) - 1u);

    uint32_t bits;
    if (!Backward || args.mask_mode == MaskMode::Regenerate) {
      bits = dropout_keep_bits(rng, static_cast<uint64_t>(g), args.threshold) & valid;
    } else if (args.mask_mode == MaskMode::Bits) {
      bits = args.mask[g];
    } else if (Aligned && full) {
      const uint64_t bytes = *reinterpret_cast<const uint64_t*>(args.mask + e0);
      bits = 0;
#pragma unroll
      for (int j = 0; j < kDropoutGroup; ++j) bits |= static_cast<uint32_t>(((bytes >> (8 * j)) & 0xFFu) != 0) << j;
    } else {
      bits = 0;
      for (int j = 0; j < kDropoutGroup && e0 + j < n; ++j) bits |= static_cast<uint32_t>(args.mask[e0 + j] != 0) << j;
    }

    if (!Backward && args.mask_mode == MaskMode::Bits) {
      args.mask[g] = static_cast<uint8_t>(bits);
    } else if (!Backward && args.mask_mode == MaskMode::Bool) {
      if (Aligned && full) {
        uint64_t bytes = 0;
#pragma unroll
        for (int j = 0; j < kDropoutGroup; ++j) bytes |= static_cast<uint64_t>((bits >> j) & 1u) << (8 * j);
        *reinterpret_cast<uint64_t*>(args.mask + e0) = bytes;
      } else {
        for (int j = 0; j < kDropoutGroup && e0 + j < n; ++j) args.mask[e0 + j] = (bits >> j) & 1u;
      }
    }

    if (Aligned && full) {
      Group8<T> x = *reinterpret_cast<const Group8<T>*>(in + e0);
      Group8<T> y;
#pragma unroll
      for (int j = 0; j < kDropoutGroup; ++j) y.v[j] = from_compute<T>(to_compute(x.v[j]) * (((bits >> j) & 1u) ? scale : A(0)));
      *reinterpret_cast<Group8<T>*>(out + e0) = y;
    } else {
      for (int j = 0; j < kDropoutGroup && e0 + j < n; ++j) {
        out[e0 + j] = from_compute<T>(to_compute(in[e0 + j]) * (((bits >> j) & 1u) ? scale : A(0)));
      }
    }
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

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, bool Backward>
int launch_typed(const DropoutArgs& args, const DropoutRngSource& src, cudaStream_t stream) {
  const int64_t groups = (args.n + kDropoutGroup - 1) / kDropoutGroup;
  const int64_t wanted = (groups + kThreads - 1) / kThreads;
  const int64_t most = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  const int blocks = static_cast<int>(wanted < 1 ? 1 : (wanted < most ? wanted : most));
  const bool mask_ok = args.mask == nullptr || args.mask_mode != MaskMode::Bool || (reinterpret_cast<uintptr_t>(args.mask) & 7u) == 0;
  if (aligned16(args.input) && aligned16(args.output) && mask_ok) {
    dropout_kernel<T, Backward, true><<<blocks, kThreads, 0, stream>>>(args, src);
  } else {
    dropout_kernel<T, Backward, false><<<blocks, kThreads, 0, stream>>>(args, src);
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
