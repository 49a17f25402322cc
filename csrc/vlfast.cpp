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
  m.def("ema_update_(Tensor(a!)[] target, Tensor[] source, Tensor decay) -> ()");
}
