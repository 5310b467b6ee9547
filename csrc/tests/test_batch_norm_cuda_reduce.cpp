// The CUDA batch-norm reductions' per-thread code (batch_norm_reduce.h), built for the host and
// run for every thread of every block of the grid reduce_plan gives, against the CPU kernels.
// The block and split merges are done here in double (the device's shuffle trees merge in
// another fixed order), so the statistics agree to rounding, and the counts exactly: every
// element was read once. Covered: statistics and backward sums, every dtype, NCHW-like layouts
// (vector and scalar packs, several splits) and channels-last ones (several channel tiles,
// splits), aligned or not. The device's block merges and finalize kernels need the GPU tests.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "host_device_support.h"  // before batch_norm_reduce.h: the host conversions

#include "../batch_norm/batch_norm_kernels.h"
#include "../batch_norm/batch_norm_reduce.h"
#include "check.h"

using namespace fastreg;
using namespace fastreg::bn_cuda;

namespace {

using Buffer = fastreg_test::GuardedBuffer;

struct Sums {
  double dy = 0.0, dy_xmu = 0.0;
};

// Per channel: the merged statistics (forward) or sums (backward) of every block and thread.
struct Reduced {
  std::vector<Welford> stats;
  std::vector<Sums> sums;
};

template <typename T, int V, bool Vector, bool Backward>
void run_grid(const ReducePlan& p, const ReduceArgs& a, Reduced& out) {
  using A = Acc<T>;
  const int64_t C = a.channels;
  const int tc = 1 << a.log2_tc;
  for (int64_t tile = 0; tile < p.tiles; ++tile) {
    for (int64_t s = 0; s < p.splits; ++s) {
      for (uint32_t thread = 0; thread < kThreads; ++thread) {
        if (p.channels_last) {
          ClThreadState<A, V> t;
          reduce_cl_thread<T, V, Vector, Backward>(a, static_cast<uint32_t>(tile), s, thread, t);
          const int64_t col = thread & (tc - 1);
          for (int v = 0; v < V; ++v) {
            const int64_t c = (tile * tc + col) * V + v;
            if (c >= C) continue;
            if (Backward) {
              out.sums[c].dy += t.sdy[v];
              out.sums[c].dy_xmu += t.sdyx[v];
            } else {
              const Welford w{static_cast<double>(t.n), static_cast<double>(t.shift[v]) + static_cast<double>(t.d[v]),
                              static_cast<double>(t.m2[v])};
              out.stats[c] = merge(out.stats[c], w);
            }
          }
        } else {
          Running<A> st;
          double dy = 0.0, dy_xmu = 0.0;
          reduce_nchw_thread<T, V, Vector, Backward>(a, tile, s, thread, st, dy, dy_xmu);
          out.sums[tile].dy += dy;
          out.sums[tile].dy_xmu += dy_xmu;
          if (!Backward) out.stats[tile] = merge(out.stats[tile], st.to_double());
        }
      }
    }
  }
}

// batch_norm_reduce_cuda.cu's launch_reduce_typed: the same choice of pack width and loads.
template <typename T, bool Backward>
void run_reduce(const ReducePlan& p, const ReduceArgs& a, Reduced& out) {
  if (p.vec == 1) {
    run_grid<T, 1, false, Backward>(p, a, out);
  } else if (reduce_vector_loads(p, a, Backward)) {
    run_grid<T, kVec<T>, true, Backward>(p, a, out);
  } else {
    run_grid<T, kVec<T>, false, Backward>(p, a, out);
  }
}

template <typename X>
void fill(uint8_t* where, int64_t n, double (*value)(int64_t)) {
  for (int64_t i = 0; i < n; ++i) {
    const X v = static_cast<X>(value(i));
    std::memcpy(where + i * sizeof(X), &v, sizeof(X));
  }
}

double x_at(int64_t i) { return 3.0 + 0.37 * static_cast<double>(i % 23) - 0.011 * static_cast<double>(i % 101); }
double dy_at(int64_t i) { return 0.11 * static_cast<double>(i % 17) - 0.8; }

bool close(double got, double want, double tol) { return std::fabs(got - want) <= tol; }

template <typename T>
void check_case(const char* type, DType dtype, const BatchNormLayout& layout, size_t shift, double rtol) {
  using A = Acc<T>;
  const int64_t n = layout.numel(), C = layout.channels, count = layout.count();
  const std::string what = std::string(type) + " (" + std::to_string(layout.outer) + "," + std::to_string(C) + "," +
                           std::to_string(layout.inner) + ") shift=" + std::to_string(shift);
  Buffer x(n * sizeof(T)), dy(n * sizeof(T));
  fill<T>(x.at(shift), n, x_at);
  fill<T>(dy.at(shift), n, dy_at);
  const ReducePlan p = reduce_plan(layout, dtype);
  if (p.splits == 0) return;  // nothing to launch (an empty input)

  // Statistics.
  std::vector<A> mean_cpu(C), var_cpu(C);
  batch_norm_stats_cpu(layout, dtype, x.at(shift), mean_cpu.data(), var_cpu.data());
  Reduced fwd{std::vector<Welford>(C, Welford{0.0, 0.0, 0.0}), std::vector<Sums>(C)};
  run_reduce<T, false>(p, reduce_args(layout, p, x.at(shift), nullptr, nullptr, nullptr), fwd);
  for (int64_t c = 0; c < C; ++c) {
    const Welford& w = fwd.stats[c];
    const double var = w.n > 0.0 ? w.m2 / w.n : 0.0;
    const double spread = std::sqrt(static_cast<double>(var_cpu[c])) + std::fabs(static_cast<double>(mean_cpu[c]));
    if (w.n != static_cast<double>(count)) {
      fastreg_test::fail(__FILE__, __LINE__, what + ": channel " + std::to_string(c) + " counted " +
                                                 std::to_string(w.n) + " elements, not " + std::to_string(count));
    } else if (!close(w.mean, mean_cpu[c], rtol * spread) || !close(var, var_cpu[c], rtol * (var_cpu[c] + 1e-30))) {
      fastreg_test::fail(__FILE__, __LINE__, what + ": channel " + std::to_string(c) + " mean/var " +
                                                 std::to_string(w.mean) + "/" + std::to_string(var) + " vs the CPU's " +
                                                 std::to_string(mean_cpu[c]) + "/" + std::to_string(var_cpu[c]));
    }
  }

  // Backward sums around the CPU's mean.
  std::vector<A> sum_dy_cpu(C), sum_dy_xmu_cpu(C);
  batch_norm_backward_reduce_cpu(layout, dtype, dy.at(shift), x.at(shift), mean_cpu.data(), sum_dy_cpu.data(),
                                 sum_dy_xmu_cpu.data());
  Reduced bwd{std::vector<Welford>(C, Welford{0.0, 0.0, 0.0}), std::vector<Sums>(C)};
  run_reduce<T, true>(p, reduce_args(layout, p, x.at(shift), dy.at(shift), mean_cpu.data(), nullptr), bwd);
  const double scale = static_cast<double>(count) * 4.0;  // |dy| < 1, |x - mean| < 4: a bound on the sums' terms
  for (int64_t c = 0; c < C; ++c) {
    if (!close(bwd.sums[c].dy, sum_dy_cpu[c], rtol * scale) || !close(bwd.sums[c].dy_xmu, sum_dy_xmu_cpu[c], rtol * scale)) {
      fastreg_test::fail(__FILE__, __LINE__, what + ": channel " + std::to_string(c) + " backward sums " +
                                                 std::to_string(bwd.sums[c].dy) + "/" + std::to_string(bwd.sums[c].dy_xmu) +
                                                 " vs the CPU's " + std::to_string(sum_dy_cpu[c]) + "/" +
                                                 std::to_string(sum_dy_xmu_cpu[c]));
    }
  }
}

template <typename T>
void check_type(const char* type, DType dtype, double rtol) {
  const BatchNormLayout layouts[] = {
      // NCHW-like: vector packs, scalar packs (inner % V != 0), threads stepping across rows
      // (more packs per channel than threads), several splits
      {2, 3, 16}, {2, 3, 5}, {4, 7, 2}, {3, 5, 7}, {2, 64, 49}, {1, 3, 4097}, {1, 1, 1000}, {40, 3, 7},
      {16, 2, 100}, {300, 2, 33}, {1, 2, 100000}, {0, 3, 4},
      // channels-last: C under, at and over a tile's width; several splits
      {10, 3, 1}, {7, 8, 1}, {600, 130, 1}, {3, 1000, 1}, {9000, 4, 1}, {1, 1, 1}, {50000, 2, 1}};
  for (const BatchNormLayout& layout : layouts) {
    for (const size_t shift : {size_t{0}, sizeof(T)}) check_case<T>(type, dtype, layout, shift, rtol);
  }
}

FASTREG_TEST(batch_norm_cuda_reduce_matches_cpu_float) { check_type<float>("float32", DType::Float32, 1e-5); }
FASTREG_TEST(batch_norm_cuda_reduce_matches_cpu_double) { check_type<double>("float64", DType::Float64, 1e-12); }
FASTREG_TEST(batch_norm_cuda_reduce_matches_cpu_half) { check_type<c10::Half>("float16", DType::Float16, 1e-5); }
FASTREG_TEST(batch_norm_cuda_reduce_matches_cpu_bfloat16) {
  check_type<c10::BFloat16>("bfloat16", DType::BFloat16, 1e-5);
}

// The plans exercise what the tests above claim: several splits and channel tiles.
FASTREG_TEST(batch_norm_cuda_reduce_plans_have_several_blocks) {
  FASTREG_CHECK(reduce_plan(BatchNormLayout{1, 2, 100000}, DType::Float32).splits >= 2);
  FASTREG_CHECK(reduce_plan(BatchNormLayout{50000, 2, 1}, DType::Float32).splits >= 2);
  FASTREG_CHECK(reduce_plan(BatchNormLayout{600, 130, 1}, DType::Float32).tiles >= 2);
  FASTREG_CHECK(reduce_plan(BatchNormLayout{2, 3, 5}, DType::Float32).vec == 1);
}

}  // namespace
