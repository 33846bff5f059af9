// The lora_runtime op library: every schema, in one place, and the Python module whose import
// loads the shared object (and so runs every registration of csrc/).
//
// Where each op's kernels are registered (csrc/README.md has the table):
//   lora_linear.cpp    lora_linear (CompositeImplicitAutograd), lora_linear_fwd/_bwd/_infer
//   lora_group.cpp     lora_group_fwd/_bwd/_infer
//   lora_autograd.cpp  the Autograd kernels of lora_linear_fwd and lora_group_fwd
//   merge_exact.cpp    merge_enter, merge_leave (CPU)
//   lora_product.cpp   lora_product (CPU): B @ A by the loop of lora_product.h
// The fake (meta) kernels are Python: lora_runtime/ops/{lora_linear,lora_group,infer,merge_exact}.py.
#include <Python.h>  // PyInit__C below

#include <torch/library.h>

TORCH_LIBRARY(lora_runtime, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "float scaling, Tensor? lora_input=None) -> Tensor");
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, float scaling, Tensor? lora_input=None) -> (Tensor, Tensor)");
  m.def("lora_linear_bwd(Tensor grad, Tensor? x, Tensor weight, Tensor lora_a, "
        "Tensor lora_b, Tensor? h, float scaling, Tensor? lora_input, bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_linear_infer(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, float scaling) -> Tensor");
  m.def("lora_group_fwd(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor lora_a, "
        "Tensor[] lora_bs, float[] scalings) -> (Tensor[], Tensor)");
  m.def("lora_group_bwd(Tensor?[] grads, Tensor x, Tensor[] weights, Tensor lora_a, "
        "Tensor[] lora_bs, Tensor h, float[] scalings, bool need_x, bool need_a, "
        "bool need_b) -> (Tensor, Tensor, Tensor[])");
  m.def("lora_group_infer(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor lora_a, "
        "Tensor[] lora_bs, float[] scalings) -> Tensor[]");
  m.def("merge_enter(Tensor(a!) weight, Tensor lora_b, Tensor lora_a, float scaling) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("merge_leave(Tensor(a!) weight, Tensor lora_b, Tensor lora_a, float scaling, "
        "Tensor mask, Tensor values) -> Tensor");
  m.def("lora_product(Tensor lora_b, Tensor lora_a) -> Tensor");
}

// `import lora_runtime.ops._C` loads this library, which runs the registrations of csrc/.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
