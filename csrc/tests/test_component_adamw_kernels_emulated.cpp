// The component AdamW CUDA kernel (csrc/cuda/component_adamw_kernels.cuh) compiled as plain C++ and run on the CPU
// under cuda_emulation.h, with its descriptor table built by the same host code as the launcher's, against a plain
// float64 loop over the definition. Covered: several tensors of different shapes in one launch (the binary search
// from block to tensor), one column (groups of one thread), more rows than a block holds, more columns than a block
// holds, rows 0 / some / all (the rows past rows[m] and every element past the tensor must keep their bits),
// strided and transposed gradients, per-row steps 1 to 1000, warmup and weight decay on and off, and every dtype.
#include "check.h"
#include "cuda_emulation.h"

// clang-format off: the emulation must come first
#include "../cuda/component_adamw_kernels.cuh"
// clang-format on

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

using namespace pefttorch;
using namespace pefttorch::cuda;

namespace {

using pt_test::fail;

struct Spec {
  int64_t total_rows, cols, rows;
  double warmup = 0.0;
  int grad_layout = 0;  // 0 contiguous, 1 transposed, 2 every other column of a wider matrix
};

constexpr double kLr = 0.01, kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8;

// The tensor of `spec`, fresh random data (never zeros: zeros hide unread elements; v > 0), in `dtype`, with the
// step counts of its rows cycling through 1, 2, 50, 1000.
ComponentAdamwTensor make(const Spec& s, at::ScalarType dtype) {
  const int64_t r = s.total_rows, c = s.cols;
  at::Tensor g;
  if (s.grad_layout == 1) {
    g = at::randn({c, r}).to(dtype).t();
  } else if (s.grad_layout == 2) {
    g = at::randn({r, 2 * c}).to(dtype).slice(1, 0, 2 * c, 2);
  } else {
    g = at::randn({r, c}).to(dtype);
  }
  at::Tensor steps = at::empty({r}, at::kFloat);
  const float cycle[] = {1.f, 2.f, 50.f, 1000.f};
  for (int64_t k = 0; k < r; ++k) steps[k] = cycle[k % 4];
  return {at::randn({r, c}).to(dtype), g, 0.1 * at::randn({r, c}).to(dtype), 0.01 * at::rand({r, c}).to(dtype) + 1e-3,
          steps, s.rows, s.warmup};
}

// The definition in float64 from the same (rounded) inputs: the state of (p, m, v) after the step, as float64.
std::vector<at::Tensor> plain_step(const ComponentAdamwTensor& d, double weight_decay) {
  at::Tensor p = d.p.to(at::kDouble).clone(), m = d.m.to(at::kDouble).clone(), v = d.v.to(at::kDouble).clone();
  const at::Tensor g = d.g.to(at::kDouble);
  for (int64_t k = 0; k < d.rows; ++k) {
    const double s = d.steps[k].item<float>();
    const double lr_k = kLr * (d.warmup > 0 ? std::min(1.0, s / d.warmup) : 1.0);
    for (int64_t j = 0; j < d.p.size(1); ++j) {
      const double gv = g[k][j].item<double>();
      double pv = p[k][j].item<double>() * (1 - lr_k * weight_decay);
      double mv = m[k][j].item<double>();
      mv += (1 - kBeta1) * (gv - mv);
      const double vv = kBeta2 * v[k][j].item<double>() + (1 - kBeta2) * gv * gv;
      pv -= lr_k / (1 - std::pow(kBeta1, s)) * mv / (std::sqrt(vv / (1 - std::pow(kBeta2, s))) + kEps);
      p[k][j] = pv;
      m[k][j] = mv;
      v[k][j] = vv;
    }
  }
  return {p, m, v};
}

// |got - want| <= rel |want| + abs, elementwise (want in float64).
bool close(const at::Tensor& got, const at::Tensor& want, double rel, double abs) {
  const at::Tensor err = (got.to(at::kDouble) - want).abs();
  return (err <= rel * want.abs() + abs).all().item<bool>();
}

template <typename T>
void check(const std::string& name, const std::vector<Spec>& specs, double weight_decay) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const std::string what = name + " " + c10::toString(dtype) + " wd " + std::to_string(weight_decay);
  std::vector<ComponentAdamwTensor> tensors;
  for (const Spec& s : specs) tensors.push_back(make(s, dtype));
  std::vector<std::vector<at::Tensor>> before, want;
  for (const auto& d : tensors) {
    before.push_back({d.p.clone(), d.m.clone(), d.v.clone()});
    want.push_back(plain_step(d, weight_decay));
  }
  int64_t blocks = -1;
  const std::vector<AdamwTensor<T>> table = adamw_table<T>(tensors, &blocks);

  // the table: tensors with work only, in order, their runs of blocks back to back
  int64_t next = 0;
  size_t t = 0;
  for (size_t m = 0; m < tensors.size(); ++m) {
    const AdamwPlan p = plan_adamw(tensors[m].rows, tensors[m].p.size(1));
    if (p.blocks == 0) continue;
    if (t >= table.size() || table[t].p != tensors[m].p.data_ptr() || table[t].first_block != next) {
      fail(what + ": table entry of tensor " + std::to_string(m));
      return;
    }
    next += p.blocks;
    ++t;
  }
  if (t != table.size() || blocks != next) fail(what + ": " + std::to_string(blocks) + " blocks in the table");

  if (blocks > 0) {
    pt_emu::launch(dim3(static_cast<unsigned>(blocks)), kAdamwThreads, component_adamw_kernel<T>, table.data(),
                   static_cast<int64_t>(table.size()),
                   adamw_scalars<adamw_acc_t<T>>(kLr, kBeta1, kBeta2, kEps, weight_decay));
  }
  // The step in float32 (double: float64) from the same inputs as the definition: a few roundings of that precision
  // (1 - beta2 and beta2^s in float32 are off by ~1e-5 relative of the update, which is ~lr: 1e-6 absolute), then
  // one rounding to T (half an ulp: 2^-9 relative for bfloat16, 2^-12 for float16, with margin).
  const bool is_double = std::is_same_v<T, double>;
  const double step_rel = is_double ? 1e-13 : 1e-5, step_abs = is_double ? 1e-14 : 1e-6;
  const double store_rel = std::is_same_v<T, c10::BFloat16> ? 1.0 / 256 : std::is_same_v<T, c10::Half> ? 1.0 / 1024
                                                                                                         : 0.0;
  for (size_t m = 0; m < tensors.size(); ++m) {
    const auto& d = tensors[m];
    const int64_t n = d.rows, r = d.p.size(0);
    const at::Tensor got[] = {d.p, d.m, d.v};
    const char* names[] = {"p", "m", "v"};
    for (int i = 0; i < 3; ++i) {
      const std::string where = what + ": tensor " + std::to_string(m) + " " + names[i];
      if (!close(got[i].slice(0, 0, n), want[m][i].slice(0, 0, n), step_rel + store_rel, step_abs)) {
        fail(where + " differs from the definition");
      }
      if (!at::equal(got[i].slice(0, n, r), before[m][i].slice(0, n, r))) fail(where + " changed past rows[m]");
    }
  }
}

template <typename T>
void check_all() {
  // total_rows, cols, rows[, warmup, grad_layout]
  const std::vector<Spec> mixed = {
      {1, 1, 1},                // one element
      {17, 3, 9, 0.0, 1},       // partial rows, transposed grad, groups of 4
      {3, 17, 3, 100.0, 2},     // all rows, warmup, strided grad
      {17, 1, 17, 3.0},         // lora_E-like (cap, 1): groups of 1, warmup shorter than some steps
      {6, 5, 0},                // rows 0: no blocks, untouched
      {1100, 2, 1050, 10.0, 1}, // more rows than a block holds (128 groups x 4 = 512): 3 blocks
      {5, 1100, 4, 0.0, 0},     // two column pieces (1024 + 76)
      {40, 33, 37, 0.0, 2},     // groups of 64, rows over several groups
  };
  for (const double wd : {0.0, 0.1}) check<T>("mixed", mixed, wd);
  // many tensors, each a block or none: the search from block to tensor over a long table
  std::vector<Spec> many;
  for (int m = 0; m < 41; ++m) many.push_back({1 + m % 5, 1 + m % 7, (m % 3 == 0) ? 0 : 1 + m % 5, 0.5 * m, m % 3});
  check<T>("many", many, 0.05);
  check<T>("only rows 0", {{4, 4, 0}}, 0.0);  // no launch at all
}

void check_plans() {
  const AdamwPlan p1 = plan_adamw(1, 1), p2 = plan_adamw(100, 33), p3 = plan_adamw(9, 1100);
  if (p1.col_threads != 1 || p1.rows_per_block != 1024 || p1.blocks != 1) fail("plan for 1 x 1");
  if (p2.col_threads != 64 || p2.rows_per_block != 16 || p2.col_chunks != 1 || p2.blocks != 7) fail("plan 100 x 33");
  if (p3.col_threads != 256 || p3.rows_per_block != 4 || p3.col_chunks != 2 || p3.blocks != 6) fail("plan 9 x 1100");
  if (plan_adamw(0, 5).blocks != 0 || plan_adamw(5, 0).blocks != 0) fail("plans without work");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_plans();
  check_all<float>();
  check_all<double>();
  check_all<c10::Half>();
  check_all<c10::BFloat16>();
  return pt_test::finish("test_component_adamw_kernels_emulated");
}
