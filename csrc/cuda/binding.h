// Helpers for the .cpp files that bind CUDA kernels to torch ops.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "float_kind.h"

namespace vlfast {

inline FloatKind float_kind(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat: return FloatKind::f32;
    case c10::kHalf: return FloatKind::f16;
    case c10::kBFloat16: return FloatKind::bf16;
    case c10::kDouble: return FloatKind::f64;
    default: TORCH_CHECK_TYPE(false, "vlfast CUDA kernels take float32/float16/bfloat16/float64, got ", dtype);
  }
}

}  // namespace vlfast
