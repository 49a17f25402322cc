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
  int64_t numel;
};

// target[i] <- decay * target[i] + (1 - decay) * source[i] for every pair (all pairs share the
// two dtypes). decay is read from decay_on_device when it is not null, else decay_value is used.
// sm_count sizes the grid. Returns the launch status.
cudaError_t ema_cuda_launch(const EmaPair* pairs, int64_t count, FloatKind target_kind,
                            FloatKind source_kind, double decay_value, const double* decay_on_device,
                            int sm_count, cudaStream_t stream);

}  // namespace vlfast
