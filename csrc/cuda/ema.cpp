// CUDA binding of vlfast::ema_update_: groups the tensors by (target, source) dtype and hands
// raw pointers to the launcher in ema_kernel.cu, on the current stream.
// c10/cuda headers only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <tuple>
#include <vector>

#include "../ema_check.h"
#include "binding.h"
#include "ema_kernel.h"

namespace vlfast {
namespace {

void ema_update_cuda(at::TensorList target, at::TensorList source, const at::Tensor& decay, at::TensorList copies) {
  check_ema_args(target, source, decay, copies);
  if (target.empty()) return;
  const c10::cuda::CUDAGuard guard(target[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // A decay on the GPU is read by the kernel itself: no host sync.
  double decay_value = 0.0;
  at::Tensor decay_on_device;
  if (decay.is_cuda()) {
    decay_on_device = decay.to(target[0].device(), at::kDouble).contiguous();
  } else {
    decay_value = decay.item<double>();
  }

  std::vector<at::Tensor> sources;  // keeps contiguous copies of strided sources alive
  // (target, source, copy) kinds; the copy kind is f32 when there are no copies
  std::map<std::tuple<FloatKind, FloatKind, FloatKind>, std::vector<EmaPair>> groups;
  sources.reserve(source.size());
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i].numel() == 0) continue;
    sources.push_back(source[i].contiguous());
    const at::Tensor& s = sources.back();
    const bool copied = !copies.empty();
    groups[{float_kind(target[i].scalar_type()), float_kind(s.scalar_type()),
            copied ? float_kind(copies[i].scalar_type()) : FloatKind::f32}]
        .push_back({target[i].data_ptr(), s.const_data_ptr(), copied ? copies[i].data_ptr() : nullptr,
                    target[i].numel()});
  }
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, target[0].device().index()));
  for (const auto& [kinds, pairs] : groups) {
    const auto [target_kind, source_kind, copy_kind] = kinds;
    C10_CUDA_CHECK(ema_cuda_launch(pairs.data(), static_cast<int64_t>(pairs.size()), target_kind, source_kind,
                                   !copies.empty(), copy_kind, decay_value,
                                   decay_on_device.defined() ? decay_on_device.const_data_ptr<double>() : nullptr,
                                   sm_count, stream));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace vlfast
