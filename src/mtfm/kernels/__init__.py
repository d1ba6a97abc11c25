"""Attention kernels behind one dispatch point.

:func:`hstu_attention` is the only entry the model calls. Backends register under a name
(``ModelConfig.attention_backend``); every backend has the contract of
:func:`mtfm.kernels.reference.reference_attention` (the plain PyTorch truth) and is tested
against it, forward and backward. GPU kernels (Triton) plug in with :func:`register_backend`
from their own module, without touching the model.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from mtfm.kernels.common import AttentionLayout, AttentionParams, QuerySet, bias_index, log_buckets
from mtfm.kernels.jagged import jagged_attention
from mtfm.kernels.reference import reference_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor, QuerySet, AttentionLayout, AttentionParams], Tensor]

_BACKENDS: dict[str, AttentionFn] = {"reference": reference_attention, "jagged": jagged_attention}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``attention_backend=name`` (it must match the reference)."""
    _BACKENDS[name] = fn


def backends() -> list[str]:
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
    """``[Nq, H, dv]`` masked HSTU attention with GQA, computed by the named backend."""
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
    "bias_index",
    "log_buckets",
    "hstu_attention",
    "jagged_attention",
    "reference_attention",
    "register_backend",
]
