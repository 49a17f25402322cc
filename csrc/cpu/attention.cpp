// CPU kernels of vlfast::attention and attention_backward: softmax(q·kᵀ·scale, key-padding
// mask)·v at VLP's lengths (tens to a few hundred tokens). Each (batch, head) holds its whole
// Lq×Lk block of scores, so the softmax is exact in one pass, with no online rescaling, and the
// forward keeps the probabilities (its aux) for the backward, as eager attention does, where
// SDPA's flash kernel recomputes them from q and k.
// The products are register tiles written as plain loops, which the AVX2 clone vectorises (torch
// does not export its CPU BLAS wrapper to extensions).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "vectorize.h"

namespace vlfast {
namespace {

constexpr int64_t kTileRows = 4;
constexpr int64_t kKeyAlign = 8;  // the probabilities' rows are padded to this many keys

int64_t padded_keys(int64_t keys) { return (keys + kKeyAlign - 1) / kKeyAlign * kKeyAlign; }

// A matrix operand: element (i, p) at data[i·row + p·col].
template <typename T>
struct Strided {
  const T* data;
  int64_t row, col;

  Strided rows_from(int64_t i) const { return {data + i * row, row, col}; }
};

// c[i, j] = alpha · Σ_p a(i, p) · b[p·ldb + j] for i < Rows, j < Cols. Fixed trip counts keep
// acc in registers.
template <int64_t Rows, int64_t Cols, typename T>
inline void tile(int64_t depth, Strided<T> a, const T* __restrict b, int64_t ldb, T alpha, T* __restrict c,
                 int64_t ldc) {
  T acc[Rows][Cols] = {};
  for (int64_t p = 0; p < depth; ++p) {
    const T* __restrict b_row = b + p * ldb;
#pragma GCC unroll 8
    for (int64_t r = 0; r < Rows; ++r) {
      const T a_rp = a.data[r * a.row + p * a.col];
#pragma omp simd
      for (int64_t j = 0; j < Cols; ++j) acc[r][j] += a_rp * b_row[j];
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < Rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < Cols; ++j) c[r * ldc + j] = alpha * acc[r][j];
  }
}

// Rows rows of c, all n columns (a multiple of 8).
template <int64_t Rows, typename T>
inline void row_block(int64_t n, int64_t depth, Strided<T> a, const T* b, int64_t ldb, T alpha, T* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) tile<Rows, 16>(depth, a, b + j, ldb, alpha, c + j, ldc);
  if (j < n) tile<Rows, 8>(depth, a, b + j, ldb, alpha, c + j, ldc);
}

// c (m × n, row stride ldc) = alpha · a (m × depth) · b (depth × n, row stride ldb); n a multiple of 8.
template <typename T>
VLFAST_CLONES void matmul(int64_t m, int64_t n, int64_t depth, Strided<T> a, const T* b, int64_t ldb, T alpha, T* c,
                          int64_t ldc) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    row_block<kTileRows>(n, depth, a.rows_from(i), b, ldb, alpha, c + i * ldc, ldc);
  static_assert(kTileRows == 4, "the remainder's cases below");
  switch (m - i) {
    case 1: return row_block<1>(n, depth, a.rows_from(i), b, ldb, alpha, c + i * ldc, ldc);
    case 2: return row_block<2>(n, depth, a.rows_from(i), b, ldb, alpha, c + i * ldc, ldc);
    case 3: return row_block<3>(n, depth, a.rows_from(i), b, ldb, alpha, c + i * ldc, ldc);
  }
}

// exp(x) for x ≤ 0 (a score minus its row's max), Cephes' expf polynomial after the reduction
// x = n·ln2 + r: plain arithmetic the AVX2 clone vectorises, unlike std::exp. Relative error
// about 2e-7; 0 below -87 (a masked key's -inf included), where exp is under 2e-38. n comes from
// the clamped x, so that its conversion to int is defined for any x; r from x, so a NaN stays NaN.
inline float exp_nonpositive(float x) {
  const float clamped = x > -87.0f ? x : -87.0f;
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  // Not std::bit_cast, which is C++20: torch 2.11 (the lent GPU machines') builds extensions as C++17.
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return x < -87.0f ? 0.0f : poly * two_to_n;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// One row of scores (keys of them, in place) -> probabilities, for a row with a key to attend
// to. bias: 0 for a key to attend to, -inf for a masked one (nullptr: none masked). The padding
// gets 0. A NaN score makes the row NaN, as in torch's softmax.
template <typename T>
VLFAST_CLONES void softmax_row(int64_t keys, int64_t padded, const T* __restrict bias, T* __restrict row) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) row[j] += bias[j];
  }
  T max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < keys; ++j) max = row[j] > max ? row[j] : max;
  const T inv = T(1) / row_sum<T>(keys, [&](int64_t j) { return row[j] = exp_nonpositive(row[j] - max); });
#pragma omp simd
  for (int64_t j = 0; j < keys; ++j) row[j] *= inv;
  std::fill(row + keys, row + padded, T(0));
}

// One row of the softmax's backward, in place: dp -> ds = p·(dp - Σ p·dp)·scale.
template <typename T>
VLFAST_CLONES void softmax_backward_row(int64_t keys, const T* __restrict p, T scale, T* __restrict dp) {
  const T dot = row_sum<T>(keys, [&](int64_t j) { return p[j] * dp[j]; });
#pragma omp simd
  for (int64_t j = 0; j < keys; ++j) dp[j] = p[j] * (dp[j] - dot) * scale;
}

// (keys × dim) rows at stride `stride` -> (dim × padded) transposed, the padding columns 0.
template <typename T>
void transpose_rows(int64_t keys, int64_t dim, const T* src, int64_t stride, int64_t padded, T* dst) {
  for (int64_t d = 0; d < dim; ++d) {
    T* out = dst + d * padded;
    for (int64_t j = 0; j < keys; ++j) out[j] = src[j * stride + d];
    std::fill(out + keys, out + padded, T(0));
  }
}

// A (B, H, L, Dh) tensor's (batch, head) block: its rows at stride `row`.
template <typename T>
struct Heads {
  T* data;
  int64_t batch, head, row;

  Heads(const at::Tensor& t, T* base) : data(base), batch(t.stride(0)), head(t.stride(1)), row(t.stride(2)) {}
  T* at(int64_t b, int64_t h) const { return data + b * batch + h * head; }
};

// q (B, H, Lq, Dh), k and v (B, H, Lk, Dh): one dtype, lengths >= 1, Dh a multiple of 8.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) > 0 && q.size(3) > 0 && q.size(3) % 8 == 0,
                    "q must be (B, H, Lq >= 1, Dh a multiple of 8), got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(2) > 0 &&
                        k.size(3) == q.size(3),
                    "k must be (B=", q.size(0), ", H=", q.size(1), ", Lk >= 1, Dh=", q.size(3), "), got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q must be a float tensor, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ", v.scalar_type());
}

// The kernels' operand: fp32 math for fp16/bf16 (converted once), unit stride along Dh.
at::Tensor operand(const at::Tensor& t) {
  at::Tensor x = t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
  return x.stride(3) == 1 ? x : x.contiguous();
}

// (B, H, L, Dh) output laid out as (B, L, H, Dh), the layout the heads go back to.
at::Tensor new_heads(const at::Tensor& like, int64_t length) {
  return at::empty({like.size(0), length, like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// (output in q's dtype, aux: the probabilities (B, H, Lq, Lk padded to 8) in the math dtype).
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                               const std::optional<at::Tensor>& key_padding_mask, double scale) {
  check_qkv(q_in, k_in, v_in);
  const int64_t batch = q_in.size(0), heads = q_in.size(1), queries = q_in.size(2), keys = k_in.size(2),
                dim = q_in.size(3), padded = padded_keys(keys);
  const bool* mask = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.is_contiguous() && m.sizes() == at::IntArrayRef({batch, keys}),
                      "key_padding_mask must be a contiguous bool (B=", batch, ", Lk=", keys, ") tensor, got ",
                      m.scalar_type(), " ", m.sizes());
    mask = m.const_data_ptr<bool>();
  }
  const at::Tensor q = operand(q_in), k = operand(k_in), v = operand(v_in);
  at::Tensor out = new_heads(q, queries);
  at::Tensor probs = at::empty({batch, heads, queries, padded}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention", [&] {
    using T = scalar_t;
    const Heads<const T> qh(q, q.const_data_ptr<T>()), kh(k, k.const_data_ptr<T>()), vh(v, v.const_data_ptr<T>());
    const Heads<T> oh(out, out.data_ptr<T>()), ph(probs, probs.data_ptr<T>());
    // Per batch, shared by its heads: the scores' bias (0 for a key to attend to, -inf for a
    // masked one) and whether any key is left.
    std::vector<T> bias;
    std::vector<char> has_key(batch, 1);
    if (mask != nullptr) {
      bias.resize(batch * keys);
      for (int64_t b = 0; b < batch; ++b) {
        const bool* attend = mask + b * keys;
        has_key[b] = std::any_of(attend, attend + keys, [](bool a) { return a; });
        for (int64_t j = 0; j < keys; ++j) bias[b * keys + j] = attend[j] ? T(0) : -std::numeric_limits<T>::infinity();
      }
    }
    at::parallel_for(0, batch * heads, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> k_t(dim * padded);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        T* p = ph.at(b, h);
        if (!has_key[b]) {
          std::fill(p, p + queries * padded, T(0));  // no key to attend to: output 0, gradients 0
        } else {
          transpose_rows(keys, dim, kh.at(b, h), kh.row, padded, k_t.data());
          matmul<T>(queries, padded, dim, {qh.at(b, h), qh.row, 1}, k_t.data(), padded, static_cast<T>(scale), p,
                    padded);
          const T* key_bias = mask == nullptr ? nullptr : bias.data() + b * keys;
          for (int64_t i = 0; i < queries; ++i) softmax_row(keys, padded, key_bias, p + i * padded);
        }
        matmul<T>(queries, dim, keys, {p, padded, 1}, vh.at(b, h), vh.row, T(1), oh.at(b, h), oh.row);
      }
    });
  });
  return {out.to(q_in.scalar_type()), probs};
}

// (grad q, grad k, grad v) in q's dtype, from the forward's probabilities (its aux); the mask and
// the output, which the GPU's kernel takes, are in them already.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                                            const std::optional<at::Tensor>& /*key_padding_mask*/,
                                                            const at::Tensor& /*out*/, const at::Tensor& probs,
                                                            double scale) {
  check_qkv(q_in, k_in, v_in);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == q_in.sizes() && grad_out_in.scalar_type() == q_in.scalar_type(),
                    "grad_out must have q's shape and dtype");
  const int64_t batch = q_in.size(0), heads = q_in.size(1), queries = q_in.size(2), keys = k_in.size(2),
                dim = q_in.size(3), padded = padded_keys(keys);
  const at::Tensor q = operand(q_in), k = operand(k_in), v = operand(v_in), grad_out = operand(grad_out_in);
  TORCH_CHECK_VALUE(probs.sizes() == at::IntArrayRef({batch, heads, queries, padded}) && probs.is_contiguous() &&
                        probs.scalar_type() == q.scalar_type(),
                    "aux must be the CPU forward's contiguous (B, H, Lq, Lk padded to 8) probabilities");
  at::Tensor grad_q = new_heads(q, queries), grad_k = new_heads(q, keys), grad_v = new_heads(q, keys);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward", [&] {
    using T = scalar_t;
    const Heads<const T> qh(q, q.const_data_ptr<T>()), kh(k, k.const_data_ptr<T>()), vh(v, v.const_data_ptr<T>()),
        doh(grad_out, grad_out.const_data_ptr<T>()), ph(probs, probs.const_data_ptr<T>());
    const Heads<T> dqh(grad_q, grad_q.data_ptr<T>()), dkh(grad_k, grad_k.data_ptr<T>()),
        dvh(grad_v, grad_v.data_ptr<T>());
    at::parallel_for(0, batch * heads, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> v_t(dim * padded), ds(queries * padded);
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        const T *p = ph.at(b, h), *dout = doh.at(b, h);
        // dv = pᵀ·do; dp = do·vᵀ into ds, then ds = p·(dp - Σ p·dp)·scale; dq = ds·k; dk = dsᵀ·q.
        matmul<T>(keys, dim, queries, {p, 1, padded}, dout, doh.row, T(1), dvh.at(b, h), dvh.row);
        transpose_rows(keys, dim, vh.at(b, h), vh.row, padded, v_t.data());
        matmul<T>(queries, padded, dim, {dout, doh.row, 1}, v_t.data(), padded, T(1), ds.data(), padded);
        for (int64_t i = 0; i < queries; ++i)
          softmax_backward_row(keys, p + i * padded, static_cast<T>(scale), ds.data() + i * padded);
        matmul<T>(queries, dim, keys, {ds.data(), padded, 1}, kh.at(b, h), kh.row, T(1), dqh.at(b, h), dqh.row);
        matmul<T>(keys, dim, queries, {ds.data(), 1, padded}, qh.at(b, h), qh.row, T(1), dkh.at(b, h), dkh.row);
      }
    });
  });
  const auto dtype = q_in.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CPU, m) {
  m.impl("attention", &forward_cpu);
  m.impl("attention_backward", &backward_cpu);
}

}  // namespace vlfast
