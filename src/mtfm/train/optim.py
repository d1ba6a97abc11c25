"""Optimizers and gradient clipping, including sparse (row-wise) embedding updates.

Embedding tables hold about 90% of the small preset's parameters, yet a batch reads a few
thousand of their rows. With dense gradients every step zero-fills every table's gradient,
accumulates into it, and runs the optimizer over every row. ``TrainConfig.sparse_embedding_updates``
turns the lookups into sparse-gradient ones (``nn.Embedding.sparse``: the gradient holds only
the rows the batch touched) and gives the tables an optimizer that updates only those rows:

* ``embedding_optimizer: adagrad`` -> :class:`torch.optim.Adagrad` on sparse gradients. The same
  math as dense Adagrad: a row with a zero gradient gets no update and no accumulator change,
  so skipping it changes nothing (tested: equal weights after several steps).
* ``embedding_optimizer: adam`` -> :class:`torch.optim.SparseAdam`, i.e. *lazy* Adam: only
  touched rows update their moments and move. Dense Adam also moves untouched rows (their
  momentum decays but still steps), so the two differ once a row skips a step; rows touched at
  every step, and every dense parameter up to that point, agree exactly (tested). The accuracy
  delta is measured in BENCHMARKS.md.

The dense parameters use PyTorch's fused Adam/AdamW kernel (one pass over all parameters)
where the device supports it; it computes the same update as the per-parameter loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mtfm.train.config import TrainConfig

ATTENTION_BIAS_NAMES = ("time_bias", "position_bias", "match_scale")  # scalars in score units (content match too)


def embedding_modules(model: nn.Module) -> list[nn.Embedding | nn.EmbeddingBag]:
    """Every nn.Embedding / nn.EmbeddingBag with a trainable weight (each weight once, even if shared)."""
    seen: dict[int, nn.Embedding | nn.EmbeddingBag] = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad:
            seen.setdefault(id(module.weight), module)
    return list(seen.values())


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights of every nn.Embedding / nn.EmbeddingBag (each once, even if shared)."""
    return [m.weight for m in embedding_modules(model)]


def use_sparse_embedding_gradients(model: nn.Module, sparse: bool = True) -> None:
    """Make every embedding lookup of ``model`` produce sparse (touched-rows-only) gradients.

    Every lookup must go through the module's ``sparse`` flag (``nn.Embedding.forward`` and
    :meth:`mtfm.model.embedding.FeatureEmbeddings.embed` do), so a table shared by several
    features gets a sparse gradient from each of them.
    """
    for module in embedding_modules(model):
        module.sparse = sparse


def _dense_groups(model: nn.Module, dense: list[nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """One param group, or two when the attention biases get their own lr (``attention_bias_lr_scale``)."""
    if cfg.attention_bias_lr_scale == 1.0:
        return [{"params": dense}]
    bias_ids = {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ATTENTION_BIAS_NAMES}
    groups = [{"params": [p for p in dense if id(p) not in bias_ids]}]
    biases = [p for p in dense if id(p) in bias_ids]
    if biases:
        groups.append({"params": biases, "lr": cfg.lr * cfg.attention_bias_lr_scale})
    return groups


def _fused_supported(params: list[nn.Parameter]) -> bool:
    """PyTorch's fused Adam takes floating-point parameters on CPU or CUDA, all on one device type."""
    types = {p.device.type for p in params}
    return len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """``dense`` (Adam/AdamW), plus ``embedding`` when a separate embedding optimizer is asked for.

    With ``cfg.sparse_embedding_updates`` the embedding optimizer takes sparse gradients
    (:func:`use_sparse_embedding_gradients` must have been applied to the model).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    emb = embedding_parameters(model) if cfg.embedding_optimizer != "shared" else []
    emb_ids = {id(p) for p in emb}
    dense = [p for p in params if id(p) not in emb_ids]
    dense_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if dense:
        optimizers["dense"] = dense_cls(_dense_groups(model, dense, cfg), lr=cfg.lr, betas=cfg.betas,
                                        weight_decay=cfg.weight_decay, fused=_fused_supported(dense) or None)
    if emb:
        lr = cfg.embedding_lr or cfg.lr
        if cfg.embedding_optimizer == "adagrad":
            optimizers["embedding"] = torch.optim.Adagrad(emb, lr=lr)
        elif cfg.sparse_embedding_updates:
            optimizers["embedding"] = torch.optim.SparseAdam(emb, lr=lr, betas=cfg.betas)
        else:
            optimizers["embedding"] = torch.optim.Adam(emb, lr=lr, betas=cfg.betas,
                                                       fused=_fused_supported(emb) or None)
    if not optimizers:
        raise ValueError("the model has no trainable parameters")
    return optimizers


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients (returns the total norm).

    Without sparse gradients this *is* PyTorch's function. With them, each sparse gradient is
    coalesced once (duplicate rows summed, so its norm is the norm of the dense gradient it
    stands for, and the optimizer does not coalesce it again) and enters the global L2 norm by
    its values; every gradient is then scaled by the same clip coefficient as PyTorch's.
    """
    params = [p for p in params if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in sparse:
        p.grad = p.grad.coalesce()
    dense_grads = [p.grad for p in params if not p.grad.is_sparse]
    norms = [torch.linalg.vector_norm(p.grad.values()) for p in sparse]
    if dense_grads:
        norms.append(torch.nn.utils.get_total_norm(dense_grads))
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if dense_grads:
        torch._foreach_mul_(dense_grads, coef)
    for p in sparse:
        p.grad.values().mul_(coef)
    return total
