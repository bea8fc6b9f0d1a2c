// Device code of the sparse-activation ops (launchers: sparse_activations.cu). Kept apart, like
// lora_linear_kernels.cuh, so the CPU emulation test can compile and run it without a GPU.
//
//   density_forward:  per-block partial sums (float64) of a^2 / (a^2 + eps) and counts of |a| > threshold
//   density_backward: ga = g * 2 a eps / (a^2 + eps)^2 * scale, one pass
//   sparse_mlp_in:    one warp per neuron: the gate (or only) projection for every token, the activation,
//                     and, for gated MLPs, the up projection only where the neuron is active
//   sparse_mlp_down:  the down projection over active neurons only, partial sums per neuron split
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace pefttorch::cuda {

constexpr int kReduceThreads = 256;
constexpr int kMaxSparseTokens = 16;  // the decode regime the sparse kernels serve
constexpr int kInWarps = 8;           // warps (neurons) per block in sparse_mlp_in
constexpr int kDownThreads = 128;     // output columns per block in sparse_mlp_down

enum class Act : int { kReLU = 0, kGELU = 1, kGELUTanh = 2, kSiLU = 3 };

__device__ __forceinline__ float activate(float v, Act act) {
  switch (act) {
    case Act::kReLU: return v > 0.f ? v : 0.f;
    case Act::kGELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case Act::kGELUTanh: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Act::kSiLU: return v / (1.f + expf(-v));
  }
  return v;
}

// Terms in opmath precision (float32; float64 for float64 a), sums in float64: accurate for any size, and
// the reduction order is fixed, so results are deterministic.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    density_forward_kernel(const T* __restrict__ a, int64_t n, double eps, double threshold, double* __restrict__ sums,
                           long long* __restrict__ counts) {
  using acc_t = at::opmath_type<T>;
  __shared__ double s_sum[kReduceThreads];
  __shared__ long long s_cnt[kReduceThreads];
  const acc_t e = static_cast<acc_t>(eps), thr = static_cast<acc_t>(threshold);
  double sum = 0.0;
  long long cnt = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t v = static_cast<acc_t>(a[i]), v2 = v * v;
    sum += static_cast<double>(v2 / (v2 + e));
    cnt += (v < 0 ? -v : v) > thr;
  }
  s_sum[threadIdx.x] = sum;
  s_cnt[threadIdx.x] = cnt;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + half];
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = s_sum[0];
    counts[blockIdx.x] = s_cnt[0];
  }
}

// grad is 0-dim on the device (reading it on the host would synchronise), in acc_t.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    density_backward_kernel(const at::opmath_type<T>* __restrict__ grad, const T* __restrict__ a, int64_t n,
                            double eps, double scale, T* __restrict__ ga) {
  using acc_t = at::opmath_type<T>;
  const acc_t e = static_cast<acc_t>(eps), k = static_cast<acc_t>(2.0 * eps * scale) * grad[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t v = static_cast<acc_t>(a[i]), d = v * v + e;
    ga[i] = static_cast<T>((k / d) * (v / d));  // not / (d * d), which underflows for tiny eps
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// acc[t] = sum_k w[k] * x[t][k] over the warp's lanes, for every token (all lanes end with the sums).
template <typename T>
__device__ __forceinline__ void warp_dots(const T* __restrict__ w, const T* __restrict__ x, int64_t ldx, int tokens,
                                          int64_t hidden, float acc[kMaxSparseTokens]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < kMaxSparseTokens; ++t) acc[t] = 0.f;
  for (int64_t k = lane; k < hidden; k += 32) {
    const float wk = static_cast<float>(w[k]);
#pragma unroll
    for (int t = 0; t < kMaxSparseTokens; ++t) {
      if (t < tokens) acc[t] += wk * static_cast<float>(x[t * ldx + k]);
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxSparseTokens; ++t) {
    if (t < tokens) acc[t] = warp_sum(acc[t]);
  }
}

// Warp w of the grid owns neuron i = w. h[t][i] is its masked activation (gated: times the up
// projection, computed only if some token activates it); active[i] says whether any token does.
template <typename T>
__global__ void __launch_bounds__(kInWarps * 32)
    sparse_mlp_in_kernel(const T* __restrict__ x, int64_t ldx, int tokens, int64_t hidden, const T* __restrict__ w_in,
                         const T* __restrict__ b_in, const T* __restrict__ w_up, const T* __restrict__ b_up,
                         int64_t inter, Act act, float threshold, float* __restrict__ h, uint8_t* __restrict__ active) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kInWarps + threadIdx.x / 32;
  if (i >= inter) return;  // warp-uniform: whole warps leave together, so the shuffles stay full
  float g[kMaxSparseTokens];
  warp_dots(w_in + i * hidden, x, ldx, tokens, hidden, g);
  const float bias = b_in != nullptr ? static_cast<float>(b_in[i]) : 0.f;
  unsigned mask = 0;  // bit t: token t activates this neuron (|act(gate)| > threshold)
#pragma unroll
  for (int t = 0; t < kMaxSparseTokens; ++t) {
    if (t < tokens) {
      g[t] = activate(g[t] + bias, act);
      mask |= static_cast<unsigned>(fabsf(g[t]) > threshold) << t;
    }
  }
  if (w_up != nullptr && mask != 0) {  // the up row is read only for neurons some token activates
    float up[kMaxSparseTokens];
    warp_dots(w_up + i * hidden, x, ldx, tokens, hidden, up);
    const float bias_up = b_up != nullptr ? static_cast<float>(b_up[i]) : 0.f;
#pragma unroll
    for (int t = 0; t < kMaxSparseTokens; ++t) g[t] *= up[t] + bias_up;
  }
  if ((threadIdx.x & 31) == 0) {
    active[i] = mask != 0;
#pragma unroll
    for (int t = 0; t < kMaxSparseTokens; ++t) {
      if (t < tokens) h[t * inter + i] = (mask >> t) & 1u ? g[t] : 0.f;
    }
  }
}

// part[s][t][o] = sum over active neurons i of split s of h[t][i] * w_down_t[i][o]; thread o of the grid
// owns an output column (consecutive threads read consecutive columns of a row).
template <typename T>
__global__ void __launch_bounds__(kDownThreads)
    sparse_mlp_down_kernel(const float* __restrict__ h, const uint8_t* __restrict__ active, int tokens, int64_t inter,
                           const T* __restrict__ w_down_t, int64_t out, int64_t rows_per_split, float* __restrict__ part) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kDownThreads + threadIdx.x;
  const int64_t s = blockIdx.y, i0 = s * rows_per_split, i1 = std::min(inter, i0 + rows_per_split);
  if (o >= out) return;
  float acc[kMaxSparseTokens];
#pragma unroll
  for (int t = 0; t < kMaxSparseTokens; ++t) acc[t] = 0.f;
  for (int64_t i = i0; i < i1; ++i) {
    if (!active[i]) continue;  // inactive rows are never read: traffic follows the density
    const float w = static_cast<float>(w_down_t[i * out + o]);
#pragma unroll
    for (int t = 0; t < kMaxSparseTokens; ++t) {
      if (t < tokens) acc[t] += h[t * inter + i] * w;
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxSparseTokens; ++t) {
    if (t < tokens) part[(s * tokens + t) * out + o] = acc[t];
  }
}

// Splits of the intermediate neurons for sparse_mlp_down: enough blocks to fill the GPU twice over,
// each split at least 64 neurons.
inline int64_t down_splits(int64_t inter, int64_t out, int64_t sms) {
  const int64_t col_blocks = (out + kDownThreads - 1) / kDownThreads;
  const int64_t want = std::max<int64_t>(1, (2 * sms + col_blocks - 1) / col_blocks);
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(1, inter / 64));
}

}  // namespace pefttorch::cuda
