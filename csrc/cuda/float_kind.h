// The floating-point dtypes the CUDA kernels are instantiated for, named without torch headers
// so that .cu files and their .cpp bindings share them.
#pragma once

namespace vlfast {

enum class FloatKind : int { f32, f16, bf16, f64 };

}  // namespace vlfast
