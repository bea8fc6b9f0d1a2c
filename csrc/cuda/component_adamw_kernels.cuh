// Device code of the component AdamW op (IncreLoRA/AdaLoRA; launcher: component_adamw.cu), with the host-side table
// the kernel reads. Kept apart so the CPU emulation test (csrc/tests/test_component_adamw_kernels_emulated.cpp) can
// compile and run it without a GPU.
//
// One launch steps every tensor: for each tensor m and row k < rows[m], AdamW on p[k, :], m[k, :], v[k, :] from
// g[k, :] with the row's step count steps[m][k] (the arithmetic: csrc/common/adamw.h, in float32, float64 for
// float64 tensors).
//
// Work: the host gives each tensor with work a descriptor (AdamwTensor: pointers, the gradient's and the steps'
// strides, rows, cols, warmup) and a run of blocks; the table goes to the device, and a block finds its tensor by
// binary search on first_block. A tensor's blocks tile its (rows, cols) into rows_per_block x (col_threads *
// kAdamwColPasses) pieces. In a block the threads form groups of col_threads (a power of two from 1 to
// kAdamwThreads, just covering the columns: a (cap, 1) lora_E gets groups of 1, so no thread idles), one column per
// thread and pass; group q takes the block's rows q, q + groups, q + 2 groups, ... (kAdamwRows of them), so that
// for narrow tensors neighbouring groups touch neighbouring rows (coalesced). A thread reads its row's step count
// once and forms the row's bias corrections and learning rate once, for all its passes over the row's columns.
// Each element is written by exactly one thread, with no atomics: the result is the same from run to run.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../common/adamw.h"
#include "../ops.h"
#include "multi_tensor.cuh"

namespace pefttorch::cuda {

constexpr int kAdamwThreads = 256;
constexpr int kAdamwRows = 4;        // rows per group per block
constexpr int kAdamwColPasses = 4;   // column passes of a group per block: cols per block = 4 col_threads

// One tensor as the kernel sees it. The same layout for every T but for the pointee and acc types, built on the host
// by adamw_table and copied to the device as bytes.
template <typename T>
struct AdamwTensor {
  T* p;               // params (rows_total, cols), contiguous
  T* m;               // exp_avg, likewise
  T* v;               // exp_avg_sq, likewise
  const T* g;         // grad, any strides
  const float* steps; // step counts, >= rows of them
  int64_t g_stride_r, g_stride_c, steps_stride;  // in elements
  int64_t rows, cols;     // rows to update and columns (both > 0: tensors with no work are left out)
  int64_t first_block;    // the tensor's blocks are [first_block, first_block + row_chunks * col_chunks)
  int64_t col_chunks;     // pieces along the columns
  int32_t col_threads;    // threads per group: 1, 2, 4, ..., 256
  int32_t rows_per_block; // kAdamwThreads / col_threads * kAdamwRows
  adamw_acc_t<T> warmup;  // 0: none
};

using AdamwPlan = BlockPlan;

// One tensor's blocks: groups of 1 thread or more (a (cap, 1) e gets one thread per row), rows to update only.
inline AdamwPlan plan_adamw(int64_t rows, int64_t cols) {
  return plan_blocks(rows, cols, 1, kAdamwThreads, kAdamwRows, kAdamwColPasses);
}

// The descriptors of the tensors with work, in order, and the blocks they need in all (*blocks).
template <typename T>
std::vector<AdamwTensor<T>> adamw_table(const std::vector<ComponentAdamwTensor>& tensors, int64_t* blocks) {
  std::vector<AdamwTensor<T>> table;
  int64_t next = 0;
  for (const ComponentAdamwTensor& d : tensors) {
    const int64_t cols = d.p.size(1);
    const AdamwPlan plan = plan_adamw(d.rows, cols);
    if (plan.blocks == 0) continue;
    table.push_back({d.p.mutable_data_ptr<T>(), d.m.mutable_data_ptr<T>(), d.v.mutable_data_ptr<T>(),
                     d.g.const_data_ptr<T>(), d.steps.const_data_ptr<float>(), d.g.stride(0), d.g.stride(1),
                     d.steps.stride(0), d.rows, cols, next, plan.col_chunks, plan.col_threads, plan.rows_per_block,
                     static_cast<adamw_acc_t<T>>(d.warmup)});
    next += plan.blocks;
  }
  TORCH_CHECK(next <= std::numeric_limits<int32_t>::max(), "component_adamw_: the tensors need ", next,
              " CUDA blocks, more than one launch can have (2^31 - 1)");
  *blocks = next;
  return table;
}

// One AdamW step on the block's piece of its tensor, for the `count` tensors of `table` (sorted by first_block).
// Launched with kAdamwThreads threads and as many blocks as adamw_table said.
template <typename T>
__global__ void __launch_bounds__(kAdamwThreads)
    component_adamw_kernel(const AdamwTensor<T>* __restrict__ table, int64_t count,
                           const AdamwScalars<adamw_acc_t<T>> h) {
  using acc_t = adamw_acc_t<T>;
  const int64_t block = blockIdx.x;
  const int64_t lo = owner_of_block(table, count, block);
  // read in place, not copied into registers: most fields are used once
  const AdamwTensor<T>& d = table[lo];

  const int tid = threadIdx.x;
  const int groups = kAdamwThreads / d.col_threads;
  const int group = tid / d.col_threads, lane = tid % d.col_threads;
  const int64_t piece = block - d.first_block;
  const int64_t row0 = piece / d.col_chunks * d.rows_per_block;  // the block's first row
  const int64_t col_begin = piece % d.col_chunks * d.col_threads * kAdamwColPasses;
  const int64_t col_end_max = col_begin + int64_t{d.col_threads} * kAdamwColPasses;
  const int64_t col_end = col_end_max < d.cols ? col_end_max : d.cols;

  for (int r = 0; r < kAdamwRows; ++r) {
    const int64_t row = row0 + int64_t{r} * groups + group;
    if (row >= d.rows) break;  // the rows of later r are larger still
    const AdamwRow<acc_t> rs = adamw_row<acc_t>(h, static_cast<acc_t>(d.steps[row * d.steps_stride]), d.warmup);
    T* p = d.p + row * d.cols;
    T* m = d.m + row * d.cols;
    T* v = d.v + row * d.cols;
    const T* g = d.g + row * d.g_stride_r;
    for (int64_t j = col_begin + lane; j < col_end; j += d.col_threads) {
      adamw_element<T, acc_t>(h, rs, p[j], g[j * d.g_stride_c], m[j], v[j]);
    }
  }
}

}  // namespace pefttorch::cuda
