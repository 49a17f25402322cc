// One warp per output row: 16-byte vector loads and stores where the row pointers allow, the
// position embedding added in registers, each output element written once.
#include <cstdint>

#include "float_math.cuh"
#include "patch_gather_kernel.h"

namespace vlfast {
namespace {

constexpr int kWarpsPerBlock = 8;

// out_row = in_row + pos_row; a null in_row or pos_row counts as zeros.
template <typename T, typename O>
__device__ void write_row(O* out_row, const T* in_row, const O* pos_row, int64_t dim, int lane) {
  using A = acc_t<T, O>;
  constexpr int V = kVecElems<T, O>;
  const auto aligned = [](const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  int64_t vector_end = 0;
  if (aligned(out_row, sizeof(Vec<O, V>)) && aligned(in_row, sizeof(Vec<T, V>)) && aligned(pos_row, sizeof(Vec<O, V>))) {
    vector_end = dim / V * V;
    for (int64_t i = int64_t(lane) * V; i < vector_end; i += 32 * V) {
      Vec<O, V> result;
      Vec<T, V> in;
      Vec<O, V> pos;
      if (in_row != nullptr) in = *reinterpret_cast<const Vec<T, V>*>(in_row + i);
      if (pos_row != nullptr) pos = *reinterpret_cast<const Vec<O, V>*>(pos_row + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A value = (in_row != nullptr ? to_acc<A>(in.v[k]) : A(0)) + (pos_row != nullptr ? to_acc<A>(pos.v[k]) : A(0));
        store(result.v[k], value);
      }
      *reinterpret_cast<Vec<O, V>*>(out_row + i) = result;
    }
  }
  for (int64_t i = vector_end + lane; i < dim; i += 32) {
    const A value = (in_row != nullptr ? to_acc<A>(in_row[i]) : A(0)) + (pos_row != nullptr ? to_acc<A>(pos_row[i]) : A(0));
    store(out_row[i], value);
  }
}

template <typename S, typename O, bool kUnmask>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) rows_kernel(const RowsArgs a) {
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= a.batch * a.rows_out) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = r / a.rows_out, n = r % a.rows_out, j = a.ids[r];
  O* out_row = static_cast<O*>(a.out) + r * a.dim;
  const int64_t id_limit = kUnmask ? a.rows_out : a.rows_in;
  if (j < 0 || j >= id_limit) {
    for (int64_t i = lane; i < a.dim; i += 32) store(out_row[i], nanf(""));
    return;
  }
  const int64_t pos_index = kUnmask ? n : j, pos_rows = kUnmask ? a.rows_out : a.rows_in;
  const O* pos_row = a.pos == nullptr ? nullptr
                                      : static_cast<const O*>(a.pos) + ((a.pos_batch == 1 ? 0 : b) * pos_rows + pos_index) * a.dim;
  if (j < a.rows_in) {
    write_row(out_row, static_cast<const S*>(a.src) + (b * a.rows_in + j) * a.dim, pos_row, a.dim, lane);
  } else {
    write_row(out_row, static_cast<const O*>(a.fill), pos_row, a.dim, lane);
  }
}

}  // namespace

cudaError_t patch_gather_cuda_launch(const RowsArgs& args, bool unmask, FloatKind src_kind, FloatKind out_kind,
                             cudaStream_t stream) {
  const int64_t total_rows = args.batch * args.rows_out;
  if (total_rows == 0 || args.dim == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((total_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  dispatch_float_pair(src_kind, out_kind, [&](auto src, auto out) {
    using S = typename decltype(src)::type;
    using O = typename decltype(out)::type;
    if (unmask) {
      rows_kernel<S, O, true><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(args);
    } else {
      rows_kernel<S, O, false><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(args);
    }
    return 0;
  });
  return cudaGetLastError();
}

}  // namespace vlfast
