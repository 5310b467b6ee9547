// CPU implementations of the fastreg dropout ops. The schemas are defined in
// fastreg/ops/dropout.py (so the ops exist, on the reference, without a compiler).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_output_pool.h"
#include "dropout_glue.h"

namespace fastreg {
namespace {

constexpr int64_t kGroupsPerTask = 2048;  // 16K elements: large enough to amortise a task

DropoutRngState host_rng_state(const at::Tensor& rng_state) {
  const at::Tensor host = rng_state.is_cpu() ? rng_state : rng_state.cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  return DropoutRngState{static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

// Writes dropout of the dense `in` into `out` (which may be `in` itself: each element is
// read before it is written, by the same thread) and returns the mask.
at::Tensor run_forward(const at::Tensor& in, at::Tensor& out, double p, DropoutRngState rng, MaskMode mode) {
  at::Tensor mask = new_dropout_mask(in, mode);
  const DropoutArgs args = dropout_args(in, out, mask, p, mode, "fastreg.dropout");
  const int64_t groups = (args.n + kDropoutGroup - 1) / kDropoutGroup;
  at::parallel_for(0, groups, kGroupsPerTask,
                   [&](int64_t begin, int64_t end) { dropout_forward_cpu(args, rng, begin, end); });
  return mask;
}

std::tuple<at::Tensor, at::Tensor> forward_with_state(const at::Tensor& input, double p, DropoutRngState rng, int64_t mask_mode) {
  check_strided(input, "fastreg.dropout", "input");
  check_dropout_p(p);
  const MaskMode mode = dropout_mask_mode(mask_mode);
  const at::Tensor in = memory_dense(input);
  at::Tensor out = empty_like_pooled(in);
  at::Tensor mask = run_forward(in, out, p, rng, mode);
  return {out, mask};
}

struct DrawnRngState {
  at::Tensor tensor;  // (seed, offset), what the op returns and backward reads
  DropoutRngState value;
};

// The same draw as the reference's torch.randint(2**62, (1,), generator=generator): for a range
// this wide, ATen's CPU randint takes random64() % range under the generator's lock.
// Drawing it here spares a small call two tensor ops (randint, zeros) of its host time;
// test_kernel_draws_rng_state_like_the_reference holds the two draws together.
DrawnRngState draw_rng_state(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64() % (uint64_t{1} << 62);
  }
  at::Tensor tensor = at::empty({2}, at::kLong);
  int64_t* v = tensor.data_ptr<int64_t>();
  v[0] = static_cast<int64_t>(seed);
  v[1] = 0;
  return {tensor, DropoutRngState{seed, 0}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& input, double p, int64_t mask_mode,
                                                           std::optional<at::Generator> generator) {
  check_strided(input, "fastreg.dropout", "input");
  kernel_dtype(input, "fastreg.dropout");
  check_dropout_p(p);  // every check before the generator advances: a refused call draws nothing
  dropout_mask_mode(mask_mode);
  check_dropout_generator(generator, input, "fastreg.dropout");
  const DrawnRngState rng = draw_rng_state(generator);
  auto [out, mask] = forward_with_state(input, p, rng.value, mask_mode);
  return {out, mask, rng.tensor};
}

// In place: a dense input is overwritten by the kernel itself (no output allocation, one pass);
// any other input gets the out-of-place result copied back.
std::tuple<at::Tensor, at::Tensor> dropout_inplace_cpu(at::Tensor& input, double p, int64_t mask_mode,
                                                       std::optional<at::Generator> generator) {
  const char* op = "fastreg.dropout_";
  check_strided(input, op, "input");     // first: a sparse input has no strides to look at
  check_overwritable(input, op, kInplaceDifferentiableForm, "input");
  at::assert_no_internal_overlap(input);  // before the generator advances
  kernel_dtype(input, op);
  check_dropout_p(p);
  const MaskMode mode = dropout_mask_mode(mask_mode);
  check_dropout_generator(generator, input, op);
  bump_version(input);
  const DrawnRngState rng = draw_rng_state(generator);
  if (input.is_non_overlapping_and_dense()) {
    return {run_forward(input, input, p, rng.value, mode), rng.tensor};
  }
  auto [out, mask] = forward_with_state(input, p, rng.value, mask_mode);
  input.copy_(out);
  return {mask, rng.tensor};
}

std::tuple<at::Tensor, at::Tensor> dropout_seeded_cpu(const at::Tensor& input, double p, const at::Tensor& rng_state,
                                                      int64_t mask_mode) {
  check_rng_state(rng_state, "fastreg.dropout_seeded");
  return forward_with_state(input, p, host_rng_state(rng_state), mask_mode);
}

at::Tensor dropout_backward_cpu_op(const at::Tensor& grad_output, const at::Tensor& mask, const at::Tensor& rng_state,
                                   double p, int64_t mask_mode) {
  const char* op = "fastreg.dropout_backward";
  check_strided(grad_output, op, "grad_output");
  check_dropout_p(p);
  check_rng_state(rng_state, op);
  const MaskMode mode = dropout_mask_mode(mask_mode);
  TORCH_CHECK(grad_output.is_non_overlapping_and_dense(), op, ": grad_output must be dense in the forward output's layout");
  check_saved_mask(mask, grad_output, mode);
  at::Tensor grad_input = empty_like_pooled(grad_output);
  at::Tensor mask_arg = mask;
  const DropoutArgs args = dropout_args(grad_output, grad_input, mask_arg, p, mode, op);
  const DropoutRngState rng = host_rng_state(rng_state);
  const int64_t groups = (args.n + kDropoutGroup - 1) / kDropoutGroup;
  at::parallel_for(0, groups, kGroupsPerTask,
                   [&](int64_t begin, int64_t end) { dropout_backward_cpu(args, rng, begin, end); });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_", &dropout_inplace_cpu);
  m.impl("dropout_seeded", &dropout_seeded_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu_op);
}

}  // namespace fastreg
