// lora_product(B, A) = B @ A by the library's own loop (lora_product.h): the one definition of
// the rank-r product that every CPU path of the merge uses (get_delta_weight, merge_lora,
// iter_merged_weights, the tensor-op merge), so that they and merged()'s fused kernels give
// the same merged weights bit for bit. CPU, float32 and float64 (the accumulation dtypes).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "lora_product.h"

namespace lora_runtime {

at::Tensor lora_product(const at::Tensor& lora_b, const at::Tensor& lora_a) {
  TORCH_CHECK(lora_b.device().is_cpu() && lora_a.device().is_cpu(),
              "lora_product: CPU tensors only, got lora_b on ", lora_b.device(),
              " and lora_a on ", lora_a.device());
  TORCH_CHECK(lora_b.dim() == 2 && lora_a.dim() == 2 && lora_b.size(1) == lora_a.size(0),
              "lora_product: lora_b ", lora_b.sizes(), " and lora_a ", lora_a.sizes(),
              " do not fit: need [out, r] and [r, in]");
  TORCH_CHECK(lora_b.scalar_type() == lora_a.scalar_type() &&
                  (lora_a.scalar_type() == at::kFloat || lora_a.scalar_type() == at::kDouble),
              "lora_product: lora_b and lora_a must both be Float or both Double, got ",
              lora_b.scalar_type(), " and ", lora_a.scalar_type());
  const at::Tensor b = lora_b.contiguous(), a = lora_a.contiguous();
  const int64_t rows = b.size(0), r = b.size(1), in = a.size(1);
  at::Tensor p = at::empty({rows, in}, a.options());
  const int64_t tiles = (rows + kProductTileRows - 1) / kProductTileRows;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lora_product", [&] {
    const scalar_t* bd = b.data_ptr<scalar_t>();
    const scalar_t* ad = a.data_ptr<scalar_t>();
    scalar_t* pd = p.data_ptr<scalar_t>();
    const ProductFactors<scalar_t> factors(bd, ad, r, in);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      const int64_t r0 = t0 * kProductTileRows, r1 = std::min(rows, t1 * kProductTileRows);
      factors.rows(r0, r1, pd + r0 * in);
    });
  });
  return p;
}

TORCH_LIBRARY_IMPL(lora_runtime, CPU, m) { m.impl("lora_product", &lora_product); }

}  // namespace lora_runtime
