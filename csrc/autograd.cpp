// Autograd of every differentiable vlfast op, on every device, whatever the kernel (C++, CUDA or
// Triton registered from Python): random_masking and unmask (each the other's backward),
// itc_loss_rows, attention, indexed_attention and dropout_add_layer_norm, and their backward ops, which raise if a
// second derivative is taken. In C++ because a user pays the autograd layer's host cost at every
// call, and torch.library's Python autograd cost more host time than the code the ops replace
// (docs/ops/dropout_add_layer_norm.md and docs/design.md have the measurements).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace vlfast {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

template <typename Signature, typename... Args>
auto call_kernel(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// A backward op: under create_graph=True through its autograd (below: it raises if a second
// derivative is taken); else straight to the kernel.
template <typename Signature, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_kernel(op, std::forward<Args>(args)...);
}

// A saved optional tensor comes back undefined when it was absent.
OptionalTensor optional(const Tensor& saved) { return saved.defined() ? OptionalTensor(saved) : std::nullopt; }

// ---- backward ops: vlfast's kernels have no second derivative ----

// Runs a backward kernel; under grad mode its outputs carry this node, which raises when
// differentiated: create_graph=True gives the gradients (with a graph), a second derivative raises.
struct NoSecondDerivative : torch::autograd::Function<NoSecondDerivative> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, const char* public_op,
                               const std::function<variable_list()>& run) {
    ctx->saved_data["op"] = std::string(public_op);
    return run();
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "vlfast.ops.", ctx->saved_data["op"].toStringRef(),
                                " has no second derivative (double backward)");
    return {};
  }
};

variable_list without_second_derivative(const char* public_op, std::vector<Tensor> inputs,
                                        const std::function<variable_list()>& run) {
  std::vector<Tensor> given;  // the tensors the gradients would flow to (absent optionals dropped)
  for (Tensor& input : inputs)
    if (input.defined()) given.push_back(std::move(input));
  return NoSecondDerivative::apply(at::TensorList(given), public_op, run);
}

// ---- dropout_add_layer_norm ----

using LayerNormSignature = Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                                   const Tensor&);
using LayerNormBackwardSignature = Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, double, const Tensor&);

const c10::TypedOperatorHandle<LayerNormBackwardSignature>& layer_norm_backward_op() {
  static const auto op = find_op<LayerNormBackwardSignature>("vlfast::dropout_add_layer_norm_backward");
  return op;
}

struct DropoutAddLayerNorm : torch::autograd::Function<DropoutAddLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual, const Tensor& weight,
                               const Tensor& bias, double p, double eps, const Tensor& seed) {
    static const auto op = find_op<LayerNormSignature>("vlfast::dropout_add_layer_norm");
    auto [out, mean, rstd] = call_kernel(op, x, residual, weight, bias, p, eps, seed);
    ctx->save_for_backward({x, residual, weight, mean, rstd, seed});
    ctx->saved_data["p"] = p;
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // else each backward fills zeros for mean and rstd: 2 kernels per call
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);  // the output was not used
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_residual, grad_weight, grad_bias] =
        call_backward(layer_norm_backward_op(), grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3],
                      saved[4], ctx->saved_data["p"].toDouble(), saved[5]);
    return {grad_x, grad_residual, grad_weight, grad_bias, Tensor(), Tensor(), Tensor()};
  }
};

Tensor3 dropout_add_layer_norm_autograd(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                        const Tensor& bias, double p, double eps, const Tensor& seed) {
  const variable_list outputs = DropoutAddLayerNorm::apply(x, residual, weight, bias, p, eps, seed);
  return {outputs[0], outputs[1], outputs[2]};
}

Tensor4 dropout_add_layer_norm_backward_autograd(const Tensor& grad, const Tensor& x, const Tensor& residual,
                                                 const Tensor& weight, const Tensor& mean, const Tensor& rstd, double p,
                                                 const Tensor& seed) {
  const variable_list outputs =
      without_second_derivative("dropout_add_layer_norm", {grad, x, residual, weight, mean, rstd, seed}, [&] {
        auto [a, b, c, d] = call_kernel(layer_norm_backward_op(), grad, x, residual, weight, mean, rstd, p, seed);
        return variable_list{a, b, c, d};
      });
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

// ---- attention: aux is the CPU kernel's probabilities or the Triton kernel's log-sum-exp ----

using AttentionSignature = Tensor2(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, double);
using AttentionBackwardSignature = Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const OptionalTensor&, const Tensor&, const Tensor&, double);

const c10::TypedOperatorHandle<AttentionBackwardSignature>& attention_backward_op() {
  static const auto op = find_op<AttentionBackwardSignature>("vlfast::attention_backward");
  return op;
}

struct Attention : torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptionalTensor& key_padding_mask, double scale) {
    static const auto op = find_op<AttentionSignature>("vlfast::attention");
    auto [out, aux] = call_kernel(op, q, k, v, key_padding_mask, scale);
    ctx->save_for_backward({q, k, v, key_padding_mask.value_or(Tensor()), out, aux});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({aux});
    ctx->set_materialize_grads(false);  // else each backward fills zeros for aux: (B, H, L, L) on the CPU
    return {out, aux};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] = call_backward(attention_backward_op(), grads[0], saved[0], saved[1], saved[2],
                                                  optional(saved[3]), saved[4], saved[5],
                                                  ctx->saved_data["scale"].toDouble());
    return {grad_q, grad_k, grad_v, Tensor(), Tensor()};
  }
};

Tensor2 attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const OptionalTensor& key_padding_mask,
                           double scale) {
  const variable_list outputs = Attention::apply(q, k, v, key_padding_mask, scale);
  return {outputs[0], outputs[1]};
}

Tensor3 attention_backward_autograd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptionalTensor& key_padding_mask, const Tensor& out, const Tensor& aux,
                                    double scale) {
  const variable_list outputs = without_second_derivative(
      "attention", {grad_out, q, k, v, key_padding_mask.value_or(Tensor()), out, aux}, [&] {
        auto [a, b, c] = call_kernel(attention_backward_op(), grad_out, q, k, v, key_padding_mask, out, aux, scale);
        return variable_list{a, b, c};
      });
  return {outputs[0], outputs[1], outputs[2]};
}

// ---- indexed_attention: attention with k, v read through an index; aux is the log-sum-exp ----

using IndexedAttentionSignature = Tensor2(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const OptionalTensor&, double);
using IndexedAttentionBackwardSignature = Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                                                  double);

const c10::TypedOperatorHandle<IndexedAttentionBackwardSignature>& indexed_attention_backward_op() {
  static const auto op = find_op<IndexedAttentionBackwardSignature>("vlfast::indexed_attention_backward");
  return op;
}

struct IndexedAttention : torch::autograd::Function<IndexedAttention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& index, const OptionalTensor& key_padding_mask, double scale) {
    static const auto op = find_op<IndexedAttentionSignature>("vlfast::indexed_attention");
    auto [out, lse] = call_kernel(op, q, k, v, index, key_padding_mask, scale);
    ctx->save_for_backward({q, k, v, index, key_padding_mask.value_or(Tensor()), out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(6);
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] =
        call_backward(indexed_attention_backward_op(), grads[0], saved[0], saved[1], saved[2], saved[3],
                      optional(saved[4]), saved[5], saved[6], ctx->saved_data["scale"].toDouble());
    return {grad_q, grad_k, grad_v, Tensor(), Tensor(), Tensor()};
  }
};

Tensor2 indexed_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& index,
                                   const OptionalTensor& key_padding_mask, double scale) {
  const variable_list outputs = IndexedAttention::apply(q, k, v, index, key_padding_mask, scale);
  return {outputs[0], outputs[1]};
}

Tensor3 indexed_attention_backward_autograd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& index, const OptionalTensor& key_padding_mask,
                                            const Tensor& out, const Tensor& lse, double scale) {
  const variable_list outputs = without_second_derivative(
      "indexed_attention", {grad_out, q, k, v, key_padding_mask.value_or(Tensor()), out, lse}, [&] {
        auto [a, b, c] = call_kernel(indexed_attention_backward_op(), grad_out, q, k, v, index, key_padding_mask, out,
                                     lse, scale);
        return variable_list{a, b, c};
      });
  return {outputs[0], outputs[1], outputs[2]};
}

// ---- itc_loss_rows: one direction of itc_loss; only the row losses carry gradients ----

using ItcSignature = Tensor4(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
                             c10::SymInt, const Tensor&, double, bool);
using ItcBackwardSignature = Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                                     const OptionalTensor&, c10::SymInt, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<ItcBackwardSignature>& itc_backward_op() {
  static const auto op = find_op<ItcBackwardSignature>("vlfast::itc_loss_rows_backward");
  return op;
}

struct ItcLossRows : torch::autograd::Function<ItcLossRows> {
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& temperature,
                               const OptionalTensor& query_ids, const OptionalTensor& key_ids, c10::SymInt key_offset,
                               const Tensor& seed, double smoothing, bool sample) {
    static const auto op = find_op<ItcSignature>("vlfast::itc_loss_rows");
    auto [rows, negative, lse, npos] =
        call_kernel(op, query, key, temperature, query_ids, key_ids, key_offset, seed, smoothing, sample);
    ctx->save_for_backward({query, key, temperature, query_ids.value_or(Tensor()), key_ids.value_or(Tensor()), lse,
                            npos});
    ctx->saved_data["key_offset"] = key_offset;
    ctx->mark_non_differentiable({negative, lse, npos});
    ctx->set_materialize_grads(false);
    return {rows, negative, lse, npos};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(9);
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_query, grad_key, grad_temperature] =
        call_backward(itc_backward_op(), grads[0], saved[0], saved[1], saved[2], optional(saved[3]),
                      optional(saved[4]), ctx->saved_data["key_offset"].toSymInt(), saved[5], saved[6]);
    return {grad_query, grad_key, grad_temperature, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor4 itc_loss_rows_autograd(const Tensor& query, const Tensor& key, const Tensor& temperature,
                               const OptionalTensor& query_ids, const OptionalTensor& key_ids, c10::SymInt key_offset,
                               const Tensor& seed, double smoothing, bool sample) {
  const variable_list outputs =
      ItcLossRows::apply(query, key, temperature, query_ids, key_ids, std::move(key_offset), seed, smoothing, sample);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

Tensor3 itc_loss_rows_backward_autograd(const Tensor& grad, const Tensor& query, const Tensor& key,
                                        const Tensor& temperature, const OptionalTensor& query_ids,
                                        const OptionalTensor& key_ids, c10::SymInt key_offset, const Tensor& lse,
                                        const Tensor& npos) {
  const variable_list outputs = without_second_derivative(
      "itc_loss",
      {grad, query, key, temperature, query_ids.value_or(Tensor()), key_ids.value_or(Tensor()), lse, npos}, [&] {
        auto [a, b, c] =
            call_kernel(itc_backward_op(), grad, query, key, temperature, query_ids, key_ids, key_offset, lse, npos);
        return variable_list{a, b, c};
      });
  return {outputs[0], outputs[1], outputs[2]};
}

// ---- momentum_itc_loss_rows: its gradients are outputs of the forward ----

using MomentumItcSignature = Tensor3(const Tensor&, const Tensor&, at::TensorList, const Tensor&, const Tensor&,
                                     const OptionalTensor&);

struct MomentumItcLossRows : torch::autograd::Function<MomentumItcLossRows> {
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& query_m,
                               const std::vector<Tensor>& keys, const Tensor& positive, const Tensor& temperature,
                               const OptionalTensor& alpha) {
    static const auto op = find_op<MomentumItcSignature>("vlfast::momentum_itc_loss_rows");
    auto [rows, grad_query, grad_temperature] = call_kernel(op, query, query_m, keys, positive, temperature, alpha);
    ctx->save_for_backward({grad_query, grad_temperature, query, temperature});
    ctx->saved_data["query_dtype"] = query.scalar_type();
    ctx->saved_data["temperature_dtype"] = temperature.scalar_type();
    ctx->mark_non_differentiable({grad_query, grad_temperature});
    ctx->set_materialize_grads(false);
    return {rows, grad_query, grad_temperature};
  }

  // One gradient per argument of forward (the keys, a std::vector, are one that takes none):
  // query's and temperature's.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    // The gradients depend on query and temperature through the saved ones: a second derivative raises.
    const variable_list outputs = without_second_derivative("momentum_itc_loss", {grads[0], saved[2], saved[3]}, [&] {
      const Tensor grad_rows = grads[0].to(saved[0].scalar_type());
      return variable_list{grad_rows.unsqueeze(1).mul(saved[0]).to(ctx->saved_data["query_dtype"].toScalarType()),
                           grad_rows.mul(saved[1]).sum().to(ctx->saved_data["temperature_dtype"].toScalarType())};
    });
    result[0] = outputs[0];
    result[4] = outputs[1];
    return result;
  }
};

Tensor3 momentum_itc_loss_rows_autograd(const Tensor& query, const Tensor& query_m, at::TensorList keys,
                                        const Tensor& positive, const Tensor& temperature, const OptionalTensor& alpha) {
  const variable_list outputs =
      MomentumItcLossRows::apply(query, query_m, keys.vec(), positive, temperature, alpha);
  return {outputs[0], outputs[1], outputs[2]};
}

// ---- random_masking and unmask: each kernel is the other's backward ----

using RandomMaskingSignature = Tensor(const Tensor&, const OptionalTensor&, const Tensor&);
using UnmaskSignature = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&);

const c10::TypedOperatorHandle<RandomMaskingSignature>& random_masking_op() {
  static const auto op = find_op<RandomMaskingSignature>("vlfast::random_masking");
  return op;
}

const c10::TypedOperatorHandle<UnmaskSignature>& unmask_op() {
  static const auto op = find_op<UnmaskSignature>("vlfast::unmask");
  return op;
}

// (B, size): where each value 0..size-1 stands in its row of index (B, L); L where absent. For a
// full permutation this is its argsort, as one scatter instead of a sort.
Tensor inverse_index(const Tensor& index, int64_t size) {
  const int64_t kept = index.size(1);
  return at::full({index.size(0), size}, kept, index.options())
      .scatter_(1, index, at::arange(kept, index.options()).expand_as(index));
}

// The gradient of a (1 or B, N, D) addend from the (B, N, D) gradient of the sum, in its dtype.
Tensor sum_to(const Tensor& grad, int64_t addend_batch, at::ScalarType dtype) {
  return (addend_batch == 1 && grad.size(0) != 1 ? grad.sum(0, /*keepdim=*/true) : grad).to(dtype);
}

struct RandomMasking : torch::autograd::Function<RandomMasking> {
  static Tensor forward(AutogradContext* ctx, const Tensor& src, const OptionalTensor& pos_embed, const Tensor& index) {
    ctx->save_for_backward({index});
    ctx->saved_data["patches"] = src.size(1);
    ctx->saved_data["src_dtype"] = src.scalar_type();
    ctx->saved_data["pos_batch"] = pos_embed.has_value() ? pos_embed->size(0) : int64_t{-1};
    ctx->saved_data["pos_dtype"] = pos_embed.has_value() ? pos_embed->scalar_type() : src.scalar_type();
    return call_kernel(random_masking_op(), src, pos_embed, index);
  }

  // The gradient of a gather is an unmask with zero fill: each source row gets the gradient of
  // the output row it went to, the rows not gathered zero.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor index = ctx->get_saved_variables()[0];
    const int64_t pos_batch = ctx->saved_data["pos_batch"].toInt();
    const Tensor grad_full = call_backward(unmask_op(), grads[0].contiguous(),
                                           inverse_index(index, ctx->saved_data["patches"].toInt()), std::nullopt,
                                           std::nullopt);
    Tensor grad_src, grad_pos;
    if (ctx->needs_input_grad(0)) grad_src = grad_full.to(ctx->saved_data["src_dtype"].toScalarType());
    if (pos_batch >= 0 && ctx->needs_input_grad(1))
      grad_pos = sum_to(grad_full, pos_batch, ctx->saved_data["pos_dtype"].toScalarType());
    return {grad_src, grad_pos, Tensor()};
  }
};

struct Unmask : torch::autograd::Function<Unmask> {
  static Tensor forward(AutogradContext* ctx, const Tensor& rows, const Tensor& ids_restore, const OptionalTensor& fill,
                        const OptionalTensor& pos_embed) {
    ctx->save_for_backward({ids_restore});
    ctx->saved_data["kept"] = rows.size(1);
    ctx->saved_data["rows_dtype"] = rows.scalar_type();
    ctx->saved_data["fill_dtype"] = fill.has_value() ? fill->scalar_type() : rows.scalar_type();
    ctx->saved_data["has_fill"] = fill.has_value();
    ctx->saved_data["pos_batch"] = pos_embed.has_value() ? pos_embed->size(0) : int64_t{-1};
    ctx->saved_data["pos_dtype"] = pos_embed.has_value() ? pos_embed->scalar_type() : rows.scalar_type();
    return call_kernel(unmask_op(), rows, ids_restore, fill, pos_embed);
  }

  // The gradient of an unmask: a gather of the kept positions' rows; the fill's is the sum of the
  // masked positions' rows; the position embedding's the whole gradient, summed over a shared batch.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor ids_restore = ctx->get_saved_variables()[0];
    const int64_t kept = ctx->saved_data["kept"].toInt();
    const int64_t pos_batch = ctx->saved_data["pos_batch"].toInt();
    const Tensor grad = grads[0].contiguous();
    Tensor grad_rows, grad_fill, grad_pos;
    if (ctx->needs_input_grad(0)) {
      const Tensor ids_keep = inverse_index(ids_restore, ids_restore.size(1)).slice(1, 0, kept).contiguous();
      grad_rows = call_backward(random_masking_op(), grad, std::nullopt, ids_keep)
                      .to(ctx->saved_data["rows_dtype"].toScalarType());
    }
    if (ctx->saved_data["has_fill"].toBool() && ctx->needs_input_grad(2)) {  // the tensors given: rows, ids, fill
      const Tensor masked = ids_restore.ge(kept).to(grad.scalar_type());
      grad_fill = at::einsum("bn,bnd->d", {masked, grad}).to(ctx->saved_data["fill_dtype"].toScalarType());
    }
    // needs_input_grad counts the tensors given: an absent fill moves pos_embed's place up.
    if (pos_batch >= 0 && ctx->needs_input_grad(ctx->saved_data["has_fill"].toBool() ? 3 : 2))
      grad_pos = sum_to(grad, pos_batch, ctx->saved_data["pos_dtype"].toScalarType());
    return {grad_rows, Tensor(), grad_fill, grad_pos};
  }
};

Tensor random_masking_autograd(const Tensor& src, const OptionalTensor& pos_embed, const Tensor& index) {
  return RandomMasking::apply(src, pos_embed, index);
}

Tensor unmask_autograd(const Tensor& rows, const Tensor& ids_restore, const OptionalTensor& fill,
                       const OptionalTensor& pos_embed) {
  return Unmask::apply(rows, ids_restore, fill, pos_embed);
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, Autograd, m) {
  m.impl("random_masking", &random_masking_autograd);
  m.impl("unmask", &unmask_autograd);
  m.impl("itc_loss_rows", &itc_loss_rows_autograd);
  m.impl("itc_loss_rows_backward", &itc_loss_rows_backward_autograd);
  m.impl("momentum_itc_loss_rows", &momentum_itc_loss_rows_autograd);
  m.impl("attention", &attention_autograd);
  m.impl("attention_backward", &attention_backward_autograd);
  m.impl("indexed_attention", &indexed_attention_autograd);
  m.impl("indexed_attention_backward", &indexed_attention_backward_autograd);
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm_autograd);
  m.impl("dropout_add_layer_norm_backward", &dropout_add_layer_norm_backward_autograd);
}

}  // namespace vlfast
