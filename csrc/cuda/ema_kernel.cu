// Multi-tensor EMA kernel. One launch covers up to kMaxTensors tensors: their pointers and
// chunk offsets travel in the kernel's parameters (< 4 KiB), blocks walk the chunks grid-stride
// and find a chunk's tensor by binary search, so tensors of any mix of sizes fill the card.
#include <algorithm>
#include <type_traits>

#include "ema_kernel.h"
#include "float_math.cuh"

namespace vlfast {
namespace {

constexpr int kThreads = 512;
constexpr int kBlocksPerSm = 2048 / kThreads;
constexpr int64_t kChunk = 1 << 14;
constexpr int kMaxTensors = 96;  // the table stays under the 4 KiB of parameters every CUDA version takes

struct LaunchTable {
  void* target[kMaxTensors];
  const void* source[kMaxTensors];
  void* copy[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];  // tensor i owns chunks [first_chunk[i], first_chunk[i+1])
  int count;
};

// C: the copies' type, void when there are none.
template <typename T, typename S, typename C>
__global__ void __launch_bounds__(kThreads)
    ema_kernel(const LaunchTable table, double decay_value, const double* decay_on_device) {
  using A = acc_t<T, S>;
  const double decay = decay_on_device != nullptr ? *decay_on_device : decay_value;
  const A d = static_cast<A>(decay);
  const A w = static_cast<A>(1.0 - decay);
  constexpr int V = kVecElems<T, S>;

  const int64_t total_chunks = table.first_chunk[table.count];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    int lo = 0, hi = table.count - 1;  // last tensor whose first chunk <= chunk
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (table.first_chunk[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    const int64_t begin = (chunk - table.first_chunk[lo]) * kChunk;
    const int64_t n = min(kChunk, table.numel[lo] - begin);
    T* t = static_cast<T*>(table.target[lo]) + begin;
    const S* s = static_cast<const S*>(table.source[lo]) + begin;
    constexpr bool kCopies = !std::is_void_v<C>;
    using CopyT = std::conditional_t<kCopies, C, T>;  // a stand-in type when there are no copies
    CopyT* c = kCopies ? static_cast<CopyT*>(table.copy[lo]) + begin : nullptr;

    int64_t vector_end = 0;
    if (reinterpret_cast<uintptr_t>(t) % sizeof(Vec<T, V>) == 0 &&
        reinterpret_cast<uintptr_t>(s) % sizeof(Vec<S, V>) == 0 &&
        (!kCopies || reinterpret_cast<uintptr_t>(c) % sizeof(Vec<CopyT, V>) == 0)) {
      vector_end = n / V * V;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < vector_end; i += kThreads * V) {
        Vec<T, V> tv = *reinterpret_cast<const Vec<T, V>*>(t + i);
        const Vec<S, V> sv = *reinterpret_cast<const Vec<S, V>*>(s + i);
#pragma unroll
        for (int k = 0; k < V; ++k) store(tv.v[k], d * to_acc<A>(tv.v[k]) + w * to_acc<A>(sv.v[k]));
        *reinterpret_cast<Vec<T, V>*>(t + i) = tv;
        if constexpr (kCopies) {
          Vec<CopyT, V> cv;
#pragma unroll
          for (int k = 0; k < V; ++k) store(cv.v[k], to_acc<A>(tv.v[k]));  // one rounding, to nearest
          *reinterpret_cast<Vec<CopyT, V>*>(c + i) = cv;
        }
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < n; i += kThreads) {
      store(t[i], d * to_acc<A>(t[i]) + w * to_acc<A>(s[i]));
      if constexpr (kCopies) store(c[i], to_acc<A>(t[i]));
    }
  }
}

template <typename T, typename S, typename C>
cudaError_t launch(const EmaPair* pairs, int64_t count, double decay_value,
                   const double* decay_on_device, int sm_count, cudaStream_t stream) {
  for (int64_t first = 0; first < count; first += kMaxTensors) {
    LaunchTable table;
    table.count = static_cast<int>(std::min<int64_t>(kMaxTensors, count - first));
    table.first_chunk[0] = 0;
    for (int i = 0; i < table.count; ++i) {
      const EmaPair& pair = pairs[first + i];
      table.target[i] = pair.target;
      table.source[i] = pair.source;
      table.copy[i] = pair.copy;
      table.numel[i] = pair.numel;
      table.first_chunk[i + 1] = table.first_chunk[i] + (pair.numel + kChunk - 1) / kChunk;
    }
    const int64_t total_chunks = table.first_chunk[table.count];
    if (total_chunks == 0) continue;
    const int blocks = static_cast<int>(std::min<int64_t>(total_chunks, int64_t(sm_count) * kBlocksPerSm));
    ema_kernel<T, S, C><<<blocks, kThreads, 0, stream>>>(table, decay_value, decay_on_device);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t ema_cuda_launch(const EmaPair* pairs, int64_t count, FloatKind target_kind,
                            FloatKind source_kind, bool has_copies, FloatKind copy_kind, double decay_value,
                            const double* decay_on_device, int sm_count, cudaStream_t stream) {
  if (has_copies) {  // f32 targets (checked by the binding): 8 instantiations, not 32
    return dispatch_float(source_kind, [&](auto source) {
      using S = typename decltype(source)::type;
      return copy_kind == FloatKind::f16
                 ? launch<float, S, __half>(pairs, count, decay_value, decay_on_device, sm_count, stream)
                 : launch<float, S, __nv_bfloat16>(pairs, count, decay_value, decay_on_device, sm_count, stream);
    });
  }
  return dispatch_float_pair(target_kind, source_kind, [&](auto target, auto source) {
    return launch<typename decltype(target)::type, typename decltype(source)::type, void>(
        pairs, count, decay_value, decay_on_device, sm_count, stream);
  });
}

}  // namespace vlfast
