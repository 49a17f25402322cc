// CPU kernels of dropout_add_layer_norm: out = LayerNorm(dropout(x) + residual) row by row, the
// dropout mask drawn from Philox by element index, so the backward regenerates it
// instead of storing it, and the Triton kernel on the GPU draws the same mask from the same seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "accumulate.h"

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

#if defined(__GNUC__) && defined(__x86_64__)
// The same rounds, a block's eight counters in one AVX2 register. _mm256_mul_epu32 multiplies the
// even 32-bit lanes into 64-bit products, so the odd lanes are shifted down for a second multiply
// and the halves blended back into (high words, low words).
__attribute__((target("avx2"))) void philox_avx2(uint64_t first_block, int64_t blocks, uint64_t key, uint32_t* words) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kRoundA)), round_b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < blocks; ++i) {
    const uint64_t counter = 8 * (first_block + i);  // a multiple of 8: the lanes share its high word
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter))), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i a_even = _mm256_mul_epu32(round_a, c0), a_odd = _mm256_mul_epu32(round_a, _mm256_srli_epi64(c0, 32));
      const __m256i b_even = _mm256_mul_epu32(round_b, c2), b_odd = _mm256_mul_epu32(round_b, _mm256_srli_epi64(c2, 32));
      const __m256i a_hi = _mm256_blend_epi32(_mm256_srli_epi64(a_even, 32), a_odd, 0xAA);
      const __m256i b_hi = _mm256_blend_epi32(_mm256_srli_epi64(b_even, 32), b_odd, 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(b_hi, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(a_hi, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = _mm256_blend_epi32(b_even, _mm256_slli_epi64(b_odd, 32), 0xAA);
      c3 = _mm256_blend_epi32(a_even, _mm256_slli_epi64(a_odd, 32), 0xAA);
      k0 += kKeyA;
      k1 += kKeyB;
    }
    __m256i* block = reinterpret_cast<__m256i*>(words + 32 * i);
    _mm256_storeu_si256(block, c0);
    _mm256_storeu_si256(block + 1, c1);
    _mm256_storeu_si256(block + 2, c2);
    _mm256_storeu_si256(block + 3, c3);
  }
}
#endif

void philox4x32_10(uint64_t first_block, int64_t blocks, uint64_t key, uint32_t* words) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return philox_avx2(first_block, blocks, key, words);
#endif
  philox_scalar(first_block, blocks, key, words);
}

struct DropoutMask {
  uint64_t seed;
  uint32_t threshold;  // an element is kept iff its Philox word >> 1 >= threshold

  DropoutMask(const at::Tensor& seed_tensor, double p)
      : seed(static_cast<uint64_t>(seed_tensor.item<int64_t>())),
        threshold(static_cast<uint32_t>(p * 2147483648.0)) {}  // floor(p·2³¹), as the Triton launcher

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
    for (int64_t i = 0; i < count; ++i) factor[i] = (w[i] >> 1) >= threshold ? scale : A(0);
  }
};

// Sums with eight independent partial sums, which the compiler vectorises (one running sum
// cannot be: float addition does not reassociate).
template <typename A, typename F>
A lane_sum(int64_t count, F term) {
  constexpr int kLanes = 8;
  A lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= count; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += term(d + j);
  }
  for (; d < count; ++d) lanes[0] += term(d);
  A total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

void check_rows(const at::Tensor& x, const at::Tensor& residual, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (rows, D) tensor, got ", x.sizes());
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.is_contiguous(),
                    "residual must be a contiguous tensor of x's shape ", x.sizes(), ", got ", residual.sizes());
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be one int64, got ",
                    seed.scalar_type(), " of shape ", seed.sizes());
}

// weight or bias: (D,), contiguous, in residual's dtype.
void check_affine(const at::Tensor& t, const char* name, const at::Tensor& residual) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == residual.size(1) && t.is_contiguous(), name,
                    " must be a contiguous (", residual.size(1), ",) tensor, got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == residual.scalar_type(), name, " must have residual's dtype ",
                   residual.scalar_type(), ", got ", t.scalar_type());
}

template <typename A>
A dropout_scale(double p) {
  return p < 1.0 ? static_cast<A>(1.0 / (1.0 - p)) : A(0);
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
  const int64_t rows = x.size(0), dim = x.size(1);
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
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<A> factor(dim), h(dim);
      std::vector<uint32_t> words;
      for (int64_t r = lo; r < hi; ++r) {
        mask.fill(r * dim, dim, scale, factor.data(), words);
        const X* xr = x_data + r * dim;
        const R* rr = res_data + r * dim;
        for (int64_t d = 0; d < dim; ++d) h[d] = static_cast<A>(xr[d]) * factor[d] + static_cast<A>(rr[d]);
        const A mu = lane_sum<A>(dim, [&](int64_t d) { return h[d]; }) / dim;
        const A var = lane_sum<A>(dim, [&](int64_t d) { return (h[d] - mu) * (h[d] - mu); }) / dim;
        const A inv = A(1) / std::sqrt(var + static_cast<A>(eps));
        R* o = out_data + r * dim;
        for (int64_t d = 0; d < dim; ++d) {
          o[d] = static_cast<R>((h[d] - mu) * inv * static_cast<A>(w[d]) + static_cast<A>(b[d]));
        }
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
  const int64_t rows = x.size(0), dim = x.size(1);
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
      std::vector<A> factor_buffer(dim), xhat_buffer(dim), g_buffer(dim);
      std::vector<uint32_t> words;
      A* __restrict factor = factor_buffer.data();
      A* __restrict xhat = xhat_buffer.data();
      A* __restrict g = g_buffer.data();  // dy · weight
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        A* __restrict gw_part = gw_parts + chunk * dim;
        A* __restrict gb_part = gb_parts + chunk * dim;
        for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
          mask.fill(r * dim, dim, scale, factor, words);
          const X* __restrict xr = x_data + r * dim;
          const R* __restrict rr = res_data + r * dim;
          const R* __restrict dy = g_data + r * dim;
          const A mu = mean_data[r], inv = rstd_data[r];
          for (int64_t d = 0; d < dim; ++d) {
            xhat[d] = (static_cast<A>(xr[d]) * factor[d] + static_cast<A>(rr[d]) - mu) * inv;
          }
          for (int64_t d = 0; d < dim; ++d) g[d] = static_cast<A>(dy[d]) * static_cast<A>(w[d]);
          for (int64_t d = 0; d < dim; ++d) {
            gw_part[d] += static_cast<A>(dy[d]) * xhat[d];
            gb_part[d] += static_cast<A>(dy[d]);
          }
          const A mean_g = lane_sum<A>(dim, [&](int64_t d) { return g[d]; }) / dim;
          const A mean_g_xhat = lane_sum<A>(dim, [&](int64_t d) { return g[d] * xhat[d]; }) / dim;
          X* __restrict gx = gx_data + r * dim;
          R* __restrict gres = gr_data + r * dim;
          for (int64_t d = 0; d < dim; ++d) {
            const A dh = inv * (g[d] - mean_g - xhat[d] * mean_g_xhat);
            gres[d] = static_cast<R>(dh);
            gx[d] = static_cast<X>(dh * factor[d]);
          }
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
