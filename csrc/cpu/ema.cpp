// CPU kernel of vlfast::ema_update_: every tensor is cut into chunks and the chunks of all
// tensors share one at::parallel_for, so a model's many small tensors cost one parallel region.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../ema_check.h"
#include "accumulate.h"

namespace vlfast {
namespace {

constexpr int64_t kChunk = 1 << 15;  // 128 KiB of fp32: a chunk's target and source fit in L2

// C is the copies' type, void when there are none.
template <typename T, typename S, typename C>
void ema_range(T* target, const S* source, C* copy, int64_t n, double decay) {
  // (1 - decay) is formed in double, as torch does for ALBEF's `param * (1. - m)` with a Python float m.
  using A = acc_t<T, S>;
  const A d = static_cast<A>(decay);
  const A w = static_cast<A>(1.0 - decay);
  for (int64_t i = 0; i < n; ++i) {
    const T value = static_cast<T>(d * static_cast<A>(target[i]) + w * static_cast<A>(source[i]));
    target[i] = value;
    if constexpr (!std::is_void_v<C>) copy[i] = static_cast<C>(value);  // round to nearest, as .to() does
  }
}

struct Chunk {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

void ema_update_cpu(at::TensorList target, at::TensorList source, const at::Tensor& decay, at::TensorList copies) {
  check_ema_args(target, source, decay, copies);
  const double d = decay.item<double>();
  std::vector<at::Tensor> sources;
  std::vector<Chunk> chunks;
  sources.reserve(source.size());
  for (size_t i = 0; i < target.size(); ++i) {
    sources.push_back(source[i].contiguous());
    for (int64_t begin = 0; begin < target[i].numel(); begin += kChunk) {
      chunks.push_back({i, begin, std::min(begin + kChunk, target[i].numel())});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& chunk = chunks[c];
      const at::Tensor& t = target[chunk.tensor];
      const at::Tensor& s = sources[chunk.tensor];
      const int64_t n = chunk.end - chunk.begin;
      if (!copies.empty()) {  // float32 targets (checked) with bfloat16 or float16 copies
        const at::Tensor& c = copies[chunk.tensor];
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ema_update_", [&] {
          using S = scalar_t;
          AT_DISPATCH_REDUCED_FLOATING_TYPES(c.scalar_type(), "ema_update_", [&] {
            ema_range(t.data_ptr<float>() + chunk.begin, s.const_data_ptr<S>() + chunk.begin,
                      c.data_ptr<scalar_t>() + chunk.begin, n, d);
          });
        });
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ema_update_", [&] {
        using T = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ema_update_", [&] {
          ema_range(t.data_ptr<T>() + chunk.begin, s.const_data_ptr<scalar_t>() + chunk.begin,
                    static_cast<void*>(nullptr), n, d);
        });
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace vlfast
