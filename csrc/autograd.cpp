// Autograd of the ops a model calls in every layer: dropout_add_layer_norm (every device: the CPU
// kernel here, Triton on CUDA) and attention_cpu. In C++ because the trainer's step calls them
// dozens of times (dropout_add_layer_norm 42 times): with torch.library's Python autograd a 4×8
// dropout_add_layer_norm forward and backward cost the CPU's host 258 µs, Hugging Face's code
// 145 µs (benchmarks/profile_train_step.py; README has the numbers since).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace vlfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

template <typename Signature, typename... Args>
auto call_kernel(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// A backward op: under create_graph=True through autograd, whose formula for it (Python, beside
// the fake kernels) raises if a second derivative is taken; else straight to the kernel.
template <typename Signature, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_kernel(op, std::forward<Args>(args)...);
}

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LayerNormGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct DropoutAddLayerNorm : torch::autograd::Function<DropoutAddLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, const at::Tensor& bias, double p, double eps,
                               const at::Tensor& seed) {
    static const auto op = find_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, double, const at::Tensor&)>("vlfast::dropout_add_layer_norm");
    auto [out, mean, rstd] = call_kernel(op, x, residual, weight, bias, p, eps, seed);
    ctx->save_for_backward({x, residual, weight, mean, rstd, seed});
    ctx->saved_data["p"] = p;
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<LayerNormGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>(
            "vlfast::dropout_add_layer_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_residual, grad_weight, grad_bias] =
        call_backward(op, grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4],
                      ctx->saved_data["p"].toDouble(), saved[5]);
    return {grad_x, grad_residual, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor3 dropout_add_layer_norm_autograd(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                      const at::Tensor& bias, double p, double eps, const at::Tensor& seed) {
  const variable_list outputs = DropoutAddLayerNorm::apply(x, residual, weight, bias, p, eps, seed);
  return {outputs[0], outputs[1], outputs[2]};
}

struct AttentionCpu : torch::autograd::Function<AttentionCpu> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding_mask, double scale) {
    static const auto op =
        find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, double)>("vlfast::attention_cpu");
    auto [out, probs] = call_kernel(op, q, k, v, key_padding_mask, scale);
    ctx->save_for_backward({q, k, v, probs});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({probs});
    return {out, probs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double)>("vlfast::attention_cpu_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] =
        call_backward(op, grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["scale"].toDouble());
    return {grad_q, grad_k, grad_v, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_cpu_autograd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const std::optional<at::Tensor>& key_padding_mask,
                                                          double scale) {
  const variable_list outputs = AttentionCpu::apply(q, k, v, key_padding_mask, scale);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, Autograd, m) {
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_autograd);
  m.impl("attention_cpu", &attention_cpu_autograd);
}

}  // namespace vlfast
