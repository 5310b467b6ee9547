// Framework-free entry points of the dropout kernels: plain pointers, sizes and a stream.
// dropout_ops.cpp / dropout_ops_cuda.cpp turn tensors into these calls.
#pragma once

#include <cstdint>

#include "dropout_rng.h"

namespace fastreg {

enum class DType : int { Float64 = 0, Float32 = 1, Float16 = 2, BFloat16 = 3 };

// How the keep mask reaches backward. The values are part of the op schema (mask_mode).
enum class MaskMode : int { Regenerate = 0, Bits = 1, Bool = 2 };

struct DropoutArgs {
  const void* input;      // n elements of dtype, dense, in memory order
  void* output;           // n elements of dtype
  uint8_t* mask;          // Bits: ceil(n / 8) bytes; Bool: n bytes; Regenerate: nullptr
  int64_t n;
  DType dtype;
  MaskMode mask_mode;
  uint32_t threshold;     // dropout_keep_threshold(p)
  float scale;            // dropout_scale(threshold), for fp32/fp16/bf16
  double scale_f64;       // the same for fp64
};

// Where the seed and offset live: host values (CPU, eager CUDA) or device pointers
// (CUDA-graph capture, or a saved rng_state tensor), plus an offset added to *offset_ptr.
struct DropoutRngSource {
  DropoutRngState value;
  const int64_t* seed_ptr;    // nullptr: use value.seed
  const int64_t* offset_ptr;  // nullptr: use value.offset
  uint64_t offset_extra;      // added to *offset_ptr
  int64_t* state_out;         // if set, the kernel writes {seed, offset} here (2 x int64)
};

// CPU: processes groups [group_begin, group_end) (see dropout_rng.h); callers parallelise.
void dropout_forward_cpu(const DropoutArgs& args, DropoutRngState rng, int64_t group_begin, int64_t group_end);
// grad_input = grad_output * keep * scale; keep from mask (Bits/Bool) or regenerated.
void dropout_backward_cpu(const DropoutArgs& args, DropoutRngState rng, int64_t group_begin, int64_t group_end);

// CUDA: one launch on `stream` (a cudaStream_t); returns the cudaError_t of the launch.
// In backward, args.input is grad_output and args.output is grad_input. The forward
// launch writes the resolved {seed, offset} to rng.state_out, even for n == 0.
int dropout_forward_cuda(const DropoutArgs& args, const DropoutRngSource& rng, void* stream);
int dropout_backward_cuda(const DropoutArgs& args, const DropoutRngSource& rng, void* stream);

}  // namespace fastreg
