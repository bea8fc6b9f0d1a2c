// C++ smoke test of the ops as a C++ user reaches them: through the dispatcher, on the CPU.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>

#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

int main() {
  const auto forward = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("pefttorch::lora_linear_forward", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double, double, const std::optional<at::Tensor>&)>();
  at::manual_seed(0);
  const auto x = at::randn({2, 5, 12}, at::kDouble), w = at::randn({7, 12}, at::kDouble);
  const auto a = at::randn({3, 12}, at::kDouble), b = at::randn({7, 3}, at::kDouble);
  const auto bias = at::randn({7}, at::kDouble);
  auto [y, s] = forward.call(x, w, a, b, bias, 0.5, 0.0, std::nullopt);
  const auto want = at::matmul(x, w.t()) + bias + 0.5 * at::matmul(at::matmul(x, a.t()), b.t());
  EXPECT(y.sizes() == want.sizes());
  EXPECT(at::allclose(y, want, 1e-12, 1e-12));
  EXPECT(s.sizes() == at::IntArrayRef({10, 3}));

  // With dropout the kept elements are scaled by 1/(1-p): check on W = 0, A = B = I.
  const auto eye = at::eye(12, at::kDouble);
  const auto ones = at::ones({64, 12}, at::kDouble);
  auto [yd, sd] = forward.call(ones, at::zeros({12, 12}, at::kDouble), eye, eye, std::nullopt, 1.0, 0.25,
                               at::scalar_tensor(42, at::kLong));
  const auto kept = yd.ne(0);
  EXPECT(at::allclose(yd.masked_select(kept), at::full({kept.sum().item<int64_t>()}, 1.0 / 0.75, at::kDouble)));
  const double rate = kept.to(at::kDouble).mean().item<double>();
  EXPECT(rate > 0.65 && rate < 0.85);

  // Bad input is an exception with a message, not a crash.
  bool threw = false;
  try {
    forward.call(x, w, a, at::randn({6, 3}, at::kDouble), bias, 1.0, 0.0, std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("lora_b.size(0) must equal out_features") != std::string::npos;
  }
  EXPECT(threw);
  std::puts("test_ops: ok");
  return 0;
}
