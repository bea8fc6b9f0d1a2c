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

#include "../common/density.h"

namespace pefttorch::cuda {

constexpr int kReduceThreads = 256;
constexpr int kMaxSparseTokens = 16;  // the decode regime the sparse kernels serve
constexpr int kInWarps = 8;           // warps (neurons) per block in sparse_mlp_in
constexpr int kDownThreads = 128;     // threads per block in sparse_mlp_down (a pack of columns each)

enum class Act : int { kReLU = 0, kGELU = 1, kGELUTanh = 2, kSiLU = 3 };

__device__ __forceinline__ float activate(float v, Act act) {
  switch (act) {
    case Act::kReLU: return v <= 0.f ? 0.f : v;  // NaN stays NaN, as at::relu
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
    const acc_t v = static_cast<acc_t>(a[i]);
    sum += density_term(v, e);
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

// Runs the callable with TOK = tokens rounded up to 1, 4 or 16 (the kernels' accumulator rows).
#define PT_SPARSE_TOKENS_SWITCH(tokens, TOK, ...) \
  [&] {                                           \
    if ((tokens) <= 1) {                          \
      constexpr int TOK = 1;                      \
      return __VA_ARGS__();                       \
    } else if ((tokens) <= 4) {                   \
      constexpr int TOK = 4;                      \
      return __VA_ARGS__();                       \
    } else {                                      \
      constexpr int TOK = kMaxSparseTokens;       \
      return __VA_ARGS__();                       \
    }                                             \
  }()

// 16 bytes of T: the unit of the weight loads (8 fp16/bf16 values, 4 fp32).
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Packs each lane loads before it uses the first: decode is bound by how many weight bytes are in flight,
// not by arithmetic (one load at a time left the first version 10x slower than cuBLAS's dense GEMV).
constexpr int kLoadsAhead = 4;

// acc[t] = sum_k w[k] * x[t][k] over the warp's lanes, for every token t < tokens <= TOK (all lanes end with
// the sums). `vec` (warp-uniform): w and every row of x are 16-byte aligned and hidden is a multiple of a pack,
// so each lane loads 16 bytes at a time, kLoadsAhead packs ahead; otherwise one element at a time.
template <typename T, int TOK>
__device__ __forceinline__ void warp_dots(const T* __restrict__ w, const T* __restrict__ x, int64_t ldx, int tokens,
                                          int64_t hidden, bool vec, float acc[TOK]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < TOK; ++t) acc[t] = 0.f;
  if (vec) {
    constexpr int N = Pack<T>::N;
    const int64_t packs = hidden / N;
    const Pack<T>* wp = reinterpret_cast<const Pack<T>*>(w);
    for (int64_t p0 = lane; p0 < packs; p0 += 32 * kLoadsAhead) {
      Pack<T> wv[kLoadsAhead];
#pragma unroll
      for (int u = 0; u < kLoadsAhead; ++u) {
        if (p0 + u * 32 < packs) wv[u] = wp[p0 + u * 32];
      }
#pragma unroll
      for (int u = 0; u < kLoadsAhead; ++u) {
        const int64_t p = p0 + u * 32;
        if (p >= packs) break;
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
          if (t < tokens) {
            const Pack<T> xv = reinterpret_cast<const Pack<T>*>(x + t * ldx)[p];
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < N; ++j) sum += static_cast<float>(wv[u].v[j]) * static_cast<float>(xv.v[j]);
            acc[t] += sum;
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < hidden; k += 32) {
      const float wk = static_cast<float>(w[k]);
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        if (t < tokens) acc[t] += wk * static_cast<float>(x[t * ldx + k]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t < tokens) acc[t] = warp_sum(acc[t]);
  }
}

// Warp w of the grid owns neuron i = w. h[t][i] is its masked activation (gated: times the up
// projection, computed only if some token activates it); active[i] says whether any token does.
// TOK: the token count rounded up (PT_SPARSE_TOKENS_SWITCH). Sized for 16 tokens the kernel took 158
// registers, one block of 8 warps per multiprocessor, too few loads in flight (the H200 read the gate
// weights at about 0.5 TB/s); for one token it needs a fraction of that.
template <typename T, int TOK>
__global__ void __launch_bounds__(kInWarps * 32)
    sparse_mlp_in_kernel(const T* __restrict__ x, int64_t ldx, int tokens, int64_t hidden, const T* __restrict__ w_in,
                         const T* __restrict__ b_in, const T* __restrict__ w_up, const T* __restrict__ b_up,
                         int64_t inter, Act act, float threshold, float* __restrict__ h, uint8_t* __restrict__ active) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kInWarps + threadIdx.x / 32;
  if (i >= inter) return;  // warp-uniform: whole warps leave together, so the shuffles stay full
  // rows of w_in and w_up start 16-byte aligned when the matrices do and hidden is a multiple of a pack
  const bool vec = hidden % Pack<T>::N == 0 && ldx % Pack<T>::N == 0 && aligned16(x) && aligned16(w_in) &&
                   (w_up == nullptr || aligned16(w_up));
  float g[TOK];
  warp_dots<T, TOK>(w_in + i * hidden, x, ldx, tokens, hidden, vec, g);
  const float bias = b_in != nullptr ? static_cast<float>(b_in[i]) : 0.f;
  // bit t: token t activates this neuron, i.e. not |act(gate)| <= threshold: a NaN is active and propagates, as in
  // the dense MLP
  unsigned mask = 0;
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t < tokens) {
      g[t] = activate(g[t] + bias, act);
      mask |= static_cast<unsigned>(!(fabsf(g[t]) <= threshold)) << t;
    }
  }
  if (w_up != nullptr && mask != 0) {  // the up row is read only for neurons some token activates
    float up[TOK];
    warp_dots<T, TOK>(w_up + i * hidden, x, ldx, tokens, hidden, vec, up);
    const float bias_up = b_up != nullptr ? static_cast<float>(b_up[i]) : 0.f;
#pragma unroll
    for (int t = 0; t < TOK; ++t) g[t] *= up[t] + bias_up;
  }
  if ((threadIdx.x & 31) == 0) {
    active[i] = mask != 0;
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      if (t < tokens) h[t * inter + i] = (mask >> t) & 1u ? g[t] : 0.f;
    }
  }
}

constexpr int kDownMaxRows = 1024;  // neurons per split of sparse_mlp_down (its list of active ones is in shared memory)

// Output columns one block of sparse_mlp_down covers: a pack of columns per thread.
template <typename T>
constexpr int64_t down_block_cols() {
  return static_cast<int64_t>(kDownThreads) * Pack<T>::N;
}

// part[s][t][o] = sum over active neurons i of split s of h[t][i] * w_down_t[i][o]. The block first lists
// its split's active neurons in order (a scan of the flags in shared memory: the order, and so the sums,
// are deterministic), then each thread owns a pack of consecutive output columns and walks the list,
// kLoadsAhead rows ahead. TOK: the token count rounded up (1, 4 or 16), so one token keeps 8 accumulators,
// not 128. Inactive rows are never read: the weight traffic follows the density.
template <typename T, int TOK>
__global__ void __launch_bounds__(kDownThreads)
    sparse_mlp_down_kernel(const float* __restrict__ h, const uint8_t* __restrict__ active, int tokens, int64_t inter,
                           const T* __restrict__ w_down_t, int64_t out, int64_t rows_per_split, float* __restrict__ part) {
  constexpr int N = Pack<T>::N;
  __shared__ int rows[kDownMaxRows];   // offsets in the split of its active neurons, in order
  __shared__ int scan[kDownThreads];
  const int64_t s = blockIdx.y, i0 = s * rows_per_split, i1 = std::min(inter, i0 + rows_per_split);
  // thread k lists the neurons of its own stretch of the split; a prefix sum of the counts places them
  const int64_t per = (rows_per_split + kDownThreads - 1) / kDownThreads;
  const int64_t b = std::min(i1, i0 + threadIdx.x * per), e = std::min(i1, b + per);
  int mine = 0;
  for (int64_t i = b; i < e; ++i) mine += active[i] != 0;
  scan[threadIdx.x] = mine;
  __syncthreads();
  for (int offset = 1; offset < kDownThreads; offset *= 2) {  // inclusive prefix sum
    const int v = static_cast<int>(threadIdx.x) >= offset ? scan[threadIdx.x - offset] : 0;
    __syncthreads();
    scan[threadIdx.x] += v;
    __syncthreads();
  }
  int at = scan[threadIdx.x] - mine;
  for (int64_t i = b; i < e; ++i) {
    if (active[i]) rows[at++] = static_cast<int>(i - i0);
  }
  const int count = scan[kDownThreads - 1];
  __syncthreads();

  const int64_t o = (static_cast<int64_t>(blockIdx.x) * kDownThreads + threadIdx.x) * N;
  if (o >= out) return;  // after the last barrier
  const int cols = static_cast<int>(std::min<int64_t>(N, out - o));
  const bool vec = cols == N && aligned16(w_down_t + o) && out % N == 0;
  float acc[TOK][N];
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[t][j] = 0.f;
  }
  for (int r0 = 0; r0 < count; r0 += kLoadsAhead) {
    Pack<T> wv[kLoadsAhead];
#pragma unroll
    for (int u = 0; u < kLoadsAhead; ++u) {
      if (r0 + u >= count) break;
      const T* row = w_down_t + (i0 + rows[r0 + u]) * out + o;
      if (vec) {
        wv[u] = *reinterpret_cast<const Pack<T>*>(row);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) wv[u].v[j] = j < cols ? row[j] : T(0.f);
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadsAhead; ++u) {
      if (r0 + u >= count) break;
      const int64_t i = i0 + rows[r0 + u];
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        if (t < tokens) {
          const float hv = h[t * inter + i];
#pragma unroll
          for (int j = 0; j < N; ++j) acc[t][j] += hv * static_cast<float>(wv[u].v[j]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t < tokens) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (j < cols) part[(s * tokens + t) * out + o + j] = acc[t][j];
      }
    }
  }
}

// Splits of the intermediate neurons for sparse_mlp_down: about four blocks per multiprocessor, at least 32
// neurons and at most kDownMaxRows per split, and at most 8 MiB of partial sums.
inline int64_t down_splits(int64_t inter, int64_t out, int tokens, int64_t block_cols, int64_t sms) {
  const int64_t col_blocks = (out + block_cols - 1) / block_cols;
  const int64_t fewest = (inter + kDownMaxRows - 1) / kDownMaxRows;
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{8} << 20) / (4 * std::max<int64_t>(1, tokens * out)));
  const int64_t want = std::min((4 * sms + col_blocks - 1) / col_blocks, by_memory);
  return std::max(fewest, std::clamp<int64_t>(want, 1, std::max<int64_t>(1, inter / 32)));
}

}  // namespace pefttorch::cuda
