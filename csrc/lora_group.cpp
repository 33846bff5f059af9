// Grouped LoRA linear for sibling layers that read the same input (q/k/v, gate/up):
//   y_i = x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T   for i = 0 .. k-1
// with the k rank-r_i shrinks done as ONE GEMM against the stacked A = cat(A_i) [R, in],
// R = sum r_i, and in the backward dA (all members) and the LoRA part of dx as one GEMM each.
//
// Ops (schemas in TORCH_LIBRARY_FRAGMENT below):
//   lora_group_fwd  returns (ys, h) with h = x @ A.T [..., R], kept for dB_i.
//   lora_group_bwd  gradients of x, of the stacked A and of every B_i; the base weights and
//                   biases are frozen (the Python caller groups only such layers).
// Autograd and fake kernels are registered in Python (lora_runtime/ops/lora_group.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace lora_runtime {
namespace {

std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> s(shape.begin(), shape.end());
  s.back() = last;
  return s;
}

void check_same(const at::Tensor& t, const std::string& name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lora_group: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == x.device(), "lora_group: ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on one device");
}

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
  check_same(lora_a, "lora_a", x);
  int64_t rank_sum = 0;
  for (size_t i = 0; i < k; ++i) {
    const auto& w = weights[i];
    const auto& b = lora_bs[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "lora_group: weights[", i,
                "] must be [out, ", in, "], got ", w.sizes(), " (x.shape=", x.sizes(), ")");
    TORCH_CHECK(b.dim() == 2 && b.size(0) == w.size(0), "lora_group: lora_bs[", i,
                "] must be [out, r] = [", w.size(0), ", r], got ", b.sizes());
    check_same(w, "weights[" + std::to_string(i) + "]", x);
    check_same(b, "lora_bs[" + std::to_string(i) + "]", x);
    const c10::optional<at::Tensor> bias = biases.get(i);
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "lora_group: biases[", i,
                  "] must be [", w.size(0), "], got ", bias->sizes());
      check_same(*bias, "biases[" + std::to_string(i) + "]", x);
    }
    rank_sum += b.size(1);
  }
  TORCH_CHECK(rank_sum == lora_a.size(0), "lora_group: the ranks of lora_bs sum to ", rank_sum,
              " but the stacked lora_a has ", lora_a.size(0), " rows");
  return in;
}

}  // namespace

// The forward of the group. `lora_first`: without a bias, the rank-r product writes y first
// (beta 0) and the base GEMM accumulates into it, reading y inside its compute-bound kernel
// instead of in a separate pass over [N, out] (what lora_linear_fwd does; it pays at training
// sizes). The no-grad entry point (lora_infer.cpp, decode sizes) passes false: at a few tokens
// an accumulating base GEMM costs more than a plain one.
std::tuple<std::vector<at::Tensor>, at::Tensor> group_forward(
    const at::Tensor& x, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, const at::Tensor& lora_a,
    at::TensorList lora_bs, at::ArrayRef<double> scalings, bool lora_first) {
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
    if (bias.has_value() && bias->defined()) {
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

std::tuple<std::vector<at::Tensor>, at::Tensor> lora_group_fwd(
    const at::Tensor& x, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, const at::Tensor& lora_a,
    at::TensorList lora_bs, at::ArrayRef<double> scalings) {
  return group_forward(x, weights, biases, lora_a, lora_bs, scalings, /*lora_first=*/true);
}

// Returns (dx, dlora_a [R, in], dlora_bs); an entry not asked for is empty ([0] / []).
// grads[i] undefined means member i's output got no gradient (it counts as zero).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> lora_group_bwd(
    const c10::List<c10::optional<at::Tensor>>& grads, const at::Tensor& x,
    at::TensorList weights, const at::Tensor& lora_a, at::TensorList lora_bs,
    const at::Tensor& h, at::ArrayRef<double> scalings, bool need_x, bool need_a,
    bool need_b) {
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
    all_defined = all_defined && g.has_value() && g->defined();
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
    if (g.has_value() && g->defined()) {
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

TORCH_LIBRARY_FRAGMENT(lora_runtime, m) {
  m.def("lora_group_fwd(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor lora_a, "
        "Tensor[] lora_bs, float[] scalings) -> (Tensor[], Tensor)");
  m.def("lora_group_bwd(Tensor?[] grads, Tensor x, Tensor[] weights, Tensor lora_a, "
        "Tensor[] lora_bs, Tensor h, float[] scalings, bool need_x, bool need_a, "
        "bool need_b) -> (Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(lora_runtime, CPU, m) {
  m.impl("lora_group_fwd", &lora_group_fwd);
  m.impl("lora_group_bwd", &lora_group_bwd);
}

TORCH_LIBRARY_IMPL(lora_runtime, CUDA, m) {
  m.impl("lora_group_fwd", &lora_group_fwd);
  m.impl("lora_group_bwd", &lora_group_bwd);
}

}  // namespace lora_runtime

