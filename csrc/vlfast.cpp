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
  // decay is a 0-d tensor so a learnable or scheduled decay on the GPU costs no host sync.
  // copies: empty, or one per target (an fp32 master) that receives the updated value rounded to
  // its bf16/fp16 dtype in the same pass: the weights a mixed-precision forward reads.
  m.def("ema_update_(Tensor(a!)[] target, Tensor[] source, Tensor decay, Tensor(b!)[] copies) -> ()");
  // out[b, l] = src[b, index[b, l]] + pos_embed[b or 0, index[b, l]]: the visible patches.
  m.def("gather_rows(Tensor src, Tensor? pos_embed, Tensor index) -> Tensor");
  // out[b, n] = (rows[b, j] if j < L else fill) + pos_embed[b or 0, n], j = ids_restore[b, n]:
  // the patches back at their positions, fill (zeros if None) at the masked ones.
  m.def("unmask_rows(Tensor rows, Tensor ids_restore, Tensor? fill, Tensor? pos_embed) -> Tensor");
  // (LayerNorm(dropout(x, p) + residual), row mean, row 1/std) over the rows of (..., D); the mask comes from
  // Philox at element index under seed, so the backward regenerates it. CUDA: a Triton kernel.
  m.def("dropout_add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float p, float eps, "
        "Tensor seed) -> (Tensor, Tensor, Tensor)");
  m.def("dropout_add_layer_norm_backward(Tensor grad, Tensor x, Tensor residual, Tensor weight, Tensor mean, "
        "Tensor rstd, float p, Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // (softmax(q·kᵀ·scale, key_padding_mask)·v, the probabilities) for (B, H, L, Dh) q, k, v on the
  // CPU; the backward takes the probabilities instead of recomputing them.
  m.def("attention_cpu(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)");
  m.def("attention_cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor probs, float scale) "
        "-> (Tensor, Tensor, Tensor)");
}
