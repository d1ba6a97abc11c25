"""2:4 structured pruning of the attention projections (paper 3.3.3).

The paper serves MTFM with its attention's UVQK projection (``f1``, or ``f_uq`` + ``f_kv`` in
target layers) and output projection (``f2``) pruned to 2:4 sparsity, so sparse tensor cores
can run them. Here:

* :func:`mask_2_4` keeps, in every group of 4 consecutive weights along the *input* dim of each
  output row, the 2 of largest magnitude (magnitude pruning; ties go to the lower index);
* :func:`prune_2_4` applies it to a *copy* of a trained model (the original is untouched) and
  reports the achieved sparsity. The pruned copy still runs dense math, so its accuracy delta
  can be measured on any CPU;
* :func:`to_semi_structured` swaps the pruned weights for ``torch.sparse.to_sparse_semi_structured``
  tensors -- a CUDA-only kernel path (it refuses other devices by name).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtfm.model.layers import FullAttentionLayer, TargetAttentionLayer

_PROJECTIONS = {FullAttentionLayer: ("f1", "f2"), TargetAttentionLayer: ("f_uq", "f_kv", "f2")}


def mask_2_4(weight: Tensor) -> Tensor:
    """Boolean mask ``[out, in]`` keeping the 2 largest-magnitude weights of every 4 along ``in``.

    The input dim must be a multiple of 4: the hardware format groups along it, so a ragged
    tail has no 2:4 meaning (and silently leaving it dense would overstate the sparsity)."""
    if weight.dim() != 2:
        raise ValueError(f"mask_2_4: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_dim, in_dim = weight.shape
    if in_dim % 4:
        raise ValueError(f"mask_2_4: input dim {in_dim} is not a multiple of 4")
    groups = weight.detach().abs().reshape(out_dim, in_dim // 4, 4)
    keep = groups.topk(2, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_dim, in_dim)


def attention_projections(model: nn.Module) -> dict[str, nn.Linear]:
    """``qualified name -> Linear`` of every attention layer's UVQK and output projection."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        for kind, attrs in _PROJECTIONS.items():
            if isinstance(module, kind):
                for attr in attrs:
                    found[f"{name}.{attr}" if name else attr] = getattr(module, attr)
    return found


@dataclass
class PruneReport:
    """What :func:`prune_2_4` pruned: per projection and overall, the fraction of zero weights."""

    per_layer: dict[str, float]
    zero_weights: int
    total_weights: int

    @property
    def sparsity(self) -> float:
        return self.zero_weights / max(self.total_weights, 1)


@torch.no_grad()
def prune_2_4(model: nn.Module) -> tuple[nn.Module, PruneReport]:
    """A deep copy of ``model`` with every attention projection 2:4-pruned (dense zeros), and a report.

    A copy, because pruning is lossy: the caller compares the copy against the original."""
    pruned = copy.deepcopy(model)
    projections = attention_projections(pruned)
    if not projections:
        raise ValueError(f"prune_2_4: {type(model).__name__} has no attention projection to prune")
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name, linear in projections.items():
        linear.weight.mul_(mask_2_4(linear.weight).to(linear.weight.dtype))
        z = int((linear.weight == 0).sum())
        per_layer[name] = z / linear.weight.numel()
        zeros += z
        total += linear.weight.numel()
    return pruned, PruneReport(per_layer, zeros, total)


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every (already 2:4-pruned) attention projection's weight for a semi-structured sparse
    tensor, in place. CUDA only: the sparse kernels (cuSPARSELt / CUTLASS) exist nowhere else."""
    from torch.sparse import to_sparse_semi_structured

    for name, linear in attention_projections(model).items():
        w = linear.weight
        if w.device.type != "cuda":
            raise RuntimeError(f"to_semi_structured: {name}.weight is on {w.device}; the 2:4 sparse kernels need CUDA")
        if not bool((mask_2_4(w) | (w == 0)).all()) or int((w == 0).sum()) < w.numel() // 2:
            raise ValueError(f"to_semi_structured: {name}.weight is not 2:4 sparse (run prune_2_4 first)")
        linear.weight = nn.Parameter(to_sparse_semi_structured(w.detach().to(dtype)), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return model
