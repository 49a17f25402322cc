// Autograd of vlfast's kernels: dropout_add_layer_norm (every device: the CPU kernel here, Triton
// on CUDA), attention_cpu, and gather_rows / unmask_rows (random_masking and unmask, each the
// other's backward). In C++ because a user pays the autograd layer's host cost at every call:
// with torch.library's Python autograd a 4×8 dropout_add_layer_norm forward and backward cost the
// CPU's host 258 µs, Hugging Face's code 145 µs (benchmarks/profile_train_step.py; README has the
// numbers since); random_masking's was 215 µs against MAE's 128 µs.
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
    ctx->set_materialize_grads(false);  // else each backward fills zeros for mean and rstd: 2 kernels per call
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<LayerNormGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>(
            "vlfast::dropout_add_layer_norm_backward");
    if (!grads[0].defined()) return variable_list(7);  // the output was not used
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
    ctx->set_materialize_grads(false);  // else each backward fills a (B, H, L, L) zeros for probs
    return {out, probs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double)>("vlfast::attention_cpu_backward");
    if (!grads[0].defined()) return variable_list(5);
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

using RowsSignature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&);
using UnmaskSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<RowsSignature>& gather_rows_op() {
  static const auto op = find_op<RowsSignature>("vlfast::gather_rows");
  return op;
}

const c10::TypedOperatorHandle<UnmaskSignature>& unmask_rows_op() {
  static const auto op = find_op<UnmaskSignature>("vlfast::unmask_rows");
  return op;
}

// (B, size): where each value 0..size-1 stands in its row of index (B, L); L where absent. For a
// full permutation this is its argsort, as one scatter instead of a sort.
at::Tensor inverse_index(const at::Tensor& index, int64_t size) {
  const int64_t kept = index.size(1);
  return at::full({index.size(0), size}, kept, index.options())
      .scatter_(1, index, at::arange(kept, index.options()).expand_as(index));
}

// The gradient of a (1 or B, N, D) addend from the (B, N, D) gradient of the sum, in its dtype.
at::Tensor sum_to(const at::Tensor& grad, int64_t addend_batch, at::ScalarType dtype) {
  return (addend_batch == 1 && grad.size(0) != 1 ? grad.sum(0, /*keepdim=*/true) : grad).to(dtype);
}

struct GatherRows : torch::autograd::Function<GatherRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& src, const std::optional<at::Tensor>& pos_embed,
                            const at::Tensor& index) {
    ctx->save_for_backward({index});
    ctx->saved_data["patches"] = src.size(1);
    ctx->saved_data["src_dtype"] = src.scalar_type();
    ctx->saved_data["pos_batch"] = pos_embed.has_value() ? pos_embed->size(0) : int64_t{-1};
    ctx->saved_data["pos_dtype"] = pos_embed.has_value() ? pos_embed->scalar_type() : src.scalar_type();
    return call_kernel(gather_rows_op(), src, pos_embed, index);
  }

  // The gradient of a gather is an unmask with zero fill: each source row gets the gradient of
  // the output row it went to, the rows not gathered zero.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor index = ctx->get_saved_variables()[0];
    const int64_t pos_batch = ctx->saved_data["pos_batch"].toInt();
    const at::Tensor grad_full = call_backward(unmask_rows_op(), grads[0].contiguous(),
                                               inverse_index(index, ctx->saved_data["patches"].toInt()),
                                               std::nullopt, std::nullopt);
    at::Tensor grad_src, grad_pos;
    if (ctx->needs_input_grad(0)) grad_src = grad_full.to(ctx->saved_data["src_dtype"].toScalarType());
    if (pos_batch >= 0 && ctx->needs_input_grad(1))
      grad_pos = sum_to(grad_full, pos_batch, ctx->saved_data["pos_dtype"].toScalarType());
    return {grad_src, grad_pos, at::Tensor()};
  }
};

struct UnmaskRows : torch::autograd::Function<UnmaskRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rows, const at::Tensor& ids_restore,
                            const std::optional<at::Tensor>& fill, const std::optional<at::Tensor>& pos_embed) {
    ctx->save_for_backward({ids_restore});
    ctx->saved_data["kept"] = rows.size(1);
    ctx->saved_data["rows_dtype"] = rows.scalar_type();
    ctx->saved_data["fill_dtype"] = fill.has_value() ? fill->scalar_type() : rows.scalar_type();
    ctx->saved_data["has_fill"] = fill.has_value();
    ctx->saved_data["pos_batch"] = pos_embed.has_value() ? pos_embed->size(0) : int64_t{-1};
    ctx->saved_data["pos_dtype"] = pos_embed.has_value() ? pos_embed->scalar_type() : rows.scalar_type();
    return call_kernel(unmask_rows_op(), rows, ids_restore, fill, pos_embed);
  }

  // The gradient of an unmask: a gather of the kept positions' rows; the fill's is the sum of the
  // masked positions' rows; the position embedding's the whole gradient, summed over a shared batch.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ids_restore = ctx->get_saved_variables()[0];
    const int64_t kept = ctx->saved_data["kept"].toInt();
    const int64_t pos_batch = ctx->saved_data["pos_batch"].toInt();
    const at::Tensor grad = grads[0].contiguous();
    at::Tensor grad_rows, grad_fill, grad_pos;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor ids_keep = inverse_index(ids_restore, ids_restore.size(1)).slice(1, 0, kept).contiguous();
      grad_rows = call_backward(gather_rows_op(), grad, std::nullopt, ids_keep)
                      .to(ctx->saved_data["rows_dtype"].toScalarType());
    }
    if (ctx->saved_data["has_fill"].toBool() && ctx->needs_input_grad(2)) {  // the tensors given: rows, ids, fill
      const at::Tensor masked = ids_restore.ge(kept).to(grad.scalar_type());
      grad_fill = at::einsum("bn,bnd->d", {masked, grad}).to(ctx->saved_data["fill_dtype"].toScalarType());
    }
    // needs_input_grad counts the tensors given: an absent fill moves pos_embed's place up.
    if (pos_batch >= 0 && ctx->needs_input_grad(ctx->saved_data["has_fill"].toBool() ? 3 : 2))
      grad_pos = sum_to(grad, pos_batch, ctx->saved_data["pos_dtype"].toScalarType());
    return {grad_rows, at::Tensor(), grad_fill, grad_pos};
  }
};

at::Tensor gather_rows_autograd(const at::Tensor& src, const std::optional<at::Tensor>& pos_embed,
                                const at::Tensor& index) {
  return GatherRows::apply(src, pos_embed, index);
}

at::Tensor unmask_rows_autograd(const at::Tensor& rows, const at::Tensor& ids_restore,
                                const std::optional<at::Tensor>& fill, const std::optional<at::Tensor>& pos_embed) {
  return UnmaskRows::apply(rows, ids_restore, fill, pos_embed);
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, Autograd, m) {
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_autograd);
  m.impl("attention_cpu", &attention_cpu_autograd);
  m.impl("gather_rows", &gather_rows_autograd);
  m.impl("unmask_rows", &unmask_rows_autograd);
}

}  // namespace vlfast
