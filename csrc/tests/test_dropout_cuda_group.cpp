// The CUDA dropout kernel's per-group code (dropout_group.h), built for the host, against the
// CPU kernel: the same output and mask bytes for every dtype, mask mode, tail length, p, in
// place or not, aligned or not. This covers the CUDA kernel's indexing, tails and mask handling
// on machines without a GPU; the device conversions (compute_type_cuda.cuh) and the grid loop
// are what it leaves to the GPU tests.
#include <cstring>
#include <string>
#include <vector>

#include "host_device_support.h"  // before dropout_group.h: the host conversions

#include "../dropout/dropout_group.h"
#include "../dropout/dropout_kernels.h"
#include "check.h"

using namespace fastreg;

namespace {

constexpr DropoutRngState kRng{0x0123456789abcdefULL, 40};

int64_t groups_of(int64_t n) { return (n + kDropoutGroup - 1) / kDropoutGroup; }

using Buffer = fastreg_test::GuardedBuffer;

// What the CUDA grid does, group by group (in reverse: the groups must be independent).
template <typename T, bool Backward>
void run_groups(const DropoutArgs& args) {
  using A = typename ComputeType<T>::type;
  const A scale = sizeof(T) == 8 ? static_cast<A>(args.scale_f64) : static_cast<A>(args.scale);
  const bool aligned = dropout_groups_aligned(args);
  for (int64_t g = groups_of(args.n) - 1; g >= 0; --g) {
    if (aligned) {
      dropout_group<T, Backward, true>(args, kRng, scale, g);
    } else {
      dropout_group<T, Backward, false>(args, kRng, scale, g);
    }
  }
}

struct Case {
  int64_t n;
  MaskMode mode;
  double p;
  size_t misalign;  // bytes added to the data (and bool mask) addresses
  bool in_place;
};

std::string describe(const char* type, const Case& c, const char* what) {
  return std::string(type) + " n=" + std::to_string(c.n) + " mode=" + std::to_string(static_cast<int>(c.mode)) +
         " p=" + std::to_string(c.p) + " misalign=" + std::to_string(c.misalign) +
         (c.in_place ? " in place" : "") + ": " + what;
}

// One implementation's buffers: input (also the output in place), output, mask.
struct Run {
  Buffer data_in, data_out, mask;
  DropoutArgs args{};

  Run(const Case& c, DType dtype, size_t element, const std::vector<uint8_t>& input,
      const std::vector<uint8_t>& mask_in)
      : data_in(c.n * element), data_out(c.n * element), mask(c.n) {
    std::memcpy(data_in.at(c.misalign), input.data(), input.size());
    if (!mask_in.empty()) std::memcpy(mask.at(c.misalign), mask_in.data(), mask_in.size());
    args.input = data_in.at(c.misalign);
    args.output = c.in_place ? data_in.at(c.misalign) : data_out.at(c.misalign);
    args.mask = c.mode == MaskMode::Regenerate ? nullptr : mask.at(c.misalign);
    args.n = c.n;
    args.dtype = dtype;
    args.mask_mode = c.mode;
    args.threshold = dropout_keep_threshold(c.p);
    args.scale_f64 = dropout_scale(args.threshold);
    args.scale = static_cast<float>(args.scale_f64);
  }

  bool same_bytes(Run& other) {
    return data_in.window() == other.data_in.window() && data_out.window() == other.data_out.window() &&
           mask.window() == other.mask.window();
  }
};

template <typename T>
std::vector<uint8_t> ramp_bytes(int64_t n, double step) {
  std::vector<T> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<T>(step * static_cast<double>(i % 97) - 3.0);
  std::vector<uint8_t> bytes(n * sizeof(T));
  std::memcpy(bytes.data(), v.data(), bytes.size());
  return bytes;
}

template <typename T>
void check_type(const char* type, DType dtype) {
  const int64_t sizes[] = {0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1001};
  const MaskMode modes[] = {MaskMode::Regenerate, MaskMode::Bits, MaskMode::Bool};
  const double ps[] = {0.0, 0.3, 1.0};
  for (const int64_t n : sizes) {
    const std::vector<uint8_t> input = ramp_bytes<T>(n, 0.0625);
    const std::vector<uint8_t> grad = ramp_bytes<T>(n, -0.125);
    for (const MaskMode mode : modes) {
      for (const double p : ps) {
        for (const size_t misalign : {size_t{0}, sizeof(T)}) {
          for (const bool in_place : {false, true}) {
            const Case c{n, mode, p, misalign, in_place};
            Run cpu(c, dtype, sizeof(T), input, {});
            Run group(c, dtype, sizeof(T), input, {});
            dropout_forward_cpu(cpu.args, kRng, 0, groups_of(n));
            run_groups<T, false>(group.args);
            if (!cpu.same_bytes(group)) {
              fastreg_test::fail(__FILE__, __LINE__, describe(type, c, "forward bytes differ"));
            }

            // Backward from the forward's mask (the CPU one: the two are equal when forward passed).
            std::vector<uint8_t> mask;
            if (mode == MaskMode::Bits) mask.assign(cpu.mask.at(misalign), cpu.mask.at(misalign) + groups_of(n));
            if (mode == MaskMode::Bool) mask.assign(cpu.mask.at(misalign), cpu.mask.at(misalign) + n);
            Run cpu_back(c, dtype, sizeof(T), grad, mask);
            Run group_back(c, dtype, sizeof(T), grad, mask);
            dropout_backward_cpu(cpu_back.args, kRng, 0, groups_of(n));
            run_groups<T, true>(group_back.args);
            if (!cpu_back.same_bytes(group_back)) {
              fastreg_test::fail(__FILE__, __LINE__, describe(type, c, "backward bytes differ"));
            }
          }
        }
      }
    }
  }
}

FASTREG_TEST(dropout_cuda_group_matches_cpu_float) { check_type<float>("float32", DType::Float32); }
FASTREG_TEST(dropout_cuda_group_matches_cpu_double) { check_type<double>("float64", DType::Float64); }
FASTREG_TEST(dropout_cuda_group_matches_cpu_half) { check_type<c10::Half>("float16", DType::Float16); }
FASTREG_TEST(dropout_cuda_group_matches_cpu_bfloat16) { check_type<c10::BFloat16>("bfloat16", DType::BFloat16); }

// The aligned path must really run: a 64-byte aligned case takes it, a shifted one does not.
FASTREG_TEST(dropout_cuda_group_alignment_rule) {
  Buffer data(256), mask(64);
  DropoutArgs args{};
  args.input = data.at(0);
  args.output = data.at(16);
  args.mask = mask.at(0);
  args.mask_mode = MaskMode::Bool;
  FASTREG_CHECK(dropout_groups_aligned(args));
  args.output = data.at(4);
  FASTREG_CHECK(!dropout_groups_aligned(args));
  args.output = data.at(16);
  args.mask = mask.at(4);
  FASTREG_CHECK(!dropout_groups_aligned(args));
  args.mask_mode = MaskMode::Bits;  // a bits mask is read byte by byte: any address
  FASTREG_CHECK(dropout_groups_aligned(args));
}

}  // namespace
