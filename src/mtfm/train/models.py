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
from torch import nn

from mtfm.config import DataSchema, schema_from_dict
from mtfm.train.checkpoint import load_model_weights, read_checkpoint_config, verify_checkpoint

# The baselines (issue 14): arch -> (module, model class, config class). Each module is one
# self-contained model (FuxiCTR style): ``Model(schema, Config)``, ``model(batch).logits[s]``
# ``[n_s, num_tasks]`` and ``model.loss(batch, out)``, trained by the same trainer as MTFM.
BASELINES: dict[str, tuple[str, str, str]] = {
    "logistic": ("mtfm.baselines.logistic", "LogisticRegression", "LogisticConfig"),
    "dcnv2": ("mtfm.baselines.dcnv2", "DCNv2", "DCNv2Config"),
    "mmoe": ("mtfm.baselines.mmoe", "MMoEBaseline", "MMoEConfig"),
    "rankmixer": ("mtfm.baselines.rankmixer", "RankMixer", "RankMixerConfig"),
    "mtgr": ("mtfm.baselines.mtgr", "MTGR", "MTGRConfig"),
    "onetrans": ("mtfm.baselines.onetrans", "OneTrans", "OneTransConfig"),
    "star": ("mtfm.baselines.star", "STAR", "STARConfig"),
    "pepnet": ("mtfm.baselines.pepnet", "PEPNet", "PEPNetConfig"),
}
Arch = str
ARCHS: tuple[str, ...] = ("mtfm", *BASELINES)


def baseline_classes(arch: str) -> tuple[type[nn.Module], type]:
    """The model class and config class of baseline ``arch``."""
    import importlib

    if arch not in BASELINES:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {list(ARCHS)}")
    module_name, model_name, config_name = BASELINES[arch]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def build_model(arch: str, model_config: dict, schema: DataSchema) -> nn.Module:
    """A fresh model of kind ``arch`` for ``schema`` (weights from the current torch seed)."""
    if arch == "mtfm":
        from mtfm.model.config import model_config_from_dict
        from mtfm.model.mtfm import MTFM
        from mtfm.sharing import upgrade_legacy_model_config

        model_config, schema = upgrade_legacy_model_config(model_config, schema)
        return MTFM(schema, model_config_from_dict(model_config, "model config"))
    model_cls, config_cls = baseline_classes(arch)
    return model_cls(schema, config_cls.model_validate(model_config))


def model_from_checkpoint(ckpt: str | Path) -> tuple[nn.Module, dict, DataSchema]:
    """Rebuild the model saved in ``ckpt`` and load its weights; also return its config and schema.
    The checkpoint's files are verified first: a damaged one is named, not loaded."""
    verify_checkpoint(Path(ckpt))
    config = read_checkpoint_config(ckpt)
    schema = schema_from_dict(config["schema"], f"{ckpt}/config.json: schema")
    model = build_model(config["arch"], config["model"], schema)
    load_model_weights(ckpt, model)
    return model, config, schema
