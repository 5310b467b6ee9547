// Argument checks and kernel arguments shared by the CPU and CUDA dropout glue.
#pragma once

#include <ATen/ATen.h>

#include "../common/tensor_glue.h"
#include "dropout_kernels.h"

namespace fastreg {

inline MaskMode dropout_mask_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "fastreg.dropout: mask_mode must be 0 (regenerate), 1 (bits) or 2 (bool), got ",
                    mode);
  return static_cast<MaskMode>(mode);
}

// Named by the error of a direct dropout_ call on a tensor that requires grad (as in the reference).
inline constexpr const char* kInplaceDifferentiableForm = "fastreg.functional.dropout(input, p, inplace=True)";

inline void check_dropout_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
}

// A generator of another device type than the input's is refused by name. Without this check
// the failure depends on the path: a torch.ops call picks the kernel from the tensors alone,
// a C++ call from the generator too (a CPU input with a CUDA generator reaches the CUDA kernel).
inline void check_dropout_generator(const std::optional<at::Generator>& generator, const at::Tensor& input,
                                    const char* op) {
  if (!generator.has_value() || !generator->defined()) return;
  TORCH_CHECK(generator->device().type() == input.device().type(), op, ": generator is on ", generator->device(),
              " but input is on ", input.device(), "; pass a generator of the input's device");
}

// The mask tensor a forward call returns: empty for Regenerate, packed bytes for Bits,
// a bool tensor shaped and strided like the output for Bool.
inline at::Tensor new_dropout_mask(const at::Tensor& dense_input, MaskMode mode) {
  switch (mode) {
    case MaskMode::Regenerate: return at::empty({0}, dense_input.options().dtype(at::kByte));
    case MaskMode::Bits:
      return at::empty({(dense_input.numel() + kDropoutGroup - 1) / kDropoutGroup}, dense_input.options().dtype(at::kByte));
    case MaskMode::Bool: return at::empty_like(dense_input, dense_input.options().dtype(at::kBool));
  }
  TORCH_CHECK(false, "unreachable");
}

inline void check_saved_mask(const at::Tensor& mask, const at::Tensor& grad, MaskMode mode) {
  TORCH_CHECK(mask.device() == grad.device(), "fastreg.dropout_backward: mask is on ", mask.device(), " but grad_output on ",
              grad.device());  // in every mode: an unused mask on another device is still a caller's mistake
  if (mode == MaskMode::Regenerate) return;
  const int64_t expected = mode == MaskMode::Bits ? (grad.numel() + kDropoutGroup - 1) / kDropoutGroup : grad.numel();
  TORCH_CHECK(mask.numel() == expected, "fastreg.dropout_backward: mask has ", mask.numel(), " elements, expected ",
              expected, " for mask_mode ", static_cast<int>(mode));
  TORCH_CHECK(mask.is_non_overlapping_and_dense(), "fastreg.dropout_backward: mask (sizes ", mask.sizes(), ", strides ",
              mask.strides(), ") is not dense; pass the mask the forward returned");
  TORCH_CHECK(mode == MaskMode::Bits || mask.strides() == grad.strides(),
              "fastreg.dropout_backward: a bool mask must have grad_output's strides");
  TORCH_CHECK(mask.scalar_type() == (mode == MaskMode::Bits ? at::kByte : at::kBool),
              "fastreg.dropout_backward: mask dtype ", mask.scalar_type(), " does not match mask_mode ", static_cast<int>(mode));
}

inline void check_rng_state(const at::Tensor& rng_state, const char* op) {
  TORCH_CHECK(rng_state.layout() == at::kStrided && rng_state.scalar_type() == at::kLong && rng_state.numel() == 2 &&
                  rng_state.is_contiguous(),
              op,
              ": rng_state must be a contiguous int64 tensor of 2 elements (seed, offset)");
}

inline DropoutArgs dropout_args(const at::Tensor& in, at::Tensor& out, at::Tensor& mask, double p, MaskMode mode,
                                const char* op) {
  DropoutArgs args{};
  args.input = in.data_ptr();
  args.output = out.data_ptr();
  args.mask = mode == MaskMode::Regenerate ? nullptr : static_cast<uint8_t*>(mask.data_ptr());
  args.n = in.numel();
  args.dtype = kernel_dtype(in, op);
  args.mask_mode = mode;
  args.threshold = dropout_keep_threshold(p);
  args.scale_f64 = dropout_scale(args.threshold);
  args.scale = static_cast<float>(args.scale_f64);
  return args;
}

}  // namespace fastreg
