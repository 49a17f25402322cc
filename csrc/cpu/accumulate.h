// Accumulation type of the CPU kernels: fp32 math unless an operand is fp64, one rounding at the end.
#pragma once
#include <type_traits>

namespace vlfast {

template <typename... Ts>
using acc_t = std::conditional_t<(std::is_same_v<Ts, double> || ...), double, float>;

}  // namespace vlfast
