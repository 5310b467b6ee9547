// Philox4x32-10 against the known-answer vectors published with Random123 (kat_vectors),
// the reference implementation by the algorithm's authors.
#include "../common/philox.h"
#include "check.h"

namespace {

struct KnownAnswer {
  uint32_t counter[4];
  uint32_t key[2];
  uint32_t expected[4];
};

constexpr KnownAnswer kVectors[] = {
    {{0x00000000, 0x00000000, 0x00000000, 0x00000000},
     {0x00000000, 0x00000000},
     {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
     {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
     {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

}  // namespace

FASTREG_TEST(philox_known_answers) {
  for (const KnownAnswer& v : kVectors) {
    const fastreg::Philox4x32 counter{{v.counter[0], v.counter[1], v.counter[2], v.counter[3]}};
    const fastreg::Philox4x32 out = fastreg::philox4x32_10(counter, v.key[0], v.key[1]);
    for (int i = 0; i < 4; ++i) FASTREG_CHECK_EQ(out.x[i], v.expected[i]);
  }
}

FASTREG_TEST(philox_mulhilo_splits_the_64_bit_product) {
  uint32_t hi = 0, lo = 0;
  fastreg::philox_detail::mulhilo(0xffffffffu, 0xffffffffu, hi, lo);  // (2^32-1)^2 = 0xfffffffe_00000001
  FASTREG_CHECK_EQ(hi, 0xfffffffeu);
  FASTREG_CHECK_EQ(lo, 0x00000001u);
}
