"""Attention kernels behind one dispatch point.

:func:`hstu_attention` is the only entry the model calls. Backends register under a name
(``ModelConfig.attention_backend``); every backend has the contract of
:func:`mtfm.kernels.reference.reference_attention` (the plain PyTorch truth) and is tested
against it, forward and backward. GPU kernels (Triton) plug in with :func:`register_backend`
from their own module, without touching the model.

``"request"`` (:mod:`mtfm.kernels.request`) scores one request (one user, context tokens first)
with sizes from shapes only, which is what ``torch.export`` needs.

``"triton"`` (:mod:`mtfm.kernels.triton_attention`) is registered here by a thin wrapper that
imports Triton only when first called, so ``import mtfm`` never needs Triton. ``"auto"`` picks
``triton`` for CUDA tensors when Triton is importable and ``jagged`` otherwise (set
``MTFM_DISABLE_TRITON=1`` to keep ``auto`` off Triton, e.g. for before/after measurements).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

from torch import Tensor

from mtfm.kernels.common import AttentionLayout, AttentionParams, QuerySet, bias_index, log_buckets
from mtfm.kernels.jagged import jagged_attention
from mtfm.kernels.reference import reference_attention
from mtfm.kernels.request import request_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor, QuerySet, AttentionLayout, AttentionParams], Tensor]


def _triton_attention(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, layout: AttentionLayout, params: AttentionParams
) -> Tensor:
    """The Triton backend, imported on first use (CPU installs never load Triton)."""
    from mtfm.kernels.triton_attention import triton_attention

    return triton_attention(q, k, v, queries, layout, params)


_BACKENDS: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "jagged": jagged_attention,
    "request": request_attention,
    "triton": _triton_attention,
}


@functools.cache
def triton_importable() -> bool:
    """Whether Triton can be imported (checked once, and only when a CUDA tensor asks)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading
        return False
    return True


def resolve_backend(backend: str, device) -> str:
    """The backend ``"auto"`` stands for on ``device``: ``triton`` on CUDA when importable, else ``jagged``."""
    if backend != "auto":
        return backend
    if getattr(device, "type", str(device)) == "cuda" and not triton_disabled() and triton_importable():
        return "triton"
    return "jagged"


def triton_disabled() -> bool:
    """``MTFM_DISABLE_TRITON=1``: ``auto`` and the GLN hook stay on the PyTorch paths."""
    return os.environ.get("MTFM_DISABLE_TRITON", "0") == "1"


def fused_gln_available(x: Tensor) -> bool:
    """Whether :class:`mtfm.model.layers.GroupLayerNorm` should run the fused Triton kernel on ``x``."""
    return x.is_cuda and not triton_disabled() and triton_importable()


def fused_group_layer_norm(x: Tensor, group_ids: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Group LayerNorm in one Triton pass (:mod:`mtfm.kernels.triton_gln`, imported on first use)."""
    from mtfm.kernels.triton_gln import fused_group_layer_norm as fused

    return fused(x, group_ids, weight, bias, eps)


_FORCED_BACKEND: ContextVar[str | None] = ContextVar("mtfm_forced_attention_backend", default=None)


@contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Inside the block every :func:`hstu_attention` call runs backend ``name``, whatever the
    model's config says. The request graph of :mod:`mtfm.serve.export` uses it to run a trained
    model's layers on the ``request`` backend (its layout is one request) without copying them."""
    if name not in _BACKENDS and name != "auto":
        raise ValueError(f"unknown attention backend {name!r}; available: {backends()}")
    token = _FORCED_BACKEND.set(name)
    try:
        yield
    finally:
        _FORCED_BACKEND.reset(token)


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``attention_backend=name`` (it must match the reference)."""
    _BACKENDS[name] = fn


def backends() -> list[str]:
    """Registered backend names (``"auto"`` is resolved per call by :func:`resolve_backend`)."""
    return sorted(_BACKENDS)


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    queries: QuerySet,
    layout: AttentionLayout,
    params: AttentionParams,
    backend: str = "jagged",
) -> Tensor:
    """``[Nq, H, dv]`` masked HSTU attention with GQA, computed by the named backend (or ``"auto"``)."""
    backend = resolve_backend(_FORCED_BACKEND.get() or backend, q.device)
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; available: {backends()}") from None
    return fn(q, k, v, queries, layout, params)


__all__ = [
    "AttentionLayout",
    "AttentionParams",
    "QuerySet",
    "backends",
    "forced_backend",
    "fused_gln_available",
    "fused_group_layer_norm",
    "bias_index",
    "log_buckets",
    "hstu_attention",
    "jagged_attention",
    "reference_attention",
    "register_backend",
    "request_attention",
    "resolve_backend",
    "triton_disabled",
    "triton_importable",
]
