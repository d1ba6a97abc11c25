"""Attention kernels behind one dispatch point.

:func:`hstu_attention` is the only entry the model calls. Backends register under a name
(``ModelConfig.attention_backend``); every backend has the contract of
:func:`mtfm.kernels.reference.reference_attention` (the plain PyTorch truth) and is tested
against it, forward and backward. GPU kernels (Triton) plug in with :func:`register_backend`
from their own module, without touching the model.

``"triton"`` (:mod:`mtfm.kernels.triton_attention`) is registered here by a thin wrapper that
imports Triton only when first called, so ``import mtfm`` never needs Triton. ``"auto"`` picks
``triton`` for CUDA tensors when Triton is importable and ``jagged`` otherwise (set
``MTFM_DISABLE_TRITON=1`` to keep ``auto`` off Triton, e.g. for before/after measurements).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

from torch import Tensor

from mtfm.kernels.common import AttentionLayout, AttentionParams, QuerySet, bias_index, log_buckets
from mtfm.kernels.jagged import jagged_attention
from mtfm.kernels.reference import reference_attention

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
    backend = resolve_backend(backend, q.device)
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
    "fused_gln_available",
    "fused_group_layer_norm",
    "bias_index",
    "log_buckets",
    "hstu_attention",
    "jagged_attention",
    "reference_attention",
    "register_backend",
    "resolve_backend",
    "triton_disabled",
    "triton_importable",
]
