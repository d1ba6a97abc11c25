"""Parameter and FLOP counts of a model on a batch (for scaling plots, paper section 4.4).

FLOPs are *matmul* FLOPs of one forward pass, 2 per multiply-add, the usual convention of
scaling-law work; element-wise work (activations, LayerNorm, softmax, masking) and embedding
lookups are not counted. Training costs about 3x the forward (``train_estimate``).

Attention is counted for the work the dynamic mask requires, independent of the backend: each
query against its user's context (H and R) tokens, plus one own-key term per T query. That is
exactly what the ``jagged`` backend computes when it needs no padding; the ``reference``
backend also computes the always-masked T columns and padding, which are not model FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from mtfm.data.batch import TOKEN_T, JaggedBatch
from mtfm.model.embedding import module_key
from mtfm.model.layers import FullAttentionLayer, TargetAttentionLayer
from mtfm.model.mtfm import MTFMBase


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(model: MTFMBase) -> dict[str, int]:
    """Parameters by component; ``dense`` excludes embedding tables (the scaling-law axis)."""
    layers = [layer for block in model.stack.blocks for layer in (*block.targets, *block.fulls)]
    counts = {
        "embedding_tables": _numel(model.embeddings.tables),
        "numeric_encoders": _numel(model.embeddings.numeric),
        "tokenizers": _numel(model.history_tokenizers) + _numel(model.realtime_tokenizers) + _numel(model.scenario_tokenizers),
        "target_layers": sum(_numel(l) for l in layers if isinstance(l, TargetAttentionLayer)),
        "full_layers": sum(_numel(l) for l in layers if isinstance(l, FullAttentionLayer)),
        "final_norm": _numel(model.final_norm),
        "head": _numel(model.head),
    }
    counts["total"] = sum(counts.values())
    counts["dense"] = counts["total"] - counts["embedding_tables"]
    if counts["total"] != _numel(model):
        raise AssertionError(f"parameter components {counts['total']} != model parameters {_numel(model)}")
    return counts


def _linear(rows: int, layer: nn.Linear) -> int:
    return 2 * rows * layer.in_features * layer.out_features


def _mlp(rows: int, mlp: nn.Module) -> int:
    return sum(_linear(rows, m) for m in mlp.modules() if isinstance(m, nn.Linear))


def count_flops(model: MTFMBase, batch: JaggedBatch) -> dict[str, int]:
    """Forward matmul FLOPs by component for ``batch`` (see the module docstring)."""
    cfg = model.config
    heads, dh = cfg.num_heads, cfg.dim_per_head
    lay = batch.layout
    lengths = lay.offsets[1:] - lay.offsets[:-1]
    user = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths)
    is_t = lay.token_type == TOKEN_T
    n_tokens, n_t = int(is_t.shape[0]), int(is_t.sum())
    t_per_user = torch.bincount(user[is_t], minlength=lengths.shape[0])
    ctx_per_user = lengths - t_per_user
    first = next((l for b in model.stack.blocks for l in (*b.targets, *b.fulls)), None)
    content = sum(first.link_widths) if first is not None else 0  # content-match columns of Q and K
    pair = 2 * (dh + content) * heads + 2 * dh * heads  # one (query, key) pair: Q.K and A.V, per head
    full_pairs = int((lengths * ctx_per_user).sum()) + n_t
    target_pairs = int((t_per_user * ctx_per_user).sum()) + n_t

    out = {"numeric_encoders": _numeric_flops(model, batch), "tokenizers": 0}
    for name, seq in batch.history.items():
        out["tokenizers"] += _mlp(seq.num_rows, model.history_tokenizers[name])
    for name, seq in batch.realtime.items():
        out["tokenizers"] += _mlp(seq.num_rows, model.realtime_tokenizers[name])
    for name, sc in batch.scenarios.items():
        out["tokenizers"] += _mlp(sc.num_rows, model.scenario_tokenizers[name])

    out.update(target_proj=0, target_attn=0, full_proj=0, full_attn=0)
    for block in model.stack.blocks:
        for layer in block.targets:
            out["target_proj"] += _linear(n_t, layer.f_uq) + _linear(n_tokens, layer.f_kv) + _linear(n_t, layer.f2)
            out["target_attn"] += target_pairs * pair
        for layer in block.fulls:
            if layer.pruned:  # U, Q and the output only for T rows; K, V for all tokens
                uq = 2 * n_t * layer.f1.in_features * 2 * heads * dh
                kv = 2 * n_tokens * layer.f1.in_features * (layer.f1.out_features - 2 * heads * dh)
                out["full_proj"] += uq + kv + _linear(n_t, layer.f2)
                out["full_attn"] += target_pairs * pair
            else:
                out["full_proj"] += _linear(n_tokens, layer.f1) + _linear(n_tokens, layer.f2)
                out["full_attn"] += full_pairs * pair

    head, out["head"] = model.head, 0
    for name, sc in batch.scenarios.items():
        n = sc.num_rows
        out["head"] += sum(_mlp(n, expert) for expert in head.experts)
        for task in head.tasks[name]:
            key = module_key(name, task)
            mix = 2 * n * cfg.mmoe_num_experts * cfg.mmoe_expert_dim  # gate-weighted sum of the experts
            out["head"] += _linear(n, head.gates[key]) + mix + _mlp(n, head.towers[key])
    out["total"] = sum(out.values())
    out["train_estimate"] = 3 * out["total"]
    return out


def _numeric_flops(model: MTFMBase, batch: JaggedBatch) -> int:
    """Each numeric feature's ``Linear(1, numeric_dim)`` on every row of its field."""
    rows = {f"H:{n}": s.num_rows for n, s in batch.history.items()}
    rows.update({f"R:{n}": s.num_rows for n, s in batch.realtime.items()})
    for name, sc in batch.scenarios.items():
        rows.update({f"T:{name}:{part}": sc.num_rows for part in ("user", "cross", "item")})
    total = 0
    for field, features in model.embeddings.fields.items():
        numeric = sum(1 for f in features if f.kind == "numeric")
        total += 2 * rows.get(field, 0) * numeric * model.embeddings.numeric_dim
    return total


def measured_forward_flops(model: nn.Module, batches: list[JaggedBatch]) -> int:
    """Matmul FLOPs of ``model``'s forward over ``batches`` as torch's ``FlopCounterMode`` counts them.

    For models without an analytic count (the baselines): every matmul the forward runs, masked
    or padded entries included, so for a masked model it is an upper bound of :func:`count_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            for batch in batches:
                model(batch)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
