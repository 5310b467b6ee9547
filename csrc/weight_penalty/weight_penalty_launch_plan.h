// How the CUDA weight penalty cuts a tensor list into launches (weight_penalty_cuda.cu).
// Host-only and framework-free, so ctest checks it without a GPU
// (csrc/tests/test_weight_penalty_launch_plan.cpp).
//
// Each non-empty tensor is cut into kPenaltyChunkCuda-element chunks, one thread block each.
// A launch takes the next tensors in list order, as many as its argument table holds and its
// grid allows; block b of a launch writes partial-sum slot partial_base + b. Slots therefore
// follow the list order whatever the table size, and so do the final sum and its bits.
#pragma once

#include <cstdint>

#include "weight_penalty_kernels.h"

namespace fastreg {

inline int64_t penalty_cuda_chunks(int64_t numel) { return (numel + kPenaltyChunkCuda - 1) / kPenaltyChunkCuda; }

struct PenaltyLaunch {
  int64_t begin;         // tensors[begin, end): the launch's tensors, empty ones included (they get no block)
  int64_t end;
  int64_t tensors;       // the non-empty ones among them: at most the table's capacity
  int64_t blocks;        // grid size
  int64_t partial_base;  // the partial-sum slot of the launch's block 0
};

// Calls launch(const PenaltyLaunch&) for each launch, in list order. Returns nullptr, or an
// error message before any launch when a tensor alone needs more than max_blocks blocks.
template <typename Launch>
const char* for_each_penalty_launch(const PenaltyTensor* tensors, int64_t count, int64_t max_tensors, int64_t max_blocks,
                                    Launch&& launch) {
  for (int64_t i = 0; i < count; ++i) {
    if (penalty_cuda_chunks(tensors[i].numel) > max_blocks) {
      return "fastreg.weight_penalty: a tensor is too large for one CUDA launch";
    }
  }
  PenaltyLaunch current{0, 0, 0, 0, 0};
  for (int64_t i = 0; i < count; ++i) {
    if (tensors[i].numel == 0) continue;
    const int64_t blocks = penalty_cuda_chunks(tensors[i].numel);
    if (current.tensors == max_tensors || current.blocks + blocks > max_blocks) {
      current.end = i;
      launch(static_cast<const PenaltyLaunch&>(current));
      current = PenaltyLaunch{i, i, 0, 0, current.partial_base + current.blocks};
    }
    ++current.tensors;
    current.blocks += blocks;
  }
  if (current.tensors > 0) {
    current.end = count;
    launch(static_cast<const PenaltyLaunch&>(current));
  }
  return nullptr;
}

}  // namespace fastreg
