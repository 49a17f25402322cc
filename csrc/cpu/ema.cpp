// CPU kernel of vlfast::ema_update_: every tensor is cut into chunks and the chunks of all
// tensors share one at::parallel_for, so a model's many small tensors cost one parallel region.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ema_check.h"
#include "accumulate.h"

namespace vlfast {
namespace {

constexpr int64_t kChunk = 1 << 15;  // 128 KiB of fp32: a chunk's target and source fit in L2

template <typename T, typename S>
void ema_range(T* target, const S* source, int64_t n, double decay) {
  // (1 - decay) is formed in double, as torch does for ALBEF's `param * (1. - m)` with a Python float m.
  using A = acc_t<T, S>;
  const A d = static_cast<A>(decay);
  const A w = static_cast<A>(1.0 - decay);
  for (int64_t i = 0; i < n; ++i) {
    target[i] = static_cast<T>(d * static_cast<A>(target[i]) + w * static_cast<A>(source[i]));
  }
}

struct Chunk {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

void ema_update_cpu(at::TensorList target, at::TensorList source, const at::Tensor& decay) {
  check_ema_args(target, source, decay);
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
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ema_update_", [&] {
        using T = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ema_update_", [&] {
          ema_range(t.data_ptr<T>() + chunk.begin, s.const_data_ptr<scalar_t>() + chunk.begin,
                    chunk.end - chunk.begin, d);
        });
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace vlfast
