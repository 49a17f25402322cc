// Host-side interface of ema_kernel.cu. Plain C++ and the CUDA runtime only, so the .cu file
// compiles without torch headers (a few seconds instead of minutes).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "float_kind.h"

namespace vlfast {

struct EmaPair {
  void* target;
  const void* source;
  void* copy;  // null when the pairs have no copies
  int64_t numel;
};

// target[i] <- decay * target[i] + (1 - decay) * source[i] for every pair (all pairs share the
// two dtypes), and copy[i] <- target[i] rounded to copy_kind when has_copies (then the targets are
// f32 and copy_kind is bf16 or f16). decay is read from decay_on_device when it is not null, else
// decay_value is used. sm_count sizes the grid. Returns the launch status.
cudaError_t ema_cuda_launch(const EmaPair* pairs, int64_t count, FloatKind target_kind,
                            FloatKind source_kind, bool has_copies, FloatKind copy_kind, double decay_value,
                            const double* decay_on_device, int sm_count, cudaStream_t stream);

}  // namespace vlfast
