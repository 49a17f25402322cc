"""Triton kernels of flash-attention-style attention with a key-padding mask (vlfast.ops.attention).

Forward: one program per (query block, batch·head) walks the key blocks with an online softmax
and keeps the row log-sum-exp. Backward: the tiles are recomputed from it, once per key block
(dk, dv) and once per query block (dq), so nothing of size Lq×Lk is stored and no atomics are
needed. A key the mask drops scores −inf; a query row with no key at all gets output 0 and
log-sum-exp +inf, which makes every probability, and so every gradient, of that row 0.

HAS_INDEX (vlfast.ops.indexed_attention): keys, values and mask are a cache of I entries, and
query batch b reads entry INDEX[b], as paged attention reads a block table: no gathered copy. The
keys' backward runs one program per (key block, entry·head), over the query batches that read the
entry (ORDER sorted by entry, OFFSETS where each entry's run starts), so dk and dv are summed by
entry without atomics. An entry outside [0, I) gives its query batch NaN rows (a check would make
the host wait).
"""
import triton
import triton.language as tl


@triton.jit
def _load_tile(X, offset, stride_row, rows, row_ok, dims, DH):
    return tl.load(X + offset + rows[:, None] * stride_row + dims[None, :],
                   mask=row_ok[:, None] & (dims[None, :] < DH), other=0.0)


@triton.jit
def _query_tile(Q, batch, head, stride_qb, stride_qh, stride_ql, start, LQ, dims, DH, BLOCK_M: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    return rows, row_ok, _load_tile(Q, batch * stride_qb + head * stride_qh, stride_ql, rows, row_ok, dims, DH)


@triton.jit
def _key_tiles(K, V, MASK, batch, head, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
               start, LK, dims, DH, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Key and value rows start .. start+BLOCK_N of one (K/V batch, head), and which keys may be attended."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    key_ok = col_ok
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + batch * LK + cols, mask=col_ok, other=0) != 0)
    k = _load_tile(K, batch * stride_kb + head * stride_kh, stride_kl, cols, col_ok, dims, DH)
    v = _load_tile(V, batch * stride_vb + head * stride_vh, stride_vl, cols, col_ok, dims, DH)
    return cols, col_ok, key_ok, k, v


@triton.jit
def _entry(INDEX, batch, ENTRIES, HAS_INDEX: tl.constexpr):
    """(the K/V batch that query batch ``batch`` reads, whether it is in range): itself, or INDEX[batch]."""
    if HAS_INDEX:
        entry = tl.load(INDEX + batch)
        ok = (entry >= 0) & (entry < ENTRIES)
        return tl.where(ok, entry, 0), ok
    else:
        return batch, batch >= 0


@triton.jit
def attention_forward(Q, K, V, MASK, INDEX, OUT, LSE,
                      stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                      stride_vb, stride_vh, stride_vl,
                      H, LQ, LK, DH, ENTRIES, scale,
                      HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    batch_head = tl.program_id(1)
    batch, head = batch_head // H, batch_head % H
    entry, entry_ok = _entry(INDEX, batch, ENTRIES, HAS_INDEX)
    dims = tl.arange(0, BLOCK_D)
    rows, row_ok, q = _query_tile(Q, batch, head, stride_qb, stride_qh, stride_ql, tl.program_id(0) * BLOCK_M, LQ,
                                  dims, DH, BLOCK_M)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    exp_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, LK, BLOCK_N):
        _, _, key_ok, k, v = _key_tiles(K, V, MASK, entry, head, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                                        stride_vl, start, LK, dims, DH, BLOCK_N, HAS_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no key yet: keep 0s, not NaNs
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(row_max - shift)
        exp_sum = exp_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    has_key = exp_sum != 0  # a row with a key sums to >= 1; a NaN score makes it NaN, and the row too
    out = tl.where(has_key[:, None], acc / tl.where(has_key, exp_sum, 1.0)[:, None], 0.0)
    lse = tl.where(has_key, row_max + tl.log(tl.where(has_key, exp_sum, 1.0)), float("inf"))
    out = tl.where(entry_ok, out, float("nan"))
    out_offset = batch_head * LQ * DH
    tl.store(OUT + out_offset + rows[:, None] * DH + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (dims[None, :] < DH))
    tl.store(LSE + batch_head * LQ + rows, lse, mask=row_ok)


@triton.jit
def _probabilities_and_score_grads(q, k, v, do, lse, delta, key_ok, scale, PRECISION: tl.constexpr):
    """p = softmax rows recomputed from the log-sum-exp, and d(loss)/d(scores) = p·(dp − delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    p = tl.where(key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def attention_backward_kv(Q, K, V, MASK, ORDER, OFFSETS, DO, LSE, DELTA, DK, DV,
                          stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                          stride_vb, stride_vh, stride_vl, stride_dkb, stride_dkh, stride_dkl,
                          stride_dvb, stride_dvh, stride_dvl,
                          H, LQ, LK, DH, scale,
                          HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of one key block of one (K/V batch or cache entry, head): summed over the query
    batches that read it (HAS_INDEX: ORDER[OFFSETS[entry]:OFFSETS[entry + 1]]; else its own)."""
    entry_head = tl.program_id(1)
    entry, head = (entry_head // H).to(tl.int64), entry_head % H  # int64: a large cache's offsets pass 2^31
    dims = tl.arange(0, BLOCK_D)
    cols, col_ok, key_ok, k, v = _key_tiles(K, V, MASK, entry, head, stride_kb, stride_kh, stride_kl, stride_vb,
                                            stride_vh, stride_vl, tl.program_id(0) * BLOCK_N, LK, dims, DH, BLOCK_N,
                                            HAS_MASK)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if HAS_INDEX:
        first = tl.load(OFFSETS + entry)
        last = tl.load(OFFSETS + entry + 1)
    else:
        first = entry
        last = entry + 1
    for slot in range(first, last):
        if HAS_INDEX:
            batch = tl.load(ORDER + slot)
        else:
            batch = slot
        batch_head = batch * H + head
        for start in range(0, LQ, BLOCK_M):
            rows, row_ok, q = _query_tile(Q, batch, head, stride_qb, stride_qh, stride_ql, start, LQ, dims, DH, BLOCK_M)
            do = _load_tile(DO, batch_head * LQ * DH, DH, rows, row_ok, dims, DH)
            lse = tl.load(LSE + batch_head * LQ + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + batch_head * LQ + rows, mask=row_ok, other=0.0)
            p, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, key_ok, scale, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    grad_mask = col_ok[:, None] & (dims[None, :] < DH)  # dk, dv in k's and v's layouts (unit last stride)
    tl.store(DK + entry * stride_dkb + head * stride_dkh + cols[:, None] * stride_dkl + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=grad_mask)
    tl.store(DV + entry * stride_dvb + head * stride_dvh + cols[:, None] * stride_dvl + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=grad_mask)


@triton.jit
def attention_backward_q(Q, K, V, MASK, INDEX, DO, LSE, DELTA, DQ,
                         stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                         stride_vb, stride_vh, stride_vl,
                         H, LQ, LK, DH, ENTRIES, scale,
                         HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    batch_head = tl.program_id(1)
    batch, head = batch_head // H, batch_head % H
    entry, entry_ok = _entry(INDEX, batch, ENTRIES, HAS_INDEX)
    dims = tl.arange(0, BLOCK_D)
    rows, row_ok, q = _query_tile(Q, batch, head, stride_qb, stride_qh, stride_ql, tl.program_id(0) * BLOCK_M, LQ,
                                  dims, DH, BLOCK_M)
    do = _load_tile(DO, batch_head * LQ * DH, DH, rows, row_ok, dims, DH)
    lse = tl.load(LSE + batch_head * LQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + batch_head * LQ + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, LK, BLOCK_N):
        _, _, key_ok, k, v = _key_tiles(K, V, MASK, entry, head, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                                        stride_vl, start, LK, dims, DH, BLOCK_N, HAS_MASK)
        _, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, key_ok, scale, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = tl.where(entry_ok, dq, 0.0)  # a batch that read no entry: its output is NaN, its gradient nothing
    tl.store(DQ + batch_head * LQ * DH + rows[:, None] * DH + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (dims[None, :] < DH))
