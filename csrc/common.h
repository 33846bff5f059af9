// What the op files of this library share: the declarations of the kernels (each defined in
// the file named beside it and registered there), the input checks and small helpers.
// The schemas are in library.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace lora_runtime {

// True when an optional tensor argument was given (and is a tensor, not an undefined one).
inline bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An undefined tensor as an absent optional.
inline c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// `shape` with its last entry replaced: [..., in] -> [..., last].
inline std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> s(shape.begin(), shape.end());
  s.back() = last;
  return s;
}

// Fails, naming `op` and the argument, unless `t` has x's dtype and device.
inline void check_same(const char* op, const at::Tensor& t, const std::string& name,
                       const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on one device");
}

// ---- lora_linear.cpp ----------------------------------------------------------------------

// The forward of lora_linear_fwd and lora_linear_infer: returns (y [..., out], h [..., r]).
// `lora_first`: without a bias, the rank-r product writes y first (beta 0) and the base GEMM
// accumulates into it (pays at training sizes); false computes the base GEMM as a plain mm and
// adds the rank-r product after it (cheaper at decode sizes).
std::tuple<at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    const c10::optional<at::Tensor>& lora_input, bool lora_first);

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    const c10::optional<at::Tensor>& lora_input);

using LinearBwdResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LinearBwdResult lora_linear_bwd(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                                const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const c10::optional<at::Tensor>& h,
                                double scaling, const c10::optional<at::Tensor>& lora_input,
                                std::array<bool, 6> output_mask);

// ---- lora_group.cpp -----------------------------------------------------------------------

using GroupFwdResult = std::tuple<std::vector<at::Tensor>, at::Tensor>;
using GroupBwdResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

GroupFwdResult lora_group_fwd(const at::Tensor& x, at::TensorList weights,
                              const c10::List<c10::optional<at::Tensor>>& biases,
                              const at::Tensor& lora_a, at::TensorList lora_bs,
                              at::ArrayRef<double> scalings);

GroupBwdResult lora_group_bwd(const c10::List<c10::optional<at::Tensor>>& grads,
                              const at::Tensor& x, at::TensorList weights,
                              const at::Tensor& lora_a, at::TensorList lora_bs,
                              const at::Tensor& h, at::ArrayRef<double> scalings, bool need_x,
                              bool need_a, bool need_b);

}  // namespace lora_runtime
