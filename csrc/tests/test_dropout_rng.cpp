// The dropout keep-decision spec (dropout_rng.h): threshold and scale at the edges of p, and
// keep bits that are exactly the 16-bit Philox lanes (under the tagged key) compared with the
// threshold.
#include <cmath>

#include "../dropout/dropout_rng.h"
#include "check.h"

using fastreg::dropout_keep_bits;
using fastreg::dropout_keep_threshold;
using fastreg::dropout_scale;
using fastreg::DropoutRngState;

FASTREG_TEST(dropout_rng_threshold_edges) {
  FASTREG_CHECK_EQ(dropout_keep_threshold(0.0), 65536u);  // keep everything
  FASTREG_CHECK_EQ(dropout_keep_threshold(1.0), 0u);      // keep nothing
  FASTREG_CHECK_EQ(dropout_keep_threshold(0.5), 32768u);
  FASTREG_CHECK_EQ(dropout_keep_threshold(0.25), 49152u);
  // Below the 2^-16 resolution p rounds to the nearest representable keep probability.
  FASTREG_CHECK_EQ(dropout_keep_threshold(1e-9), 65536u);
  FASTREG_CHECK_EQ(dropout_keep_threshold(1.0 - 1e-9), 0u);
  FASTREG_CHECK_EQ(dropout_keep_threshold(1.0 / 65536), 65535u);
  FASTREG_CHECK_EQ(dropout_keep_threshold(1.0 - 1.0 / 65536), 1u);
  // Half a step rounds to even, like Python's round() in the reference.
  FASTREG_CHECK_EQ(dropout_keep_threshold(1.0 - 2.5 / 65536), 2u);
}

FASTREG_TEST(dropout_rng_scale_is_exact_inverse_of_keep_probability) {
  FASTREG_CHECK(dropout_scale(0) == 0.0);  // p = 1: everything dropped, no division by zero
  FASTREG_CHECK(dropout_scale(65536) == 1.0);
  FASTREG_CHECK(dropout_scale(32768) == 2.0);
  FASTREG_CHECK(dropout_scale(49152) == 65536.0 / 49152.0);
  for (uint32_t t : {1u, 3u, 1000u, 65535u}) {
    // E[y] = x: keep probability t / 65536 times the scale is one.
    FASTREG_CHECK(std::fabs(dropout_scale(t) * t / 65536.0 - 1.0) < 1e-15);
  }
}

FASTREG_TEST(dropout_rng_keep_bits_are_the_philox_lanes) {
  const DropoutRngState rng{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
  for (uint64_t group : {uint64_t{0}, uint64_t{1}, uint64_t{0x1234567890ULL}}) {
    const fastreg::Philox4x32 counter{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                       static_cast<uint32_t>(rng.offset), static_cast<uint32_t>(rng.offset >> 32)}};
    // The key is the seed xor the ASCII bytes of "fastreg\0" (docs/rng.md), written out here.
    const fastreg::Philox4x32 r = fastreg::philox4x32_10(counter, static_cast<uint32_t>(rng.seed) ^ 0x74736166u,
                                                         static_cast<uint32_t>(rng.seed >> 32) ^ 0x00676572u);
    for (uint32_t threshold : {0u, 1u, 12345u, 32768u, 65535u, 65536u}) {
      const uint32_t bits = dropout_keep_bits(rng, group, threshold);
      for (int lane = 0; lane < 8; ++lane) {
        const uint32_t word = r.x[lane / 2];
        const uint32_t value = lane % 2 == 0 ? (word & 0xFFFFu) : (word >> 16);
        FASTREG_CHECK_EQ((bits >> lane) & 1u, static_cast<uint32_t>(value < threshold));
      }
      FASTREG_CHECK_EQ(bits >> 8, 0u);  // only eight decisions per group
    }
  }
}

// Untagged, group g at offset o would be torch's CUDA thread o at generator offset 4g (key =
// seed, counter (g, 0, o, 0)): the decisions must not be those lanes.
FASTREG_TEST(dropout_rng_keep_bits_are_not_the_untagged_philox_lanes) {
  int same = 0;
  const int groups = 1024;
  for (uint64_t group = 0; group < groups; ++group) {
    const DropoutRngState rng{1234, 8};
    const fastreg::Philox4x32 r = fastreg::philox4x32_10({{static_cast<uint32_t>(group), 0u, 8u, 0u}}, 1234u, 0u);
    uint32_t untagged = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const uint32_t value = lane % 2 == 0 ? (r.x[lane / 2] & 0xFFFFu) : (r.x[lane / 2] >> 16);
      untagged |= static_cast<uint32_t>(value < 32768u) << lane;
    }
    same += dropout_keep_bits(rng, group, 32768u) == untagged;
  }
  FASTREG_CHECK(same < groups / 20);  // independent 8-bit patterns agree about 1 time in 256
}

FASTREG_TEST(dropout_rng_keep_bits_edges_and_monotonicity) {
  const DropoutRngState rng{42, 7};
  for (uint64_t group = 0; group < 256; ++group) {
    FASTREG_CHECK_EQ(dropout_keep_bits(rng, group, 65536), 0xFFu);
    FASTREG_CHECK_EQ(dropout_keep_bits(rng, group, 0), 0u);
    // A larger keep probability keeps a superset: lowering p never drops a kept element.
    const uint32_t low = dropout_keep_bits(rng, group, 20000), high = dropout_keep_bits(rng, group, 40000);
    FASTREG_CHECK_EQ(low & ~high, 0u);
  }
}

FASTREG_TEST(dropout_rng_streams_differ_by_seed_offset_and_group) {
  const uint32_t t = 32768;
  int differ_seed = 0, differ_offset = 0, differ_group = 0, kept = 0;
  const int groups = 4096;
  for (uint64_t g = 0; g < groups; ++g) {
    const uint32_t base = dropout_keep_bits({1, 0}, g, t);
    differ_seed += base != dropout_keep_bits({2, 0}, g, t);
    differ_offset += base != dropout_keep_bits({1, 4}, g, t);
    differ_group += base != dropout_keep_bits({1, 0}, g + groups, t);
    kept += __builtin_popcount(base);
  }
  // Independent 8-bit patterns collide with probability about 1/70 at p = 0.5.
  FASTREG_CHECK(differ_seed > groups * 9 / 10);
  FASTREG_CHECK(differ_offset > groups * 9 / 10);
  FASTREG_CHECK(differ_group > groups * 9 / 10);
  // 32768 decisions at p = 0.5: the kept share is within 5 standard deviations of a half.
  const double share = kept / (8.0 * groups);
  FASTREG_CHECK(std::fabs(share - 0.5) < 5 * 0.5 / std::sqrt(8.0 * groups));
}
