// Grouped LoRA linear for sibling layers that read the same input (q/k/v, gate/up):
//   y_i = x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T   for i = 0 .. k-1
// with the k rank-r_i shrinks done as ONE GEMM against the stacked A = cat(A_i) [R, in],
// R = sum r_i, and in the backward dA (all members) and the LoRA part of dx as one GEMM each.
//
// Kernels (schemas in library.cpp):
//   lora_group_fwd    returns (ys, h) with h = x @ A.T [..., R], kept for dB_i. Its autograd
//                     formula is C++ (lora_autograd.cpp, the Autograd key).
//   lora_group_bwd    gradients of x, of the stacked A and of every B_i; the base weights and
//                     biases are frozen (the Python caller groups only such layers).
//   lora_group_infer  the same forward and checks under an op with no autograd formula, for
//                     no-grad calls (lora_runtime/ops/infer.py).
// The fake kernels are Python (lora_runtime/ops/lora_group.py, ops/infer.py). The kernels are
// ATen calls, registered once for every device (CompositeExplicitAutograd).
#include "common.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

namespace lora_runtime {
namespace {

// Validates the group; returns in_features.
int64_t check_group(const at::Tensor& x, at::TensorList weights,
                    const c10::List<c10::optional<at::Tensor>>& biases, const at::Tensor& lora_a,
                    at::TensorList lora_bs, at::ArrayRef<double> scalings) {
  const size_t k = weights.size();
  TORCH_CHECK(k >= 1, "lora_group: weights is empty; a group has at least one member");
  TORCH_CHECK(biases.size() == k && lora_bs.size() == k && scalings.size() == k,
              "lora_group: weights, biases, lora_bs and scalings must have one entry per "
              "member, got ", k, ", ", biases.size(), ", ", lora_bs.size(), ", ",
              scalings.size());
  TORCH_CHECK(x.dim() >= 1, "lora_group: x must have at least 1 dim [..., in], got shape ",
              x.sizes());
  const int64_t in = x.size(-1);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == in,
              "lora_group: lora_a must be the stacked [R, in] = [R, ", in, "], got ",
              lora_a.sizes());
  check_same("lora_group", lora_a, "lora_a", x);
  int64_t rank_sum = 0;
  for (size_t i = 0; i < k; ++i) {
    const auto& w = weights[i];
    const auto& b = lora_bs[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "lora_group: weights[", i,
                "] must be [out, ", in, "], got ", w.sizes(), " (x.shape=", x.sizes(), ")");
    TORCH_CHECK(b.dim() == 2 && b.size(0) == w.size(0), "lora_group: lora_bs[", i,
                "] must be [out, r] = [", w.size(0), ", r], got ", b.sizes());
    check_same("lora_group", w, "weights[" + std::to_string(i) + "]", x);
    check_same("lora_group", b, "lora_bs[" + std::to_string(i) + "]", x);
    const c10::optional<at::Tensor> bias = biases.get(i);
    if (defined(bias)) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "lora_group: biases[", i,
                  "] must be [", w.size(0), "], got ", bias->sizes());
      check_same("lora_group", *bias, "biases[" + std::to_string(i) + "]", x);
    }
    rank_sum += b.size(1);
  }
  TORCH_CHECK(rank_sum == lora_a.size(0), "lora_group: the ranks of lora_bs sum to ", rank_sum,
              " but the stacked lora_a has ", lora_a.size(0), " rows");
  return in;
}

// The forward of the group. `lora_first`: without a bias, the rank-r product writes y first
// (beta 0) and the base GEMM accumulates into it, reading y inside its compute-bound kernel
// instead of in a separate pass over [N, out] (what lora_linear_fwd does; it pays at training
// sizes). The no-grad entry point (lora_group_infer, decode sizes) passes false: at a few tokens
// an accumulating base GEMM costs more than a plain one.
GroupFwdResult group_forward(const at::Tensor& x, at::TensorList weights,
                             const c10::List<c10::optional<at::Tensor>>& biases,
                             const at::Tensor& lora_a, at::TensorList lora_bs,
                             at::ArrayRef<double> scalings, bool lora_first) {
  const int64_t in = check_group(x, weights, biases, lora_a, lora_bs, scalings);
  const at::Tensor x2 = x.reshape({-1, in});  // [N, in]
  const at::Tensor h = at::mm(x2, lora_a.t());  // [N, R]: every member's shrink, one GEMM
  std::vector<at::Tensor> ys;
  ys.reserve(weights.size());
  int64_t off = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t r = lora_bs[i].size(1);
    const at::Tensor hi = h.narrow(1, off, r);  // [N, r_i], a column block of h
    const c10::optional<at::Tensor> bias = biases.get(i);
    at::Tensor y;  // [N, out_i]
    if (defined(bias)) {
      y = at::addmm(*bias, x2, weights[i].t());
      y.addmm_(hi, lora_bs[i].t(), /*beta=*/1, /*alpha=*/scalings[i]);  // += s_i * h_i @ B_i.T
    } else if (lora_first) {
      y = at::empty({x2.size(0), weights[i].size(0)}, x2.options());
      y.addmm_(hi, lora_bs[i].t(), /*beta=*/0, /*alpha=*/scalings[i]);  // y = s_i * h_i @ B_i.T
      y.addmm_(x2, weights[i].t());                                    // y += x @ W_i.T
    } else {
      y = at::mm(x2, weights[i].t());
      y.addmm_(hi, lora_bs[i].t(), /*beta=*/1, /*alpha=*/scalings[i]);  // += s_i * h_i @ B_i.T
    }
    ys.push_back(y.view(with_last(x.sizes(), weights[i].size(0))));
    off += r;
  }
  return {ys, h.view(with_last(x.sizes(), lora_a.size(0)))};
}

}  // namespace

GroupFwdResult lora_group_fwd(const at::Tensor& x, at::TensorList weights,
                              const c10::List<c10::optional<at::Tensor>>& biases,
                              const at::Tensor& lora_a, at::TensorList lora_bs,
                              at::ArrayRef<double> scalings) {
  return group_forward(x, weights, biases, lora_a, lora_bs, scalings, /*lora_first=*/true);
}

std::vector<at::Tensor> lora_group_infer(const at::Tensor& x, at::TensorList weights,
                                         const c10::List<c10::optional<at::Tensor>>& biases,
                                         const at::Tensor& lora_a, at::TensorList lora_bs,
                                         at::ArrayRef<double> scalings) {
  return std::get<0>(group_forward(x, weights, biases, lora_a, lora_bs, scalings,
                                   /*lora_first=*/false));
}

// Returns (dx, dlora_a [R, in], dlora_bs); an entry not asked for is empty ([0] / []).
// grads[i] undefined means member i's output got no gradient (it counts as zero).
GroupBwdResult lora_group_bwd(const c10::List<c10::optional<at::Tensor>>& grads,
                              const at::Tensor& x, at::TensorList weights,
                              const at::Tensor& lora_a, at::TensorList lora_bs,
                              const at::Tensor& h, at::ArrayRef<double> scalings, bool need_x,
                              bool need_a, bool need_b) {
  const int64_t in = lora_a.size(1);
  const int64_t rank_sum = lora_a.size(0);
  const size_t k = weights.size();
  TORCH_CHECK(grads.size() == k, "lora_group_bwd: ", grads.size(), " grads for ", k,
              " members");
  const at::Tensor h2 = h.reshape({-1, rank_sum});  // [N, R]
  const int64_t n = h2.size(0);
  bool all_defined = true;
  for (size_t i = 0; i < k; ++i) {
    const c10::optional<at::Tensor> g = grads.get(i);
    all_defined = all_defined && defined(g);
  }
  // dh = [s_0 g_0 @ B_0 | s_1 g_1 @ B_1 | ...] : [N, R]; zero blocks for missing grads.
  const bool need_dh = need_x || need_a;
  at::Tensor dh;
  if (need_dh) dh = all_defined ? at::empty({n, rank_sum}, h.options()) : at::zeros({n, rank_sum}, h.options());
  std::vector<at::Tensor> dbs;
  at::Tensor dx = at::empty({0}, h.options());
  int64_t off = 0;
  std::vector<at::Tensor> g2s(k);
  for (size_t i = 0; i < k; ++i) {
    const int64_t out = weights[i].size(0);
    const int64_t r = lora_bs[i].size(1);
    const c10::optional<at::Tensor> g = grads.get(i);
    if (defined(g)) {
      TORCH_CHECK(g->size(-1) == out, "lora_group_bwd: grads[", i, "] has ", g->size(-1),
                  " features but weights[", i, "] is ", weights[i].sizes());
      g2s[i] = g->reshape({-1, out});  // [N, out_i]
      if (need_dh) dh.narrow(1, off, r).addmm_(g2s[i], lora_bs[i], /*beta=*/0, /*alpha=*/scalings[i]);
      if (need_b) {
        at::Tensor db = at::empty({out, r}, h.options());
        db.addmm_(g2s[i].t(), h2.narrow(1, off, r), /*beta=*/0, /*alpha=*/scalings[i]);
        dbs.push_back(db);  // [out, r] = s_i * g_i.T @ h_i
      }
    } else if (need_b) {
      dbs.push_back(at::zeros({out, r}, h.options()));
    }
    off += r;
  }
  at::Tensor da = at::empty({0}, h.options());
  if (need_a) {
    const at::Tensor x2 = x.reshape({-1, in});  // [N, in]
    da = at::mm(dh.t(), x2);                    // [R, in]: every member's dA, one GEMM
  }
  if (need_x) {
    dx = at::mm(dh, lora_a);  // [N, in]: the LoRA part of dx of every member, one GEMM
    for (size_t i = 0; i < k; ++i) {
      if (g2s[i].defined()) dx.addmm_(g2s[i], weights[i]);  // += g_i @ W_i
    }
    dx = dx.view(x.sizes());
  }
  return {dx, da, dbs};
}

TORCH_LIBRARY_IMPL(lora_runtime, CompositeExplicitAutograd, m) {
  m.impl("lora_group_fwd", &lora_group_fwd);
  m.impl("lora_group_bwd", &lora_group_bwd);
  m.impl("lora_group_infer", &lora_group_infer);
}

}  // namespace lora_runtime
