// The CUDA batch-norm element-wise kernels (batch_norm_elemt.h: arguments, launch plans and
// per-thread code), built for the host and run for every thread of every block of the grid
// they would launch, against the CPU kernels: the same output bytes (with guard bytes) for
// forward, training backward and eval backward, every dtype, NCHW-like layouts (inner sizes
// that packs fit and straddle, several tiles) and channels-last ones (several channel tiles
// and row blocks), with and without weight and bias, aligned or not. The statistics kernels
// (shared memory, shuffles) and the device conversions are left to the GPU tests.

#include "../common/no_fp_contract.h"  // as in the CPU kernels: the device never fuses either

#include <cstring>
#include <string>
#include <vector>

#include "host_device_support.h"  // before batch_norm_elemt.h: the host conversions

#include "../batch_norm/batch_norm_elemt.h"
#include "../batch_norm/batch_norm_kernels.h"
#include "check.h"

using namespace fastreg;
using namespace fastreg::bn_cuda;

namespace {

using Buffer = fastreg_test::GuardedBuffer;

// The grid launch_flat / launch_cl would run, block by block, thread by thread.
template <typename T, int V, Mode M>
void run_grid_width(ElemtArgs a) {
  if (a.inner == 1) {
    const ClGrid grid = elemt_cl_plan<V>(a);
    for (int64_t tile = 0; tile < grid.tiles; ++tile) {
      for (int64_t row_block = 0; row_block < grid.row_blocks; ++row_block) {
        for (uint32_t thread = 0; thread < kThreads; ++thread) {
          elemt_cl_thread<T, V, M>(a, static_cast<uint32_t>(tile), row_block, thread);
        }
      }
    }
  } else {
    const int64_t tiles = elemt_flat_plan<V>(a);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      for (uint32_t thread = 0; thread < kThreads; ++thread) elemt_flat_thread<T, V, M>(a, tile, thread);
    }
  }
}

// batch_norm_elemt_cuda.cu's launch(): the same early exit and choice of pack width.
template <typename T, Mode M>
void run_grid(ElemtArgs a, const BatchNormLayout& layout) {
  if (layout.numel() == 0 || layout.channels == 0) return;
  elemt_set_layout(a, layout);
  if (elemt_vectorized<T, M>(a)) {
    run_grid_width<T, kVec<T>, M>(a);
  } else {
    run_grid_width<T, 1, M>(a);
  }
}

template <typename X>
void fill(uint8_t* where, int64_t n, double (*value)(int64_t)) {
  for (int64_t i = 0; i < n; ++i) {
    const X v = static_cast<X>(value(i));
    std::memcpy(where + i * sizeof(X), &v, sizeof(X));
  }
}

double x_at(int64_t i) { return 0.37 * static_cast<double>(i % 23) - 3.1; }
double dy_at(int64_t i) { return 0.11 * static_cast<double>(i % 17) - 0.8; }
double mean_at(int64_t c) { return 0.05 * static_cast<double>(c % 11) - 0.2; }
double invstd_at(int64_t c) { return 0.5 + 0.125 * static_cast<double>(c % 5); }
double weight_at(int64_t c) { return 1.5 - 0.0625 * static_cast<double>(c % 9); }
double bias_at(int64_t c) { return 0.03 * static_cast<double>(c % 7) - 0.1; }
double sum_dy_at(int64_t c) { return 2.5 - 0.7 * static_cast<double>(c % 6); }
double sum_dy_xmu_at(int64_t c) { return 0.9 * static_cast<double>(c % 4) - 1.3; }

enum class Kind { Forward, BackwardTrain, BackwardEval };

template <typename T>
void check_case(const char* type, DType dtype, const BatchNormLayout& layout, Kind kind, bool affine_given,
                size_t shift) {
  using A = typename ComputeType<T>::type;
  const int64_t n = layout.numel(), C = layout.channels;
  const std::string what = std::string(type) + " (" + std::to_string(layout.outer) + "," + std::to_string(C) + "," +
                           std::to_string(layout.inner) + ") kind=" + std::to_string(static_cast<int>(kind)) +
                           (affine_given ? " affine" : "") + " shift=" + std::to_string(shift);
  Buffer x(n * sizeof(T)), dy(n * sizeof(T)), out_cpu(n * sizeof(T)), out_grid(n * sizeof(T));
  fill<T>(x.at(shift), n, x_at);
  fill<T>(dy.at(shift), n, dy_at);
  std::vector<A> mean(C), invstd(C), weight(C), bias(C), sum_dy(C), sum_dy_xmu(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<A>(mean_at(c));
    invstd[c] = static_cast<A>(invstd_at(c));
    weight[c] = static_cast<A>(weight_at(c));
    bias[c] = static_cast<A>(bias_at(c));
    sum_dy[c] = static_cast<A>(sum_dy_at(c));
    sum_dy_xmu[c] = static_cast<A>(sum_dy_xmu_at(c));
  }
  const BatchNormAffine affine{mean.data(), invstd.data(), affine_given ? weight.data() : nullptr,
                               affine_given ? bias.data() : nullptr};
  const int64_t count = layout.count() > 0 ? layout.count() : 1;
  void* cpu_out = out_cpu.at(shift);
  void* grid_out = out_grid.at(shift);
  switch (kind) {
    case Kind::Forward:
      batch_norm_elemt_cpu(layout, dtype, x.at(shift), cpu_out, affine);
      run_grid<T, Mode::Forward>(elemt_forward_args(x.at(shift), grid_out, affine), layout);
      break;
    case Kind::BackwardTrain:
      batch_norm_backward_elemt_cpu(layout, dtype, dy.at(shift), x.at(shift), cpu_out, affine, sum_dy.data(),
                                    sum_dy_xmu.data(), count);
      run_grid<T, Mode::BackwardTrain>(
          elemt_backward_args(dy.at(shift), x.at(shift), grid_out, affine, sum_dy.data(), sum_dy_xmu.data(), count),
          layout);
      break;
    case Kind::BackwardEval:
      batch_norm_backward_elemt_cpu(layout, dtype, dy.at(shift), x.at(shift), cpu_out, affine, nullptr, nullptr, count);
      run_grid<T, Mode::BackwardEval>(
          elemt_backward_args(dy.at(shift), x.at(shift), grid_out, affine, nullptr, nullptr, count), layout);
      break;
  }
  if (out_cpu.window() != out_grid.window()) fastreg_test::fail(__FILE__, __LINE__, what + ": output bytes differ");
}

template <typename T>
void check_type(const char* type, DType dtype) {
  const BatchNormLayout layouts[] = {
      // NCHW-like: packs inside rows, packs across rows (inner % V != 0, inner < V), several tiles
      {2, 3, 16}, {2, 3, 5}, {4, 7, 2}, {3, 5, 7}, {2, 64, 49}, {1, 3, 4097}, {1, 1, 1000}, {0, 3, 4},
      // channels-last: C under, at and over a tile's width, several row blocks
      {10, 3, 1}, {7, 8, 1}, {600, 130, 1}, {3, 1000, 1}, {9000, 4, 1}, {1, 1, 1}};
  for (const BatchNormLayout& layout : layouts) {
    for (const Kind kind : {Kind::Forward, Kind::BackwardTrain, Kind::BackwardEval}) {
      for (const bool affine_given : {true, false}) {
        for (const size_t shift : {size_t{0}, sizeof(T)}) check_case<T>(type, dtype, layout, kind, affine_given, shift);
      }
    }
  }
}

FASTREG_TEST(batch_norm_cuda_elemt_matches_cpu_float) { check_type<float>("float32", DType::Float32); }
FASTREG_TEST(batch_norm_cuda_elemt_matches_cpu_double) { check_type<double>("float64", DType::Float64); }
FASTREG_TEST(batch_norm_cuda_elemt_matches_cpu_half) { check_type<c10::Half>("float16", DType::Float16); }
FASTREG_TEST(batch_norm_cuda_elemt_matches_cpu_bfloat16) { check_type<c10::BFloat16>("bfloat16", DType::BFloat16); }

// The grids cover what the tests above need: several flat tiles, channel tiles and row blocks.
FASTREG_TEST(batch_norm_cuda_elemt_grids_have_several_blocks) {
  ElemtArgs flat{};
  elemt_set_layout(flat, BatchNormLayout{1, 3, 4097});
  FASTREG_CHECK(elemt_flat_plan<4>(flat) >= 3);
  ElemtArgs rows{};
  elemt_set_layout(rows, BatchNormLayout{9000, 4, 1});
  FASTREG_CHECK(elemt_cl_plan<4>(rows).row_blocks >= 2);
  ElemtArgs tiles{};
  elemt_set_layout(tiles, BatchNormLayout{600, 130, 1});
  const ClGrid grid = elemt_cl_plan<4>(tiles);
  FASTREG_CHECK(grid.tiles >= 2 && grid.row_blocks >= 2);
}

}  // namespace
