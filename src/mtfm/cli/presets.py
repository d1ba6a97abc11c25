"""The packaged presets as ``--help`` shows them, read from their files when help is built.

Not a subcommand: ``mtfm train --help`` and ``mtfm demo --help`` list what the model presets
(``src/mtfm/configs/model_<name>.yaml``) and training presets (``train_<arch>.yaml``) set, so
the settings a run or the demo uses are visible without reading code; reading the files (not
copying their numbers here) keeps the help from drifting when a preset changes.
"""

from __future__ import annotations

from mtfm.train.config import TRAIN_PRESETS, TrainConfig, train_preset_path
from mtfm.yamlio import safe_load


def _fmt(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def train_preset_settings(name: str) -> dict:
    """What the training preset file of ``name`` sets (the rest are TrainConfig defaults)."""
    return dict(safe_load(train_preset_path(name).read_text()) or {})


def train_preset_line(name: str) -> str:
    settings = train_preset_settings(name)
    return f"{name} (train_{name}.yaml): " + (", ".join(f"{k}={_fmt(v)}" for k, v in settings.items()) or "defaults")


def model_preset_line(name: str) -> str:
    from mtfm.model.config import load_model_config

    c = load_model_config(name)
    return (f"{name} (model_{name}.yaml): d_model {c.d_model}, ({c.target_layers_per_block}:{c.full_layers_per_block})"
            f"x{c.blocks}, {c.num_heads} heads, {c.num_kv_groups} kv group(s), embedding_dim {c.embedding_dim}")


def model_preset_names() -> list[str]:
    from mtfm.model.config import preset_names

    return list(preset_names())


def defaults_line() -> str:
    d = TrainConfig()
    return (f"fields a preset does not set keep TrainConfig's defaults: batch_size={d.batch_size}, "
            f"patience={d.patience}, select={d.select}, optimizer={d.optimizer}, grad_clip={d.grad_clip}")


def presets_epilog() -> str:
    """The presets block of ``mtfm train --help`` (also used by ``mtfm demo --help``)."""
    lines = ["model presets (--model NAME; src/mtfm/configs/):"]
    lines += [f"  {model_preset_line(n)}" for n in model_preset_names()]
    lines.append("training presets (--config NAME; default: the --arch's own; src/mtfm/configs/):")
    lines += [f"  {train_preset_line(n)}" for n in TRAIN_PRESETS]
    lines.append(f"  {defaults_line()}")
    return "\n".join(lines)
