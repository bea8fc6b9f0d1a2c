// Dtype dispatch that nests: fn is called with a value of the C++ type of a float dtype, so each level of a
// nested dispatch names its type with decltype (nested AT_DISPATCH macros all call theirs scalar_t).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace pefttorch {

template <typename Fn>
void dispatch_float(at::ScalarType s, Fn&& fn) {
  switch (s) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "dispatch_float: unsupported dtype ", s);  // op bodies check dtypes before
  }
}

}  // namespace pefttorch
