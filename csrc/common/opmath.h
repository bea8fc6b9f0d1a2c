// The precision a kernel forms a product of two values of different dtypes in, for kernels shared by CPU and
// CUDA code (and the CPU emulation of the CUDA kernels).
#pragma once

#include <type_traits>

namespace pefttorch {

// float32, or float64 when either side is float64: what a product of an S and a C value is formed in
template <typename S, typename C>
using pair_opmath_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<C, double>, double, float>;

}  // namespace pefttorch
