// The CUDA weight-penalty kernel's per-thread code (weight_penalty_chunk.h), built for the
// host and run for every thread of a block, against the CPU kernel: gradients byte for byte
// (with guard bytes), S1 and S2 to rounding (the two sum in different orders), for every dtype
// and mode, chunk lengths with tails, and parameters and gradients aligned or not.
// The block reduction, the launch table and the final sum are left to the GPU tests.

#include "../common/no_fp_contract.h"  // as in the CPU kernel: the device never fuses either

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "host_device_support.h"  // before weight_penalty_chunk.h: the host conversions

#include "../weight_penalty/weight_penalty_chunk.h"
#include "../weight_penalty/weight_penalty_kernels.h"
#include "check.h"

using namespace fastreg;

namespace {

using Buffer = fastreg_test::GuardedBuffer;

template <typename T>
void fill(uint8_t* where, int64_t n, double (*value)(int64_t)) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = static_cast<T>(value(i));
    std::memcpy(where + i * sizeof(T), &v, sizeof(T));
  }
}

double weight_at(int64_t i) { return 0.0625 * static_cast<double>(i % 13 - 6); }  // zeros and both signs
double grad_at(int64_t i) { return 0.1 * static_cast<double>(i % 7) - 0.3; }

struct Sums {
  double s1 = 0.0, s2 = 0.0;
};

// One chunk as a CUDA block does it: every thread's share, each thread's sums kept apart.
template <typename T, PenaltyMode M>
Sums run_block(const T* w, T* g, int64_t len, const PenaltyScalars& scalars) {
  using A = typename ComputeType<T>::type;
  A c1, c2x2;
  penalty_coefficients<A>(M, scalars, c1, c2x2);
  Sums total;
  for (uint32_t thread = 0; thread < kPenaltyThreads; ++thread) {
    double s1 = 0.0, s2 = 0.0;
    penalty_chunk<T, M>(w, g, len, c1, c2x2, s1, s2, thread);
    total.s1 += s1;
    total.s2 += s2;
  }
  return total;
}

template <typename T>
Sums run_block(PenaltyMode mode, const T* w, T* g, int64_t len, const PenaltyScalars& scalars) {
  switch (mode) {
    case PenaltyMode::Value: return run_block<T, PenaltyMode::Value>(w, g, len, scalars);
    case PenaltyMode::Accumulate: return run_block<T, PenaltyMode::Accumulate>(w, g, len, scalars);
    case PenaltyMode::Backward: return run_block<T, PenaltyMode::Backward>(w, g, len, scalars);
  }
  return {};
}

bool close(double got, double want, double rtol) { return std::fabs(got - want) <= rtol * std::fabs(want) + 1e-300; }

template <typename T>
void check_type(const char* type, DType dtype, double rtol) {
  const int64_t lengths[] = {1, 3, 8, 9, 31, 1000, kPenaltyChunkCuda - 1, kPenaltyChunkCuda};
  const PenaltyMode modes[] = {PenaltyMode::Value, PenaltyMode::Accumulate, PenaltyMode::Backward};
  const double coefficients[][2] = {{0.3, 0.7}, {0.0, 0.5}, {0.25, 0.0}};
  const float grad_output = 1.5f;
  const double grad_output64 = 0.1;  // a list with a float64 tensor: the value, and so go, is float64
  for (const int64_t len : lengths) {
    for (const PenaltyMode mode : modes) {
      for (const auto& l : coefficients) {
        for (const size_t w_shift : {size_t{0}, sizeof(T)}) {
          for (const size_t g_shift : {size_t{0}, sizeof(T)}) {
            for (const bool go64 : {false, true}) {
              const std::string what = std::string(type) + " len=" + std::to_string(len) +
                                       " mode=" + std::to_string(static_cast<int>(mode)) + " l1=" + std::to_string(l[0]) +
                                       " l2=" + std::to_string(l[1]) + " shifts=" + std::to_string(w_shift) + "," +
                                       std::to_string(g_shift) + (go64 ? " go=float64" : " go=float32");
              const size_t bytes = static_cast<size_t>(len) * sizeof(T);
              Buffer w(bytes), g_cpu(bytes), g_block(bytes);
              fill<T>(w.at(w_shift), len, weight_at);
              fill<T>(g_cpu.at(g_shift), len, grad_at);
              fill<T>(g_block.at(g_shift), len, grad_at);
              const bool writes = mode != PenaltyMode::Value;
              const PenaltyScalars scalars = go64 ? PenaltyScalars{l[0], l[1], &grad_output64, DType::Float64}
                                                  : PenaltyScalars{l[0], l[1], &grad_output, DType::Float32};

              const PenaltyTensor tensor{w.at(w_shift), writes ? g_cpu.at(g_shift) : nullptr, len, dtype};
              double cpu[2] = {0.0, 0.0};
              weight_penalty_range_cpu(tensor, mode, scalars, 0, len, cpu);
              const Sums block = run_block<T>(mode, reinterpret_cast<const T*>(w.at(w_shift)),
                                              writes ? reinterpret_cast<T*>(g_block.at(g_shift)) : nullptr, len, scalars);

              if (g_cpu.window() != g_block.window()) fastreg_test::fail(__FILE__, __LINE__, what + ": gradient bytes differ");
              if (mode != PenaltyMode::Backward && !(close(block.s1, cpu[0], rtol) && close(block.s2, cpu[1], rtol))) {
                fastreg_test::fail(__FILE__, __LINE__,
                                   what + ": sums " + std::to_string(block.s1) + ", " + std::to_string(block.s2) +
                                       " vs the CPU's " + std::to_string(cpu[0]) + ", " + std::to_string(cpu[1]));
              }
            }
          }
        }
      }
    }
  }
}

// Backward forms go * l in the value's dtype, then rounds it to the compute type, as autograd
// does on the naive formula: float(double(go) * l1) for a float32 tensor in a list with a
// float64 one, which is not float(go) * float(l1) for these numbers.
FASTREG_TEST(weight_penalty_cuda_chunk_backward_coefficients_are_formed_in_the_value_dtype) {
  const double go64 = 0.1, l1 = 0.3, l2 = 0.7;
  const float go32 = 0.1f;
  float c1 = 0.0f, c2x2 = 0.0f;
  penalty_coefficients<float>(PenaltyMode::Backward, PenaltyScalars{l1, l2, &go64, DType::Float64}, c1, c2x2);
  FASTREG_CHECK(c1 == static_cast<float>(go64 * l1));
  FASTREG_CHECK(c2x2 == 2.0f * static_cast<float>(go64 * l2));
  FASTREG_CHECK(c1 != static_cast<float>(go64) * static_cast<float>(l1));
  penalty_coefficients<float>(PenaltyMode::Backward, PenaltyScalars{l1, l2, &go32, DType::Float32}, c1, c2x2);
  FASTREG_CHECK(c1 == go32 * static_cast<float>(l1));
  FASTREG_CHECK(c2x2 == 2.0f * (go32 * static_cast<float>(l2)));
  double d1 = 0.0, d2x2 = 0.0;
  penalty_coefficients<double>(PenaltyMode::Backward, PenaltyScalars{l1, l2, &go64, DType::Float64}, d1, d2x2);
  FASTREG_CHECK(d1 == go64 * l1 && d2x2 == 2.0 * (go64 * l2));
}

FASTREG_TEST(weight_penalty_cuda_chunk_matches_cpu_float) { check_type<float>("float32", DType::Float32, 1e-6); }
FASTREG_TEST(weight_penalty_cuda_chunk_matches_cpu_double) { check_type<double>("float64", DType::Float64, 1e-13); }
FASTREG_TEST(weight_penalty_cuda_chunk_matches_cpu_half) { check_type<c10::Half>("float16", DType::Float16, 1e-6); }
FASTREG_TEST(weight_penalty_cuda_chunk_matches_cpu_bfloat16) {
  check_type<c10::BFloat16>("bfloat16", DType::BFloat16, 1e-6);
}

}  // namespace
