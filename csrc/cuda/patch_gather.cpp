// CUDA binding of vlfast::random_masking (the gather of the kept patches) and vlfast::unmask.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../patch_gather_check.h"
#include "binding.h"
#include "patch_gather_kernel.h"

namespace vlfast {
namespace {

at::Tensor launch(const at::Tensor& src, const at::Tensor& ids, const std::optional<at::Tensor>& fill,
                  const std::optional<at::Tensor>& pos, const RowsShape& shape, bool unmask) {
  const c10::cuda::CUDAGuard guard(src.device());
  at::Tensor out = at::empty({shape.batch, shape.rows_out, shape.dim}, src.options().dtype(rows_out_dtype(src, fill, pos)));
  const RowsArgs args{src.const_data_ptr(),
                      ids.const_data_ptr<int64_t>(),
                      fill.has_value() ? fill->const_data_ptr() : nullptr,
                      pos.has_value() ? pos->const_data_ptr() : nullptr,
                      out.data_ptr(),
                      shape.batch, shape.rows_in, shape.rows_out, shape.dim, shape.pos_batch};
  C10_CUDA_CHECK(patch_gather_cuda_launch(args, unmask, float_kind(src.scalar_type()), float_kind(out.scalar_type()),
                                  c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor random_masking_cuda(const at::Tensor& src, const std::optional<at::Tensor>& pos, const at::Tensor& index) {
  return launch(src, index, std::nullopt, pos, check_random_masking(src, pos, index), /*unmask=*/false);
}

at::Tensor unmask_cuda(const at::Tensor& rows, const at::Tensor& ids_restore, const std::optional<at::Tensor>& fill,
                            const std::optional<at::Tensor>& pos) {
  return launch(rows, ids_restore, fill, pos, check_unmask(rows, ids_restore, fill, pos), /*unmask=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CUDA, m) {
  m.impl("random_masking", &random_masking_cuda);
  m.impl("unmask", &unmask_cuda);
}

}  // namespace vlfast
