// CPU kernels of vlfast::random_masking (the gather of the kept patches) and vlfast::unmask: one
// parallel loop over output rows, each row written once with the position embedding added on the way.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../patch_gather_check.h"
#include "accumulate.h"

namespace vlfast {
namespace {

// out = row + pos, where a null row or pos counts as zeros.
template <typename O, typename S>
void write_row(O* out, const S* row, const O* pos, int64_t dim) {
  using A = acc_t<O, S>;
  if (row != nullptr && pos != nullptr) {
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<O>(static_cast<A>(row[d]) + static_cast<A>(pos[d]));
  } else if (row != nullptr) {
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<O>(static_cast<A>(row[d]));
  } else if (pos != nullptr) {
    std::copy(pos, pos + dim, out);
  } else {
    std::fill(out, out + dim, O(0));
  }
}

void check_index_values(const at::Tensor& index, int64_t limit, const char* name) {
  const int64_t* ids = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < limit, name, " holds ", ids[i], ", outside [0, ", limit, ")");
  }
}

int64_t grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

#define VLFAST_DISPATCH_ROWS(IN_DTYPE, OUT_DTYPE, ...)                                                     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, OUT_DTYPE, "vlfast_rows", [&] {              \
    using O = scalar_t;                                                                                    \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, IN_DTYPE, "vlfast_rows", [&] {             \
      using S = scalar_t;                                                                                  \
      __VA_ARGS__();                                                                                       \
    });                                                                                                    \
  })

at::Tensor random_masking_cpu(const at::Tensor& src, const std::optional<at::Tensor>& pos, const at::Tensor& index) {
  const RowsShape shape = check_random_masking(src, pos, index);
  check_index_values(index, shape.rows_in, "index");
  at::Tensor out = at::empty({shape.batch, shape.rows_out, shape.dim}, src.options().dtype(rows_out_dtype(src, std::nullopt, pos)));
  const int64_t* ids = index.const_data_ptr<int64_t>();
  VLFAST_DISPATCH_ROWS(src.scalar_type(), out.scalar_type(), [&] {
    const S* in = src.const_data_ptr<S>();
    const O* pos_data = pos.has_value() ? pos->const_data_ptr<O>() : nullptr;
    O* out_data = out.data_ptr<O>();
    at::parallel_for(0, shape.batch * shape.rows_out, grain(shape.dim), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / shape.rows_out, n = ids[r];
        const O* pos_row = pos_data ? pos_data + ((shape.pos_batch == 1 ? 0 : b) * shape.rows_in + n) * shape.dim : nullptr;
        write_row(out_data + r * shape.dim, in + (b * shape.rows_in + n) * shape.dim, pos_row, shape.dim);
      }
    });
  });
  return out;
}

at::Tensor unmask_cpu(const at::Tensor& rows, const at::Tensor& ids_restore, const std::optional<at::Tensor>& fill,
                           const std::optional<at::Tensor>& pos) {
  const RowsShape shape = check_unmask(rows, ids_restore, fill, pos);
  check_index_values(ids_restore, shape.rows_out, "ids_restore");
  at::Tensor out = at::empty({shape.batch, shape.rows_out, shape.dim}, rows.options().dtype(rows_out_dtype(rows, fill, pos)));
  const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
  VLFAST_DISPATCH_ROWS(rows.scalar_type(), out.scalar_type(), [&] {
    const S* in = rows.const_data_ptr<S>();
    const O* fill_data = fill.has_value() ? fill->const_data_ptr<O>() : nullptr;
    const O* pos_data = pos.has_value() ? pos->const_data_ptr<O>() : nullptr;
    O* out_data = out.data_ptr<O>();
    at::parallel_for(0, shape.batch * shape.rows_out, grain(shape.dim), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / shape.rows_out, n = r % shape.rows_out, j = ids[r];
        const O* pos_row = pos_data ? pos_data + ((shape.pos_batch == 1 ? 0 : b) * shape.rows_out + n) * shape.dim : nullptr;
        if (j < shape.rows_in) {
          write_row(out_data + r * shape.dim, in + (b * shape.rows_in + j) * shape.dim, pos_row, shape.dim);
        } else {
          write_row(out_data + r * shape.dim, fill_data, pos_row, shape.dim);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("unmask", &unmask_cpu);
}

}  // namespace vlfast
