// The density loss's term of one activation, a^2 / (a^2 + eps), shared by the CPU and CUDA forward kernels (and the
// CPU emulation of the CUDA kernels): one rule for the overflow below, not a copy per device.
#pragma once

#include <limits>

#include "host_device.h"

namespace pefttorch {

// In acc_t, returned as the double it is summed in. |v| above sqrt(max): v^2 is inf and inf / inf NaN, where the
// term's limit is 1 (the gradient's is 0); an inf activation stays NaN, as its gradient is: only a finite one's
// square is taken to its limit.
template <typename acc_t>
PT_HOST_DEVICE double density_term(acc_t v, acc_t eps) {
  const acc_t v2 = v * v, big = std::numeric_limits<acc_t>::max();
  return v2 > big && (v < 0 ? -v : v) <= big ? 1.0 : static_cast<double>(v2 / (v2 + eps));
}

}  // namespace pefttorch
