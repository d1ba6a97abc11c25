"""Which model a run trains, and how to rebuild it from a checkpoint's config.json.

A run's config records ``arch`` (``mtfm`` or a baseline), the model config as a plain dict
and the (possibly restricted) data schema, so ``mtfm evaluate`` can rebuild the exact model
without the command line that trained it. Checkpoints from before explicit embedding sharing
(their model config holds ``share_embeddings_by_name``) are rebuilt with the sharing that flag
implied, declared in their schema (:func:`mtfm.sharing.upgrade_legacy_model_config`), so their
weights load unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from mtfm.config import DataSchema, schema_from_dict
from mtfm.train.checkpoint import load_model_weights, read_checkpoint_config, verify_checkpoint

Arch = Literal["mtfm", "logistic"]
ARCHS: tuple[str, ...] = ("mtfm", "logistic")


def build_model(arch: str, model_config: dict, schema: DataSchema) -> nn.Module:
    """A fresh model of kind ``arch`` for ``schema`` (weights from the current torch seed)."""
    if arch == "mtfm":
        from mtfm.model.config import model_config_from_dict
        from mtfm.model.mtfm import MTFM
        from mtfm.sharing import upgrade_legacy_model_config

        model_config, schema = upgrade_legacy_model_config(model_config, schema)
        return MTFM(schema, model_config_from_dict(model_config, "model config"))
    if arch == "logistic":
        from mtfm.baselines.logistic import LogisticConfig, LogisticRegression

        return LogisticRegression(schema, LogisticConfig.model_validate(model_config))
    raise ValueError(f"unknown model arch {arch!r}; expected one of {list(ARCHS)}")


def model_from_checkpoint(ckpt: str | Path) -> tuple[nn.Module, dict, DataSchema]:
    """Rebuild the model saved in ``ckpt`` and load its weights; also return its config and schema.
    The checkpoint's files are verified first: a damaged one is named, not loaded."""
    verify_checkpoint(Path(ckpt))
    config = read_checkpoint_config(ckpt)
    schema = schema_from_dict(config["schema"], f"{ckpt}/config.json: schema")
    model = build_model(config["arch"], config["model"], schema)
    load_model_weights(ckpt, model)
    return model, config, schema
