// Host-side interface of patch_gather_kernel.cu (no torch headers): the row gather of the visible patches
// and its inverse, the unmask, each one pass with the position embedding added.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "float_kind.h"

namespace vlfast {

struct RowsArgs {
  const void* src;      // (batch, rows_in, dim), src kind
  const int64_t* ids;   // (batch, rows_out)
  const void* fill;     // unmask: (dim,) out kind, or null for zeros
  const void* pos;      // (pos_batch, gather ? rows_in : rows_out, dim) out kind, or null
  void* out;            // (batch, rows_out, dim), out kind
  int64_t batch, rows_in, rows_out, dim, pos_batch;
};

// gather: out[b, l] = src[b, ids[b, l]] + pos[b or 0, ids[b, l]].
// unmask: out[b, n] = (src[b, j] if j < rows_in else fill) + pos[b or 0, n], j = ids[b, n].
// An id outside its range (gather: [0, rows_in), unmask: [0, rows_out)) makes its row NaN: the
// kernels never read out of bounds and never sync the host to check.
cudaError_t patch_gather_cuda_launch(const RowsArgs& args, bool unmask, FloatKind src_kind, FloatKind out_kind,
                             cudaStream_t stream);

}  // namespace vlfast
