// The vlfast extension module: op schemas live here, kernels register per device beside their
// sources (csrc/cpu, csrc/cuda). Importing vlfast._C is what makes torch.ops.vlfast.* exist.
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "vlfast kernels; the ops are torch.ops.vlfast.*", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(vlfast, m) {
  // One schema (and one for its backward) per public op vlfast.ops.X, named X or, where the kernel
  // is a part of the op, X_<part>. Kernels: csrc/cpu and csrc/cuda (TORCH_LIBRARY_IMPL beside
  // them), Triton's from the op's Python module (torch.library.register_kernel); autograd:
  // csrc/autograd.cpp; fake (meta) implementations: the op's Python module. The table of which
  // file holds what: docs/design.md, "Where each op lives".

  // ema_update_: in place, no autograd. decay is a 0-d tensor so a learnable or scheduled decay on
  // the GPU costs no host sync. copies: empty, or one per target (an fp32 master) that receives the
  // updated value rounded to its bf16/fp16 dtype in the same pass: the weights a mixed-precision
  // forward reads.
  m.def("ema_update_(Tensor(a!)[] target, Tensor[] source, Tensor decay, Tensor(b!)[] copies) -> ()");
  // random_masking's kernel, the gather of the kept patches (the op draws the permutation in torch):
  // out[b, l] = src[b, index[b, l]] + pos_embed[b or 0, index[b, l]]. Its backward is unmask's kernel.
  m.def("random_masking(Tensor src, Tensor? pos_embed, Tensor index) -> Tensor");
  // out[b, n] = (rows[b, j] if j < L else fill) + pos_embed[b or 0, n], j = ids_restore[b, n]:
  // the patches back at their positions, fill (zeros if None) at the masked ones. Its backward is
  // random_masking's kernel.
  m.def("unmask(Tensor rows, Tensor ids_restore, Tensor? fill, Tensor? pos_embed) -> Tensor");
  // itc_loss's kernel, one direction of the loss: per query row (loss = lse − mean positive score,
  // one sampled negative, lse, #positives) against the keys; itc_loss calls it once per direction
  // and averages. Triton on CUDA (and on the CPU under the Triton interpreter).
  m.def("itc_loss_rows(Tensor query, Tensor key, Tensor temperature, Tensor? query_ids, Tensor? key_ids, "
        "SymInt key_offset, Tensor seed, float smoothing, bool sample) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("itc_loss_rows_backward(Tensor grad, Tensor query, Tensor key, Tensor temperature, Tensor? query_ids, "
        "Tensor? key_ids, SymInt key_offset, Tensor lse, Tensor npos) -> (Tensor, Tensor, Tensor)");
  // momentum_itc_loss's kernel, one direction: per query row (loss against soft targets, the
  // gradient of that loss with respect to the query row, and with respect to the temperature)
  // over the keys given in parts (the batch's momentum features, the queue); alpha None: no
  // distillation. The gradients come out of the forward (docs/ops/momentum_itc_loss.md), so
  // there is no backward kernel. Torch compositions registered from Python for each device.
  m.def("momentum_itc_loss_rows(Tensor query, Tensor query_m, Tensor[] keys, Tensor positive, Tensor temperature, "
        "Tensor? alpha) -> (Tensor, Tensor, Tensor)");
  // (softmax(q·kᵀ·scale, key_padding_mask)·v, aux) for (B, H, L, Dh) q, k, v; aux is what the
  // backward takes instead of recomputing: on the CPU (C++) the probabilities, (B, H, Lq, Lk padded
  // to 8) in the math dtype; on CUDA (Triton) the row log-sum-exp, (B, H, Lq) fp32.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor out, "
        "Tensor aux, float scale) -> (Tensor, Tensor, Tensor)");
  // indexed_attention: attention of each query batch p of q (P, H, Lq, Dh) to entry index[p] of a
  // cache k, v (I, H, Lk, Dh) with its mask (I, Lk), without a gathered copy; aux is the row
  // log-sum-exp (P, H, Lq) (fp32; fp64 for fp64 on the CPU). The backward's dk, dv are the cache's,
  // summed over the batches that read each entry. CPU: torch's flash kernel per entry; CUDA: Triton.
  m.def("indexed_attention(Tensor q, Tensor k, Tensor v, Tensor index, Tensor? key_padding_mask, float scale) "
        "-> (Tensor, Tensor)");
  m.def("indexed_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor index, "
        "Tensor? key_padding_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  // (LayerNorm(dropout(x, p) + residual), row mean, row 1/std) over the rows of (..., D); the mask
  // comes from Philox at element index under seed, so the backward regenerates it. CPU: C++; CUDA:
  // Triton.
  m.def("dropout_add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float p, float eps, "
        "Tensor seed) -> (Tensor, Tensor, Tensor)");
  m.def("dropout_add_layer_norm_backward(Tensor grad, Tensor x, Tensor residual, Tensor weight, Tensor mean, "
        "Tensor rstd, float p, Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)");
}
