// The exact, reversible merge of merged(...) (lora_runtime/adapters/merge.py) in one pass
// over a layer's weight each way (the tensor-op path takes about twenty):
//
//   merge_enter(W, B, A, s): M = round(W + s * P), written into W in place; returns what gives
//                         W back bit for bit: a packed mask of the elements where
//                         round(M - s * P) != W (bit patterns) and their original values, or,
//                         when that patch would hold as many bytes as W, a plain copy of W.
//   merge_leave(M, B, A, s, mask, values): W = round(M - s * P) with the masked elements
//                         patched from `values`; returns the checksum of the result.
//
// P = B @ A is the raw rank-r product in the accumulation dtype (float32; float64 for a
// float64 weight: B and A come in that dtype), s the LoRA scale; the sum and the difference
// are taken in that dtype and rounded once to W's dtype, exactly as merged_weight() does.
// P is never held whole: each parallel task computes a tile of its rows (lora_product.h, the
// same bits as the lora_product op) and uses it from the cache, so a pass reads and writes W
// only (ProductTiles below). The checksum is the int64 sum of W's bit patterns read as signed
// integers of W's width (adapters/merge_bits.checksum).
// Mask layout: bit j of byte i flags element 8i + j of the flattened weight (merge_bits.pack).
// CPU only (schemas in library.cpp); other devices use the tensor-op path of merge.py.
// merge_enter keeps each tile's flagged originals as it goes and gathers them after, so W is
// read once; in the rare case where the copy is the smaller store (nearly every element
// flagged) it rebuilds W beside M from them, in a second pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lora_product.h"

namespace lora_runtime {
namespace {

template <typename T>
struct Bits {
  using type = std::conditional_t<sizeof(T) == 2, int16_t,
                                  std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>;
};

template <typename T>
inline typename Bits<T>::type bits_of(T v) {
  typename Bits<T>::type out;
  std::memcpy(&out, &v, sizeof(T));
  return out;
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_args(const at::Tensor& w, const at::Tensor& b, const at::Tensor& a, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && b.device().is_cpu() && a.device().is_cpu(), op,
              ": CPU tensors only (other devices take merge.py's tensor-op path), got weight on ",
              w.device(), ", lora_b on ", b.device(), " and lora_a on ", a.device());
  TORCH_CHECK(w.is_contiguous() && b.is_contiguous() && a.is_contiguous(), op,
              ": weight, lora_b and lora_a must be contiguous");
  TORCH_CHECK(w.dim() == 2 && b.dim() == 2 && a.dim() == 2 && b.size(0) == w.size(0) &&
                  a.size(1) == w.size(1) && b.size(1) == a.size(0),
              op, ": weight ", w.sizes(), ", lora_b ", b.sizes(), " and lora_a ", a.sizes(),
              " do not fit: need [out, in], [out, r] and [r, in]");
  const auto acc = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(b.scalar_type() == acc && a.scalar_type() == acc, op,
              ": lora_b and lora_a must be ", acc, " for a ", w.scalar_type(), " weight, got ",
              b.scalar_type(), " and ", a.scalar_type());
}

// The per-element loops below are written so that the compiler vectorises them (no branch,
// no bit packing inside); on x86-64 with GCC each is also built for AVX2 and picked at load
// time (LORA_VECTOR_CLONES, lora_product.h). Vector adds, multiplies and conversions round
// exactly as the scalar ones, and -ffp-contract=off keeps `W + s * P` two roundings, so the
// results are the same bits.

// Rounds to W's dtype as static_cast does; for bfloat16 without c10's NaN branch (same bits:
// nearest even, NaN as 0x7FC0), so that the loops around it vectorise.
template <typename T>
inline T round_to(acc_of<T> v) {
  return static_cast<T>(v);
}

template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(nan ? static_cast<uint16_t>(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

constexpr int64_t kChunk = 512;  // elements per inner step: 64 mask bytes, kept in L1

template <typename T>
inline uint64_t bits_sum(const T* w, int64_t len) {  // the checksum's part over w[0, len)
  uint64_t sum = 0;  // unsigned: wraps like torch's int64 sum
  for (int64_t j = 0; j < len; ++j) sum += static_cast<uint64_t>(static_cast<int64_t>(bits_of(w[j])));
  return sum;
}

// Enters w[0, len) (len <= kChunk): writes M = round(W + s P) over w and the chunk's mask
// bytes, appends the originals of the flagged elements to `kept`; returns W's checksum part.
template <typename T>
LORA_VECTOR_CLONES uint64_t enter_chunk(T* w, const acc_of<T>* p, acc_of<T> s, int64_t len,
                                        uint8_t* mask, std::vector<T>& kept) {
  using A = acc_of<T>;
  T merged[kChunk];
  uint8_t miss[kChunk];
  const uint64_t sum = bits_sum(w, len);
  for (int64_t j = 0; j < len; ++j) {
    const A d = p[j] * s;
    const T m = round_to<T>(static_cast<A>(w[j]) + d);
    const T back = round_to<T>(static_cast<A>(m) - d);  // what merge_leave will compute
    miss[j] = bits_of(back) != bits_of(w[j]);
    merged[j] = m;
  }
  for (int64_t byte = 0; byte * 8 < len; ++byte) {
    uint8_t flags = 0;
    for (int64_t j = 0; j < 8 && byte * 8 + j < len; ++j) flags |= miss[byte * 8 + j] << j;
    mask[byte] = flags;
    for (uint8_t f = flags; f; f &= f - 1) kept.push_back(w[byte * 8 + __builtin_ctz(f)]);
  }
  std::memcpy(static_cast<void*>(w), merged, len * sizeof(T));
  return sum;
}

// Leaves w[0, len): w <- round(M - s P), the flagged elements from `*values` (advanced past
// them); returns the restored weight's checksum part. `mask` null: nothing flagged.
template <typename T>
LORA_VECTOR_CLONES uint64_t leave_chunk(T* w, const acc_of<T>* p, acc_of<T> s, int64_t len,
                                        const uint8_t* mask, const T** values) {
  using A = acc_of<T>;
  for (int64_t j = 0; j < len; ++j) w[j] = round_to<T>(static_cast<A>(w[j]) - p[j] * s);
  if (mask) {
    for (int64_t byte = 0; byte * 8 < len; ++byte) {
      for (uint8_t f = mask[byte]; f; f &= f - 1) w[byte * 8 + __builtin_ctz(f)] = *(*values)++;
    }
  }
  return bits_sum(w, len);
}

// Tiles of kProductTileRows rows of W: each parallel task computes its tile's rows of P
// (lora_product.h) into a buffer of its own and uses them from the cache.
template <typename A>
class ProductTiles {
 public:
  ProductTiles(const at::Tensor& b, const at::Tensor& a)
      : factors_(b.data_ptr<A>(), a.data_ptr<A>(), b.size(1), a.size(1)), rows_(b.size(0)),
        in_(a.size(1)) {}

  int64_t count() const { return (rows_ + kProductTileRows - 1) / kProductTileRows; }
  int64_t first_row(int64_t t) const { return t * kProductTileRows; }
  int64_t end_row(int64_t t) const { return std::min(rows_, (t + 1) * kProductTileRows); }

  // Tile t's rows of P, computed into `buf` (a thread's own, kProductTileRows * in values).
  const A* rows_of(int64_t t, std::vector<A>& buf) const {
    buf.resize(kProductTileRows * in_);
    factors_.rows(first_row(t), end_row(t), buf.data());
    return buf.data();
  }

 private:
  ProductFactors<A> factors_;
  int64_t rows_, in_;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> enter_impl(at::Tensor& w,
                                                                     const at::Tensor& b,
                                                                     const at::Tensor& a,
                                                                     double scaling) {
  using A = acc_of<T>;
  const int64_t n = w.numel(), in = w.size(1);
  const ProductTiles<A> tiles(b, a);
  const int64_t count = tiles.count();
  T* wd = w.data_ptr<T>();
  const A s = static_cast<A>(scaling);
  at::Tensor mask = at::empty({(n + 7) / 8}, w.options().dtype(at::kByte));
  uint8_t* md = mask.data_ptr<uint8_t>();  // a tile starts at a multiple of 8 elements
  std::vector<std::vector<T>> kept(count);  // each tile's flagged originals, in order
  std::vector<uint64_t> sums(count, 0);
  // One pass: flag the elements the restore's round(M - s P) would miss, keep their
  // originals, write M over W, sum W's bit patterns.
  at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const A* pd = tiles.rows_of(t, buf);  // P from element lo on
      const int64_t lo = tiles.first_row(t) * in, hi = tiles.end_row(t) * in;
      uint64_t sum = 0;
      for (int64_t i = lo; i < hi; i += kChunk) {
        sum += enter_chunk<T>(wd + i, pd + (i - lo), s, std::min(kChunk, hi - i), md + i / 8,
                              kept[t]);
      }
      sums[t] = sum;
    }
  });
  int64_t patched = 0;
  uint64_t checksum = 0;
  std::vector<int64_t> offsets(count, 0);
  for (int64_t t = 0; t < count; ++t) {
    offsets[t] = patched;
    patched += static_cast<int64_t>(kept[t].size());
    checksum += sums[t];
  }
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const int64_t patch_bytes = patched ? patched * static_cast<int64_t>(sizeof(T)) + (n + 7) / 8 : 0;
  const bool use_copy = patch_bytes >= bytes && bytes > 0;
  at::Tensor copy = at::empty({use_copy ? w.size(0) : 0, in}, w.options());
  at::Tensor values = at::empty({use_copy ? 0 : patched}, w.options());
  if (use_copy) {
    // Rebuild W beside M (rare: nearly every element was flagged): the flagged elements from
    // what was kept, the others as round(M - s P), which is W by the test that flagged them.
    T* cd = copy.data_ptr<T>();
    std::memcpy(static_cast<void*>(cd), wd, bytes);
    at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
      std::vector<A> buf;
      for (int64_t t = t0; t < t1; ++t) {
        const A* pd = tiles.rows_of(t, buf);
        const int64_t lo = tiles.first_row(t) * in, hi = tiles.end_row(t) * in;
        const T* vals = kept[t].data();
        for (int64_t i = lo; i < hi; i += kChunk) {
          leave_chunk<T>(cd + i, pd + (i - lo), s, std::min(kChunk, hi - i), md + i / 8, &vals);
        }
      }
    });
  } else if (patched) {
    T* vd = values.data_ptr<T>();
    at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) std::copy(kept[t].begin(), kept[t].end(), vd + offsets[t]);
    });
  }
  if (use_copy || patched == 0) mask = at::empty({0}, mask.options());
  return {mask, values, copy, at::scalar_tensor(use_copy ? 0 : static_cast<int64_t>(checksum), at::kLong)};
}

template <typename T>
at::Tensor leave_impl(at::Tensor& w, const at::Tensor& b, const at::Tensor& a, double scaling,
                      const at::Tensor& mask, const at::Tensor& values) {
  using A = acc_of<T>;
  const int64_t in = w.size(1);
  const ProductTiles<A> tiles(b, a);
  const int64_t count = tiles.count();
  T* wd = w.data_ptr<T>();
  const A s = static_cast<A>(scaling);
  const bool has_mask = mask.numel() > 0;
  const uint8_t* md = has_mask ? mask.data_ptr<uint8_t>() : nullptr;
  const T* vd = values.numel() ? values.data_ptr<T>() : nullptr;
  std::vector<int64_t> offsets(count, 0);
  std::vector<uint64_t> sums(count, 0);
  if (has_mask) {  // where each tile's patched values start: popcounts of the mask
    std::vector<int64_t> counts(count, 0);
    at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t lo = tiles.first_row(t) * in, hi = tiles.end_row(t) * in;
        int64_t c = 0;
        for (int64_t byte = lo / 8; byte < (hi + 7) / 8; ++byte) c += __builtin_popcount(md[byte]);
        counts[t] = c;
      }
    });
    int64_t total = 0;
    for (int64_t t = 0; t < count; ++t) {
      offsets[t] = total;
      total += counts[t];
    }
    TORCH_CHECK(total == values.numel(), "merge_leave: the mask flags ", total,
                " elements but ", values.numel(), " values were kept");
  }
  at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const A* pd = tiles.rows_of(t, buf);
      const int64_t lo = tiles.first_row(t) * in, hi = tiles.end_row(t) * in;
      const T* vals = vd ? vd + offsets[t] : nullptr;
      uint64_t sum = 0;
      for (int64_t i = lo; i < hi; i += kChunk) {
        sum += leave_chunk<T>(wd + i, pd + (i - lo), s, std::min(kChunk, hi - i),
                              has_mask ? md + i / 8 : nullptr, &vals);
      }
      sums[t] = sum;
    }
  });
  uint64_t checksum = 0;
  for (int64_t t = 0; t < count; ++t) checksum += sums[t];
  return at::scalar_tensor(static_cast<int64_t>(checksum), at::kLong);
}

}  // namespace

// Returns (mask uint8 [ceil(n/8)] or [0] when nothing is patched or a copy is kept,
//          values [n_patched] in W's dtype, copy [out, in] or [0, in], checksum int64 scalar).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_enter(at::Tensor weight,
                                                                      const at::Tensor& lora_b,
                                                                      const at::Tensor& lora_a,
                                                                      double scaling) {
  check_args(weight, lora_b, lora_a, "merge_enter");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "merge_enter",
                                  [&] { out = enter_impl<scalar_t>(weight, lora_b, lora_a, scaling); });
  return out;
}

at::Tensor merge_leave(at::Tensor weight, const at::Tensor& lora_b, const at::Tensor& lora_a,
                       double scaling, const at::Tensor& mask, const at::Tensor& values) {
  check_args(weight, lora_b, lora_a, "merge_leave");
  TORCH_CHECK(mask.numel() == 0 || (mask.scalar_type() == at::kByte &&
                                    mask.numel() == (weight.numel() + 7) / 8),
              "merge_leave: mask must be uint8 [ceil(numel / 8)] = [",
              (weight.numel() + 7) / 8, "] or empty, got ", mask.scalar_type(), " ",
              mask.sizes());
  TORCH_CHECK(values.scalar_type() == weight.scalar_type() && values.is_contiguous(),
              "merge_leave: values must be contiguous ", weight.scalar_type());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "merge_leave",
                                  [&] { out = leave_impl<scalar_t>(weight, lora_b, lora_a, scaling, mask, values); });
  return out;
}

TORCH_LIBRARY_IMPL(lora_runtime, CPU, m) {
  m.impl("merge_enter", &merge_enter);
  m.impl("merge_leave", &merge_leave);
}

}  // namespace lora_runtime
