// dropout_forward_cpu / dropout_backward_cpu on small buffers, checked element by element
// against dropout_keep_bits: every mask mode, a partial last group, float and double.
#include <cstring>
#include <vector>

#include <c10/util/Half.h>

#include "../common/cpu_isa.h"
#include "../dropout/dropout_cpu_avx512.h"
#include "../dropout/dropout_kernels.h"
#include "check.h"

using namespace fastreg;

namespace {

constexpr DropoutRngState kRng{0x9e3779b97f4a7c15ULL, 12};

bool kept(int64_t i, uint32_t threshold) {
  return (dropout_keep_bits(kRng, static_cast<uint64_t>(i / kDropoutGroup), threshold) >> (i % kDropoutGroup)) & 1u;
}

int64_t groups_of(int64_t n) { return (n + kDropoutGroup - 1) / kDropoutGroup; }

template <typename T>
DropoutArgs make_args(const std::vector<T>& in, std::vector<T>& out, std::vector<uint8_t>& mask, MaskMode mode,
                      double p, DType dtype) {
  DropoutArgs args{};
  args.input = in.data();
  args.output = out.data();
  args.mask = mode == MaskMode::Regenerate ? nullptr : mask.data();
  args.n = static_cast<int64_t>(in.size());
  args.dtype = dtype;
  args.mask_mode = mode;
  args.threshold = dropout_keep_threshold(p);
  args.scale_f64 = dropout_scale(args.threshold);
  args.scale = static_cast<float>(args.scale_f64);
  return args;
}

template <typename T>
std::vector<T> ramp(int64_t n) {
  std::vector<T> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<T>(0.25 * (i + 1) - 3.0);
  return v;
}

// Forward then backward for one mask mode; each output equals input * scale where kept, else 0.
template <typename T>
void check_round_trip(int64_t n, double p, MaskMode mode, DType dtype) {
  const std::vector<T> in = ramp<T>(n);
  std::vector<T> out(n, T(-99));
  std::vector<uint8_t> mask(mode == MaskMode::Bits ? groups_of(n) : mode == MaskMode::Bool ? n : 0, 0xAB);
  DropoutArgs args = make_args(in, out, mask, mode, p, dtype);
  dropout_forward_cpu(args, kRng, 0, groups_of(n));

  const T scale = static_cast<T>(dtype == DType::Float64 ? args.scale_f64 : args.scale);
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T expected = kept(i, args.threshold) ? static_cast<T>(in[i] * scale) : T(0);
    wrong += out[i] != expected;
    if (mode == MaskMode::Bool) wrong += mask[i] != static_cast<uint8_t>(kept(i, args.threshold));
    if (mode == MaskMode::Bits) wrong += ((mask[i / 8] >> (i % 8)) & 1) != static_cast<int>(kept(i, args.threshold));
  }
  FASTREG_CHECK_EQ(wrong, int64_t{0});
  if (mode == MaskMode::Bits && n % 8 != 0) {
    FASTREG_CHECK_EQ(mask.back() >> (n % 8), 0);  // no garbage past the last element
  }

  // Backward: grad_input = grad_output * keep * scale, the keep bits from the saved mask or regenerated.
  const std::vector<T> grad_out = ramp<T>(n);
  std::vector<T> grad_in(n, T(-99));
  DropoutArgs back = make_args(grad_out, grad_in, mask, mode, p, dtype);
  dropout_backward_cpu(back, kRng, 0, groups_of(n));
  wrong = 0;
  for (int64_t i = 0; i < n; ++i) wrong += grad_in[i] != (kept(i, args.threshold) ? static_cast<T>(grad_out[i] * scale) : T(0));
  FASTREG_CHECK_EQ(wrong, int64_t{0});
}

}  // namespace

FASTREG_TEST(dropout_cpu_all_mask_modes_float) {
  for (MaskMode mode : {MaskMode::Regenerate, MaskMode::Bits, MaskMode::Bool}) {
    for (int64_t n : {1, 7, 8, 37, 1000}) check_round_trip<float>(n, 0.3, mode, DType::Float32);
  }
}

FASTREG_TEST(dropout_cpu_all_mask_modes_double) {
  for (MaskMode mode : {MaskMode::Regenerate, MaskMode::Bits, MaskMode::Bool}) {
    check_round_trip<double>(523, 0.5, mode, DType::Float64);
  }
}

// The AVX-512 block keeps each group's 64-bit counter in one lane: groups whose low word wraps
// past 2^32 inside a block, the last groups of the 64-bit range, offsets and seeds with high
// bits set, and every edge of the 16-bit threshold compare must give the spec's bits.
FASTREG_TEST(dropout_cpu_keep_bits_blocks_match_the_spec) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() != CpuIsa::Avx512) return;  // else the kernel runs the spec's own loop
  const uint64_t wrap = uint64_t{1} << 32;
  const uint64_t firsts[] = {0, 1, 64 * 7 + 3, wrap - 40, wrap - 64, wrap, 5 * wrap - 1, ~uint64_t{0} - 63};
  const uint32_t thresholds[] = {0, 1, 2, 32768, 45875, 65535, 65536};
  const DropoutRngState states[] = {kRng, {~uint64_t{0}, ~uint64_t{0} - 1}, {0, wrap + 7}};
  int64_t wrong = 0;
  for (const DropoutRngState& rng : states) {
    for (const uint64_t first : firsts) {
      for (const uint32_t threshold : thresholds) {
        uint8_t bits[kDropoutCpuBlockGroups];
        dropout_keep_bits_avx512(rng, first, threshold, bits);
        for (int k = 0; k < kDropoutCpuBlockGroups; ++k) wrong += bits[k] != dropout_keep_bits(rng, first + k, threshold);
      }
    }
  }
  FASTREG_CHECK_EQ(wrong, int64_t{0});
#endif
}

FASTREG_TEST(dropout_cpu_p_zero_is_identity_and_p_one_zeroes) {
  const int64_t n = 45;
  const std::vector<float> in = ramp<float>(n);
  std::vector<float> out(n);
  std::vector<uint8_t> no_mask;
  DropoutArgs args = make_args(in, out, no_mask, MaskMode::Regenerate, 0.0, DType::Float32);
  dropout_forward_cpu(args, kRng, 0, groups_of(n));
  FASTREG_CHECK(std::memcmp(in.data(), out.data(), n * sizeof(float)) == 0);
  args = make_args(in, out, no_mask, MaskMode::Regenerate, 1.0, DType::Float32);
  dropout_forward_cpu(args, kRng, 0, groups_of(n));
  int64_t nonzero = 0;
  for (float v : out) nonzero += v != 0.0f;
  FASTREG_CHECK_EQ(nonzero, int64_t{0});
}

FASTREG_TEST(dropout_cpu_group_ranges_compose) {
  // Callers split the groups across threads: any split must give the whole-range result.
  const int64_t n = 8 * 200 + 5;
  const std::vector<float> in = ramp<float>(n);
  std::vector<float> whole(n), pieces(n);
  std::vector<uint8_t> mask_whole(groups_of(n)), mask_pieces(groups_of(n));
  dropout_forward_cpu(make_args(in, whole, mask_whole, MaskMode::Bits, 0.4, DType::Float32), kRng, 0, groups_of(n));
  const DropoutArgs args = make_args(in, pieces, mask_pieces, MaskMode::Bits, 0.4, DType::Float32);
  const int64_t cuts[] = {0, 3, 64, 65, 130, groups_of(n)};
  for (int k = 0; k + 1 < 6; ++k) dropout_forward_cpu(args, kRng, cuts[k], cuts[k + 1]);
  FASTREG_CHECK(whole == pieces);
  FASTREG_CHECK(mask_whole == mask_pieces);
}

// In place (output == input) must give the out-of-place bytes: every element is read before
// it is written, including in the 16-bit paths' explicit vector loops.
template <typename T>
void check_in_place_matches(const std::vector<T>& in, DType dtype) {
  const int64_t n = static_cast<int64_t>(in.size());
  std::vector<T> out(n);
  std::vector<T> data = in;
  std::vector<uint8_t> mask_out(groups_of(n)), mask_in_place(groups_of(n));
  dropout_forward_cpu(make_args(in, out, mask_out, MaskMode::Bits, 0.3, dtype), kRng, 0, groups_of(n));
  const DropoutArgs args = make_args(data, data, mask_in_place, MaskMode::Bits, 0.3, dtype);
  dropout_forward_cpu(args, kRng, 0, groups_of(n));
  FASTREG_CHECK(std::memcmp(out.data(), data.data(), n * sizeof(T)) == 0);
  FASTREG_CHECK(mask_out == mask_in_place);
}

FASTREG_TEST(dropout_cpu_in_place_matches_out_of_place) {
  const int64_t n = 8 * 300 + 3;  // several blocks of 64 groups and a partial last group
  check_in_place_matches(ramp<float>(n), DType::Float32);
  check_in_place_matches(ramp<double>(n), DType::Float64);
  std::vector<uint16_t> bf16(n);  // bfloat16 bit patterns: the top half of each float
  const std::vector<float> values = ramp<float>(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], sizeof(bits));
    bf16[i] = static_cast<uint16_t>(bits >> 16);
  }
  check_in_place_matches(bf16, DType::BFloat16);
  std::vector<c10::Half> fp16(values.begin(), values.end());
  check_in_place_matches(fp16, DType::Float16);
}
