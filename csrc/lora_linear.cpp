// Fused LoRA linear: y = x @ W.T + b + s * (x_l @ A.T) @ B.T, with x_l = x unless a
// separate LoRA-branch input (x after dropout) is given.
//
// Kernels (schemas in library.cpp):
//   lora_linear        public op; CompositeImplicitAutograd, calls lora_linear_fwd and keeps
//                      its first output, so torch.export graphs show lora_linear.
//   lora_linear_fwd    forward; returns (y, h) with h = x_l @ A.T [..., r], which the backward
//                      reuses instead of recomputing. Its autograd formula is C++
//                      (lora_autograd.cpp, the Autograd key).
//   lora_linear_bwd    backward; computes only the gradients asked for.
//   lora_linear_infer  the same forward and checks under an op with no autograd formula, for
//                      no-grad calls (lora_runtime/ops/infer.py); no lora_input, and the base
//                      GEMM as a plain mm (decode sizes).
// The kernels are ATen calls, so one registration (CompositeExplicitAutograd) serves every
// device; the Autograd kernel sits above it.
#include "common.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

namespace lora_runtime {
namespace {

// Validates shapes, dtypes and devices; returns in_features.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, const c10::optional<at::Tensor>& lora_input) {
  TORCH_CHECK(x.dim() >= 1, "lora_linear: x must have at least 1 dim [..., in], got shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 2, "lora_linear: weight must be 2-d [out, in], got shape ",
              weight.sizes());
  const int64_t in = weight.size(1);
  const int64_t out = weight.size(0);
  TORCH_CHECK(x.size(-1) == in, "lora_linear: x has ", x.size(-1),
              " input features (x.shape=", x.sizes(), ") but weight expects ", in,
              " (weight.shape=", weight.sizes(), ")");
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == in,
              "lora_linear: lora_a must be [r, in] = [r, ", in, "], got lora_a.shape=",
              lora_a.sizes(), " (weight.shape=", weight.sizes(), ")");
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == out && lora_b.size(1) == r,
              "lora_linear: lora_b must be [out, r] = [", out, ", ", r,
              "], got lora_b.shape=", lora_b.sizes(), " (weight.shape=", weight.sizes(),
              ", lora_a.shape=", lora_a.sizes(), ")");
  check_same("lora_linear", weight, "weight", x);
  check_same("lora_linear", lora_a, "lora_a", x);
  check_same("lora_linear", lora_b, "lora_b", x);
  if (defined(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out,
                "lora_linear: bias must be [out] = [", out, "], got bias.shape=",
                bias->sizes(), " (weight.shape=", weight.sizes(), ")");
    check_same("lora_linear", *bias, "bias", x);
  }
  if (defined(lora_input)) {
    TORCH_CHECK(lora_input->sizes() == x.sizes(),
                "lora_linear: lora_input must have x's shape ", x.sizes(), ", got ",
                lora_input->sizes());
    check_same("lora_linear", *lora_input, "lora_input", x);
  }
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    const c10::optional<at::Tensor>& lora_input, bool lora_first) {
  const int64_t in = check_inputs(x, weight, bias, lora_a, lora_b, lora_input);
  const at::Tensor x2 = x.reshape({-1, in});  // [N, in]; copies only if x is not viewable
  const at::Tensor xl2 = defined(lora_input) ? lora_input->reshape({-1, in}) : x2;
  at::Tensor h = at::mm(xl2, lora_a.t());  // [N, r]
  at::Tensor y;                            // [N, out]
  if (defined(bias)) {
    y = at::addmm(*bias, x2, weight.t());                    // bias fused into the base GEMM
    y.addmm_(h, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);  // y += s * h @ B.T
  } else if (lora_first) {
    // The rank-r product writes y first (beta=0: y is not read, s folded into alpha);
    // the base GEMM then accumulates into it, reading y inside its compute-bound
    // kernel instead of in a separate read-modify-write pass over [N, out].
    y = at::empty({x2.size(0), weight.size(0)}, x2.options());
    y.addmm_(h, lora_b.t(), /*beta=*/0, /*alpha=*/scaling);  // y = s * h @ B.T
    y.addmm_(x2, weight.t());                                // y += x @ W.T
  } else {
    // At a few tokens an accumulating base GEMM costs more than a plain one.
    y = at::mm(x2, weight.t());
    y.addmm_(h, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);  // y += s * h @ B.T
  }
  return {y.view(with_last(x.sizes(), weight.size(0))),
          h.view(with_last(x.sizes(), lora_a.size(0)))};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    const c10::optional<at::Tensor>& lora_input) {
  return linear_forward(x, weight, bias, lora_a, lora_b, scaling, lora_input,
                        /*lora_first=*/true);
}

at::Tensor lora_linear_infer(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scaling) {
  return std::get<0>(linear_forward(x, weight, bias, lora_a, lora_b, scaling, c10::nullopt,
                                    /*lora_first=*/false));
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, double scaling,
                       const c10::optional<at::Tensor>& lora_input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_runtime::lora_linear_fwd", "")
                       .typed<decltype(lora_linear_fwd)>();
  return std::get<0>(op.call(x, weight, bias, lora_a, lora_b, scaling, lora_input));
}

// Returns (dx, dweight, dbias, dlora_a, dlora_b, dlora_input); an entry whose
// output_mask is false is an empty tensor of shape [0].
LinearBwdResult lora_linear_bwd(const at::Tensor& grad, const c10::optional<at::Tensor>& x,
                                const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const c10::optional<at::Tensor>& h,
                                double scaling, const c10::optional<at::Tensor>& lora_input,
                                std::array<bool, 6> output_mask) {
  const int64_t in = weight.size(1);
  const int64_t out = weight.size(0);
  const bool separate_lora_input = defined(lora_input);
  const auto [need_x, need_w, need_b, need_a, need_lb, need_li] = output_mask;
  TORCH_CHECK(grad.size(-1) == out, "lora_linear_bwd: grad has ", grad.size(-1),
              " features but weight.shape=", weight.sizes());
  const bool need_x_input = need_w || (need_a && !separate_lora_input);
  TORCH_CHECK(!need_x_input || defined(x),
              "lora_linear_bwd: x is required for the requested gradients");
  TORCH_CHECK(!need_lb || defined(h), "lora_linear_bwd: h is required for dlora_b");

  const at::Tensor g2 = grad.reshape({-1, out});  // [N, out]
  const auto empty = [&] { return at::empty({0}, grad.options()); };
  at::Tensor dx = empty(), dw = empty(), db = empty(), da = empty(), dlb = empty(), dli = empty();

  // The scale s is folded into each GEMM's alpha (beta=0: the fresh output is not read),
  // so no separate pass multiplies by s. The two rank-r products that read g run back to
  // back, while g is still in cache.
  const bool need_gb = need_a || need_li || (need_x && !separate_lora_input);
  at::Tensor gb;  // g @ B : [N, r], unscaled
  if (need_gb) gb = at::mm(g2, lora_b);
  if (need_lb) {
    const at::Tensor h2 = h->reshape({-1, lora_a.size(0)});  // [N, r]
    dlb = at::empty({out, lora_a.size(0)}, grad.options());
    dlb.addmm_(g2.t(), h2, /*beta=*/0, /*alpha=*/scaling);  // [out, r] = s * g.T @ h
  }
  if (need_x) {
    dx = at::empty({g2.size(0), in}, grad.options());
    if (!separate_lora_input) {
      dx.addmm_(gb, lora_a, /*beta=*/0, /*alpha=*/scaling);  // s * (g @ B) @ A
      dx.addmm_(g2, weight);                                  // += g @ W, accumulated in the GEMM
    } else {
      at::mm_out(dx, g2, weight);  // [N, in]
    }
    dx = dx.view(with_last(grad.sizes(), in));
  }
  if (need_li) {
    TORCH_CHECK(separate_lora_input, "lora_linear_bwd: dlora_input asked without lora_input");
    dli = at::empty({g2.size(0), in}, grad.options());
    dli.addmm_(gb, lora_a, /*beta=*/0, /*alpha=*/scaling);  // [N, in] = s * (g @ B) @ A
    dli = dli.view(with_last(grad.sizes(), in));
  }
  if (need_a || need_w) {
    const at::Tensor x2 = need_x_input ? x->reshape({-1, in}) : at::Tensor();
    if (need_a) {
      const at::Tensor xl2 = separate_lora_input ? lora_input->reshape({-1, in}) : x2;
      da = at::empty({lora_a.size(0), in}, grad.options());
      da.addmm_(gb.t(), xl2, /*beta=*/0, /*alpha=*/scaling);  // [r, in] = s * (g @ B).T @ x
    }
    if (need_w) dw = at::mm(g2.t(), x2);  // [out, in]
  }
  if (need_b) db = g2.sum(0);  // [out]
  return {dx, dw, db, da, dlb, dli};
}

TORCH_LIBRARY_IMPL(lora_runtime, CompositeImplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
}

TORCH_LIBRARY_IMPL(lora_runtime, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd);
  m.impl("lora_linear_bwd", &lora_linear_bwd);
  m.impl("lora_linear_infer", &lora_linear_infer);
}

}  // namespace lora_runtime
