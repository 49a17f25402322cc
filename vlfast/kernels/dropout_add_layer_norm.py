"""Triton kernels of vlfast.ops.dropout_add_layer_norm: one program per row forward; backward
programs each take a run of rows and write one partial sum of the weight and bias gradients.
Math in fp32 (fp64 inputs run the reference on the GPU: Triton passes float arguments as fp32)."""
import triton
import triton.language as tl


@triton.jit
def keep_factor(seed, offsets, threshold, scale):
    """scale where the element at ``offsets`` is kept, else 0. Element 32·b + 8·w + j draws word w
    of Philox counter 8·b + j and is kept iff word >> 1 >= threshold, as
    csrc/cpu/dropout_add_layer_norm.cpp draws it (there eight counters fill one AVX2 register)."""
    # tl.philox on explicit 32-bit counter words: tl.randint4x's handling of int64 offsets has
    # changed between Triton versions, the Philox4x32 rounds have not.
    counter = ((offsets >> 5) << 3) + (offsets & 7)
    zero = tl.zeros_like(counter).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, counter.to(tl.uint32), (counter >> 32).to(tl.uint32), zero, zero)
    word_index = (offsets >> 3) & 3
    word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
    return tl.where((word >> 1).to(tl.int32) >= threshold, scale, 0.0)


@triton.jit
def dropout_add_layer_norm_forward(X, RES, W, B, SEED, OUT, MEAN, RSTD, D, threshold, scale, eps,
                                   HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    offsets = row * D + cols
    h = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        h = h * keep_factor(tl.load(SEED), offsets, threshold, scale).to(tl.float32)
    h += tl.load(RES + offsets, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(h, axis=0) / D
    centred = tl.where(inside, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (centred * rstd * w + b).to(OUT.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def dropout_add_layer_norm_backward(DY, X, RES, W, SEED, MEAN, RSTD, DX, DRES, DW_PARTS, DB_PARTS, rows, D,
                                    rows_per_program, threshold, scale,
                                    HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        offsets = row * D + cols
        x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            factor = keep_factor(tl.load(SEED), offsets, threshold, scale).to(tl.float32)
            x = x * factor
        h = x + tl.load(RES + offsets, mask=inside, other=0.0).to(tl.float32)
        xhat = tl.where(inside, (h - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        dy = tl.load(DY + offsets, mask=inside, other=0.0).to(tl.float32)
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
