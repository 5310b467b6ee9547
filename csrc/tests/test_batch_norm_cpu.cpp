// The CPU batch-norm kernels on small buffers: statistics against a two-pass sum in long double,
// element-wise results against the header's formulas evaluated here (bit for bit: same
// arithmetic in the compute type), every walk (NCHW, channels-last, small inner, one large
// channel), empty inputs, a large mean, and results that do not depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../batch_norm/batch_norm_kernels.h"
#include "check.h"

#include "../common/no_fp_contract.h"  // the kernels do not fuse; neither may the expected values

using namespace fastreg;

namespace {

// Deterministic pseudo-random values in [-1, 1) (an LCG: no <random> distribution differences).
struct Lcg {
  uint64_t state;
  double next() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) / static_cast<double>(1ULL << 52) - 1.0;
  }
};

template <typename T>
std::vector<T> values(int64_t n, uint64_t seed, double mean = 0.25, double scale = 2.0) {
  Lcg lcg{seed};
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(mean + scale * lcg.next());
  return v;
}

template <typename T>
double as_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
double as_double<double>(double v) {
  return v;
}

// Index of element (o, c, i) of the layout.
inline int64_t at(const BatchNormLayout& l, int64_t o, int64_t c, int64_t i) { return (o * l.channels + c) * l.inner + i; }

template <typename T>
void exact_stats(const BatchNormLayout& l, const std::vector<T>& x, int64_t c, double& mean, double& var) {
  long double sum = 0;
  for (int64_t o = 0; o < l.outer; ++o)
    for (int64_t i = 0; i < l.inner; ++i) sum += as_double(x[at(l, o, c, i)]);
  const long double mu = sum / l.count();
  long double sq = 0;
  for (int64_t o = 0; o < l.outer; ++o)
    for (int64_t i = 0; i < l.inner; ++i) {
      const long double d = as_double(x[at(l, o, c, i)]) - mu;
      sq += d * d;
    }
  mean = static_cast<double>(mu);
  var = static_cast<double>(sq / l.count());
}

bool close(double got, double want, double rtol, double atol) { return std::fabs(got - want) <= atol + rtol * std::fabs(want); }

template <typename T>
DType dtype_of();
template <>
DType dtype_of<float>() {
  return DType::Float32;
}
template <>
DType dtype_of<double>() {
  return DType::Float64;
}
template <>
DType dtype_of<c10::BFloat16>() {
  return DType::BFloat16;
}

// The layouts every test walks: NCHW-like, channels-last, a small inner (row walk with several
// columns per channel), a row whose width is not a whole number of vectors, one large channel
// (split across threads and into pieces), few channels with long runs, rows of whole vectors
// that the row walk cuts into register strips of every width (144 columns: strips and single
// vectors on AVX-512 and AVX2); an order walk with several units of rows and a partial slab of
// channels; last, two layouts whose float outputs pass 4 MB, so they are written with
// non-temporal stores, with runs and rows that start and end inside cache lines.
const BatchNormLayout kLayouts[] = {
    {4, 3, 37},    {2, 5, 1000}, {50, 7, 1},   {9, 64, 1},    {6, 4, 3},     {1, 1, 70001},
    {3, 2, 9000},  {1, 1, 1},    {2, 1, 5},    {33, 130, 1},  {300, 144, 1}, {70, 36, 4},
    {30, 40, 200}, {40, 7, 3737}, {52429, 5, 4},
};

template <typename T>
void check_forward(const BatchNormLayout& l, double rtol, double atol) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const std::vector<T> x = values<T>(l.numel(), 7 + l.numel());
  std::vector<A> w(l.channels), b(l.channels);
  for (int64_t c = 0; c < l.channels; ++c) {
    w[c] = static_cast<A>(0.5 + 0.25 * c);
    b[c] = static_cast<A>(0.125 * c - 1);
  }
  std::vector<A> mean(l.channels), var(l.channels), invstd(l.channels), mean2(l.channels), var2(l.channels);
  std::vector<T> y(l.numel());
  const double eps = 1e-5;
  batch_norm_train_forward_cpu(l, dtype_of<T>(), x.data(), y.data(), w.data(), b.data(), eps, mean.data(), var.data(),
                               invstd.data());
  batch_norm_stats_cpu(l, dtype_of<T>(), x.data(), mean2.data(), var2.data());
  int64_t wrong_stats = 0, wrong_y = 0;
  for (int64_t c = 0; c < l.channels; ++c) {
    double m, v;
    exact_stats(l, x, c, m, v);
    wrong_stats += !close(mean[c], m, rtol, atol) + !close(var[c], v, rtol, atol);
    wrong_stats += mean[c] != mean2[c] || var[c] != var2[c];
    wrong_stats += invstd[c] != A(1) / std::sqrt(var[c] + static_cast<A>(eps));
    const A a = invstd[c] * w[c];
    for (int64_t o = 0; o < l.outer; ++o)
      for (int64_t i = 0; i < l.inner; ++i) {
        const int64_t e = at(l, o, c, i);
        const T want = static_cast<T>((static_cast<A>(x[e]) - mean[c]) * a + b[c]);
        wrong_y += std::memcmp(&y[e], &want, sizeof(T)) != 0;
      }
  }
  FASTREG_CHECK_EQ(wrong_stats, int64_t{0});
  FASTREG_CHECK_EQ(wrong_y, int64_t{0});
}

template <typename T>
void check_backward(const BatchNormLayout& l, double rtol, double atol) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const std::vector<T> x = values<T>(l.numel(), 11 + l.numel());
  const std::vector<T> dy = values<T>(l.numel(), 13 + l.numel(), 0.0, 1.0);
  std::vector<A> mean(l.channels), invstd(l.channels), w(l.channels);
  for (int64_t c = 0; c < l.channels; ++c) {
    mean[c] = static_cast<A>(0.1 * c);
    invstd[c] = static_cast<A>(1.5 - 0.01 * c);
    w[c] = static_cast<A>(c % 2 ? -0.75 : 1.25);
  }
  const BatchNormAffine affine{mean.data(), invstd.data(), w.data(), nullptr};
  std::vector<A> sum_dy(l.channels), sum_dyx(l.channels), sum_dy2(l.channels), sum_dyx2(l.channels);
  std::vector<T> dx(l.numel()), dx_eval(l.numel()), dx_elemt(l.numel());
  batch_norm_backward_train_cpu(l, dtype_of<T>(), dy.data(), x.data(), dx.data(), affine, sum_dy.data(), sum_dyx.data());
  batch_norm_backward_reduce_cpu(l, dtype_of<T>(), dy.data(), x.data(), mean.data(), sum_dy2.data(), sum_dyx2.data());
  batch_norm_backward_elemt_cpu(l, dtype_of<T>(), dy.data(), x.data(), dx_eval.data(), affine, nullptr, nullptr, 0);
  const int64_t count = 3 * l.count();  // as SyncBatchNorm passes the global count
  batch_norm_backward_elemt_cpu(l, dtype_of<T>(), dy.data(), x.data(), dx_elemt.data(), affine, sum_dy.data(),
                                sum_dyx.data(), count);
  int64_t wrong_sums = 0, wrong_dx = 0;
  for (int64_t c = 0; c < l.channels; ++c) {
    long double s1 = 0, s2 = 0;
    for (int64_t o = 0; o < l.outer; ++o)
      for (int64_t i = 0; i < l.inner; ++i) {
        const int64_t e = at(l, o, c, i);
        s1 += as_double(dy[e]);
        s2 += as_double(dy[e]) * (as_double(x[e]) - static_cast<double>(mean[c]));
      }
    wrong_sums += !close(sum_dy[c], static_cast<double>(s1), rtol, atol) + !close(sum_dyx[c], static_cast<double>(s2), rtol, atol);
    wrong_sums += sum_dy[c] != sum_dy2[c] || sum_dyx[c] != sum_dyx2[c];
    const A scale = invstd[c] * w[c];
    for (const int64_t n : {l.count(), count}) {
      const A mean_dy = sum_dy[c] / static_cast<A>(n);
      const A proj = invstd[c] * invstd[c] * sum_dyx[c] / static_cast<A>(n);
      const std::vector<T>& got = n == l.count() ? dx : dx_elemt;
      for (int64_t o = 0; o < l.outer; ++o)
        for (int64_t i = 0; i < l.inner; ++i) {
          const int64_t e = at(l, o, c, i);
          const A g = static_cast<A>(dy[e]);
          const T want = static_cast<T>((g - mean_dy - (static_cast<A>(x[e]) - mean[c]) * proj) * scale);
          wrong_dx += std::memcmp(&got[e], &want, sizeof(T)) != 0;
          if (n == l.count()) {
            const T want_eval = static_cast<T>(g * scale);
            wrong_dx += std::memcmp(&dx_eval[e], &want_eval, sizeof(T)) != 0;
          }
        }
    }
  }
  FASTREG_CHECK_EQ(wrong_sums, int64_t{0});
  FASTREG_CHECK_EQ(wrong_dx, int64_t{0});
}

}  // namespace

FASTREG_TEST(batch_norm_cpu_forward_float) {
  for (const BatchNormLayout& l : kLayouts) check_forward<float>(l, 1e-6, 1e-7);
}

FASTREG_TEST(batch_norm_cpu_forward_double) {
  for (const BatchNormLayout& l : kLayouts) check_forward<double>(l, 1e-13, 1e-15);
}

FASTREG_TEST(batch_norm_cpu_forward_bfloat16) {
  for (const BatchNormLayout& l : kLayouts) check_forward<c10::BFloat16>(l, 1e-6, 1e-7);
}

FASTREG_TEST(batch_norm_cpu_backward_float) {
  for (const BatchNormLayout& l : kLayouts) check_backward<float>(l, 1e-6, 1e-6);
}

FASTREG_TEST(batch_norm_cpu_backward_double) {
  for (const BatchNormLayout& l : kLayouts) check_backward<double>(l, 1e-13, 1e-13);
}

FASTREG_TEST(batch_norm_cpu_backward_bfloat16) {
  for (const BatchNormLayout& l : kLayouts) check_backward<c10::BFloat16>(l, 1e-6, 1e-6);
}

// bfloat16 outputs are rounded to nearest even with NaN -> 0x7FC0, as c10::BFloat16(float),
// whatever instructions round them: here NaNs of both signs, infinities, the largest values
// (which overflow once scaled), ties, and products that are float32 subnormals sit among
// ordinary values, so some vectors hold specials and some hold none.
FASTREG_TEST(batch_norm_cpu_bfloat16_rounds_special_values) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            3.3895314e38f,  // the largest bfloat16
                            1e-38f,
                            -3e-39f,
                            1.0078125f,  // 1 + 2^-7: one bfloat16 step above 1
                            0.0f,
                            -0.0f};
  const BatchNormLayout layouts[] = {{3, 2, 1000}, {1000, 2, 1}};
  for (const BatchNormLayout& l : layouts) {
    std::vector<c10::BFloat16> x = values<c10::BFloat16>(l.numel(), 5);
    for (int64_t e = 0; e < l.numel(); e += 97) x[e] = c10::BFloat16(specials[(e / 97) % 10]);
    for (int64_t e = 500; e < 540; ++e) x[e] = c10::BFloat16(specials[e % 10]);  // runs of specials
    // Channel 0 halves values (1 + 2^-7 becomes a tie between two bfloat16) and makes 1e-38 a
    // float32 subnormal; channel 1 scales by a value with a long significand.
    const float mean[2] = {0.0f, 0.1f}, invstd[2] = {0.5f, 1.2345678f}, weight[2] = {1.0f, -0.987654f};
    const float bias[2] = {0.0f, 0.0f};
    const BatchNormAffine affine{mean, invstd, weight, bias};
    std::vector<c10::BFloat16> y(l.numel()), dx(l.numel());
    batch_norm_elemt_cpu(l, DType::BFloat16, x.data(), y.data(), affine);
    batch_norm_backward_elemt_cpu(l, DType::BFloat16, x.data(), x.data(), dx.data(), affine, nullptr, nullptr, 0);
    int64_t wrong = 0;
    for (int64_t o = 0; o < l.outer; ++o)
      for (int64_t c = 0; c < l.channels; ++c)
        for (int64_t i = 0; i < l.inner; ++i) {
          const int64_t e = (o * l.channels + c) * l.inner + i;
          const float a = invstd[c] * weight[c];
          const c10::BFloat16 want_y((static_cast<float>(x[e]) - mean[c]) * a + bias[c]);
          const c10::BFloat16 want_dx(static_cast<float>(x[e]) * a);
          wrong += y[e].x != want_y.x;
          wrong += dx[e].x != want_dx.x;
        }
    FASTREG_CHECK_EQ(wrong, int64_t{0});
  }
}

// Channels whose float32 statistics from batch_norm_stats_cpu miss the exact ones by more than
// (mean_rtol, mean_atol) or var_rtol.
namespace {
int64_t wrong_stats(const BatchNormLayout& l, const std::vector<float>& x, double mean_rtol, double mean_atol,
                    double var_rtol) {
  std::vector<float> mean(l.channels), var(l.channels);
  batch_norm_stats_cpu(l, DType::Float32, x.data(), mean.data(), var.data());
  int64_t wrong = 0;
  for (int64_t c = 0; c < l.channels; ++c) {
    double m, v;
    exact_stats(l, x, c, m, v);
    wrong += !close(mean[c], m, mean_rtol, mean_atol) + !close(var[c], v, var_rtol, 0);
  }
  return wrong;
}
}  // namespace

// 1e4 + U(-1, 1) in float: the variance (about 1/3) survives; sum(x^2) - sum(x)^2 would not.
FASTREG_TEST(batch_norm_cpu_stats_large_mean) {
  for (const BatchNormLayout& l : {BatchNormLayout{16, 8, 144}, BatchNormLayout{2304, 8, 1}, BatchNormLayout{1, 1, 100000}}) {
    FASTREG_CHECK_EQ(wrong_stats(l, values<float>(l.numel(), 3, 1e4, 1.0), 1e-7, 0, 1e-5), int64_t{0});
  }
}

// Data whose first rows sit far from the rest (sorted or shifted batches): a fixed shift taken
// from the first rows would leave float sums of (x - shift)^2 that cancel (a one-pass row walk
// failed this). Rows before `cut` are 1e3 + U(-1, 1), the others U(-1, 1).
FASTREG_TEST(batch_norm_cpu_stats_shifted_first_rows) {
  for (const BatchNormLayout& l : {BatchNormLayout{8192, 8, 1}, BatchNormLayout{3000, 37, 1}, BatchNormLayout{64, 4, 200},
                                   BatchNormLayout{6400, 64, 1}}) {
    std::vector<float> x = values<float>(l.numel(), 5, 0.0, 1.0);
    const int64_t cut = l.numel() / 50;
    for (int64_t e = 0; e < cut; ++e) x[e] += 1e3f;
    FASTREG_CHECK_EQ(wrong_stats(l, x, 1e-6, 1e-6, 1e-5), int64_t{0});
  }
}

// Rows alternating between +1e3 and -1e3 (+ U(-1, 1)) every `period` rows: the row walk shifts
// each block by the previous block's mean, so with a period of a block (16 to 128 rows) every
// shift is 2e3 off; the variance must keep its precision all the same.
FASTREG_TEST(batch_norm_cpu_stats_alternating_blocks) {
  for (const BatchNormLayout& l : {BatchNormLayout{4096, 64, 1}, BatchNormLayout{2048, 256, 1}, BatchNormLayout{6000, 40, 1}}) {
    for (const int64_t period : {1, 16, 64, 102, 128}) {
      std::vector<float> x = values<float>(l.numel(), 9, 0.0, 1.0);
      const int64_t width = l.channels * l.inner;
      for (int64_t e = 0; e < l.numel(); ++e) x[e] += (e / width / period) % 2 == 0 ? 1e3f : -1e3f;
      FASTREG_CHECK_EQ(wrong_stats(l, x, 1e-6, 1e-3, 1e-5), int64_t{0});
    }
  }
}

// Nothing to reduce: mean = var = 0, invstd = 1 / sqrt(eps), sums 0, nothing written.
FASTREG_TEST(batch_norm_cpu_empty) {
  const BatchNormLayout l{0, 3, 0};
  std::vector<float> mean(3, 9.f), var(3, 9.f), invstd(3, 9.f), sdy(3, 9.f), sdyx(3, 9.f);
  batch_norm_train_forward_cpu(l, DType::Float32, nullptr, nullptr, nullptr, nullptr, 0.25, mean.data(), var.data(),
                               invstd.data());
  const BatchNormAffine affine{mean.data(), invstd.data(), nullptr, nullptr};
  batch_norm_backward_train_cpu(l, DType::Float32, nullptr, nullptr, nullptr, affine, sdy.data(), sdyx.data());
  batch_norm_elemt_cpu(l, DType::Float32, nullptr, nullptr, affine);
  batch_norm_backward_elemt_cpu(l, DType::Float32, nullptr, nullptr, nullptr, affine, sdy.data(), sdyx.data(), 0);
  int64_t wrong = 0;
  for (int c = 0; c < 3; ++c) wrong += mean[c] != 0.f || var[c] != 0.f || invstd[c] != 2.f || sdy[c] != 0.f || sdyx[c] != 0.f;
  FASTREG_CHECK_EQ(wrong, int64_t{0});
}

// Fixed blocks merged in a fixed order: one thread and two give the same bits.
FASTREG_TEST(batch_norm_cpu_independent_of_threads) {
  const int before = at::get_num_threads();
  for (const BatchNormLayout& l : {BatchNormLayout{4, 3, 5000}, BatchNormLayout{3000, 24, 1}, BatchNormLayout{1, 1, 90001},
                                   BatchNormLayout{30, 40, 200}}) {
    const std::vector<float> x = values<float>(l.numel(), 5), dy = values<float>(l.numel(), 6);
    std::vector<float> out[2][5];
    std::vector<float> y[2], dx[2];
    for (int run = 0; run < 2; ++run) {
      at::set_num_threads(run == 0 ? 1 : 2);
      for (auto& v : out[run]) v.assign(l.channels, 0.f);
      y[run].assign(l.numel(), 0.f);
      dx[run].assign(l.numel(), 0.f);
      batch_norm_train_forward_cpu(l, DType::Float32, x.data(), y[run].data(), nullptr, nullptr, 1e-5,
                                   out[run][0].data(), out[run][1].data(), out[run][2].data());
      const BatchNormAffine affine{out[run][0].data(), out[run][2].data(), nullptr, nullptr};
      batch_norm_backward_train_cpu(l, DType::Float32, dy.data(), x.data(), dx[run].data(), affine, out[run][3].data(),
                                    out[run][4].data());
    }
    bool same = y[0] == y[1] && dx[0] == dx[1];
    for (int k = 0; k < 5; ++k) same = same && out[0][k] == out[1][k];
    FASTREG_CHECK(same);
  }
  at::set_num_threads(before);
}
