// Lets the same inline code compile for the host (g++) and the device (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTREG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTREG_HOST_DEVICE inline
#endif

// `#pragma unroll` on the device; nothing on the host, where g++ would warn about it.
#if defined(__CUDA_ARCH__)
#define FASTREG_UNROLL _Pragma("unroll")
#else
#define FASTREG_UNROLL
#endif
