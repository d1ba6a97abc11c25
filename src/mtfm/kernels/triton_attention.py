"""Masked HSTU attention with GQA in Triton: forward and backward (paper section 3.3.2, issue 15).

Same contract and result as :func:`mtfm.kernels.reference.reference_attention`; see
:mod:`mtfm.kernels.common` for the formula. What the kernels do differently from the PyTorch
backends, and why:

* **Jagged, no padding, no mask in memory.** Work is cut into *tiles*: a tile is up to
  ``BLOCK_M // r`` consecutive query rows of one user (``r = H / G`` query heads per key/value
  group). Each program loops over its user's context keys (H and R tokens, ``layout.context()``)
  in blocks of ``BLOCK_N`` and evaluates the dynamic mask of every (query, key) cell in
  registers from per-token scalars: a context key is visible iff ``lo_k < t_q <= hi_k`` (H: the
  whole line, R: ``(t_k, expiry_k]``, see :mod:`mtfm.model.mask`) or it is the query itself.
  Timestamps and expiries are compared as int64, exactly.
* **Skipped work.** No token sees another T-token, so T columns are never visited: a T query's
  only T key is its own, added as one dot product per row (the ``_self`` terms), as the jagged
  backend does. Padding does not exist (each tile stops at its user's last query and key).
* **GQA without repeating K/V.** The ``r`` query heads of one group are packed into the rows of
  a tile (row ``m`` = query ``m // r``, head ``m % r``), so each key/value block is loaded once
  for all of them and feeds one ``[BLOCK_M, BLOCK_N]`` matmul.
* **Relative bias.** Time buckets ``min(floor(log2(1 + |dt|)), T - 1)`` are computed exactly by
  integer halving (bit length), not by a float log. Position gaps are counted over the keys the
  query sees (:func:`mtfm.kernels.common.visible_rank_gap`): a first, cheap kernel counts for each
  query the visible keys before its own column (``cnt``) and before every key block
  (``bnd``, one int per query and key block); the main kernels then get
  ``before_q(col_k) = bnd + exclusive cumsum of the mask within the block``, so every kernel
  (including the backward one that walks keys in the outer loop) sees the same gaps.
* **Backward** recomputes scores (nothing ``[N, C]`` is stored): one kernel per query tile for
  ``dQ`` and the bias-table gradient (looping over key blocks), one per key block for ``dK`` and
  ``dV`` (looping over the user's query tiles), so no gradient needs atomics except the T-self
  terms and the bias table. The bias gradient is reduced per tile over the (few) buckets
  present in it, then added with one atomic per bucket and head.

HSTU has no softmax, so there are no row statistics: ``A = SiLU(S) * M * norm @ V`` with
``S = alpha * Q K^T + bias``; ``dS = (dA V^T) * SiLU'(S) * M * norm``. Accumulation is fp32;
inputs may be fp32 or bf16 (fp32 matmuls use IEEE precision unless PyTorch allows TF32).

This module imports Triton at load time; import it lazily (the dispatch point in
:mod:`mtfm.kernels` does), so that CPU-only installs never need Triton. On CPU it runs under
``TRITON_INTERPRET=1`` (tests, small shapes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtfm.data.batch import NEVER, TOKEN_H, TOKEN_R, TOKEN_T
from mtfm.kernels.common import AttentionLayout, AttentionParams, QuerySet, check_shapes, empty_output

_INT64_MIN = -(1 << 63)


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, read when this module loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device helpers are Triton functions when compiled. The interpreter re-patches the language on
# every device-function call (milliseconds each, most of a small test's time), so there they are
# plain Python functions, which run the same code under the already patched language.
_device = (lambda fn: fn) if interpreting() else triton.jit


if interpreting():

    def _mm(a, b, PRECISION):
        """The interpreter multiplies bf16 blocks wrongly (raw bits): upcast, as tensor cores do exactly."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32))

else:

    @triton.jit
    def _mm(a, b, PRECISION: tl.constexpr):
        """``a @ b`` with fp32 accumulation (``PRECISION`` applies to fp32 operands)."""
        return tl.dot(a, b, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@_device
def _log_bucket(gap, NUM: tl.constexpr):
    """``min(floor(log2(1 + |gap|)), NUM - 1)`` as int32, exact: bit length by halving steps.

    ``1 + |gap|`` is capped at ``2^(NUM - 1)`` first (its bucket is the last one), so only the
    halving steps that can fire are emitted, and the steps run in int32 when the cap fits.
    """
    x = tl.abs(gap.to(tl.int64)) + 1
    if NUM - 1 < 63:
        x = tl.minimum(x, 1 << (NUM - 1))
    if NUM - 1 < 31:
        x = x.to(tl.int32)
    n = tl.zeros_like(x)
    if NUM - 1 >= 32:
        t = x >> 32
        n = tl.where(t > 0, n + 32, n)
        x = tl.where(t > 0, t, x)
    if NUM - 1 >= 16:
        t = x >> 16
        n = tl.where(t > 0, n + 16, n)
        x = tl.where(t > 0, t, x)
    if NUM - 1 >= 8:
        t = x >> 8
        n = tl.where(t > 0, n + 8, n)
        x = tl.where(t > 0, t, x)
    if NUM - 1 >= 4:
        t = x >> 4
        n = tl.where(t > 0, n + 4, n)
        x = tl.where(t > 0, t, x)
    if NUM - 1 >= 2:
        t = x >> 2
        n = tl.where(t > 0, n + 2, n)
        x = tl.where(t > 0, t, x)
    if NUM - 1 >= 1:
        n = tl.where((x >> 1) > 0, n + 1, n)
    return n.to(tl.int32)


@_device
def _visible(q_time, q_tok, k_lo, k_hi, k_tok, row_ok, key_ok):
    """``[rows, keys]`` dynamic mask: ``lo_k < t_q <= hi_k`` or the query itself (and both real)."""
    vis = (k_lo[None, :] < q_time[:, None]) & (q_time[:, None] <= k_hi[None, :])
    vis = vis | (q_tok[:, None] == k_tok[None, :])
    return vis & row_ok[:, None] & key_ok[None, :]


@_device
def _bias_column(vis, q_time, k_time, q_cnt, q_bnd,
                 TIME_BUCKETS: tl.constexpr, POS_BUCKETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bias-table column of every cell: ``time_bucket * max(P, 1) + position_bucket``.

    The position gap is ``before_q(col_q) - before_q(col_k)`` (visible keys left of each
    column), with ``before_q(col_k) = q_bnd + exclusive cumsum of vis`` along the block.
    """
    col = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if TIME_BUCKETS > 0:
        step = POS_BUCKETS if POS_BUCKETS > 0 else 1
        col += _log_bucket(q_time[:, None] - k_time[None, :], TIME_BUCKETS) * step
    if POS_BUCKETS > 0:
        seen = vis.to(tl.int32)
        before = q_bnd[:, None] + tl.cumsum(seen, 1) - seen
        col += _log_bucket(q_cnt[:, None] - before, POS_BUCKETS)
    return col


@_device
def _dsilu(s):
    """``d SiLU(s) / ds = sig (1 + s (1 - sig))``, and ``SiLU(s)``."""
    sig = tl.sigmoid(s)
    return sig * (1.0 + s * (1.0 - sig)), s * sig


@_device
def _rows(q0, q_end, R: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed GQA rows of a tile: query row, head within the group, and validity of each row."""
    m = tl.arange(0, BLOCK_M)
    qi = m // R
    row = q0 + qi
    ok = (qi < BLOCK_M // R) & (row < q_end)
    return tl.where(ok, row, 0), m % R, ok


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _count_kernel(
    tile_user_ptr, tile_q0_ptr, q_off_ptr, c_off_ptr,
    q_tok_ptr, q_time_ptr, q_col_ptr,
    k_tok_ptr, k_lo_ptr, k_hi_ptr,
    bnd_base_ptr, cnt_ptr, bnd_ptr,
    PER: tl.constexpr, QUERIES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per query: visible context keys before its own column (``cnt``) and before every key block (``bnd``)."""
    tile = tl.program_id(0)
    b = tl.load(tile_user_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(q_off_ptr + b)
    q_end = tl.load(q_off_ptr + b + 1)
    c_start = tl.load(c_off_ptr + b)
    c_end = tl.load(c_off_ptr + b + 1)
    nkb = tl.cdiv(c_end - c_start, BLOCK_N)
    base = tl.load(bnd_base_ptr + b)

    i = tl.arange(0, QUERIES)
    row = q0 + i
    row_ok = (i < PER) & (row < q_end)
    row = tl.where(row_ok, row, 0)
    q_tok = tl.load(q_tok_ptr + row)
    q_time = tl.load(q_time_ptr + row)
    q_col = tl.load(q_col_ptr + row)
    bnd_row = base + (row - q_start) * nkb

    run = tl.zeros([QUERIES], dtype=tl.int32)
    cnt = tl.zeros([QUERIES], dtype=tl.int32)
    for k0 in range(c_start, c_end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        key_ok = j < c_end
        j = tl.where(key_ok, j, 0)
        vis = _visible(q_time, q_tok, tl.load(k_lo_ptr + j), tl.load(k_hi_ptr + j), tl.load(k_tok_ptr + j), row_ok, key_ok)
        tl.store(bnd_ptr + bnd_row + (k0 - c_start) // BLOCK_N, run, mask=row_ok)
        seen = vis.to(tl.int32)
        run += tl.sum(seen, 1)
        cnt += tl.sum(tl.where((j - c_start)[None, :] < q_col[:, None], seen, 0), 1)
    tl.store(cnt_ptr + row, cnt, mask=row_ok)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr,
    tile_user_ptr, tile_q0_ptr, q_off_ptr, c_off_ptr,
    q_tok_ptr, q_time_ptr, q_self_ptr,
    k_tok_ptr, k_lo_ptr, k_hi_ptr, k_time_ptr,
    bnd_base_ptr, cnt_ptr, bnd_ptr,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_on, stride_oh,
    alpha, norm,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, TIME_BUCKETS: tl.constexpr, POS_BUCKETS: tl.constexpr, WIDTH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.load(tile_user_ptr + tile)
    q_start = tl.load(q_off_ptr + b)
    q_end = tl.load(q_off_ptr + b + 1)
    c_start = tl.load(c_off_ptr + b)
    c_end = tl.load(c_off_ptr + b + 1)
    nkb = tl.cdiv(c_end - c_start, BLOCK_N)

    row, hj, row_ok = _rows(tl.load(tile_q0_ptr + tile), q_end, R, BLOCK_M)
    head = g * R + hj
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + row[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    q_tok = tl.load(q_tok_ptr + row)
    q_time = tl.load(q_time_ptr + row)
    q_cnt = tl.load(cnt_ptr + row) if POS_BUCKETS > 0 else tl.zeros([BLOCK_M], dtype=tl.int32)
    bnd_row = tl.load(bnd_base_ptr + b) + (row - q_start) * nkb

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for k0 in range(c_start, c_end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        key_ok = j < c_end
        j = tl.where(key_ok, j, 0)
        k_tok = tl.load(k_tok_ptr + j)
        kk = tl.load(k_ptr + k_tok[:, None].to(tl.int64) * stride_kn + g * stride_kg + d[None, :],
                     mask=key_ok[:, None] & (d[None, :] < D), other=0.0)
        vv = tl.load(v_ptr + k_tok[:, None].to(tl.int64) * stride_vn + g * stride_vg + dv[None, :],
                     mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = _mm(q, tl.trans(kk), PRECISION) * alpha
        vis = _visible(q_time, q_tok, tl.load(k_lo_ptr + j), tl.load(k_hi_ptr + j), k_tok, row_ok, key_ok)
        if HAS_BIAS:
            q_bnd = tl.load(bnd_ptr + bnd_row + (k0 - c_start) // BLOCK_N, mask=row_ok, other=0) if POS_BUCKETS > 0 \
                else q_cnt
            col = _bias_column(vis, q_time, tl.load(k_time_ptr + j), q_cnt, q_bnd,
                               TIME_BUCKETS, POS_BUCKETS, BLOCK_M, BLOCK_N)
            s += tl.load(bias_ptr + head[:, None] * WIDTH + col, mask=vis, other=0.0)
        p = tl.where(vis, s * tl.sigmoid(s) * norm, 0.0)
        acc += _mm(p.to(vv.dtype), vv, PRECISION)

    # A T query's own key: the one T column the mask leaves open (time and position gap 0 -> column 0).
    is_self = row_ok & (tl.load(q_self_ptr + row) != 0)
    k_own = tl.load(k_ptr + q_tok[:, None].to(tl.int64) * stride_kn + g * stride_kg + d[None, :],
                    mask=is_self[:, None] & (d[None, :] < D), other=0.0)
    v_own = tl.load(v_ptr + q_tok[:, None].to(tl.int64) * stride_vn + g * stride_vg + dv[None, :],
                    mask=is_self[:, None] & (dv[None, :] < DV), other=0.0)
    s_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), 1) * alpha
    if HAS_BIAS:
        s_own += tl.load(bias_ptr + head * WIDTH, mask=is_self, other=0.0)
    p_own = tl.where(is_self, s_own * tl.sigmoid(s_own) * norm, 0.0)
    acc += p_own[:, None] * v_own.to(tl.float32)

    tl.store(out_ptr + row[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh + dv[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, bias_ptr, dbias_ptr,
    tile_user_ptr, tile_q0_ptr, q_off_ptr, c_off_ptr,
    q_tok_ptr, q_time_ptr, q_self_ptr,
    k_tok_ptr, k_lo_ptr, k_hi_ptr, k_time_ptr,
    bnd_base_ptr, cnt_ptr, bnd_ptr,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_on, stride_oh,
    stride_dkn, stride_dkg, stride_dvn, stride_dvg,
    alpha, norm,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, TIME_BUCKETS: tl.constexpr, POS_BUCKETS: tl.constexpr,
    WIDTH: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dQ`` of one query tile, the bias-table gradient of its cells, and the T-self terms' ``dK``, ``dV``."""
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.load(tile_user_ptr + tile)
    q_start = tl.load(q_off_ptr + b)
    q_end = tl.load(q_off_ptr + b + 1)
    c_start = tl.load(c_off_ptr + b)
    c_end = tl.load(c_off_ptr + b + 1)
    nkb = tl.cdiv(c_end - c_start, BLOCK_N)

    row, hj, row_ok = _rows(tl.load(tile_q0_ptr + tile), q_end, R, BLOCK_M)
    head = g * R + hj
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + row[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + row[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh + dv[None, :],
                 mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    q_tok = tl.load(q_tok_ptr + row)
    q_time = tl.load(q_time_ptr + row)
    q_cnt = tl.load(cnt_ptr + row) if POS_BUCKETS > 0 else tl.zeros([BLOCK_M], dtype=tl.int32)
    bnd_row = tl.load(bnd_base_ptr + b) + (row - q_start) * nkb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(c_start, c_end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        key_ok = j < c_end
        j = tl.where(key_ok, j, 0)
        k_tok = tl.load(k_tok_ptr + j)
        kk = tl.load(k_ptr + k_tok[:, None].to(tl.int64) * stride_kn + g * stride_kg + d[None, :],
                     mask=key_ok[:, None] & (d[None, :] < D), other=0.0)
        vv = tl.load(v_ptr + k_tok[:, None].to(tl.int64) * stride_vn + g * stride_vg + dv[None, :],
                     mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = _mm(q, tl.trans(kk), PRECISION) * alpha
        vis = _visible(q_time, q_tok, tl.load(k_lo_ptr + j), tl.load(k_hi_ptr + j), k_tok, row_ok, key_ok)
        if HAS_BIAS:
            q_bnd = tl.load(bnd_ptr + bnd_row + (k0 - c_start) // BLOCK_N, mask=row_ok, other=0) if POS_BUCKETS > 0 \
                else q_cnt
            col = _bias_column(vis, q_time, tl.load(k_time_ptr + j), q_cnt, q_bnd,
                               TIME_BUCKETS, POS_BUCKETS, BLOCK_M, BLOCK_N)
            s += tl.load(bias_ptr + head[:, None] * WIDTH + col, mask=vis, other=0.0)
        dp = _mm(do, tl.trans(vv), PRECISION)
        grad, _ = _dsilu(s)
        ds = tl.where(vis, dp * grad * norm, 0.0)
        dq += _mm(ds.to(kk.dtype), kk, PRECISION)
        if BIAS_GRAD:
            # Reduce the tile's cells bucket by bucket, visiting only the buckets present (a tile
            # of nearby queries and keys holds few), then one atomic per bucket and head.
            w = tl.min(tl.where(vis, col, WIDTH))
            while w < WIDTH:
                per_row = tl.sum(tl.where(vis & (col == w), ds, 0.0), 1)
                if R == 1:
                    tl.atomic_add(dbias_ptr + g * WIDTH + w, tl.sum(per_row, 0))
                else:
                    for h in tl.static_range(R):
                        tl.atomic_add(dbias_ptr + (g * R + h) * WIDTH + w, tl.sum(tl.where(hj == h, per_row, 0.0), 0))
                w = tl.min(tl.where(vis & (col > w), col, WIDTH))

    # T-self terms: dS of the own key, its dQ part here, its dK / dV (read by this row alone) by atomics over the heads.
    is_self = row_ok & (tl.load(q_self_ptr + row) != 0)
    k_own = tl.load(k_ptr + q_tok[:, None].to(tl.int64) * stride_kn + g * stride_kg + d[None, :],
                    mask=is_self[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    v_own = tl.load(v_ptr + q_tok[:, None].to(tl.int64) * stride_vn + g * stride_vg + dv[None, :],
                    mask=is_self[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    dof = do.to(tl.float32)
    s_own = tl.sum(qf * k_own, 1) * alpha
    if HAS_BIAS:
        s_own += tl.load(bias_ptr + head * WIDTH, mask=is_self, other=0.0)
    grad_own, silu_own = _dsilu(s_own)
    ds_own = tl.where(is_self, tl.sum(dof * v_own, 1) * grad_own * norm, 0.0)
    p_own = tl.where(is_self, silu_own * norm, 0.0)
    dq = (dq + ds_own[:, None] * k_own) * alpha
    tl.store(dq_ptr + row[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))
    own = q_tok[:, None].to(tl.int64)
    tl.atomic_add(dk_ptr + own * stride_dkn + g * stride_dkg + d[None, :], ds_own[:, None] * qf * alpha,
                  mask=is_self[:, None] & (d[None, :] < D))
    tl.atomic_add(dv_ptr + own * stride_dvn + g * stride_dvg + dv[None, :], p_own[:, None] * dof,
                  mask=is_self[:, None] & (dv[None, :] < DV))
    if BIAS_GRAD:
        for h in tl.static_range(R):
            tl.atomic_add(dbias_ptr + (g * R + h) * WIDTH, tl.sum(tl.where(hj == h, ds_own, 0.0), 0))


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, bias_ptr,
    ktile_user_ptr, ktile_k0_ptr, q_off_ptr, c_off_ptr,
    q_tok_ptr, q_time_ptr,
    k_tok_ptr, k_lo_ptr, k_hi_ptr, k_time_ptr,
    bnd_base_ptr, cnt_ptr, bnd_ptr,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_on, stride_oh,
    stride_dkn, stride_dkg, stride_dvn, stride_dvg,
    alpha, norm,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, TIME_BUCKETS: tl.constexpr, POS_BUCKETS: tl.constexpr, WIDTH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dK``, ``dV`` of one block of context keys, over every query tile of its user."""
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.load(ktile_user_ptr + tile)
    k0 = tl.load(ktile_k0_ptr + tile)
    q_start = tl.load(q_off_ptr + b)
    q_end = tl.load(q_off_ptr + b + 1)
    c_start = tl.load(c_off_ptr + b)
    c_end = tl.load(c_off_ptr + b + 1)
    nkb = tl.cdiv(c_end - c_start, BLOCK_N)
    kb = (k0 - c_start) // BLOCK_N
    base = tl.load(bnd_base_ptr + b)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    j = k0 + tl.arange(0, BLOCK_N)
    key_ok = j < c_end
    j = tl.where(key_ok, j, 0)
    k_tok = tl.load(k_tok_ptr + j)
    k_lo = tl.load(k_lo_ptr + j)
    k_hi = tl.load(k_hi_ptr + j)
    k_time = tl.load(k_time_ptr + j) if TIME_BUCKETS > 0 else k_lo
    kk = tl.load(k_ptr + k_tok[:, None].to(tl.int64) * stride_kn + g * stride_kg + d[None, :],
                 mask=key_ok[:, None] & (d[None, :] < D), other=0.0)
    vv = tl.load(v_ptr + k_tok[:, None].to(tl.int64) * stride_vn + g * stride_vg + dv[None, :],
                 mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_M // R):
        row, hj, row_ok = _rows(q0, q_end, R, BLOCK_M)
        head = g * R + hj
        q = tl.load(q_ptr + row[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        do = tl.load(do_ptr + row[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh + dv[None, :],
                     mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        q_tok = tl.load(q_tok_ptr + row)
        q_time = tl.load(q_time_ptr + row)
        s = _mm(q, tl.trans(kk), PRECISION) * alpha
        vis = _visible(q_time, q_tok, k_lo, k_hi, k_tok, row_ok, key_ok)
        if HAS_BIAS:
            if POS_BUCKETS > 0:
                q_cnt = tl.load(cnt_ptr + row)
                q_bnd = tl.load(bnd_ptr + base + (row - q_start) * nkb + kb, mask=row_ok, other=0)
            else:
                q_cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
                q_bnd = q_cnt
            col = _bias_column(vis, q_time, k_time, q_cnt, q_bnd, TIME_BUCKETS, POS_BUCKETS, BLOCK_M, BLOCK_N)
            s += tl.load(bias_ptr + head[:, None] * WIDTH + col, mask=vis, other=0.0)
        grad, silu = _dsilu(s)
        p = tl.where(vis, silu * norm, 0.0)
        dvacc += _mm(tl.trans(p.to(do.dtype)), do, PRECISION)
        dp = _mm(do, tl.trans(vv), PRECISION)
        ds = tl.where(vis, dp * grad * norm, 0.0)
        dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION)

    tl.store(dk_ptr + k_tok[:, None].to(tl.int64) * stride_dkn + g * stride_dkg + d[None, :], dk * alpha,
             mask=key_ok[:, None] & (d[None, :] < D))
    tl.store(dv_ptr + k_tok[:, None].to(tl.int64) * stride_dvn + g * stride_dvg + dv[None, :], dvacc,
             mask=key_ok[:, None] & (dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------
# Host side: the per-batch plan, block sizes, the autograd function
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: ``rows`` packed (query, head) rows per tile, ``keys`` keys per block."""

    rows: int
    keys: int
    warps: int
    stages: int


def choose_blocks(head_dim: int, value_dim: int, heads_per_group: int) -> Blocks:
    """Tile sizes by head width: wide heads (the paper's 256) need smaller key blocks to fit registers."""
    rows_min = triton.next_power_of_2(max(heads_per_group, 1))
    if interpreting():
        return Blocks(max(16, rows_min), 16, 1, 1)
    width = max(triton.next_power_of_2(head_dim), triton.next_power_of_2(value_dim))
    if width <= 64:
        return Blocks(max(64, rows_min), 64, 4, 3)
    if width <= 128:
        return Blocks(max(64, rows_min), 64, 8, 2)
    return Blocks(max(64, rows_min), 32, 8, 2)


@dataclass
class _Plan:
    """Per-batch metadata the kernels read (int32 indices, int64 clocks), built once per query set."""

    q_off: Tensor  # int32 [B + 1]
    c_off: Tensor  # int32 [B + 1]
    q_tok: Tensor  # int32 [Nq]: flat token of each query
    q_time: Tensor  # int64 [Nq]
    q_col: Tensor  # int32 [Nq]: column among the user's context keys (T: just past them)
    q_self: Tensor  # int8 [Nq]: 1 for T queries (their own key is not a context key)
    k_tok: Tensor  # int32 [Nc]: flat token of each context key, by user
    k_lo: Tensor  # int64 [Nc]: visible to queries with lo < t <= hi
    k_hi: Tensor  # int64 [Nc]
    k_time: Tensor  # int64 [Nc]
    tile_user: Tensor  # int32 [tiles]: query tiles, longest users first
    tile_q0: Tensor  # int32 [tiles]
    ktile_user: Tensor  # int32 [key tiles]
    ktile_k0: Tensor  # int32 [key tiles]
    bnd_base: Tensor  # int32 [B]: start of each user's [Lq, ceil(C / BLOCK_N)] block-boundary counts
    bnd_size: int


def _tiles(offsets: Tensor, size: int, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(user, start)`` of every ``size``-row tile of every user's rows, heaviest users first."""
    lengths = offsets[1:] - offsets[:-1]
    counts = (lengths + size - 1) // size
    users = torch.arange(lengths.shape[0], device=offsets.device)
    user = torch.repeat_interleave(users, counts)
    first = torch.cumsum(counts, 0) - counts
    start = offsets[user] + (torch.arange(user.shape[0], device=offsets.device) - first[user]) * size
    order = torch.argsort(weight[user], descending=True, stable=True)
    return user[order].to(torch.int32).contiguous(), start[order].to(torch.int32).contiguous()


def _build_plan(queries: QuerySet, layout: AttentionLayout, blocks: Blocks, r: int) -> _Plan:
    if layout.num_tokens >= 2**31 - 1:
        raise ValueError(f"triton attention: {layout.num_tokens} tokens exceed int32 indices")
    context = layout.context()
    q_len = queries.offsets[1:] - queries.offsets[:-1]
    c_len = context.offsets[1:] - context.offsets[:-1]
    q_tok = queries.index
    k_tok = context.index
    k_type = layout.token_type[k_tok]
    k_time = layout.timestamps[k_tok].long()
    k_exp = layout.expiry[k_tok].long()
    lo = torch.where(k_type == TOKEN_H, torch.full_like(k_time, _INT64_MIN), torch.where(k_type == TOKEN_R, k_time, 0))
    hi = torch.where(k_type == TOKEN_H, torch.full_like(k_time, NEVER), torch.where(k_type == TOKEN_R, k_exp, 0))
    per_query = blocks.rows // r
    tile_user, tile_q0 = _tiles(queries.offsets, per_query, c_len)
    ktile_user, ktile_k0 = _tiles(context.offsets, blocks.keys, q_len)
    nkb = (c_len + blocks.keys - 1) // blocks.keys
    sizes = q_len * nkb
    base = torch.cumsum(sizes, 0) - sizes
    bnd_size = int(sizes.sum())
    if bnd_size >= 2**31 - 1:
        raise ValueError("triton attention: too many (query, key block) pairs for int32 offsets")
    i32 = torch.int32
    return _Plan(
        q_off=queries.offsets.to(i32).contiguous(),
        c_off=context.offsets.to(i32).contiguous(),
        q_tok=q_tok.to(i32).contiguous(),
        q_time=layout.timestamps[q_tok].long().contiguous(),
        q_col=layout.positions()[q_tok].to(i32).contiguous(),
        q_self=(layout.token_type[q_tok] == TOKEN_T).to(torch.int8).contiguous(),
        k_tok=k_tok.to(i32).contiguous(),
        k_lo=lo.contiguous(),
        k_hi=hi.contiguous(),
        k_time=k_time.contiguous(),
        tile_user=tile_user,
        tile_q0=tile_q0,
        ktile_user=ktile_user,
        ktile_k0=ktile_k0,
        bnd_base=base.to(i32).contiguous(),
        bnd_size=bnd_size,
    )


def plan_for(queries: QuerySet, layout: AttentionLayout, blocks: Blocks, r: int) -> _Plan:
    """The cached plan of this query set and tiling (built by the first layer of a forward pass)."""
    key = ("triton_plan", id(queries), blocks.rows // r, blocks.keys)
    if key not in layout.cache:
        layout.cache[key] = (queries, _build_plan(queries, layout, blocks, r))  # keeps the id alive
    return layout.cache[key][1]


def _precision(dtype: torch.dtype) -> str:
    """fp32 matmuls: IEEE unless PyTorch itself allows TF32 (then match its speed and accuracy)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _pos_counts(plan: _Plan, blocks: Blocks, per_query: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cnt [Nq]`` and ``bnd [bnd_size]`` (see the module docstring)."""
    nq = plan.q_tok.shape[0]
    cnt = torch.zeros(nq, dtype=torch.int32, device=device)
    bnd = torch.zeros(max(plan.bnd_size, 1), dtype=torch.int32, device=device)
    tiles = plan.tile_user.shape[0]
    if tiles:
        _count_kernel[(tiles,)](
            plan.tile_user, plan.tile_q0, plan.q_off, plan.c_off,
            plan.q_tok, plan.q_time, plan.q_col,
            plan.k_tok, plan.k_lo, plan.k_hi,
            plan.bnd_base, cnt, bnd,
            PER=per_query, QUERIES=triton.next_power_of_2(per_query), BLOCK_N=blocks.keys,
            num_warps=blocks.warps,
        )
    return cnt, bnd


class _TritonHSTU(torch.autograd.Function):
    """Autograd wrapper: saves Q, K, V, the bias table and the position counts; recomputes scores."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, queries: QuerySet,
                layout: AttentionLayout, params: AttentionParams) -> Tensor:
        dtype = q.dtype
        ctx.kv_dtypes = (k.dtype, v.dtype)
        k, v = k.to(dtype).contiguous(), v.to(dtype).contiguous()
        q = q.contiguous()
        heads, groups, dim, vdim = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
        r = heads // groups
        blocks = choose_blocks(dim, vdim, r)
        plan = plan_for(queries, layout, blocks, r)
        table = bias.float().contiguous() if bias is not None else None
        pos = params.position_buckets if table is not None else 0
        cnt, bnd = _pos_counts(plan, blocks, blocks.rows // r, q.device) if pos else (plan.q_col, plan.q_col)
        out = torch.empty((q.shape[0], heads, vdim), dtype=dtype, device=q.device)
        meta = dict(
            D=dim, DV=vdim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_DV=max(16, triton.next_power_of_2(vdim)),
            R=r, BLOCK_M=blocks.rows, BLOCK_N=blocks.keys, HAS_BIAS=table is not None,
            TIME_BUCKETS=params.time_buckets if table is not None else 0, POS_BUCKETS=pos,
            WIDTH=table.shape[1] if table is not None else 1, PRECISION=_precision(dtype),
        )
        tiles = plan.tile_user.shape[0]
        if tiles:
            _fwd_kernel[(tiles, groups)](
                q, k, v, out, table if table is not None else q,
                plan.tile_user, plan.tile_q0, plan.q_off, plan.c_off,
                plan.q_tok, plan.q_time, plan.q_self,
                plan.k_tok, plan.k_lo, plan.k_hi, plan.k_time,
                plan.bnd_base, cnt, bnd,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                params.alpha, params.norm,
                num_warps=blocks.warps, num_stages=blocks.stages, **meta,
            )
        ctx.save_for_backward(q, k, v, table, cnt, bnd)
        ctx.plan, ctx.params, ctx.blocks, ctx.meta = plan, params, blocks, meta
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, table, cnt, bnd = ctx.saved_tensors
        plan, params, blocks, meta = ctx.plan, ctx.params, ctx.blocks, ctx.meta
        do = grad_out.to(q.dtype).contiguous()
        groups = k.shape[1]
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        bias_grad = table is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros_like(table) if bias_grad else None
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
                   dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1))
        tiles, ktiles = plan.tile_user.shape[0], plan.ktile_user.shape[0]
        bias_arg = table if table is not None else q
        if tiles:
            _bwd_dq_kernel[(tiles, groups)](
                q, k, v, do, dq, dk, dv, bias_arg, dbias if dbias is not None else dk,
                plan.tile_user, plan.tile_q0, plan.q_off, plan.c_off,
                plan.q_tok, plan.q_time, plan.q_self,
                plan.k_tok, plan.k_lo, plan.k_hi, plan.k_time,
                plan.bnd_base, cnt, bnd,
                *strides, params.alpha, params.norm,
                BIAS_GRAD=bias_grad, num_warps=blocks.warps, num_stages=blocks.stages, **meta,
            )
        else:
            dq.zero_()
        if ktiles:
            _bwd_dkdv_kernel[(ktiles, groups)](
                q, k, v, do, dk, dv, bias_arg,
                plan.ktile_user, plan.ktile_k0, plan.q_off, plan.c_off,
                plan.q_tok, plan.q_time,
                plan.k_tok, plan.k_lo, plan.k_hi, plan.k_time,
                plan.bnd_base, cnt, bnd,
                *strides, params.alpha, params.norm,
                num_warps=blocks.warps, num_stages=blocks.stages, **meta,
            )
        k_dtype, v_dtype = ctx.kv_dtypes
        dbias_out = dbias.to(ctx.bias_dtype) if dbias is not None else None
        return dq, dk.to(k_dtype), dv.to(v_dtype), dbias_out, None, None, None


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, layout: AttentionLayout, params: AttentionParams
) -> Tensor:
    """Same contract and result as :func:`mtfm.kernels.reference.reference_attention`, in Triton."""
    check_shapes(q, k, v, queries, layout, params)
    if queries.num_queries == 0:
        return empty_output(q, k, v, params)
    if not (q.is_cuda or interpreting()):
        raise RuntimeError("triton attention needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return _TritonHSTU.apply(q, k, v, params.bias, queries, layout, params)
