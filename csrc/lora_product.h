// The rank-r product P = B @ A of the exact merge, computed by this library's own loop so that
// every CPU path that forms it (merged()'s kernels in merge_exact.cpp, the lora_product op
// behind get_delta_weight, merge_lora and the tensor-op merge) gets the same bits whatever BLAS
// torch was built with and however it splits a GEMM over threads.
//
//   P[i, j] = (((B[i,0] A[0,j] + B[i,1] A[1,j]) + B[i,2] A[2,j]) + ...), in the accumulation
//   dtype, every product and every sum rounded on its own (-ffp-contract=off: no FMA), the
//   terms in order of k.
//
// Rows are computed a tile of kProductTileRows at a time: a tile starts at a multiple of 8
// elements of a row-major [out, in] weight (merge_exact.cpp's mask bytes stay whole) and stays
// in the cache while the merge uses it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LORA_PRODUCT_AVX2 1
#endif

namespace lora_runtime {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LORA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LORA_VECTOR_CLONES
#endif

constexpr int64_t kProductTileRows = 8;

// p[0 .. (r1 - r0) * in) = rows [r0, r1) of b @ a; b: [rows, r], a: [r, in], row-major.
// The portable loop (float64, and float32 without AVX2): kCols partial sums while k runs.
template <typename A>
LORA_VECTOR_CLONES void product_rows_portable(const A* b, const A* a, int64_t r, int64_t in, int64_t r0,
                                     int64_t r1, A* p) {
  constexpr int64_t kCols = 256 / sizeof(A);  // 64 floats or 32 doubles
  for (int64_t i = r0; i < r1; ++i) {
    const A* bi = b + i * r;
    A* pi = p + (i - r0) * in;
    if (r == 0) {
      std::fill(pi, pi + in, A(0));
      continue;
    }
    int64_t j = 0;
    for (; j + kCols <= in; j += kCols) {
      A acc[kCols];
      for (int64_t c = 0; c < kCols; ++c) acc[c] = bi[0] * a[j + c];
      for (int64_t k = 1; k < r; ++k) {
        const A bk = bi[k];
        const A* ak = a + k * in + j;
        for (int64_t c = 0; c < kCols; ++c) acc[c] += bk * ak[c];
      }
      for (int64_t c = 0; c < kCols; ++c) pi[j + c] = acc[c];
    }
    for (; j < in; ++j) {
      A acc = bi[0] * a[j];
      for (int64_t k = 1; k < r; ++k) acc += bi[k] * a[k * in + j];
      pi[j] = acc;
    }
  }
}

constexpr int64_t kPanelCols = 16;  // columns of A in one packed panel (two AVX2 vectors)

#ifdef LORA_PRODUCT_AVX2
// The float32 loop with AVX2 (the same operations in the same order, so the same bits): four
// rows and 16 columns at a time, the 8 partial sums in registers while k runs, each load of A
// serving four rows. A is read from `panels`: its columns in blocks of 16, each block's
// [r, 16] values contiguous, so that the loop over k walks memory in order (rows of A a power
// of two bytes apart would fall into a few cache sets). Separate multiplies and adds (no FMA),
// as in the portable loop.
__attribute__((target("avx2"))) inline void product_rows_avx2(const float* b, const float* a,
                                                              const float* panels, int64_t r,
                                                              int64_t in, int64_t r0, int64_t r1,
                                                              float* p) {
  constexpr int64_t kRows = 4;
  int64_t i = r0;
  for (; i + kRows <= r1; i += kRows) {
    const float* bi = b + i * r;  // rows i .. i + 3 of B: bi[q * r + k]
    float* pi = p + (i - r0) * in;
    int64_t j = 0;
    for (const float* panel = panels; j + kPanelCols <= in; j += kPanelCols, panel += r * kPanelCols) {
      __m256 lo[kRows], hi[kRows];
      const __m256 a_lo = _mm256_loadu_ps(panel), a_hi = _mm256_loadu_ps(panel + 8);
      for (int64_t q = 0; q < kRows; ++q) {
        const __m256 bq = _mm256_set1_ps(bi[q * r]);
        lo[q] = _mm256_mul_ps(bq, a_lo);
        hi[q] = _mm256_mul_ps(bq, a_hi);
      }
      for (int64_t k = 1; k < r; ++k) {
        const __m256 k_lo = _mm256_loadu_ps(panel + k * kPanelCols);
        const __m256 k_hi = _mm256_loadu_ps(panel + k * kPanelCols + 8);
        for (int64_t q = 0; q < kRows; ++q) {
          const __m256 bq = _mm256_set1_ps(bi[q * r + k]);
          lo[q] = _mm256_add_ps(lo[q], _mm256_mul_ps(bq, k_lo));
          hi[q] = _mm256_add_ps(hi[q], _mm256_mul_ps(bq, k_hi));
        }
      }
      for (int64_t q = 0; q < kRows; ++q) {
        _mm256_storeu_ps(pi + q * in + j, lo[q]);
        _mm256_storeu_ps(pi + q * in + j + 8, hi[q]);
      }
    }
    for (; j < in; ++j) {  // the column tail, one element at a time
      for (int64_t q = 0; q < kRows; ++q) {
        float acc = bi[q * r] * a[j];
        for (int64_t k = 1; k < r; ++k) acc += bi[q * r + k] * a[k * in + j];
        pi[q * in + j] = acc;
      }
    }
  }
  if (i < r1) product_rows_portable<float>(b, a, r, in, i, r1, p + (i - r0) * in);
}
#endif

// B and A of one product, row-major, and (float32 with AVX2) A packed into panels once, for
// every tile of rows that `rows` computes from them.
template <typename A>
class ProductFactors {
 public:
  ProductFactors(const A* b, const A* a, int64_t r, int64_t in) : b_(b), a_(a), r_(r), in_(in) {
#ifdef LORA_PRODUCT_AVX2
    if constexpr (std::is_same_v<A, float>) {
      static const bool avx2 = __builtin_cpu_supports("avx2");
      if (avx2 && r > 0) {
        const int64_t blocks = in / kPanelCols;
        panels_.resize(blocks * r * kPanelCols);
        for (int64_t blk = 0; blk < blocks; ++blk) {
          for (int64_t k = 0; k < r; ++k) {
            std::copy(a + k * in + blk * kPanelCols, a + k * in + (blk + 1) * kPanelCols,
                      panels_.data() + (blk * r + k) * kPanelCols);
          }
        }
        packed_ = true;
      }
    }
#endif
  }

  // p[0 .. (r1 - r0) * in) = rows [r0, r1) of B @ A.
  void rows(int64_t r0, int64_t r1, A* p) const {
#ifdef LORA_PRODUCT_AVX2
    if constexpr (std::is_same_v<A, float>) {
      if (packed_) return product_rows_avx2(b_, a_, panels_.data(), r_, in_, r0, r1, p);
    }
#endif
    product_rows_portable<A>(b_, a_, r_, in_, r0, r1, p);
  }

 private:
  const A* b_;
  const A* a_;
  int64_t r_, in_;
  std::vector<A> panels_;
  bool packed_ = false;
};

}  // namespace lora_runtime
