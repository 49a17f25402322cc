// Autograd of dropout_add_layer_norm, for every device (the CPU kernel here, Triton on CUDA). In
// C++ because the op runs in every BERT layer's two output sublayers (42 calls in the trainer's
// step): with torch.library's Python autograd a 4×8 forward and backward cost the CPU's host
// 258 µs, Hugging Face's code 145 µs (benchmarks/profile_train_step.py; README has the numbers since).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace vlfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats forward_kernel(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                     double p, double eps, const at::Tensor& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vlfast::dropout_add_layer_norm", "")
                             .typed<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          double, double, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, residual, weight, bias, p, eps, seed);
}

Grads backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vlfast::dropout_add_layer_norm_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  // Under create_graph=True through autograd, whose formula for the backward op (Python, beside
  // the fake kernels) raises if a second derivative is taken; else straight to the kernel.
  if (at::GradMode::is_enabled()) return op.call(grad, x, residual, weight, mean, rstd, p, seed);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad, x, residual, weight, mean, rstd, p, seed);
}

struct DropoutAddLayerNorm : torch::autograd::Function<DropoutAddLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, const at::Tensor& bias, double p, double eps,
                               const at::Tensor& seed) {
    auto [out, mean, rstd] = forward_kernel(x, residual, weight, bias, p, eps, seed);
    ctx->save_for_backward({x, residual, weight, mean, rstd, seed});
    ctx->saved_data["p"] = p;
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_residual, grad_weight, grad_bias] =
        backward_kernel(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4],
                        ctx->saved_data["p"].toDouble(), saved[5]);
    return {grad_x, grad_residual, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Stats dropout_add_layer_norm_autograd(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                      const at::Tensor& bias, double p, double eps, const at::Tensor& seed) {
  const variable_list outputs = DropoutAddLayerNorm::apply(x, residual, weight, bias, p, eps, seed);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, Autograd, m) {
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_autograd);
}

}  // namespace vlfast
