"""Fused Group LayerNorm in Triton, forward and backward (paper section 3.3.2, issue 15).

``y = (x - mean) / sqrt(var + eps) * weight[group] + bias[group]`` per row, with ``weight`` and
``bias`` of shape ``[num_groups, dim]`` and one group id per row
(:class:`mtfm.model.layers.GroupLayerNorm` is the PyTorch reference). The PyTorch path costs a
LayerNorm, two gathers of ``[N, dim]`` parameter rows and two element-wise ops, each a pass
over memory (and the same again in backward, plus two scatter-adds); here each direction is one
pass: a program normalises a block of rows and reads its rows' parameters from the small
``[G, dim]`` tables in cache.

Backward: ``dx`` is row-local; the parameter gradients ``dW[g] = sum(dy * xhat)`` and
``dB[g] = sum(dy)`` over the rows of group ``g`` are reduced inside each program for every group
present in its block of rows (rows of one user's token sequence come in runs of few groups),
then added with one atomic per group and column.

Statistics in fp32 whatever the input dtype; the output has the dtype PyTorch would give
(``x`` promoted with the parameters: fp32 under bf16 autocast, as ``F.layer_norm`` there).
Imports Triton at load time: import it lazily (``mtfm.kernels.fused_group_layer_norm`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtfm.kernels.triton_attention import interpreting

# Elements per program: enough rows to amortise the per-group atomics of the backward pass.
_FWD_ELEMENTS = 8192
_BWD_ELEMENTS = 16384


@triton.jit
def _gln_fwd_kernel(
    x_ptr, gid_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    n_rows, stride_x, stride_y, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    col_ok = c < D
    ok = row_ok[:, None] & col_ok[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=ok, other=0.0).to(tl.float32)
    # Means as products with 1 / D (one rounding; the GPU's fast division adds error, and with
    # D = 1 must give x itself so that x - mean is exactly 0).
    mean = tl.sum(x, 1) * (1.0 / D)
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) * (1.0 / D) + eps)
    g = tl.load(gid_ptr + r, mask=row_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + g[:, None] * D + c[None, :], mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + g[:, None] * D + c[None, :], mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w + b
    tl.store(y_ptr + r64[:, None] * stride_y + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + r, mean, mask=row_ok)
    tl.store(rstd_ptr + r, rstd, mask=row_ok)


@triton.jit
def _gln_bwd_kernel(
    x_ptr, gid_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    n_rows, num_groups, stride_x, stride_dy, stride_dx,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, PARAM_GRAD: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    col_ok = c < D
    ok = row_ok[:, None] & col_ok[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + r64[:, None] * stride_dy + c[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0)
    g = tl.load(gid_ptr + r, mask=row_ok, other=0)
    w = tl.load(w_ptr + g[:, None].to(tl.int64) * D + c[None, :], mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy * w
    c1 = tl.sum(xhat * wdy, 1) * (1.0 / D)
    c2 = tl.sum(wdy, 1) * (1.0 / D)
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    tl.store(dx_ptr + r64[:, None] * stride_dx + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if PARAM_GRAD:
        # Visit only the groups present in this block of rows, smallest id first.
        grp = tl.min(tl.where(row_ok, g, num_groups))
        while grp < num_groups:
            sel = (row_ok & (g == grp))[:, None]
            tl.atomic_add(dw_ptr + grp * D + c, tl.sum(tl.where(sel, dy * xhat, 0.0), 0), mask=col_ok)
            tl.atomic_add(db_ptr + grp * D + c, tl.sum(tl.where(sel, dy, 0.0), 0), mask=col_ok)
            grp = tl.min(tl.where(row_ok & (g > grp), g, num_groups))


def _rows(block_d: int, elements: int) -> int:
    if interpreting():
        return 4
    return max(1, min(64, elements // block_d))


class _FusedGroupLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group_ids: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim).contiguous()
        gid = group_ids.reshape(-1).to(torch.int32).contiguous()
        w, b = weight.contiguous(), bias.contiguous()
        n = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n, dim), dtype=out_dtype, device=x.device)
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        block_d = triton.next_power_of_2(dim)
        rows = _rows(block_d, _FWD_ELEMENTS)
        if n:
            _gln_fwd_kernel[(triton.cdiv(n, rows),)](
                x2, gid, w, b, y, mean, rstd, n, x2.stride(0), y.stride(0), eps,
                D=dim, BLOCK_D=block_d, ROWS=rows, num_warps=4 if block_d <= 1024 else 8,
            )
        ctx.save_for_backward(x2, gid, w, mean, rstd)
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = x.shape, x.dtype, (weight.dtype, bias.dtype)
        return y.reshape(*x.shape[:-1], dim)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, gid, w, mean, rstd = ctx.saved_tensors
        n, dim = x2.shape
        dy = grad_out.reshape(-1, dim).contiguous()
        dx = torch.empty((n, dim), dtype=ctx.x_dtype, device=x2.device)
        param_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dw = torch.zeros(w.shape, dtype=torch.float32, device=x2.device)
        db = torch.zeros(w.shape, dtype=torch.float32, device=x2.device)
        block_d = triton.next_power_of_2(dim)
        rows = _rows(block_d, _BWD_ELEMENTS)
        if n:
            _gln_bwd_kernel[(triton.cdiv(n, rows),)](
                x2, gid, w, dy, mean, rstd, dx, dw, db,
                n, w.shape[0], x2.stride(0), dy.stride(0), dx.stride(0),
                D=dim, BLOCK_D=block_d, ROWS=rows, PARAM_GRAD=param_grad, num_warps=4 if block_d <= 1024 else 8,
            )
        w_dtype, b_dtype = ctx.param_dtypes
        return (dx.reshape(ctx.x_shape), None, dw.to(w_dtype) if ctx.needs_input_grad[2] else None,
                db.to(b_dtype) if ctx.needs_input_grad[3] else None, None)


def fused_group_layer_norm(x: Tensor, group_ids: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``layer_norm(x) * weight[group_ids] + bias[group_ids]`` in one pass (see the module docstring).

    ``x [..., dim]``, ``group_ids`` long with ``x``'s leading shape, ``weight`` and ``bias``
    ``[num_groups, dim]``. Group ids must lie in ``[0, num_groups)`` (not checked on the device).
    """
    if weight.shape != bias.shape or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"group layer norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} "
                         f"must both be [num_groups, {x.shape[-1]}]")
    if group_ids.shape != x.shape[:-1]:
        raise ValueError(f"group layer norm: group_ids {tuple(group_ids.shape)} != rows {tuple(x.shape[:-1])}")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError("fused group layer norm needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return _FusedGroupLayerNorm.apply(x, group_ids, weight, bias, eps)
