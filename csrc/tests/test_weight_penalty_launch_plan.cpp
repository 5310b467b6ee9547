// How the CUDA weight penalty cuts a tensor list into launches (weight_penalty_launch_plan.h):
// the launches cover the list in order, respect the table size and the grid limit, are cut
// only when full, and give every block a partial-sum slot in list order, so the final sum and
// its bits do not depend on the table size. The kernels themselves are left to the GPU tests.
#include <cstdint>
#include <string>
#include <vector>

#include "../weight_penalty/weight_penalty_launch_plan.h"
#include "check.h"

using namespace fastreg;

namespace {

std::vector<PenaltyTensor> list_of(const std::vector<int64_t>& numels) {
  std::vector<PenaltyTensor> tensors;
  for (const int64_t n : numels) tensors.push_back(PenaltyTensor{nullptr, nullptr, n, DType::Float32});
  return tensors;
}

std::vector<PenaltyLaunch> plan(const std::vector<PenaltyTensor>& tensors, int64_t max_tensors, int64_t max_blocks,
                                const char** error = nullptr) {
  std::vector<PenaltyLaunch> launches;
  const char* message = for_each_penalty_launch(tensors.data(), static_cast<int64_t>(tensors.size()), max_tensors,
                                                max_blocks, [&](const PenaltyLaunch& l) { launches.push_back(l); });
  if (error != nullptr) *error = message;
  return launches;
}

// Every property a correct plan has, for one list, table size and grid limit.
void check_plan(const std::vector<int64_t>& numels, int64_t max_tensors, int64_t max_blocks) {
  const std::vector<PenaltyTensor> tensors = list_of(numels);
  const std::vector<PenaltyLaunch> launches = plan(tensors, max_tensors, max_blocks);
  const std::string what = std::to_string(numels.size()) + " tensors, table " + std::to_string(max_tensors) +
                           ", grid " + std::to_string(max_blocks);
  int64_t next = 0, slots = 0, total_chunks = 0, nonempty = 0;
  for (const int64_t n : numels) {
    total_chunks += penalty_cuda_chunks(n);
    nonempty += n != 0;
  }
  for (size_t k = 0; k < launches.size(); ++k) {
    const PenaltyLaunch& l = launches[k];
    if (l.begin != next || l.end <= l.begin) fastreg_test::fail(__FILE__, __LINE__, what + ": launches leave a gap");
    int64_t tensors_in = 0, blocks_in = 0;
    for (int64_t i = l.begin; i < l.end; ++i) {
      tensors_in += numels[i] != 0;
      blocks_in += penalty_cuda_chunks(numels[i]);
    }
    FASTREG_CHECK_EQ(l.tensors, tensors_in);
    FASTREG_CHECK_EQ(l.blocks, blocks_in);
    FASTREG_CHECK_EQ(l.partial_base, slots);
    FASTREG_CHECK(l.tensors >= 1 && l.tensors <= max_tensors);
    FASTREG_CHECK(l.blocks >= 1 && l.blocks <= max_blocks);
    if (k + 1 < launches.size()) {
      // cut only when full: the next launch's first non-empty tensor did not fit this one
      int64_t first = launches[k + 1].begin;
      while (numels[first] == 0) ++first;
      FASTREG_CHECK(l.tensors == max_tensors || l.blocks + penalty_cuda_chunks(numels[first]) > max_blocks);
      FASTREG_CHECK(numels[launches[k + 1].begin] != 0);  // empty tensors stay with the launch before
    }
    next = l.end;
    slots += l.blocks;
  }
  if (nonempty > 0) FASTREG_CHECK_EQ(next, static_cast<int64_t>(numels.size()));
  FASTREG_CHECK_EQ(slots, total_chunks);
}

uint64_t next_random(uint64_t& state) {  // splitmix64: a fixed, portable sequence
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

FASTREG_TEST(weight_penalty_launch_plan_covers_the_list_in_order) {
  uint64_t state = 7;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> numels(next_random(state) % 700);
    for (int64_t& n : numels) {
      const uint64_t r = next_random(state) % 10;  // empty, tiny, one chunk, and several chunks
      n = r == 0 ? 0 : r < 5 ? static_cast<int64_t>(next_random(state) % 100) + 1
                             : static_cast<int64_t>(next_random(state) % (5 * kPenaltyChunkCuda)) + 1;
    }
    for (const int64_t max_tensors : {1, 3, 128, 512}) {
      for (const int64_t max_blocks : {int64_t{5}, int64_t{64}, int64_t{1} << 30}) check_plan(numels, max_tensors, max_blocks);
    }
  }
}

// ResNet-50's 161 tensors: one launch with the 512-tensor table, two (128 + 33) with the 4 KB one.
FASTREG_TEST(weight_penalty_launch_plan_resnet50_takes_one_launch_with_the_large_table) {
  const std::vector<int64_t> numels(161, 4096);
  const std::vector<PenaltyTensor> tensors = list_of(numels);
  FASTREG_CHECK_EQ(plan(tensors, 512, int64_t{1} << 30).size(), size_t{1});
  const std::vector<PenaltyLaunch> small = plan(tensors, 128, int64_t{1} << 30);
  FASTREG_CHECK_EQ(small.size(), size_t{2});
  if (small.size() == 2) {
    FASTREG_CHECK_EQ(small[0].tensors, int64_t{128});
    FASTREG_CHECK_EQ(small[1].tensors, int64_t{33});
    FASTREG_CHECK_EQ(small[1].partial_base, int64_t{128});
  }
}

FASTREG_TEST(weight_penalty_launch_plan_empty_tensors_launch_nothing) {
  FASTREG_CHECK(plan(list_of({}), 128, 64).empty());
  FASTREG_CHECK(plan(list_of({0, 0, 0}), 128, 64).empty());
  const std::vector<PenaltyLaunch> one = plan(list_of({0, 5, 0, 0, 7, 0}), 128, 64);
  FASTREG_CHECK_EQ(one.size(), size_t{1});
  if (one.size() == 1) {
    FASTREG_CHECK_EQ(one[0].begin, int64_t{0});
    FASTREG_CHECK_EQ(one[0].end, int64_t{6});
    FASTREG_CHECK_EQ(one[0].tensors, int64_t{2});
  }
}

FASTREG_TEST(weight_penalty_launch_plan_refuses_a_tensor_over_the_grid_limit_before_launching) {
  const char* error = nullptr;
  const std::vector<PenaltyLaunch> launches =
      plan(list_of({10, 10, 4 * kPenaltyChunkCuda + 1}), 128, 4, &error);  // 5 chunks, grid of 4
  FASTREG_CHECK(error != nullptr);
  FASTREG_CHECK(launches.empty());
  plan(list_of({10, 4 * kPenaltyChunkCuda}), 128, 4, &error);
  FASTREG_CHECK(error == nullptr);
}
