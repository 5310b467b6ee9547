// Large CPU outputs from a small cache of huge-page blocks.
//
// A fresh 64 MB tensor costs its page faults: 16K of them with 4 KB pages, which on a VM
// takes longer than reading and writing the data. A training loop frees and re-creates the
// same-sized outputs every step, so fastreg keeps freed blocks (2 MB aligned, advised for
// transparent huge pages) and hands them out again: the job the caching allocator does on
// CUDA. The cache is bounded (FASTREG_CPU_POOL_MB, default 1024; 0 disables it).
#pragma once

#include <ATen/ATen.h>

namespace fastreg {

// Like at::empty_like(like, dtype) for a dense `like` (same strides), from the pool when large.
at::Tensor empty_like_pooled(const at::Tensor& like, at::ScalarType dtype);
inline at::Tensor empty_like_pooled(const at::Tensor& like) { return empty_like_pooled(like, like.scalar_type()); }

}  // namespace fastreg
