// PT_HOST_DEVICE marks the arithmetic that the kernels of every device share (CPU loops, CUDA device code, and the
// CUDA code run on the CPU by the emulation tests): a host and device inline function under nvcc, a plain inline
// function for the host compiler.
#pragma once

#if defined(__CUDACC__)
#define PT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PT_HOST_DEVICE inline
#endif
