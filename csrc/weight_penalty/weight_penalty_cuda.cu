// CUDA weight penalty: a multi-tensor pass (one thread block per chunk of kPenaltyChunkCuda
// elements of any tensor), then one tiny kernel that adds the blocks' partial sums in a fixed
// order. Framework-free: plain pointers and a stream; weight_penalty_ops_cuda.cpp is the glue.
//
// Multi-tensor: tensor pointers, sizes, dtypes and each tensor's first block travel by value
// in a kernel-argument table (under 4 KB), so a launch needs no device-side copy of metadata:
// nothing to synchronise, and CUDA-graph capture records the table with the launch. Up to
// kMaxTensors tensors per launch (ResNet-50's 161 tensors: 2 launches + the final one).
//
// Determinism: every element has a fixed thread and position in that thread's sequence, the
// block reduction is a fixed shuffle tree, partials go to a slot per block (no atomics), and
// the final kernel adds them in a fixed order. Alignment does not change the order either:
// misaligned tensors take scalar loads of the same packs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/block_sum_cuda.cuh"
#include "../common/compute_type_cuda.cuh"
#include "weight_penalty_chunk.h"
#include "weight_penalty_kernels.h"

namespace fastreg {
namespace {

constexpr int kThreads = kPenaltyThreads;
constexpr int kMaxTensors = 128;
constexpr int kFinalThreads = 512;
constexpr int64_t kMaxBlocksPerLaunch = int64_t{1} << 30;  // grid.x allows 2^31 - 1

struct LaunchTable {
  const void* param[kMaxTensors];
  void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t partial_base;                  // the partial-sum slot of this launch's block 0
  int32_t first_block[kMaxTensors + 1];  // first_block[count] = blocks in this launch
  int32_t count;
  uint8_t dtype[kMaxTensors];
};

static_assert(sizeof(LaunchTable) + sizeof(PenaltyScalars) + sizeof(double*) <= 4096,
              "kernel arguments must fit the classic 4 KB limit");

template <typename T, PenaltyMode M>
__device__ __forceinline__ void run_chunk(const LaunchTable& table, const PenaltyScalars& scalars, int t, int64_t begin,
                                          int64_t len, double& s1, double& s2) {
  using A = typename ComputeType<T>::type;
  A c1, c2x2;
  penalty_coefficients<A>(M, scalars, c1, c2x2);
  const T* w = static_cast<const T*>(table.param[t]) + begin;
  T* g = table.grad[t] == nullptr ? nullptr : static_cast<T*>(table.grad[t]) + begin;
  penalty_chunk<T, M>(w, g, len, c1, c2x2, s1, s2, threadIdx.x);
}

template <PenaltyMode M>
__global__ void __launch_bounds__(kThreads, 4)
    penalty_kernel(const __grid_constant__ LaunchTable table, const __grid_constant__ PenaltyScalars scalars,
                   double* __restrict__ partials) {
  // The tensor of this block: the last t with first_block[t] <= blockIdx.x (uniform per block).
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;
  const int64_t begin = static_cast<int64_t>(block - table.first_block[t]) * kPenaltyChunkCuda;
  const int64_t remaining = table.numel[t] - begin;
  const int64_t len = remaining < kPenaltyChunkCuda ? remaining : kPenaltyChunkCuda;
  double s1 = 0.0, s2 = 0.0;
  switch (static_cast<DType>(table.dtype[t])) {
    case DType::Float64: run_chunk<double, M>(table, scalars, t, begin, len, s1, s2); break;
    case DType::Float32: run_chunk<float, M>(table, scalars, t, begin, len, s1, s2); break;
    case DType::Float16: run_chunk<__half, M>(table, scalars, t, begin, len, s1, s2); break;
    case DType::BFloat16: run_chunk<__nv_bfloat16, M>(table, scalars, t, begin, len, s1, s2); break;
  }
  if constexpr (M != PenaltyMode::Backward) {
    block_sum<kThreads>(s1, s2);
    if (threadIdx.x == 0) {
      const int64_t slot = table.partial_base + block;
      partials[2 * slot] = s1;
      partials[2 * slot + 1] = s2;
    }
  }
}

// One block: thread t adds slots t, t + kFinalThreads, ...; then the fixed-order block sum.
__global__ void __launch_bounds__(kFinalThreads)
    penalty_final_kernel(const double* __restrict__ partials, int64_t slots, double l1, double l2, void* value_out,
                         DType value_dtype) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t i = threadIdx.x; i < slots; i += kFinalThreads) {
    s1 += partials[2 * i];
    s2 += partials[2 * i + 1];
  }
  block_sum<kFinalThreads>(s1, s2);
  if (threadIdx.x == 0) {
    const double value = __dadd_rn(__dmul_rn(l1, s1), __dmul_rn(l2, s2));
    if (value_dtype == DType::Float64) {
      *static_cast<double*>(value_out) = value;
    } else {
      *static_cast<float*>(value_out) = static_cast<float>(value);
    }
  }
}

int64_t chunks_of(int64_t numel) { return (numel + kPenaltyChunkCuda - 1) / kPenaltyChunkCuda; }

void launch(const LaunchTable& table, const PenaltyScalars& scalars, PenaltyMode mode, double* partials, int blocks,
            cudaStream_t stream) {
  switch (mode) {
    case PenaltyMode::Value:
      penalty_kernel<PenaltyMode::Value><<<blocks, kThreads, 0, stream>>>(table, scalars, partials);
      break;
    case PenaltyMode::Accumulate:
      penalty_kernel<PenaltyMode::Accumulate><<<blocks, kThreads, 0, stream>>>(table, scalars, partials);
      break;
    case PenaltyMode::Backward:
      penalty_kernel<PenaltyMode::Backward><<<blocks, kThreads, 0, stream>>>(table, scalars, partials);
      break;
  }
}

}  // namespace

int64_t weight_penalty_cuda_blocks(const PenaltyTensor* tensors, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) blocks += chunks_of(tensors[i].numel);
  return blocks;
}

const char* weight_penalty_cuda(const PenaltyTensor* tensors, int64_t count, PenaltyMode mode, const PenaltyScalars& scalars,
                                double* partials, void* value_out, DType value_dtype, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  LaunchTable table{};
  int64_t blocks_in_table = 0;
  int64_t partial_base = 0;
  auto flush = [&]() {
    if (table.count == 0) return;
    table.first_block[table.count] = static_cast<int32_t>(blocks_in_table);
    table.partial_base = partial_base;
    launch(table, scalars, mode, partials, static_cast<int>(blocks_in_table), cuda_stream);
    partial_base += blocks_in_table;
    blocks_in_table = 0;
    table.count = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    const PenaltyTensor& tensor = tensors[i];
    if (tensor.numel == 0) continue;
    const int64_t blocks = chunks_of(tensor.numel);
    if (blocks > kMaxBlocksPerLaunch) return "fastreg.weight_penalty: a tensor is too large for one CUDA launch";
    if (table.count == kMaxTensors || blocks_in_table + blocks > kMaxBlocksPerLaunch) flush();
    const int c = table.count++;
    table.param[c] = tensor.param;
    table.grad[c] = tensor.grad;
    table.numel[c] = tensor.numel;
    table.dtype[c] = static_cast<uint8_t>(tensor.dtype);
    table.first_block[c] = static_cast<int32_t>(blocks_in_table);
    blocks_in_table += blocks;
  }
  flush();
  if (mode != PenaltyMode::Backward) {
    penalty_final_kernel<<<1, kFinalThreads, 0, cuda_stream>>>(partials, partial_base, scalars.l1, scalars.l2, value_out,
                                                              value_dtype);
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace fastreg
