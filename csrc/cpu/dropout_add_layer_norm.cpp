// CPU kernels of dropout_add_layer_norm: out = LayerNorm(dropout(x) + residual) row by row, the
// dropout mask drawn from Philox by element index, so the backward regenerates it
// instead of storing it, and the Triton kernel on the GPU draws the same mask from the same seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "accumulate.h"
#include "vectorize.h"

namespace vlfast {
namespace {

// Rows per partial sum of the weight and bias gradients: a fixed split, so the sums do not depend
// on the thread count.
constexpr int64_t kRowsPerChunk = 32;

// Philox4x32-10 (Salmon et al., SC'11) as Triton's tl.randint4x computes it, laid out in blocks
// of 32 elements: element 32·b + 8·w + j takes word w of counter 8·b + j, so eight counters side
// by side give eight consecutive elements per word. words[32·i + ...] for blocks first + i.
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u, kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

void philox_scalar(uint64_t first_block, int64_t blocks, uint64_t key, uint32_t* words) {
  for (int64_t i = 0; i < blocks; ++i) {
    for (int j = 0; j < 8; ++j) {
      const uint64_t counter = 8 * (first_block + i) + j;
      uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
      uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
      for (int round = 0; round < 10; ++round) {
        const uint64_t a = uint64_t{kRoundA} * c0, b = uint64_t{kRoundB} * c2;
        c0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
        c2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
        c1 = static_cast<uint32_t>(b);
        c3 = static_cast<uint32_t>(a);
        k0 += kKeyA;
        k1 += kKeyB;
      }
      uint32_t* block = words + 32 * i;
      block[j] = c0, block[8 + j] = c1, block[16 + j] = c2, block[24 + j] = c3;
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(VLFAST_BASELINE_ONLY)
// The same rounds, a block's eight counters in one AVX2 register. _mm256_mul_epu32 multiplies the
// even 32-bit lanes into 64-bit products, so the odd lanes are shifted down for a second multiply
// and the halves blended back into (high words, low words). Two blocks go through the rounds
// side by side: one block's rounds are a chain of dependent multiplies that leaves the core idle.
__attribute__((target("avx2"))) inline void philox_round(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3,
                                                         __m256i k0, __m256i k1) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kRoundA)), round_b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  const __m256i a_even = _mm256_mul_epu32(round_a, c0), a_odd = _mm256_mul_epu32(round_a, _mm256_srli_epi64(c0, 32));
  const __m256i b_even = _mm256_mul_epu32(round_b, c2), b_odd = _mm256_mul_epu32(round_b, _mm256_srli_epi64(c2, 32));
  const __m256i a_hi = _mm256_blend_epi32(_mm256_srli_epi64(a_even, 32), a_odd, 0xAA);
  const __m256i b_hi = _mm256_blend_epi32(_mm256_srli_epi64(b_even, 32), b_odd, 0xAA);
  c0 = _mm256_xor_si256(_mm256_xor_si256(b_hi, c1), k0);
  c2 = _mm256_xor_si256(_mm256_xor_si256(a_hi, c3), k1);
  c1 = _mm256_blend_epi32(b_even, _mm256_slli_epi64(b_odd, 32), 0xAA);
  c3 = _mm256_blend_epi32(a_even, _mm256_slli_epi64(a_odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void philox_avx2(uint64_t first_block, int64_t blocks, uint64_t key, uint32_t* words) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < blocks; i += 2) {
    const int64_t pair = std::min<int64_t>(2, blocks - i);  // the last block may go alone
    __m256i c0[2], c1[2], c2[2], c3[2];
    for (int j = 0; j < 2; ++j) {
      const uint64_t counter = 8 * (first_block + i + j);  // a multiple of 8: the lanes share its high word
      c0[j] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter))), lane);
      c1[j] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
      c2[j] = c3[j] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
      philox_round(c0[0], c1[0], c2[0], c3[0], key0, key1);
      philox_round(c0[1], c1[1], c2[1], c3[1], key0, key1);
      k0 += kKeyA;
      k1 += kKeyB;
    }
    for (int j = 0; j < pair; ++j) {
      __m256i* block = reinterpret_cast<__m256i*>(words + 32 * (i + j));
      _mm256_storeu_si256(block, c0[j]);
      _mm256_storeu_si256(block + 1, c1[j]);
      _mm256_storeu_si256(block + 2, c2[j]);
      _mm256_storeu_si256(block + 3, c3[j]);
    }
  }
}
#endif

void philox4x32_10(uint64_t first_block, int64_t blocks, uint64_t key, uint32_t* words) {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(VLFAST_BASELINE_ONLY)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return philox_avx2(first_block, blocks, key, words);
#endif
  philox_scalar(first_block, blocks, key, words);
}

struct DropoutMask {
  uint64_t seed;
  // An element is kept iff its Philox word >> 1 >= threshold. Both sides fit in 31 bits (the
  // threshold clamped to 2³¹ - 1 at p = 1, whose scale is 0 anyway), so the compare is signed,
  // which SSE2 has.
  int32_t threshold;

  DropoutMask(const at::Tensor& seed_tensor, double p)
      : seed(static_cast<uint64_t>(seed_tensor.item<int64_t>())),
        threshold(static_cast<int32_t>(std::min(p * 2147483648.0, 2147483647.0))) {}  // floor(p·2³¹), as the Triton launcher

  // factor[i] = scale where element first + i is kept, else 0; words: scratch for the blocks.
  template <typename A>
  void fill(int64_t first, int64_t count, A scale, A* __restrict factor, std::vector<uint32_t>& words) const {
    if (threshold == 0) {
      std::fill(factor, factor + count, A(1));
      return;
    }
    const int64_t first_block = first >> 5, blocks = ((first + count - 1) >> 5) - first_block + 1;
    words.resize(32 * blocks);
    philox4x32_10(first_block, blocks, seed, words.data());
    const uint32_t* __restrict w = words.data() + (first & 31);
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) factor[i] = static_cast<int32_t>(w[i] >> 1) >= threshold ? scale : A(0);
  }
};

void check_rows(const at::Tensor& x, const at::Tensor& residual, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0 && x.is_contiguous(), "x must be a contiguous (..., D) tensor, D >= 1, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.is_contiguous(),
                    "residual must be a contiguous tensor of x's shape ", x.sizes(), ", got ", residual.sizes());
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be one int64, got ",
                    seed.scalar_type(), " of shape ", seed.sizes());
}

// weight or bias: (D,), contiguous, in residual's dtype.
void check_affine(const at::Tensor& t, const char* name, const at::Tensor& residual) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == residual.size(-1) && t.is_contiguous(), name,
                    " must be a contiguous (", residual.size(-1), ",) tensor, got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == residual.scalar_type(), name, " must have residual's dtype ",
                   residual.scalar_type(), ", got ", t.scalar_type());
}

template <typename A>
A dropout_scale(double p) {
  return p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
}

// The row functions recompute h = x·factor + residual in every pass instead of storing it: a
// scratch row at an arbitrary address made some processes 2-4x slower (loads that alias a
// pending store modulo 4 KiB wait for it), and the recomputation is one multiply-add.

// One row: out = LayerNorm(h); returns (mean, 1/std).
template <typename X, typename R, typename A>
VLFAST_CLONES std::pair<A, A> forward_row(int64_t dim, const X* __restrict x, const R* __restrict residual,
                                              const A* __restrict factor, const R* __restrict w,
                                              const R* __restrict b, A eps, R* __restrict out) {
  auto h = [&](int64_t d) { return static_cast<A>(x[d]) * factor[d] + static_cast<A>(residual[d]); };
  const A mu = row_sum<A>(dim, h) / dim;
  // A second pass: no cancellation, unlike E[h²] - mu².
  const A var = row_sum<A>(dim, [&](int64_t d) { return (h(d) - mu) * (h(d) - mu); }) / dim;
  const A inv = A(1) / std::sqrt(var + eps);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<R>((h(d) - mu) * inv * static_cast<A>(w[d]) + static_cast<A>(b[d]));
  return {mu, inv};
}

// One row of the backward: grad x and grad residual, and the row's terms added to its chunk's
// weight and bias gradients.
template <typename X, typename R, typename A>
VLFAST_CLONES void backward_row(int64_t dim, const X* __restrict x, const R* __restrict residual,
                                    const R* __restrict dy, const A* __restrict factor, const R* __restrict w, A mu,
                                    A inv, A* __restrict gw_part, A* __restrict gb_part, X* __restrict gx,
                                    R* __restrict gres) {
  auto xhat = [&](int64_t d) { return (static_cast<A>(x[d]) * factor[d] + static_cast<A>(residual[d]) - mu) * inv; };
  auto g = [&](int64_t d) { return static_cast<A>(dy[d]) * static_cast<A>(w[d]); };  // dy · weight
  const A mean_g = row_sum<A>(dim, g) / dim;
  const A mean_g_xhat = row_sum<A>(dim, [&](int64_t d) { return g(d) * xhat(d); }) / dim;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    const A dh = inv * (g(d) - mean_g - xhat(d) * mean_g_xhat);
    gres[d] = static_cast<R>(dh);
    gx[d] = static_cast<X>(dh * factor[d]);
  }
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    gw_part[d] += static_cast<A>(dy[d]) * xhat(d);
    gb_part[d] += static_cast<A>(dy[d]);
  }
}

#define VLFAST_DISPATCH_X_R(X_DTYPE, R_DTYPE, ...)                                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R_DTYPE, "dropout_add_layer_norm", [&] {    \
    using R = scalar_t;                                                                                  \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_DTYPE, "dropout_add_layer_norm", [&] {  \
      using X = scalar_t;                                                                                \
      using A = acc_t<X, R>;                                                                             \
      __VA_ARGS__();                                                                                     \
    });                                                                                                  \
  })

at::ScalarType stats_dtype(const at::Tensor& x, const at::Tensor& residual) {
  return x.scalar_type() == at::kDouble || residual.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (out in residual's dtype, row mean, row 1/std), stats in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& weight, const at::Tensor& bias, double p,
                                                           double eps, const at::Tensor& seed) {
  check_rows(x, residual, p, seed);
  check_affine(weight, "weight", residual);
  check_affine(bias, "bias", residual);
  TORCH_CHECK_VALUE(eps > 0.0, "eps must be positive, got ", eps);
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  const DropoutMask mask(seed, p);
  at::Tensor out = at::empty_like(residual);
  at::Tensor mean = at::empty({rows}, x.options().dtype(stats_dtype(x, residual)));
  at::Tensor rstd = at::empty_like(mean);
  VLFAST_DISPATCH_X_R(x.scalar_type(), residual.scalar_type(), [&] {
    const X* x_data = x.const_data_ptr<X>();
    const R *res_data = residual.const_data_ptr<R>(), *w = weight.const_data_ptr<R>(), *b = bias.const_data_ptr<R>();
    R* out_data = out.data_ptr<R>();
    A *mean_data = mean.data_ptr<A>(), *rstd_data = rstd.data_ptr<A>();
    const A scale = dropout_scale<A>(p);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / dim), [&](int64_t lo, int64_t hi) {
      std::vector<A> factor(dim);
      std::vector<uint32_t> words;
      for (int64_t r = lo; r < hi; ++r) {
        mask.fill(r * dim, dim, scale, factor.data(), words);
        const auto [mu, inv] = forward_row(dim, x_data + r * dim, res_data + r * dim, factor.data(), w, b,
                                           static_cast<A>(eps), out_data + r * dim);
        mean_data[r] = mu;
        rstd_data[r] = inv;
      }
    });
  });
  return {out, mean, rstd};
}

// (grad x, grad residual, grad weight, grad bias), each in its input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& seed) {
  check_rows(x, residual, p, seed);
  check_affine(weight, "weight", residual);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == residual.scalar_type() && grad.is_contiguous(),
                    "grad must be contiguous, of x's shape and residual's dtype");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK_VALUE(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == stats_dtype(x, residual) &&
                        rstd.scalar_type() == mean.scalar_type(),
                    "mean and rstd must be the forward's (rows,) statistics");
  const DropoutMask mask(seed, p);
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor grad_x = at::empty_like(x), grad_residual = at::empty_like(residual);
  at::Tensor grad_weight_parts = at::zeros({chunks, dim}, mean.options());
  at::Tensor grad_bias_parts = at::zeros({chunks, dim}, mean.options());
  VLFAST_DISPATCH_X_R(x.scalar_type(), residual.scalar_type(), [&] {
    const X* x_data = x.const_data_ptr<X>();
    const R *res_data = residual.const_data_ptr<R>(), *w = weight.const_data_ptr<R>(), *g_data = grad.const_data_ptr<R>();
    const A *mean_data = mean.const_data_ptr<A>(), *rstd_data = rstd.const_data_ptr<A>();
    X* gx_data = grad_x.data_ptr<X>();
    R* gr_data = grad_residual.data_ptr<R>();
    A *gw_parts = grad_weight_parts.data_ptr<A>(), *gb_parts = grad_bias_parts.data_ptr<A>();
    const A scale = dropout_scale<A>(p);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) {
      std::vector<A> factor(dim);
      std::vector<uint32_t> words;
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        A* __restrict gw_part = gw_parts + chunk * dim;
        A* __restrict gb_part = gb_parts + chunk * dim;
        for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
          mask.fill(r * dim, dim, scale, factor.data(), words);
          backward_row(dim, x_data + r * dim, res_data + r * dim, g_data + r * dim, factor.data(), w, mean_data[r],
                       rstd_data[r], gw_part, gb_part, gx_data + r * dim, gr_data + r * dim);
        }
      }
    });
  });
  return {grad_x, grad_residual, grad_weight_parts.sum(0).to(weight.scalar_type()),
          grad_bias_parts.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CPU, m) {
  m.impl("dropout_add_layer_norm", &forward_cpu);
  m.impl("dropout_add_layer_norm_backward", &backward_cpu);
}

}  // namespace vlfast
