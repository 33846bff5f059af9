// Inference-only entry points: the kernels of lora_linear / lora_group under op names with
// no autograd formula, so a call under torch.no_grad() / inference_mode() pays no Python
// autograd kernel. Callers use them only when no gradient is wanted (lora_runtime/ops/infer.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace lora_runtime {

// Defined in lora_group.cpp.
std::tuple<std::vector<at::Tensor>, at::Tensor> group_forward(
    const at::Tensor& x, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, const at::Tensor& lora_a,
    at::TensorList lora_bs, at::ArrayRef<double> scalings, bool lora_first);

}  // namespace lora_runtime

namespace lora_runtime {

at::Tensor lora_linear_infer(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scaling) {
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2 &&
                  x.size(-1) == weight.size(1) && lora_a.size(1) == weight.size(1) &&
                  lora_b.size(0) == weight.size(0) && lora_b.size(1) == lora_a.size(0),
              "lora_linear_infer: shapes do not fit: x.shape=", x.sizes(), ", weight.shape=",
              weight.sizes(), ", lora_a.shape=", lora_a.sizes(), ", lora_b.shape=",
              lora_b.sizes());
  const int64_t in = weight.size(1);
  const at::Tensor x2 = x.reshape({-1, in});   // [N, in]
  const at::Tensor h = at::mm(x2, lora_a.t());  // [N, r]
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2, weight.t())
                                                       : at::mm(x2, weight.t());  // [N, out]
  y.addmm_(h, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);  // += s * h @ B.T
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return y.view(shape);
}

std::vector<at::Tensor> lora_group_infer(const at::Tensor& x, at::TensorList weights,
                                         const c10::List<c10::optional<at::Tensor>>& biases,
                                         const at::Tensor& lora_a, at::TensorList lora_bs,
                                         at::ArrayRef<double> scalings) {
  return std::get<0>(group_forward(x, weights, biases, lora_a, lora_bs, scalings,
                                   /*lora_first=*/false));
}

TORCH_LIBRARY_FRAGMENT(lora_runtime, m) {
  m.def("lora_linear_infer(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, float scaling) -> Tensor");
  m.def("lora_group_infer(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor lora_a, "
        "Tensor[] lora_bs, float[] scalings) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lora_runtime, CPU, m) {
  m.impl("lora_linear_infer", &lora_linear_infer);
  m.impl("lora_group_infer", &lora_group_infer);
}

TORCH_LIBRARY_IMPL(lora_runtime, CUDA, m) {
  m.impl("lora_linear_infer", &lora_linear_infer);
  m.impl("lora_group_infer", &lora_group_infer);
}

}  // namespace lora_runtime
