// CPU dropout: random bits, output and mask in one pass over memory. Free of torch types
// except c10's header-only half/bfloat16 conversions; dropout_ops.cpp parallelises.
#include <algorithm>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dropout_kernels.h"

namespace fastreg {
namespace {

constexpr int kBlockGroups = 64;  // Philox calls computed side by side, in SIMD lanes

// Keep bits of groups [group0, group0 + kBlockGroups): the scalar philox4x32_10 rewritten
// structure-of-arrays so that each round is one vector loop. Cloned per ISA, picked at load.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void keep_bits_block(DropoutRngState rng, uint64_t group0, uint32_t threshold, uint8_t* out) {
  using namespace philox_detail;
  uint32_t c0[kBlockGroups], c1[kBlockGroups], c2[kBlockGroups], c3[kBlockGroups];
  for (int k = 0; k < kBlockGroups; ++k) {
    const uint64_t group = group0 + k;
    c0[k] = static_cast<uint32_t>(group);
    c1[k] = static_cast<uint32_t>(group >> 32);
    c2[k] = static_cast<uint32_t>(rng.offset);
    c3[k] = static_cast<uint32_t>(rng.offset >> 32);
  }
  uint32_t key0 = static_cast<uint32_t>(rng.seed), key1 = static_cast<uint32_t>(rng.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int k = 0; k < kBlockGroups; ++k) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0[k];
      const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2[k];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[k] ^ key0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[k] ^ key1;
      c1[k] = static_cast<uint32_t>(p1);
      c3[k] = static_cast<uint32_t>(p0);
      c0[k] = n0;
      c2[k] = n2;
    }
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  for (int k = 0; k < kBlockGroups; ++k) {
    const uint32_t words[4] = {c0[k], c1[k], c2[k], c3[k]};
    uint32_t bits = 0;
    for (int w = 0; w < 4; ++w) {
      bits |= static_cast<uint32_t>((words[w] & 0xFFFFu) < threshold) << (2 * w);
      bits |= static_cast<uint32_t>((words[w] >> 16) < threshold) << (2 * w + 1);
    }
    out[k] = static_cast<uint8_t>(bits);
  }
}

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <typename T>
typename Compute<T>::type keep_scale(const DropoutArgs& args) {
  if constexpr (std::is_same_v<T, double>) {
    return args.scale_f64;
  } else {
    return args.scale;
  }
}

// Elements [e0, e1) of one block whose keep bits are bits[(e - e0) / 8] >> ((e - e0) % 8).
// Whole groups take the 8-wide loop with constant shifts (one SIMD multiply); the last,
// partial group of the tensor takes the scalar loop.
template <typename T>
void apply_block(const DropoutArgs& args, const uint8_t* bits, int64_t e0, int64_t e1) {
  using Acc = typename Compute<T>::type;
  const T* in = static_cast<const T*>(args.input) + e0;
  T* out = static_cast<T*>(args.output) + e0;
  const Acc scale = keep_scale<T>(args);
  const int64_t full_groups = (e1 - e0) / kDropoutGroup;
  for (int64_t g = 0; g < full_groups; ++g) {
    const uint32_t b = bits[g];
    Acc multiplier[kDropoutGroup];
    for (int j = 0; j < kDropoutGroup; ++j) multiplier[j] = ((b >> j) & 1) ? scale : Acc(0);
    for (int j = 0; j < kDropoutGroup; ++j) {
      out[g * kDropoutGroup + j] = static_cast<T>(static_cast<Acc>(in[g * kDropoutGroup + j]) * multiplier[j]);
    }
  }
  for (int64_t local = full_groups * kDropoutGroup; local < e1 - e0; ++local) {
    const Acc multiplier = ((bits[local >> 3] >> (local & 7)) & 1) ? scale : Acc(0);
    out[local] = static_cast<T>(static_cast<Acc>(in[local]) * multiplier);
  }
}

void apply_block_dtype(const DropoutArgs& args, const uint8_t* bits, int64_t e0, int64_t e1) {
  switch (args.dtype) {
    case DType::Float64: return apply_block<double>(args, bits, e0, e1);
    case DType::Float32: return apply_block<float>(args, bits, e0, e1);
    case DType::Float16: return apply_block<c10::Half>(args, bits, e0, e1);
    case DType::BFloat16: return apply_block<c10::BFloat16>(args, bits, e0, e1);
  }
}

// Zeroes the bits of a partial last group, so packed masks carry no garbage past n.
uint8_t tail_clipped(uint8_t bits, int64_t group, int64_t n) {
  const int64_t valid = n - group * kDropoutGroup;
  return valid >= kDropoutGroup ? bits : static_cast<uint8_t>(bits & ((1u << valid) - 1u));
}

}  // namespace

void dropout_forward_cpu(const DropoutArgs& args, DropoutRngState rng, int64_t group_begin, int64_t group_end) {
  uint8_t bits[kBlockGroups];
  for (int64_t g0 = group_begin; g0 < group_end; g0 += kBlockGroups) {
    const int64_t groups = std::min<int64_t>(kBlockGroups, group_end - g0);
    keep_bits_block(rng, static_cast<uint64_t>(g0), args.threshold, bits);
    for (int64_t k = 0; k < groups; ++k) bits[k] = tail_clipped(bits[k], g0 + k, args.n);
    const int64_t e0 = g0 * kDropoutGroup;
    const int64_t e1 = std::min<int64_t>(args.n, (g0 + groups) * kDropoutGroup);
    apply_block_dtype(args, bits, e0, e1);
    if (args.mask_mode == MaskMode::Bits) {
      std::memcpy(args.mask + g0, bits, groups);
    } else if (args.mask_mode == MaskMode::Bool) {
      for (int64_t e = e0; e < e1; ++e) args.mask[e] = (bits[(e - e0) >> 3] >> ((e - e0) & 7)) & 1;
    }
  }
}

void dropout_backward_cpu(const DropoutArgs& args, DropoutRngState rng, int64_t group_begin, int64_t group_end) {
  uint8_t bits[kBlockGroups];
  for (int64_t g0 = group_begin; g0 < group_end; g0 += kBlockGroups) {
    const int64_t groups = std::min<int64_t>(kBlockGroups, group_end - g0);
    const int64_t e0 = g0 * kDropoutGroup;
    const int64_t e1 = std::min<int64_t>(args.n, (g0 + groups) * kDropoutGroup);
    if (args.mask_mode == MaskMode::Regenerate) {
      keep_bits_block(rng, static_cast<uint64_t>(g0), args.threshold, bits);
    } else if (args.mask_mode == MaskMode::Bits) {
      std::memcpy(bits, args.mask + g0, groups);
    } else {
      std::memset(bits, 0, sizeof(bits));
      for (int64_t e = e0; e < e1; ++e) bits[(e - e0) >> 3] |= static_cast<uint8_t>((args.mask[e] != 0) << ((e - e0) & 7));
    }
    apply_block_dtype(args, bits, e0, e1);
  }
}

}  // namespace fastreg
