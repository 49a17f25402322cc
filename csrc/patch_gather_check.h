// Shape checks shared by the CPU and CUDA kernels of random_masking / unmask, run before any
// memory is touched. vlfast.ops.patch_gather validates with readable errors first; these keep
// direct calls of torch.ops.vlfast.* in bounds. Index values are checked by the kernels.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace vlfast {

struct RowsShape {
  int64_t batch, rows_in, rows_out, dim, pos_batch;  // pos_batch: 0 (none), 1 (broadcast) or batch
};

inline int64_t check_pos_embed(const std::optional<at::Tensor>& pos, const at::Tensor& like, int64_t n, int64_t dim) {
  if (!pos.has_value()) return 0;
  TORCH_CHECK_VALUE(pos->dim() == 3 && (pos->size(0) == 1 || pos->size(0) == like.size(0)) &&
                        pos->size(1) == n && pos->size(2) == dim && pos->is_contiguous(),
                    "pos_embed must be a contiguous (1 or B, ", n, ", ", dim, ") tensor, got ", pos->sizes());
  TORCH_CHECK_VALUE(pos->device() == like.device(), "pos_embed is on ", pos->device(), ", not ", like.device());
  return pos->size(0);
}

inline void check_index(const at::Tensor& index, const char* name, int64_t batch, const at::Tensor& like) {
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == batch && index.is_contiguous(), name,
                    " must be a contiguous (", batch, ", n) tensor, got ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == like.device(), name, " is on ", index.device(), ", not ", like.device());
}

inline RowsShape check_random_masking(const at::Tensor& src, const std::optional<at::Tensor>& pos, const at::Tensor& index) {
  TORCH_CHECK_VALUE(src.dim() == 3 && src.is_contiguous(), "src must be a contiguous (B, N, D) tensor, got ", src.sizes());
  check_index(index, "index", src.size(0), src);
  const int64_t pos_batch = check_pos_embed(pos, src, src.size(1), src.size(2));
  return {src.size(0), src.size(1), index.size(1), src.size(2), pos_batch};
}

inline RowsShape check_unmask(const at::Tensor& rows, const at::Tensor& ids_restore,
                                   const std::optional<at::Tensor>& fill, const std::optional<at::Tensor>& pos) {
  TORCH_CHECK_VALUE(rows.dim() == 3 && rows.is_contiguous(), "rows must be a contiguous (B, L, D) tensor, got ", rows.sizes());
  check_index(ids_restore, "ids_restore", rows.size(0), rows);
  TORCH_CHECK_VALUE(ids_restore.size(1) >= rows.size(1), "ids_restore has ", ids_restore.size(1),
                    " positions, fewer than the ", rows.size(1), " rows");
  if (fill.has_value()) {
    TORCH_CHECK_VALUE(fill->dim() == 1 && fill->size(0) == rows.size(2) && fill->is_contiguous(),
                      "fill must be a contiguous (", rows.size(2), ",) tensor, got ", fill->sizes());
    TORCH_CHECK_VALUE(fill->device() == rows.device(), "fill is on ", fill->device(), ", not ", rows.device());
    TORCH_CHECK_TYPE(!pos.has_value() || pos->scalar_type() == fill->scalar_type(),
                     "fill and pos_embed must share a dtype, got ", fill->scalar_type(), " and ", pos->scalar_type());
  }
  const int64_t pos_batch = check_pos_embed(pos, rows, ids_restore.size(1), rows.size(2));
  return {rows.size(0), rows.size(1), ids_restore.size(1), rows.size(2), pos_batch};
}

// The output dtype: that of the added operands (the caller promotes them), else the rows'.
inline at::ScalarType rows_out_dtype(const at::Tensor& rows, const std::optional<at::Tensor>& fill,
                                     const std::optional<at::Tensor>& pos) {
  return fill.has_value() ? fill->scalar_type() : pos.has_value() ? pos->scalar_type() : rows.scalar_type();
}

}  // namespace vlfast
