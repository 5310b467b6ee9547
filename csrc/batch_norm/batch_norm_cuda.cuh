// What the CUDA batch-norm kernels (batch_norm_reduce_cuda.cu, batch_norm_elemt_cuda.cu) build
// on: CUDA's half/bfloat16 types and conversions, and the host+device helpers of
// batch_norm_device.h. Framework-free: CUDA runtime and the project's headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/compute_type_cuda.cuh"
#include "batch_norm_device.h"
#include "batch_norm_kernels.h"
