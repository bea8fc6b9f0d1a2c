// Device code of the rank importance op (IncreLoRA; launcher: rank_importance.cu), with the host-side table the
// kernel reads. Kept apart so the CPU emulation test (csrc/tests/test_rank_importance_kernels_emulated.cpp) can
// compile and run it without a GPU.
//
// One launch scores every module: score[m] = weight * sum |dW[i, j] * G[ii, jj]| over the sampled (ii, jj), with
// dW[i, j] = sum_k B[i, k] E[k] A[k, j] over k < rank formed in float32 from the factors (never materialised).
//
// Work: the host gives each module a descriptor (ImportanceModule: pointers, strides, sampling grid, rank,
// weight) and a run of blocks; the table of descriptors of the modules that have work goes to the device, and a
// block finds its module by binary search on first_block. A module's blocks tile its sampled grid into
// rows_per_block x (col_threads * kImportanceColPasses) pieces. In a block the 256 threads form groups of
// col_threads (a power of two >= 32, just covering the sampled columns up to 256), one column per thread, and
// each group owns kImportanceRows consecutive sampled rows: a thread keeps one accumulator per row, so each
// element of A it loads serves kImportanceRows products. The rows of B diag(E) the block needs are staged in
// shared memory kImportanceKTile components at a time (any rank fits); within a warp every thread reads the same
// staged value (a broadcast). The block's sum of |dW * G| goes to out[m] with one atomicAdd, times the weight:
// so the order of the adds, and the last bits of the score, vary from run to run.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../ops.h"
#include "multi_tensor.cuh"

namespace pefttorch::cuda {

constexpr int kImportanceThreads = 256;
constexpr int kImportanceRows = 8;        // sampled rows per thread: accumulators, and products per load of A
constexpr int kImportanceKTile = 64;      // components of B diag(E) staged per step
constexpr int kImportanceColPasses = 4;   // column passes of a group per block: cols per block = 4 col_threads
constexpr int kImportanceMaxRows = kImportanceThreads / 32 * kImportanceRows;  // rows per block, at most

// One module as the kernel sees it. The same layout for every T (only the pointee types differ), built on the
// host by importance_table and copied to the device as bytes.
template <typename T>
struct ImportanceModule {
  const T* a;      // lora_a (cap, in)
  const T* b;      // lora_b (out, cap)
  const T* e;      // lora_e (cap,)
  const float* g;  // grad tile (rows, cols)
  int64_t a_stride_k, a_stride_j, b_stride_i, b_stride_k, e_stride, g_stride_r, g_stride_c;  // in elements
  int64_t row_offset, row_stride, col_offset, col_stride;
  int64_t rows, cols, rank;  // sampled rows and columns, components (all > 0: modules with no work are left out)
  int64_t first_block;       // the module's blocks are [first_block, first_block + row_chunks * col_chunks)
  int64_t col_chunks;        // pieces along the sampled columns
  int64_t out_index;         // the module's place in the result
  int32_t col_threads;       // threads per group: 32, 64, 128 or 256
  int32_t rows_per_block;    // kImportanceThreads / col_threads * kImportanceRows
  float weight;
};

using ImportancePlan = BlockPlan;

// One module's blocks over its sampled grid: groups of a warp or more (the block sum reduces whole warps); no
// blocks at rank 0.
inline ImportancePlan plan_importance(int64_t rows, int64_t cols, int64_t rank) {
  return plan_blocks(rank == 0 ? 0 : rows, cols, 32, kImportanceThreads, kImportanceRows, kImportanceColPasses);
}

// The descriptors of the modules with work, in order, and the blocks they need in all (*blocks).
template <typename T>
std::vector<ImportanceModule<T>> importance_table(const std::vector<RankImportanceModule>& modules, int64_t* blocks) {
  std::vector<ImportanceModule<T>> table;
  int64_t next = 0;
  for (size_t m = 0; m < modules.size(); ++m) {
    const RankImportanceModule& d = modules[m];
    const ImportancePlan p = plan_importance(d.rows, d.cols, d.rank);
    if (p.blocks == 0) continue;
    table.push_back({d.a.const_data_ptr<T>(), d.b.const_data_ptr<T>(), d.e.const_data_ptr<T>(),
                     d.g.const_data_ptr<float>(), d.a.stride(0), d.a.stride(1), d.b.stride(0), d.b.stride(1),
                     d.e.stride(0), d.g.stride(0), d.g.stride(1), d.row_offset, d.row_stride, d.col_offset,
                     d.col_stride, d.rows, d.cols, d.rank, next, p.col_chunks, static_cast<int64_t>(m),
                     p.col_threads, p.rows_per_block, static_cast<float>(d.weight)});
    next += p.blocks;
  }
  TORCH_CHECK(next <= std::numeric_limits<int32_t>::max(), "rank_importance: the sample needs ", next,
              " CUDA blocks, more than one launch can have (2^31 - 1); sample with larger strides");
  *blocks = next;
  return table;
}

// The sum of v over the block, in thread 0 (the other threads' results are meaningless). Warp sums first, then
// the warps' sums in a fixed order.
__device__ __forceinline__ float importance_block_sum(float v, float* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int tid = threadIdx.x;
  if (tid % 32 == 0) warp_sums[tid / 32] = v;
  __syncthreads();
  float sum = 0.f;
  if (tid == 0) {
    for (int w = 0; w < kImportanceThreads / 32; ++w) sum += warp_sums[w];
  }
  return sum;
}

// out[module.out_index] += weight * the block's share of its module's score, for the `count` modules of `table`
// (sorted by first_block). Launched with kImportanceThreads threads and as many blocks as importance_table said.
template <typename T>
__global__ void __launch_bounds__(kImportanceThreads)
    rank_importance_kernel(const ImportanceModule<T>* __restrict__ table, int64_t count, float* __restrict__ out) {
  __shared__ float s_be[kImportanceMaxRows][kImportanceKTile];  // B[i, k] E[k] for the block's rows, one k tile
  __shared__ float s_warp[kImportanceThreads / 32];

  const int64_t block = blockIdx.x;
  const int64_t lo = owner_of_block(table, count, block);
  // read in place, not copied: a register copy of the whole descriptor (~180 bytes) made ptxas spill
  const ImportanceModule<T>& d = table[lo];

  const int tid = threadIdx.x;
  const int group = tid / d.col_threads, lane = tid % d.col_threads;
  const int64_t piece = block - d.first_block;
  const int64_t row0 = piece / d.col_chunks * d.rows_per_block;  // the block's first sampled row
  const int64_t my_row0 = row0 + int64_t{group} * kImportanceRows;
  const int64_t col_begin = piece % d.col_chunks * d.col_threads * kImportanceColPasses;
  const int64_t col_end_max = col_begin + int64_t{d.col_threads} * kImportanceColPasses;
  const int64_t col_end = col_end_max < d.cols ? col_end_max : d.cols;
  const int64_t k_tiles = (d.rank + kImportanceKTile - 1) / kImportanceKTile;
  const int staged = d.rows_per_block * kImportanceKTile;

  float total = 0.f;
  // Every loop below that holds a barrier has block-uniform bounds (they depend on the module, not the thread).
  for (int64_t c0 = col_begin; c0 < col_end; c0 += d.col_threads) {
    const int64_t jj = c0 + lane;
    const bool col_ok = jj < col_end;
    const T* a_col = d.a + (col_ok ? (d.col_offset + jj * d.col_stride) * d.a_stride_j : 0);
    float acc[kImportanceRows];
#pragma unroll
    for (int r = 0; r < kImportanceRows; ++r) acc[r] = 0.f;
    for (int64_t t = 0; t < k_tiles; ++t) {
      const int64_t k0 = t * kImportanceKTile;
      const int kt = d.rank - k0 < kImportanceKTile ? static_cast<int>(d.rank - k0) : kImportanceKTile;
      // With one k tile the staged values serve every column pass: stage them once.
      if (k_tiles > 1 || c0 == col_begin) {
        __syncthreads();  // nobody still reads the previous tile
        // consecutive threads take consecutive k: B's rows are read along their (usually unit) stride
        for (int idx = tid; idx < staged; idx += kImportanceThreads) {
          const int r = idx / kImportanceKTile, kk = idx % kImportanceKTile;
          const int64_t ii = row0 + r;
          float v = 0.f;
          if (ii < d.rows && kk < kt) {
            const int64_t i = d.row_offset + ii * d.row_stride, k = k0 + kk;
            v = static_cast<float>(d.b[i * d.b_stride_i + k * d.b_stride_k]) * static_cast<float>(d.e[k * d.e_stride]);
          }
          s_be[r][kk] = v;
        }
        __syncthreads();
      }
      if (col_ok) {
        const int row = group * kImportanceRows;
        for (int kk = 0; kk < kt; ++kk) {
          const float av = static_cast<float>(a_col[(k0 + kk) * d.a_stride_k]);
#pragma unroll
          for (int r = 0; r < kImportanceRows; ++r) acc[r] += s_be[row + r][kk] * av;
        }
      }
    }
    if (col_ok) {
#pragma unroll
      for (int r = 0; r < kImportanceRows; ++r) {
        const int64_t ii = my_row0 + r;
        if (ii < d.rows) total += fabsf(acc[r] * d.g[ii * d.g_stride_r + jj * d.g_stride_c]);
      }
    }
  }
  const float sum = importance_block_sum(total, s_warp);
  if (tid == 0) atomicAdd(out + d.out_index, d.weight * sum);
}

}  // namespace pefttorch::cuda
