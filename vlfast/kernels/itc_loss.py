"""Triton kernels of itc_loss, the contrastive loss with hard-negative sampling (vlfast.ops.contrastive):
the CUDA (and interpreted CPU) kernels of torch.ops.vlfast.itc_loss_rows and itc_loss_rows_backward.

One direction at a time: B query rows against N keys, s = q·k / τ. The forward walks the key
tiles once per block of rows, keeping for each row the running max and sum of exp (the
log-sum-exp), the positives' score sum and count, and the running argmax of the Gumbel-perturbed
scores over the negatives, so the B×N matrix is never stored. The backward recomputes the tiles
from the saved log-sum-exp, once over keys (dq, dτ) and once over queries (dk).

Wide features (D > BLOCK_D, SPLIT_D): the launcher caps BLOCK_D so a program's tiles fit a
GPU's shared memory (fp32 at D = 768 needed 393 KB, the H100 has 227 KB), and the scores are
summed over D chunks. The backward then runs one program per (row block, D chunk) of its output,
each recomputing the tile's scores over all of D: more arithmetic, the same memory.

Sampling a negative with probability ∝ softmax(s)_j + ε, zero at positives: a mixture of
softmax restricted to the negatives (weight 1 − positives' softmax mass) and the uniform over the
negatives (weight ε·#negatives). The first is the Gumbel-max argmax of s_j + G_j over negatives,
the second the argmax of iid uniforms over negatives, and one more uniform picks between them.
"""
import triton
import triton.language as tl


@triton.jit
def _load_chunk(X, safe, ok, dim0, D, BLOCK_D: tl.constexpr):
    """Columns dim0 .. dim0+BLOCK_D of the rows ``safe`` of a contiguous (count, D) matrix, zeros outside."""
    dims = dim0 + tl.arange(0, BLOCK_D)
    return tl.load(X + safe[:, None] * D + dims[None, :], mask=ok[:, None] & (dims[None, :] < D), other=0.0)


@triton.jit
def _store_rows(X, value, safe, ok, dim0, D, BLOCK_D: tl.constexpr):
    dims = dim0 + tl.arange(0, BLOCK_D)
    tl.store(X + safe[:, None] * D + dims[None, :], value, mask=ok[:, None] & (dims[None, :] < D))


@triton.jit
def _split_dot(A, a_safe, a_ok, B, b_safe, b_ok, D, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """A[a]·B[b]ᵀ over all of D, BLOCK_D columns at a time (SPLIT_D)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), ACC)
    for dim0 in range(0, D, BLOCK_D):
        a = _load_chunk(A, a_safe, a_ok, dim0, D, BLOCK_D)
        b = _load_chunk(B, b_safe, b_ok, dim0, D, BLOCK_D)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _block(start, count, BLOCK: tl.constexpr):
    """Indices start .. start+BLOCK, the in-range mask, and the indices clamped into range."""
    index = start + tl.arange(0, BLOCK)
    ok = index < count
    return index, ok, tl.where(ok, index, 0)


@triton.jit
def _positives(rows, cols, col_ok, QIDS, KIDS, key_offset, HAS_IDS: tl.constexpr):
    """(rows, cols) mask of positive pairs: same image id, or the key at the row's own index."""
    if HAS_IDS:
        query_ids = tl.load(QIDS + rows)
        key_ids = tl.load(KIDS + cols, mask=col_ok, other=-1)
        return (query_ids[:, None] == key_ids[None, :]) & col_ok[None, :]
    else:
        return (cols[None, :] == rows[:, None] + key_offset) & col_ok[None, :]


@triton.jit
def _score_grads(s, positive, col_ok, LSE, NPOS, GRAD, safe_rows, row_ok, ACC: tl.constexpr):
    """d(loss)/ds for each row's loss lse − mean positive score, times the row's incoming gradient."""
    lse = tl.load(LSE + safe_rows)
    inv_count = 1.0 / tl.load(NPOS + safe_rows).to(ACC)
    grad = tl.load(GRAD + safe_rows, mask=row_ok, other=0.0).to(ACC)
    p = tl.where(col_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
    return grad[:, None] * (p - tl.where(positive, inv_count[:, None], 0.0))


@triton.jit
def itc_loss_rows_forward(Q, K, TAU, QIDS, KIDS, SEED, ROW_LOSS, NEG, LSE, NPOS,
                     B, N, D, key_offset, smoothing,
                     HAS_IDS: tl.constexpr, SAMPLE: tl.constexpr, SMOOTH: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                     PRECISION: tl.constexpr, ACC: tl.constexpr):
    rows, row_ok, safe_rows = _block(tl.program_id(0) * BLOCK_M, B, BLOCK_M)
    if not SPLIT_D:
        q = _load_chunk(Q, safe_rows, row_ok, 0, D, BLOCK_D)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    seed = tl.load(SEED).to(tl.int64) * 3  # three Philox streams: Gumbel, uniform keys, mixture pick

    row_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    exp_sum = tl.zeros((BLOCK_M,), ACC)  # sum of exp(s - row_max)
    positive_exp = tl.zeros((BLOCK_M,), ACC)  # the same over positives only
    positive_score = tl.zeros((BLOCK_M,), ACC)
    positive_count = tl.zeros((BLOCK_M,), tl.int32)
    gumbel_best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    gumbel_index = tl.zeros((BLOCK_M,), tl.int32)
    uniform_best = tl.full((BLOCK_M,), -1.0, tl.float32)
    uniform_index = tl.zeros((BLOCK_M,), tl.int32)
    for start in range(0, N, BLOCK_N):
        cols, col_ok, safe_cols = _block(start, N, BLOCK_N)
        if SPLIT_D:
            s = _split_dot(Q, safe_rows, row_ok, K, safe_cols, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        else:
            k = _load_chunk(K, safe_cols, col_ok, 0, D, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        s = tl.where(col_ok[None, :], s * inv_tau, float("-inf"))
        positive = _positives(safe_rows, cols, col_ok, QIDS, KIDS, key_offset, HAS_IDS)

        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        rescale = tl.exp(row_max - new_max)
        p = tl.exp(s - new_max[:, None])
        exp_sum = exp_sum * rescale + tl.sum(p, axis=1)
        positive_exp = positive_exp * rescale + tl.sum(tl.where(positive, p, 0.0), axis=1)
        row_max = new_max
        positive_score += tl.sum(tl.where(positive, s, 0.0), axis=1)
        positive_count += tl.sum(positive.to(tl.int32), axis=1)

        if SAMPLE:
            negative = col_ok[None, :] & ~positive
            offsets = safe_rows[:, None] * N + cols[None, :]
            u = tl.maximum(tl.rand(seed, offsets), 1e-30)
            perturbed = tl.where(negative, s.to(tl.float32) - tl.log(-tl.log(u)), float("-inf"))
            tile_best = tl.max(perturbed, axis=1)
            better = tile_best > gumbel_best
            gumbel_index = tl.where(better, start + tl.argmax(perturbed, axis=1), gumbel_index)
            gumbel_best = tl.where(better, tile_best, gumbel_best)
            if SMOOTH:
                keys = tl.where(negative, tl.rand(seed + 1, offsets), -1.0)
                tile_best = tl.max(keys, axis=1)
                better = tile_best > uniform_best
                uniform_index = tl.where(better, start + tl.argmax(keys, axis=1), uniform_index)
                uniform_best = tl.where(better, tile_best, uniform_best)

    lse = row_max + tl.log(exp_sum)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(NPOS + rows, positive_count, mask=row_ok)
    tl.store(ROW_LOSS + rows, lse - positive_score / positive_count.to(ACC), mask=row_ok)
    if SAMPLE:
        negative_index = gumbel_index
        if SMOOTH:
            softmax_weight = 1.0 - positive_exp / exp_sum
            uniform_weight = smoothing * (N - positive_count).to(ACC)
            pick = tl.rand(seed + 2, safe_rows).to(ACC) * (softmax_weight + uniform_weight)
            negative_index = tl.where(pick >= softmax_weight, uniform_index, gumbel_index)
        negative_index = tl.where(positive_count < N, negative_index, -1)
        tl.store(NEG + rows, negative_index.to(tl.int64), mask=row_ok)


@triton.jit
def itc_loss_rows_backward_query(Q, K, TAU, QIDS, KIDS, LSE, NPOS, GRAD, DQ, DTAU_ROWS,
                            B, N, D, key_offset,
                            HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, PRECISION: tl.constexpr,
                            ACC: tl.constexpr):
    """dq (columns of program_id(1)'s D chunk) and, from the first chunk's programs, dτ per row."""
    rows, row_ok, safe_rows = _block(tl.program_id(0) * BLOCK_M, B, BLOCK_M)
    dim0 = tl.program_id(1) * BLOCK_D
    if not SPLIT_D:
        q = _load_chunk(Q, safe_rows, row_ok, 0, D, BLOCK_D)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    dtau = tl.zeros((BLOCK_M,), ACC)
    for start in range(0, N, BLOCK_N):
        cols, col_ok, safe_cols = _block(start, N, BLOCK_N)
        k = _load_chunk(K, safe_cols, col_ok, dim0, D, BLOCK_D)
        if SPLIT_D:
            s = _split_dot(Q, safe_rows, row_ok, K, safe_cols, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        s = s * inv_tau
        positive = _positives(safe_rows, cols, col_ok, QIDS, KIDS, key_offset, HAS_IDS)
        ds = _score_grads(s, positive, col_ok, LSE, NPOS, GRAD, safe_rows, row_ok, ACC)
        dtau += tl.sum(ds * s, axis=1)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    _store_rows(DQ, dq * inv_tau, safe_rows, row_ok, dim0, D, BLOCK_D)
    tl.store(DTAU_ROWS + rows, -dtau * inv_tau, mask=row_ok & (dim0 == 0))


@triton.jit
def itc_loss_rows_backward_key(Q, K, TAU, QIDS, KIDS, LSE, NPOS, GRAD, DK,
                          B, N, D, key_offset,
                          HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, PRECISION: tl.constexpr,
                          ACC: tl.constexpr):
    """dk, the columns of program_id(1)'s D chunk."""
    cols, col_ok, safe_cols = _block(tl.program_id(0) * BLOCK_N, N, BLOCK_N)
    dim0 = tl.program_id(1) * BLOCK_D
    if not SPLIT_D:
        k = _load_chunk(K, safe_cols, col_ok, 0, D, BLOCK_D)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(0, B, BLOCK_M):
        rows, row_ok, safe_rows = _block(start, B, BLOCK_M)
        q = _load_chunk(Q, safe_rows, row_ok, dim0, D, BLOCK_D)
        if SPLIT_D:
            s = _split_dot(Q, safe_rows, row_ok, K, safe_cols, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_M, BLOCK_N)
        s = s * inv_tau
        positive = _positives(safe_rows, cols, col_ok, QIDS, KIDS, key_offset, HAS_IDS)
        ds = _score_grads(s, positive, col_ok, LSE, NPOS, GRAD, safe_rows, row_ok, ACC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
    _store_rows(DK, dk * inv_tau, safe_cols, col_ok, dim0, D, BLOCK_D)
