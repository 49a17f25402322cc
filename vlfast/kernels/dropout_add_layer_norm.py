"""Triton kernels of vlfast.ops.dropout_add_layer_norm: one program per row forward; backward
programs each take a run of rows and write one partial sum of the weight and bias gradients."""
import triton
import triton.language as tl


@triton.jit
def keep_factor(seed, offsets, threshold, scale):
    """scale where the element at ``offsets`` is kept, else 0. Element 32·b + 8·w + j draws word w
    of Philox counter 8·b + j and is kept iff word >> 1 >= threshold, as
    csrc/cpu/dropout_add_layer_norm.cpp draws it (there eight counters fill one AVX2 register)."""
    w0, w1, w2, w3 = tl.randint4x(seed, ((offsets >> 5) << 3) + (offsets & 7))
    word_index = (offsets >> 3) & 3
    word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
    return tl.where((word >> 1).to(tl.int32) >= threshold, scale, 0.0)


@triton.jit
def dropout_add_layer_norm_forward(X, RES, W, B, SEED, OUT, MEAN, RSTD, D, threshold, scale, eps,
                                   HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    offsets = row * D + cols
    h = tl.load(X + offsets, mask=inside, other=0.0).to(ACC)
    if HAS_DROPOUT:
        h = h * keep_factor(tl.load(SEED), offsets, threshold, scale).to(ACC)
    h += tl.load(RES + offsets, mask=inside, other=0.0).to(ACC)
    mean = tl.sum(h, axis=0) / D
    centred = tl.where(inside, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    w = tl.load(W + cols, mask=inside, other=0.0).to(ACC)
    b = tl.load(B + cols, mask=inside, other=0.0).to(ACC)
    tl.store(OUT + offsets, (centred * rstd * w + b).to(OUT.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def dropout_add_layer_norm_backward(DY, X, RES, W, SEED, MEAN, RSTD, DX, DRES, DW_PARTS, DB_PARTS, rows, D,
                                    rows_per_program, threshold, scale,
                                    HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    w = tl.load(W + cols, mask=inside, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    db = tl.zeros([BLOCK_D], dtype=ACC)
    first = program.to(tl.int64) * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        offsets = row * D + cols
        x = tl.load(X + offsets, mask=inside, other=0.0).to(ACC)
        if HAS_DROPOUT:
            factor = keep_factor(tl.load(SEED), offsets, threshold, scale).to(ACC)
            x = x * factor
        h = x + tl.load(RES + offsets, mask=inside, other=0.0).to(ACC)
        xhat = tl.where(inside, (h - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        dy = tl.load(DY + offsets, mask=inside, other=0.0).to(ACC)
        g = dy * w
        mean_g = tl.sum(g, axis=0) / D
        mean_g_xhat = tl.sum(g * xhat, axis=0) / D
        dh = tl.load(RSTD + row) * (g - mean_g - xhat * mean_g_xhat)
        tl.store(DRES + offsets, dh.to(DRES.dtype.element_ty), mask=inside)
        if HAS_DROPOUT:
            dh = dh * factor
        tl.store(DX + offsets, dh.to(DX.dtype.element_ty), mask=inside)
        dw += dy * xhat
        db += dy
    tl.store(DW_PARTS + program * D + cols, dw, mask=inside)
    tl.store(DB_PARTS + program * D + cols, db, mask=inside)
