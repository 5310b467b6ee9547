// CUDA weight penalty: a multi-tensor pass (one thread block per chunk of kPenaltyChunkCuda
// elements of any tensor), then one tiny kernel that adds the blocks' partial sums in a fixed
// order. Framework-free: plain pointers and a stream; weight_penalty_ops_cuda.cpp is the glue.
//
// Multi-tensor: tensor pointers, sizes, dtypes and each tensor's first block travel by value
// in a kernel-argument table, so a launch needs no device-side copy of metadata: nothing to
// synchronise, and CUDA-graph capture records the table with the launch. Two table sizes:
// 128 tensors fit the classic 4 KB argument limit that every driver takes; 512 tensors need
// the 32 KB limit of CUDA 12.1+ (sm_70+, driver 530+), checked at run time, so that lists like
// ResNet-50's (161 tensors) or GPT-2's (148) take one launch instead of two: the second of two
// launches starts only when the first has drained. weight_penalty_launch_plan.h cuts the list.
//
// Determinism: every element has a fixed thread and position in that thread's sequence, the
// block reduction is a fixed shuffle tree, partials go to a slot per block in list order (no
// atomics), and the final kernel adds them in a fixed order, so neither the table size nor the
// number of launches changes the bits. Alignment does not change the order either: misaligned
// tensors take scalar loads of the same packs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/block_sum_cuda.cuh"
#include "../common/compute_type_cuda.cuh"
#include "weight_penalty_chunk.h"
#include "weight_penalty_kernels.h"
#include "weight_penalty_launch_plan.h"

// The 512-tensor table exists when the toolkit knows 32 KB arguments and every arch compiled
// for has them (sm_70+). __CUDA_ARCH_LIST__ ("800,900"), defined in host and device passes
// alike, lists the archs lowest first.
#define FASTREG_ARCH_LIST_HEAD_(first, ...) first
#define FASTREG_ARCH_LIST_HEAD(...) FASTREG_ARCH_LIST_HEAD_(__VA_ARGS__)
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && defined(__CUDA_ARCH_LIST__) && \
    FASTREG_ARCH_LIST_HEAD(__CUDA_ARCH_LIST__) >= 700
#define FASTREG_PENALTY_LARGE_TABLE 1
#else
#define FASTREG_PENALTY_LARGE_TABLE 0
#endif

namespace fastreg {
namespace {

constexpr int kThreads = kPenaltyThreads;
constexpr int kSmallTable = 128;
constexpr int kLargeTable = 512;
constexpr int kFinalThreads = 512;
constexpr int64_t kMaxBlocksPerLaunch = int64_t{1} << 30;  // grid.x allows 2^31 - 1

template <int Capacity>
struct LaunchTable {
  const void* param[Capacity];
  void* grad[Capacity];
  int64_t numel[Capacity];
  int64_t partial_base;               // the partial-sum slot of this launch's block 0
  int32_t first_block[Capacity + 1];  // first_block[count] = blocks in this launch
  int32_t count;
  uint8_t dtype[Capacity];
};

constexpr size_t kOtherArgumentBytes = sizeof(PenaltyScalars) + sizeof(double*);
static_assert(sizeof(LaunchTable<kSmallTable>) + kOtherArgumentBytes <= 4096,
              "the small table must fit the classic 4 KB argument limit");
static_assert(sizeof(LaunchTable<kLargeTable>) + kOtherArgumentBytes <= 32764,
              "the large table must fit the 32 KB argument limit of CUDA 12.1+");

template <typename T, PenaltyMode M, int Capacity>
__device__ __forceinline__ void run_chunk(const LaunchTable<Capacity>& table, const PenaltyScalars& scalars, int t,
                                          int64_t begin, int64_t len, double& s1, double& s2) {
  using A = typename ComputeType<T>::type;
  A c1, c2x2;
  penalty_coefficients<A>(M, scalars, c1, c2x2);
  const T* w = static_cast<const T*>(table.param[t]) + begin;
  T* g = table.grad[t] == nullptr ? nullptr : static_cast<T*>(table.grad[t]) + begin;
  penalty_chunk<T, M>(w, g, len, c1, c2x2, s1, s2, threadIdx.x);
}

template <PenaltyMode M, int Capacity>
__global__ void __launch_bounds__(kThreads, 4)
    penalty_kernel(const __grid_constant__ LaunchTable<Capacity> table, const __grid_constant__ PenaltyScalars scalars,
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

template <int Capacity>
void launch(const PenaltyTensor* tensors, const PenaltyLaunch& plan, const PenaltyScalars& scalars, PenaltyMode mode,
            double* partials, cudaStream_t stream) {
  LaunchTable<Capacity> table;
  int32_t blocks = 0;
  int c = 0;
  for (int64_t i = plan.begin; i < plan.end; ++i) {
    const PenaltyTensor& tensor = tensors[i];
    if (tensor.numel == 0) continue;
    table.param[c] = tensor.param;
    table.grad[c] = tensor.grad;
    table.numel[c] = tensor.numel;
    table.dtype[c] = static_cast<uint8_t>(tensor.dtype);
    table.first_block[c] = blocks;
    blocks += static_cast<int32_t>(penalty_cuda_chunks(tensor.numel));
    ++c;
  }
  table.first_block[c] = blocks;
  table.count = c;
  table.partial_base = plan.partial_base;
  switch (mode) {
    case PenaltyMode::Value:
      penalty_kernel<PenaltyMode::Value, Capacity><<<blocks, kThreads, 0, stream>>>(table, scalars, partials);
      break;
    case PenaltyMode::Accumulate:
      penalty_kernel<PenaltyMode::Accumulate, Capacity><<<blocks, kThreads, 0, stream>>>(table, scalars, partials);
      break;
    case PenaltyMode::Backward:
      penalty_kernel<PenaltyMode::Backward, Capacity><<<blocks, kThreads, 0, stream>>>(table, scalars, partials);
      break;
  }
}

// The 512-tensor table needs a driver that takes 32 KB arguments (CUDA 12.1, driver 530): a
// newer toolkit may run on an older driver. FASTREG_CUDA_LARGE_KERNEL_ARGS=0 turns it off, to
// compare the two or to get around a driver that misreports.
bool large_table_usable() {
#if FASTREG_PENALTY_LARGE_TABLE
  static const bool usable = [] {
    const char* setting = std::getenv("FASTREG_CUDA_LARGE_KERNEL_ARGS");
    if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
    int driver = 0;
    return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12010;
  }();
  return usable;
#else
  return false;
#endif
}

int64_t nonempty_tensors(const PenaltyTensor* tensors, int64_t count) {
  int64_t n = 0;
  for (int64_t i = 0; i < count; ++i) n += tensors[i].numel != 0;
  return n;
}

}  // namespace

int64_t weight_penalty_cuda_blocks(const PenaltyTensor* tensors, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) blocks += penalty_cuda_chunks(tensors[i].numel);
  return blocks;
}

const char* weight_penalty_cuda(const PenaltyTensor* tensors, int64_t count, PenaltyMode mode, const PenaltyScalars& scalars,
                                double* partials, void* value_out, DType value_dtype, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  // The small table whenever it is enough: fewer argument bytes to copy per launch.
  const bool large = nonempty_tensors(tensors, count) > kSmallTable && large_table_usable();
  const char* error = nullptr;
  int64_t slots = 0;
  if (large) {
#if FASTREG_PENALTY_LARGE_TABLE
    error = for_each_penalty_launch(tensors, count, kLargeTable, kMaxBlocksPerLaunch, [&](const PenaltyLaunch& plan) {
      launch<kLargeTable>(tensors, plan, scalars, mode, partials, cuda_stream);
      slots = plan.partial_base + plan.blocks;
    });
#endif
  } else {
    error = for_each_penalty_launch(tensors, count, kSmallTable, kMaxBlocksPerLaunch, [&](const PenaltyLaunch& plan) {
      launch<kSmallTable>(tensors, plan, scalars, mode, partials, cuda_stream);
      slots = plan.partial_base + plan.blocks;
    });
  }
  if (error != nullptr) return error;
  if (mode != PenaltyMode::Backward) {
    // slots == 0 (only empty tensors) still writes the value: 0
    penalty_final_kernel<<<1, kFinalThreads, 0, cuda_stream>>>(partials, slots, scalars.l1, scalars.l2, value_out,
                                                              value_dtype);
  }
  const cudaError_t launch_error = cudaGetLastError();
  return launch_error == cudaSuccess ? nullptr : cudaGetErrorString(launch_error);
}

}  // namespace fastreg
