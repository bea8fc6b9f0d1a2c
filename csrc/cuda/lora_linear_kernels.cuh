// Device code of the fused LoRA linear's CUDA kernels (host launchers: lora_linear.cu). Kept apart so
// that csrc/tests/test_cuda_kernels_emulated.cpp can also compile it as plain C++ and run it on the CPU
// under csrc/tests/cuda_emulation.h, which checks the tiling, indexing and masking without a GPU.
//
//   down:              s  = dropout(x) A^T                        (tokens, r)
//   expand_accumulate: dx += mask * (ds A) / (1 - p)              in place, after dx = dy W
//   grad_a:            dA = ds^T dropout(x)                       (r, in)
//
// All three are tiled products on one warp-level MMA interface (mma.cuh): tensor cores for fp16/bf16,
// FMA for fp32/fp64, fp32 (fp64) accumulation. Blocks are 4 warps; each mask is regenerated from the
// Philox seed while the tile is loaded.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/philox.h"
#include "mma.cuh"

namespace pefttorch::cuda {

constexpr int kThreads = 128;  // 4 warps

// Runs the callable with TILE = the rank r rounded up to 16, 32 or 64 (larger ranks loop or grid over
// tiles of 64): a compile-time tile keeps the accumulator fragments in registers.
#define PT_RANK_TILE_SWITCH(r, TILE, ...)    \
  [&] {                                      \
    if ((r) <= 16) {                         \
      constexpr int TILE = 16;               \
      return __VA_ARGS__();                  \
    } else if ((r) <= 32) {                  \
      constexpr int TILE = 32;               \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr int TILE = 64;               \
      return __VA_ARGS__();                  \
    }                                        \
  }()

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The rank tile expand and grad_a use: fp64 tiles stop at 32 ranks, where 64 would not fit the 48 KB of
// static shared memory (expand) or would spill registers (grad_a's fp64 accumulators).
template <typename T>
constexpr int rank_tile_for(int tile) {
  return sizeof(T) == 8 && tile > 32 ? 32 : tile;
}

// Four consecutive elements, loaded in one instruction where aligned (8 bytes for fp16/bf16, 16 for fp32).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// v = dropout(x)[row, col .. col+3], zero outside the (rows, cols) matrix. The mask index is
// row * cols + col, as in csrc/common/philox.h, whatever the row stride ld.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_dropped4(const T* __restrict__ x, int64_t ld, int64_t rows, int64_t cols,
                                              int64_t row, int64_t col, const Dropout& d, acc_t v[4]) {
  if (row >= rows) {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = acc_t(0);
    return;
  }
  acc_t f[4];
  d.factors4<acc_t>(static_cast<uint64_t>(row) * static_cast<uint64_t>(cols) + static_cast<uint64_t>(col), f);
  const T* p = x + row * ld + col;
  if (col + 3 < cols && reinterpret_cast<uintptr_t>(p) % sizeof(Quad<T>) == 0) {
    const Quad<T> q = *reinterpret_cast<const Quad<T>*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = static_cast<acc_t>(q.v[j]) * f[j];
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = col + j < cols ? static_cast<acc_t>(p[j]) * f[j] : acc_t(0);
}

// s[m, n] = sum_k dropout(x)[m, k] * a[n, k]: one block computes 64 rows x BN ranks over the columns
// [z * cols_per_split, (z + 1) * cols_per_split) of split z = blockIdx.z; warp w owns rows 16w .. 16w+15.
// Tiles of x and a are staged in shared memory 32 columns at a time. With one split the block writes s;
// with several, ws[z, m, n] in the accumulation type, for the caller to sum over z (deterministic, no
// atomics). The split is what makes it fast: one block per 64 rows leaves a GPU with one block of 4 warps
// per multiprocessor, waiting on its loads (0.45 ms for 8192 x 4096 on an H200, 30x the time to read x).
template <typename T, int BN>
__global__ void __launch_bounds__(kThreads)
    lora_down_dropout_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ a, T* __restrict__ s,
                             typename AccType<T>::type* __restrict__ ws, int64_t M, int64_t K, int64_t R,
                             int64_t cols_per_split, Dropout d) {
  using MM = Mma<T>;
  using acc_t = typename MM::acc_t;
  constexpr int BM = 64, BK = 32, LDT = BK + 8, LDC = BN + 4;
  constexpr int kTileBytes = (BM + BN) * LDT * sizeof(T), kOutBytes = BM * LDC * sizeof(acc_t);
  __shared__ __align__(32) unsigned char smem[kTileBytes > kOutBytes ? kTileBytes : kOutBytes];
  T* xs = reinterpret_cast<T*>(smem);         // [BM][LDT] dropout(x) tile
  T* as = xs + BM * LDT;                       // [BN][LDT] a tile
  acc_t* cs = reinterpret_cast<acc_t*>(smem);  // [BM][LDC] result, reuses the tiles after the loop

  const int warp = threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t z = blockIdx.z, k_begin = z * cols_per_split, k_end = std::min(K, k_begin + cols_per_split);
  typename MM::Acc acc[BN / 16];
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) MM::fill(acc[j], acc_t(0));

  // cols_per_split is a multiple of BK: only the last tile of the last split reaches past K
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int i = threadIdx.x; i < BM * BK / 4; i += kThreads) {
      const int row = i / (BK / 4), q = (i % (BK / 4)) * 4;
      acc_t v[4];
      load_dropped4(x, ldx, M, K, m0 + row, k0 + q, d, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) xs[row * LDT + q + j] = static_cast<T>(v[j]);
    }
    for (int i = threadIdx.x; i < BN * BK; i += kThreads) {
      const int n = i / BK, kk = i % BK;
      as[n * LDT + kk] = (n0 + n < R && k0 + kk < K) ? a[(n0 + n) * K + k0 + kk] : static_cast<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      typename MM::template A<row_major> fa;
      MM::load(fa, xs + warp * 16 * LDT + kk, LDT);
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        typename MM::template B<col_major> fb;  // B(k, n) = a[n, k]
        MM::load(fb, as + j * 16 * LDT + kk, LDT);
        MM::mma(acc[j], fa, fb);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) MM::store(cs + warp * 16 * LDC + j * 16, acc[j], LDC);
  __syncthreads();
  for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
    const int row = i / BN, n = i % BN;
    if (m0 + row >= M || n0 + n >= R) continue;
    if (ws != nullptr) {
      ws[(z * M + m0 + row) * R + n0 + n] = cs[row * LDC + n];
    } else {
      s[(m0 + row) * R + n0 + n] = static_cast<T>(cs[row * LDC + n]);
    }
  }
}

// dx[m, k] += dropout_factor(m, k) * sum_j ds[m, j] * a[j, k]: one block updates a 64 x 64 tile of dx,
// looping over the rank RC at a time; warp w owns rows 16w .. 16w+15.
template <typename T, int RC>
__global__ void __launch_bounds__(kThreads)
    lora_expand_dropout_kernel(T* __restrict__ dx, int64_t lddx, const T* __restrict__ ds, const T* __restrict__ a,
                               int64_t M, int64_t K, int64_t R, Dropout d) {
  using MM = Mma<T>;
  using acc_t = typename MM::acc_t;
  constexpr int BM = 64, BN = 64, LDD = RC + 8, LDA = BN + 8, LDC = BN + 4;
  constexpr int kTileBytes = (BM * LDD + RC * LDA) * sizeof(T), kOutBytes = BM * LDC * sizeof(acc_t);
  __shared__ __align__(32) unsigned char smem[kTileBytes > kOutBytes ? kTileBytes : kOutBytes];
  T* dss = reinterpret_cast<T*>(smem);         // [BM][LDD] ds tile
  T* as = dss + BM * LDD;                      // [RC][LDA] a tile
  acc_t* cs = reinterpret_cast<acc_t*>(smem);  // [BM][LDC] low-rank product, reuses the tiles

  const int warp = threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, k0 = static_cast<int64_t>(blockIdx.y) * BN;
  typename MM::Acc acc[BN / 16];
#pragma unroll
  for (int c = 0; c < BN / 16; ++c) MM::fill(acc[c], acc_t(0));

  for (int64_t r0 = 0; r0 < R; r0 += RC) {
    for (int i = threadIdx.x; i < BM * RC; i += kThreads) {
      const int row = i / RC, j = i % RC;
      dss[row * LDD + j] = (m0 + row < M && r0 + j < R) ? ds[(m0 + row) * R + r0 + j] : static_cast<T>(0.f);
    }
    for (int i = threadIdx.x; i < RC * BN; i += kThreads) {
      const int j = i / BN, c = i % BN;
      as[j * LDA + c] = (r0 + j < R && k0 + c < K) ? a[(r0 + j) * K + k0 + c] : static_cast<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < RC; kk += 16) {
      typename MM::template A<row_major> fa;
      MM::load(fa, dss + warp * 16 * LDD + kk, LDD);
#pragma unroll
      for (int c = 0; c < BN / 16; ++c) {
        typename MM::template B<row_major> fb;
        MM::load(fb, as + kk * LDA + c * 16, LDA);
        MM::mma(acc[c], fa, fb);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int c = 0; c < BN / 16; ++c) MM::store(cs + warp * 16 * LDC + c * 16, acc[c], LDC);
  __syncthreads();
  for (int i = threadIdx.x; i < BM * BN / 4; i += kThreads) {
    const int row = i / (BN / 4), q = (i % (BN / 4)) * 4;
    const int64_t m = m0 + row, k = k0 + q;
    if (m >= M) continue;
    acc_t f[4];
    d.factors4<acc_t>(static_cast<uint64_t>(m) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k), f);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (k + j < K) {
        T* p = dx + m * lddx + k + j;
        *p = static_cast<T>(static_cast<acc_t>(*p) + f[j] * cs[row * LDC + q + j]);
      }
    }
  }
}

// ws[z, n, k] = sum over rows m of split z of ds[m, n] * dropout(x)[m, k], for an RN x 64 tile of dA;
// warp w owns columns 16w .. 16w+15. The caller sums ws over z: deterministic, no atomics.
template <typename T, int RN>
__global__ void __launch_bounds__(kThreads)
    lora_grad_a_dropout_kernel(const T* __restrict__ ds, const T* __restrict__ x, int64_t ldx,
                               typename AccType<T>::type* __restrict__ ws, int64_t M, int64_t K, int64_t R,
                               int64_t rows_per_split, Dropout d) {
  using MM = Mma<T>;
  using acc_t = typename MM::acc_t;
  constexpr int BKM = 32, BN = 64, LDD = RN + 8, LDX = BN + 8, LDC = BN + 4;
  constexpr int kTileBytes = BKM * (LDD + LDX) * sizeof(T), kOutBytes = RN * LDC * sizeof(acc_t);
  __shared__ __align__(32) unsigned char smem[kTileBytes > kOutBytes ? kTileBytes : kOutBytes];
  T* dss = reinterpret_cast<T*>(smem);         // [BKM][LDD] ds rows
  T* xs = dss + BKM * LDD;                     // [BKM][LDX] dropout(x) rows
  acc_t* cs = reinterpret_cast<acc_t*>(smem);  // [RN][LDC] partial dA, reuses the tiles

  const int warp = threadIdx.x / 32;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BN, n0 = static_cast<int64_t>(blockIdx.y) * RN;
  const int64_t z = blockIdx.z, m_begin = z * rows_per_split, m_end = std::min(M, m_begin + rows_per_split);
  typename MM::Acc acc[RN / 16];
#pragma unroll
  for (int t = 0; t < RN / 16; ++t) MM::fill(acc[t], acc_t(0));

  for (int64_t m0 = m_begin; m0 < m_end; m0 += BKM) {
    for (int i = threadIdx.x; i < BKM * RN; i += kThreads) {
      const int mm = i / RN, n = i % RN;
      dss[mm * LDD + n] = (m0 + mm < m_end && n0 + n < R) ? ds[(m0 + mm) * R + n0 + n] : static_cast<T>(0.f);
    }
    for (int i = threadIdx.x; i < BKM * BN / 4; i += kThreads) {
      const int mm = i / (BN / 4), q = (i % (BN / 4)) * 4;
      acc_t v[4];
      load_dropped4(x, ldx, m_end, K, m0 + mm, k0 + q, d, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) xs[mm * LDX + q + j] = static_cast<T>(v[j]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BKM; kk += 16) {
      typename MM::template B<row_major> fb;  // B(m, k) = dropout(x)[m, k]
      MM::load(fb, xs + kk * LDX + warp * 16, LDX);
#pragma unroll
      for (int t = 0; t < RN / 16; ++t) {
        typename MM::template A<col_major> fa;  // A(n, m) = ds[m, n]
        MM::load(fa, dss + kk * LDD + t * 16, LDD);
        MM::mma(acc[t], fa, fb);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < RN / 16; ++t) MM::store(cs + t * 16 * LDC + warp * 16, acc[t], LDC);
  __syncthreads();
  for (int i = threadIdx.x; i < RN * BN; i += kThreads) {
    const int n = i / BN, c = i % BN;
    if (n0 + n < R && k0 + c < K) ws[(z * R + n0 + n) * K + k0 + c] = cs[n * LDC + c];
  }
}

// Launch shapes, shared by the launchers and the emulated tests: a length (tokens or in_features) split over
// blockIdx.z so that `tiles` x splits blocks are about `blocks` in all, each split at least 256 long and a
// multiple of 32 (the kernels' step along it).
struct Split {
  int64_t splits, per_split;
};
inline Split split_length(int64_t length, int64_t tiles, int64_t blocks) {
  const int64_t want = std::clamp<int64_t>(ceil_div(blocks, std::max<int64_t>(1, tiles)), 1,
                                           std::max<int64_t>(1, ceil_div(length, 256)));
  const int64_t per = ceil_div(ceil_div(length, want), 32) * 32;
  return {ceil_div(length, per), per};
}
// down splits in_features, eight blocks per multiprocessor (more blocks, more loads of x in flight).
inline Split down_split(int64_t M, int64_t K, int64_t R, int BN, int64_t sms) {
  return split_length(K, ceil_div(M, 64) * ceil_div(R, BN), 8 * sms);
}
// grad_a splits the tokens, four blocks per multiprocessor.
inline Split grad_a_split(int64_t M, int64_t K, int64_t R, int RN, int64_t sms) {
  return split_length(M, ceil_div(K, 64) * ceil_div(R, RN), 4 * sms);
}

}  // namespace pefttorch::cuda
