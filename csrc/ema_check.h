// Argument checks shared by the CPU and CUDA EMA kernels, run before anything is written. They
// are the fast path's only per-tensor checks: vlfast.ops.ema_update_ reruns its Python checks
// after an error here to name the offending parameter.
#pragma once
#include <ATen/ATen.h>

namespace vlfast {

inline void check_ema_args(at::TensorList target, at::TensorList source, const at::Tensor& decay,
                           at::TensorList copies) {
  TORCH_CHECK_VALUE(target.size() == source.size(), "ema_update_: target has ", target.size(),
                    " tensors but source has ", source.size());
  TORCH_CHECK_VALUE(decay.numel() == 1, "ema_update_: decay must hold one value, got ", decay.numel());
  TORCH_CHECK_VALUE(target.empty() || decay.is_cpu() || decay.device() == target[0].device(),
                    "ema_update_: decay must be on the CPU or on ", target[0].device());
  const auto supported = [](const at::Tensor& x) {
    const auto dtype = x.scalar_type();
    return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
  };
  for (size_t i = 0; i < target.size(); ++i) {
    TORCH_CHECK_TYPE(supported(target[i]) && supported(source[i]), "ema_update_: target[", i, "] is ",
                     target[i].scalar_type(), " and source[", i, "] is ", source[i].scalar_type(),
                     "; supported: float32, float16, bfloat16, float64");
    TORCH_CHECK_VALUE(target[i].sizes() == source[i].sizes(), "ema_update_: target[", i, "] has shape ",
                      target[i].sizes(), " but source[", i, "] has shape ", source[i].sizes());
    TORCH_CHECK_VALUE(target[i].is_contiguous(), "ema_update_: target[", i, "] is not contiguous");
    TORCH_CHECK_VALUE(target[i].device() == target[0].device() && source[i].device() == target[0].device(),
                      "ema_update_: target[", i, "] and source[", i, "] must be on ", target[0].device());
  }
  TORCH_CHECK_VALUE(copies.empty() || copies.size() == target.size(), "ema_update_: copies has ", copies.size(),
                    " tensors; it must be empty or have one per target (", target.size(), ")");
  for (size_t i = 0; i < copies.size(); ++i) {
    const auto dtype = copies[i].scalar_type();
    TORCH_CHECK_TYPE(target[i].scalar_type() == at::kFloat && (dtype == at::kBFloat16 || dtype == at::kHalf),
                     "ema_update_: copies[", i, "] is ", dtype, " of a ", target[i].scalar_type(),
                     " target; copies are bfloat16 or float16 copies of float32 targets");
    TORCH_CHECK_VALUE(copies[i].sizes() == target[i].sizes() && copies[i].is_contiguous() &&
                          copies[i].device() == target[0].device(),
                      "ema_update_: copies[", i, "] must be contiguous, of shape ", target[i].sizes(), " and on ",
                      target[0].device(), "; got ", copies[i].sizes(), " on ", copies[i].device());
  }
}

}  // namespace vlfast
