// CUDA implementations of the fastreg dropout ops: tensors in, one kernel launch out.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <mutex>

#include "dropout_glue.h"

namespace fastreg {
namespace {

// Philox offsets one call reserves on the CUDA generator. Our counters differ in the group
// index, so any increment gives fresh streams; 4 is what the generator rounds up to anyway.
constexpr uint64_t kOffsetIncrement = 4;

// The dispatcher runs a CUDA kernel when any tensor argument is on CUDA, so an op whose main
// tensor is on the CPU and whose rng_state or mask is on CUDA arrives here: say so before a
// CUDAGuard on a CPU device fails with a message about guards.
void check_is_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(),
              " but another tensor argument is on CUDA; put them all on one device");
}

// Seed and offset where a kernel can read them: from the rng_state tensor itself when it
// lives on the GPU (graph-safe), else as host values.
DropoutRngSource source_from_state(const at::Tensor& rng_state, const at::Tensor& like, const char* op) {
  check_rng_state(rng_state, op);
  DropoutRngSource src{};
  if (rng_state.is_cuda()) {
    TORCH_CHECK(rng_state.device() == like.device(), op, ": rng_state is on ", rng_state.device(), " but the input on ",
                like.device());
    src.seed_ptr = rng_state.data_ptr<int64_t>();
    src.offset_ptr = src.seed_ptr + 1;
  } else {
    const int64_t* v = rng_state.data_ptr<int64_t>();
    src.value = DropoutRngState{static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
  }
  return src;
}

// Writes dropout of the dense `in` into `out` (which may be `in` itself: each element is
// read before it is written, by the same thread) and returns the mask.
at::Tensor run_forward(const at::Tensor& in, at::Tensor& out, double p, const DropoutRngSource& src, MaskMode mode,
                       const char* op) {
  at::Tensor mask = new_dropout_mask(in, mode);
  const DropoutArgs args = dropout_args(in, out, mask, p, mode, op);
  C10_CUDA_CHECK(static_cast<cudaError_t>(dropout_forward_cuda(args, src, at::cuda::getCurrentCUDAStream().stream())));
  return mask;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, double p, const DropoutRngSource& src,
                                           int64_t mask_mode, const char* op) {
  const MaskMode mode = dropout_mask_mode(mask_mode);
  const at::Tensor in = memory_dense(input);
  at::Tensor out = at::empty_like(in);
  at::Tensor mask = run_forward(in, out, p, src, mode, op);
  return {out, mask};
}

void check_input(const at::Tensor& input, double p, const char* op) {
  check_strided(input, op, "input");
  check_dropout_p(p);
  kernel_dtype(input, op);
}

// Seed and offset from the device's generator; under CUDA-graph capture the kernel reads
// them at replay. The forward kernel writes the resolved pair into `rng_state`.
DropoutRngSource draw_source(const at::Tensor& input, const std::optional<at::Generator>& generator,
                             at::Tensor& rng_state) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kOffsetIncrement);
  }
  rng_state = at::empty({2}, input.options().dtype(at::kLong));
  DropoutRngSource src{};
  if (philox.captured_) {
    src.seed_ptr = philox.seed_.ptr;
    src.offset_ptr = philox.offset_.ptr;
    src.offset_extra = philox.offset_intragraph_;
  } else {
    src.value = DropoutRngState{philox.seed_.val, philox.offset_.val};
  }
  src.state_out = rng_state.data_ptr<int64_t>();
  return src;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_cuda(const at::Tensor& input, double p, int64_t mask_mode,
                                                            std::optional<at::Generator> generator) {
  const char* op = "fastreg.dropout";
  check_input(input, p, op);
  check_dropout_generator(generator, input, op);
  check_is_cuda(input, "input", op);
  dropout_mask_mode(mask_mode);  // before the generator advances: a refused call draws nothing
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor rng_state;
  const DropoutRngSource src = draw_source(input, generator, rng_state);
  auto [out, mask] = forward(input, p, src, mask_mode, op);
  return {out, mask, rng_state};
}

// In place: a dense input is overwritten by the kernel itself (no output allocation, one pass);
// any other input gets the out-of-place result copied back.
std::tuple<at::Tensor, at::Tensor> dropout_inplace_cuda(at::Tensor& input, double p, int64_t mask_mode,
                                                        std::optional<at::Generator> generator) {
  const char* op = "fastreg.dropout_";
  check_input(input, p, op);              // first: a sparse input has no strides to look at
  check_dropout_generator(generator, input, op);
  check_is_cuda(input, "input", op);
  check_overwritable(input, op, kInplaceDifferentiableForm, "input");
  at::assert_no_internal_overlap(input);  // before the generator advances
  const MaskMode mode = dropout_mask_mode(mask_mode);
  bump_version(input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor rng_state;
  const DropoutRngSource src = draw_source(input, generator, rng_state);
  if (input.is_non_overlapping_and_dense()) {
    return {run_forward(input, input, p, src, mode, op), rng_state};
  }
  auto [out, mask] = forward(input, p, src, mask_mode, op);
  input.copy_(out);
  return {mask, rng_state};
}

std::tuple<at::Tensor, at::Tensor> dropout_seeded_cuda(const at::Tensor& input, double p, const at::Tensor& rng_state,
                                                       int64_t mask_mode) {
  const char* op = "fastreg.dropout_seeded";
  check_input(input, p, op);
  check_is_cuda(input, "input", op);
  const DropoutRngSource src = source_from_state(rng_state, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  return forward(input, p, src, mask_mode, op);
}

at::Tensor dropout_backward_cuda_op(const at::Tensor& grad_output, const at::Tensor& mask, const at::Tensor& rng_state,
                                    double p, int64_t mask_mode) {
  const char* op = "fastreg.dropout_backward";
  check_input(grad_output, p, op);
  check_is_cuda(grad_output, "grad_output", op);
  const MaskMode mode = dropout_mask_mode(mask_mode);
  TORCH_CHECK(grad_output.is_non_overlapping_and_dense(), op, ": grad_output must be dense in the forward output's layout");
  check_saved_mask(mask, grad_output, mode);
  const DropoutRngSource src = source_from_state(rng_state, grad_output, op);  // device checks first
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor grad_input = at::empty_like(grad_output);
  at::Tensor mask_arg = mask;
  const DropoutArgs args = dropout_args(grad_output, grad_input, mask_arg, p, mode, op);
  C10_CUDA_CHECK(static_cast<cudaError_t>(dropout_backward_cuda(args, src, at::cuda::getCurrentCUDAStream().stream())));
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_", &dropout_inplace_cuda);
  m.impl("dropout_seeded", &dropout_seeded_cuda);
  m.impl("dropout_backward", &dropout_backward_cuda_op);
}

}  // namespace fastreg
