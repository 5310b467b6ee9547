// The dropout keep-decision spec (docs/rng.md), shared by the CPU and CUDA kernels and
// mirrored by fastreg/reference/dropout.py.
//
// Element i (its position in the output's memory order) belongs to group g = i / 8.
// One Philox4x32-10 call with key (seed_lo ^ "fast", seed_hi ^ "reg\0") and counter (g_lo,
// g_hi, offset_lo, offset_hi) gives 128 bits = eight 16-bit lanes; lane j = i % 8 is bits
// [16*(j%2), +16) of word j/2. The element is kept when its lane is below the keep threshold.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/host_device.h"
#include "../common/philox.h"

namespace fastreg {

constexpr int kDropoutGroup = 8;               // decisions per Philox call
constexpr uint32_t kDropoutResolution = 65536;  // p is resolved to 2^-16

// Keep iff lane < threshold. p = 0 keeps all (65536), p = 1 keeps none (0).
inline uint32_t dropout_keep_threshold(double p) {
  const double keep = std::nearbyint((1.0 - p) * kDropoutResolution);
  return keep <= 0.0 ? 0u : keep >= kDropoutResolution ? kDropoutResolution : static_cast<uint32_t>(keep);
}

// 1 / (quantized keep probability), so E[output] = input exactly; 0 when nothing is kept.
inline double dropout_scale(uint32_t threshold) {
  return threshold == 0 ? 0.0 : static_cast<double>(kDropoutResolution) / threshold;
}

// Seed and offset of one dropout call: the Philox key (after the tag below) and the upper
// counter words.
struct DropoutRngState {
  uint64_t seed;
  uint64_t offset;
};

// The Philox key is the seed xor "fastreg\0" (ASCII, little-endian words). PyTorch's own CUDA
// random ops use key = seed with the generator offset in counter words 0-1 and the thread index
// in words 2-3; without the tag, fastreg's group g at offset o would reproduce torch's thread o
// at offset 4g under the same generator seed, and the two ops' random bits would coincide.
constexpr uint32_t kDropoutKeyTag0 = 0x74736166u;  // "fast"
constexpr uint32_t kDropoutKeyTag1 = 0x00676572u;  // "reg\0"

FASTREG_HOST_DEVICE uint32_t dropout_key0(uint64_t seed) { return static_cast<uint32_t>(seed) ^ kDropoutKeyTag0; }
FASTREG_HOST_DEVICE uint32_t dropout_key1(uint64_t seed) {
  return static_cast<uint32_t>(seed >> 32) ^ kDropoutKeyTag1;
}

// Eight keep bits for group g, bit j for element 8g + j.
FASTREG_HOST_DEVICE uint32_t dropout_keep_bits(DropoutRngState rng, uint64_t group, uint32_t threshold) {
  const Philox4x32 counter{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                            static_cast<uint32_t>(rng.offset), static_cast<uint32_t>(rng.offset >> 32)}};
  const Philox4x32 r = philox4x32_10(counter, dropout_key0(rng.seed), dropout_key1(rng.seed));
  uint32_t bits = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int word = 0; word < 4; ++word) {
    bits |= static_cast<uint32_t>((r.x[word] & 0xFFFFu) < threshold) << (2 * word);
    bits |= static_cast<uint32_t>((r.x[word] >> 16) < threshold) << (2 * word + 1);
  }
  return bits;
}

}  // namespace fastreg
