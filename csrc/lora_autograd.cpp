// The autograd formulas of lora_linear_fwd and lora_group_fwd, in C++ (the Autograd key).
//
// A training step calls lora_linear once per patched layer; with the formula in Python
// (torch.library.register_autograd) every call and every backward entered the interpreter,
// about 60 us per layer per step on this CPU: at a few tokens that is as much as the layer's
// arithmetic. Here the forward saves `h` (and `x` only when a gradient needs it) and the
// backward calls lora_linear_bwd with the mask of the gradients autograd asks for, as the
// Python formula did. Under torch.compile, AOTAutograd traces through this kernel to
// lora_linear_fwd / lora_linear_bwd, whose fake kernels are in lora_runtime/ops/lora_linear.py
// (lora_group_*: lora_runtime/ops/lora_group.py).
#include "common.h"

#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace lora_runtime {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels below autograd, called through the dispatcher (so compile and export see them).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<decltype(lora_linear_fwd)>& fwd_op() {
  static const auto op = find_op<decltype(lora_linear_fwd)>("lora_runtime::lora_linear_fwd");
  return op;
}

const c10::TypedOperatorHandle<decltype(lora_linear_bwd)>& bwd_op() {
  static const auto op = find_op<decltype(lora_linear_bwd)>("lora_runtime::lora_linear_bwd");
  return op;
}

const c10::TypedOperatorHandle<decltype(lora_group_fwd)>& group_fwd_op() {
  static const auto op = find_op<decltype(lora_group_fwd)>("lora_runtime::lora_group_fwd");
  return op;
}

const c10::TypedOperatorHandle<decltype(lora_group_bwd)>& group_bwd_op() {
  static const auto op = find_op<decltype(lora_group_bwd)>("lora_runtime::lora_group_bwd");
  return op;
}

class LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
 public:
  // Inputs in the schema's order: x, weight, bias?, lora_a, lora_b, scaling, lora_input?.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                               const c10::optional<at::Tensor>& lora_input) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h] = fwd_op().call(x, weight, bias, lora_a, lora_b, scaling, lora_input);
    const bool separate = defined(lora_input);
    const bool need_w = weight.requires_grad();
    const bool need_a = lora_a.requires_grad();
    const bool need_lb = lora_b.requires_grad();
    const bool keep_x = need_w || (need_a && !separate);
    ctx->mark_non_differentiable({h});
    ctx->save_for_backward({keep_x ? x : at::Tensor(), weight, lora_a, lora_b,
                            need_lb ? h : at::Tensor(),
                            (separate && need_a) ? *lora_input : at::Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = defined(bias);
    ctx->saved_data["separate"] = separate;
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& lora_a = saved[2];
    const at::Tensor& lora_b = saved[3];
    const at::Tensor& h = saved[4];
    at::Tensor lora_input = saved[5];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool separate = ctx->saved_data["separate"].toBool();
    // Edges (differentiable inputs) in order: x, weight, [bias], lora_a, lora_b, [lora_input].
    size_t e = 0;
    const size_t ex = e++, ew = e++, eb = has_bias ? e++ : 0, ea = e++, elb = e++;
    const size_t eli = separate ? e++ : 0;
    const std::array<bool, 6> mask = {
        ctx->needs_input_grad(ex),
        ctx->needs_input_grad(ew),
        has_bias && ctx->needs_input_grad(eb),
        ctx->needs_input_grad(ea),
        ctx->needs_input_grad(elb),
        separate && ctx->needs_input_grad(eli)};
    TORCH_CHECK(!(separate && mask[3] && !lora_input.defined()),
                "lora_linear backward: lora_input was not saved");
    if (separate && !lora_input.defined()) {
      lora_input = at::empty({0}, grads[0].options());  // only its presence matters here
    }
    const at::Tensor& grad_y = grads[0];  // defined: autograd materialises missing grads
    auto [dx, dw, db, da, dlb, dli] =
        bwd_op().call(grad_y, maybe(x), weight, lora_a, lora_b, maybe(h), scaling,
                      separate ? c10::optional<at::Tensor>(lora_input) : c10::nullopt, mask);
    const auto keep = [](bool m, const at::Tensor& g) { return m ? g : at::Tensor(); };
    // One entry per forward argument (non-tensors and absent optionals: undefined).
    return {keep(mask[0], dx), keep(mask[1], dw), keep(mask[2], db), keep(mask[3], da),
            keep(mask[4], dlb), at::Tensor(), keep(mask[5], dli)};
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_autograd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    const c10::optional<at::Tensor>& lora_input) {
  auto out = LoRALinearFunction::apply(x, weight, bias, lora_a, lora_b, scaling, lora_input);
  return {out[0], out[1]};
}


// lora_group_fwd's formula: the base weights and biases are frozen (the caller groups only
// such layers), so the backward gives gradients of x, the stacked A and every B_i.
class LoRAGroupFunction : public torch::autograd::Function<LoRAGroupFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               const c10::List<c10::optional<at::Tensor>>& biases,
                               const at::Tensor& lora_a, at::TensorList lora_bs,
                               at::ArrayRef<double> scalings) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [ys, h] = group_fwd_op().call(x, weights, biases, lora_a, lora_bs, scalings);
    ctx->set_materialize_grads(false);  // a member whose output is unused counts as zero
    ctx->mark_non_differentiable({h});
    variable_list to_save = {x, lora_a, h};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), lora_bs.begin(), lora_bs.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["scalings"] = std::vector<double>(scalings.begin(), scalings.end());
    variable_list out(ys.begin(), ys.end());
    out.push_back(h);
    return out;  // [y_0 .. y_{k-1}, h]
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const size_t k = (saved.size() - 3) / 2;
    const at::Tensor& x = saved[0];
    const at::Tensor& lora_a = saved[1];
    const at::Tensor& h = saved[2];
    const std::vector<at::Tensor> weights(saved.begin() + 3, saved.begin() + 3 + k);
    const std::vector<at::Tensor> lora_bs(saved.begin() + 3 + k, saved.end());
    const auto scalings = ctx->saved_data["scalings"].toDoubleVector();
    // Edges in order: x, weights (k), lora_a, lora_bs (k); the biases are not differentiable.
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_a = ctx->needs_input_grad(k + 1);
    bool need_b = false;
    for (size_t i = 0; i < k; ++i) need_b = need_b || ctx->needs_input_grad(k + 2 + i);
    c10::List<c10::optional<at::Tensor>> grad_ys;
    for (size_t i = 0; i < k; ++i) {
      grad_ys.push_back(grads[i].defined() ? c10::optional<at::Tensor>(grads[i]) : c10::nullopt);
    }
    auto [dx, da, dbs] = group_bwd_op().call(grad_ys, x, weights, lora_a, lora_bs, h, scalings,
                                             need_x, need_a, need_b);
    // One entry per forward argument: x, weights (k), biases (1), lora_a, lora_bs (k), scalings.
    variable_list out;
    out.reserve(2 * k + 4);
    out.push_back(need_x ? dx : at::Tensor());
    for (size_t i = 0; i < k; ++i) out.emplace_back();  // frozen base weights
    out.emplace_back();                                 // biases
    out.push_back(need_a ? da : at::Tensor());
    for (size_t i = 0; i < k; ++i) out.push_back(need_b ? dbs[i] : at::Tensor());
    out.emplace_back();  // scalings
    return out;
  }
};

GroupFwdResult lora_group_fwd_autograd(const at::Tensor& x, at::TensorList weights,
                                       const c10::List<c10::optional<at::Tensor>>& biases,
                                       const at::Tensor& lora_a, at::TensorList lora_bs,
                                       at::ArrayRef<double> scalings) {
  auto out = LoRAGroupFunction::apply(x, weights, biases, lora_a, lora_bs, scalings);
  at::Tensor h = out.back();
  out.pop_back();
  return {std::vector<at::Tensor>(out.begin(), out.end()), h};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_runtime, Autograd, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_autograd);
  m.impl("lora_group_fwd", &lora_group_fwd_autograd);
}

}  // namespace lora_runtime
