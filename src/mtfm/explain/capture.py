"""The attention scores a trained MTFM actually computes, layer by layer.

Why a capture and not a re-implementation: a heatmap is only worth reading if its numbers are the
model's. The model is rebuilt with the ``reference`` attention backend (the plain PyTorch truth
every other backend is tested against, :mod:`mtfm.kernels.reference`) and run inside
:func:`mtfm.kernels.reference.record_scores`, which hands back the very masked score matrix
``SiLU(alpha Q K^T + bias) * M / n`` that the layer multiplies with ``V``: content-match columns
and relative time / position biases included, masked pairs exactly zero.

Each attention call of one forward pass is one layer, in the stack's order (per block: K target
layers, then P full layers); :func:`layer_names` names them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mtfm.data.batch import JaggedBatch
from mtfm.kernels.reference import ScoreRecord, record_scores
from mtfm.model.mtfm import MTFMBase


def load_reference_model(ckpt: str | Path) -> MTFMBase:
    """The MTFM saved in checkpoint ``ckpt``, rebuilt on the reference attention backend, in eval mode.

    Only the backend differs from the trained model (backends compute the same function; the
    tests prove it), so the scores captured are the trained model's. A baseline run is refused.
    """
    from mtfm.config import schema_from_dict
    from mtfm.train.checkpoint import load_model_weights, read_checkpoint_config, verify_checkpoint
    from mtfm.train.models import build_model

    verify_checkpoint(Path(ckpt))
    config = read_checkpoint_config(ckpt)
    if config.get("arch") != "mtfm":
        raise ValueError(f"{ckpt}: a {config.get('arch')!r} run; explain reads the attention of an MTFM run "
                         "(arch mtfm)")
    schema = schema_from_dict(config["schema"], f"{ckpt}/config.json: schema")
    model = build_model("mtfm", {**config["model"], "attention_backend": "reference"}, schema)
    load_model_weights(ckpt, model)
    assert isinstance(model, MTFMBase)
    return model.eval()


def layer_names(model: MTFMBase) -> list[str]:
    """``block<i>.target<j>`` / ``block<i>.full<j>`` (1-based) in the order the layers attend."""
    names = []
    for i, block in enumerate(model.stack.blocks, 1):
        names += [f"block{i}.target{j}" for j in range(1, len(block.targets) + 1)]
        names += [f"block{i}.full{j}" for j in range(1, len(block.fulls) + 1)]
    return names


@torch.no_grad()
def capture(model: MTFMBase, batch: JaggedBatch) -> list[ScoreRecord]:
    """One :class:`ScoreRecord` per attention layer for ``batch`` (the model must use the reference backend)."""
    if model.config.attention_backend != "reference":
        raise ValueError(f"capture needs the reference attention backend, the model uses "
                         f"{model.config.attention_backend!r} (load it with load_reference_model)")
    with record_scores() as records:
        model(batch)
    expected = len(layer_names(model))
    if len(records) != expected:
        raise RuntimeError(f"captured {len(records)} attention calls for {expected} layers")
    return records


@dataclass(frozen=True)
class UserScores:
    """One user's part of a :class:`ScoreRecord`, padding removed.

    ``q_token [Lq]`` / ``k_token [Lk]``: flat token positions in the batch; ``weights [H, Lq, Lk]``:
    the score each query head gives each key (zero where masked); ``mask [Lq, Lk]``.
    """

    q_token: Tensor
    k_token: Tensor
    weights: Tensor
    mask: Tensor


def user_scores(record: ScoreRecord, user: int) -> UserScores:
    """The scores of user ``user`` (position in the batch) in ``record``."""
    rows = record.q_token[user] >= 0
    cols = record.k_token[user] >= 0
    weights = record.weights[user][:, rows][:, :, cols]
    return UserScores(record.q_token[user][rows], record.k_token[user][cols], weights, record.mask[user][rows][:, cols])


def attention_output(scores: UserScores, v: Tensor) -> Tensor:
    """``[Lq, H, dv]``: the scores times the values, as the layer combines them (GQA: head ``h`` reads
    value group ``h // (H / G)``). Equal to the layer's attention output for these queries."""
    heads, groups = scores.weights.shape[0], v.shape[1]
    vh = v[scores.k_token].repeat_interleave(heads // groups, dim=1)  # [Lk, H, dv]
    return torch.einsum("hqk,khd->qhd", scores.weights, vh)
