// CUDA launcher of the rotary embedding op; the kernel is in rotary_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/dispatch.h"
#include "../ops.h"
#include "rotary_kernels.cuh"

namespace pefttorch::cuda {
namespace {

void apply_cuda(const RotaryArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t pairs = a.rows * a.g.half;
  // Enough blocks for every pair, at most 8 per SM (a full SM of 256-thread blocks): the grid-stride loop does
  // the rest.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::clamp<int64_t>((pairs + kRotaryThreads - 1) / kRotaryThreads, 1, 8 * sms);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(a.x.scalar_type(), [&](auto t) {
    dispatch_float(a.cos.scalar_type(), [&](auto c) {
      using T = decltype(t);
      using C = decltype(c);
      const auto kernel = a.transpose ? rotary_kernel<T, C, true> : rotary_kernel<T, C, false>;
      kernel<<<blocks, kRotaryThreads, 0, stream>>>(a.x.const_data_ptr<T>(), a.cos.const_data_ptr<C>(),
                                                    a.sin.const_data_ptr<C>(), a.out.mutable_data_ptr<T>(), a.g, pairs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

const RotaryKernels kCudaRotary{apply_cuda};

}  // namespace
}  // namespace pefttorch::cuda

TORCH_LIBRARY_IMPL(pefttorch, CUDA, m) { pefttorch::register_rotary_ops<pefttorch::cuda::kCudaRotary>(m); }
