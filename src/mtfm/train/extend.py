"""Warm start from another run: add a scenario at low cost (paper section 1, issue 16).

``mtfm train --init-from RUN [--freeze none|backbone|shared] --scenarios HP,PHF,SQS ...`` builds
the new run's model as a normal train does (same seed, same initial weights), then copies into it
every parameter whose *name and shape* exist in RUN's checkpoint (its ``best`` snapshot, else its
latest training checkpoint, or a checkpoint directory given directly). Module names come from the
schema (``scenario_tokenizers.SQS``, ``head.towers.SQS__ctr``, ``stack....gln_in.weight.T_SQS``,
``embeddings.tables.item_id``), so what the old run had is found by name and what only the new
scenario uses (its tokenizer, its Group LayerNorm group in every layer, its MMoE gates and towers,
the embedding tables and numeric encoders only its features read) stays freshly initialised.
Training is the one trainer (:func:`mtfm.train.trainer.train_from_data`); nothing else changes.

Refused, naming what differs (:class:`WarmStartError`): another arch than MTFM; a model config
field that changes what the copied weights mean (``d_model``, heads, the HTA shape, widths, the
attention biases, ...; only fields in :data:`MAY_DIFFER` may change); other input ablations; a
tensor in both with another shape (e.g. a vocabulary grew); an embedding table both read whose
ids are encoded otherwise (another vocabulary list: the same row would be another value); a
content match over other tables; ``--out`` equal to RUN.

Freezing. A frozen parameter gets ``requires_grad = False``, so no gradient, no optimizer slot
(:func:`mtfm.train.optim.make_optimizers` and gradient clipping take trainable ones only) and no
update: it stays bit-identical to RUN's value. Group LayerNorm and the MMoE are shared modules
holding per-scenario pieces, and freezing is per *parameter*, so a new scenario's pieces of them
always train:

* ``none`` (default): everything trains; copied weights are only the starting point.
* ``backbone``: the copied parameters of the HTA stack (``stack.*``: attention projections,
  output layers, the time bias and content-match weights, and the GLN scale/shift of the groups
  RUN had) are frozen. The new scenario's GLN group in every layer trains, and so do the
  embeddings, all tokenizers and all heads (experts included).
* ``shared``: every copied parameter is frozen: the backbone, every embedding table and numeric
  encoder RUN had (shared ones too), the history / real-time tokenizers, RUN's scenario
  tokenizers, the MMoE experts and RUN's (scenario, task) gates and towers. Only what is new
  trains: the new scenario's tokenizer, its GLN group, its gates and towers, its own tables.
  RUN's scenarios then score exactly as in RUN (their path reads no new parameter).

The new run records where it came from in every checkpoint's ``config.json`` and in
``metrics.json`` (``init``: run, checkpoint, freeze, counts, and the frozen parameter names, which
``--resume`` applies again before the optimizer is built, so a resumed run has the same slots).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mtfm.config import DataSchema, schema_from_dict
from mtfm.train.checkpoint import CheckpointError, CheckpointManager, read_json, verify_checkpoint

FREEZE_MODES: tuple[str, ...] = ("none", "backbone", "shared")

# Model-config fields RUN and the new run may disagree on: how the same weights are computed or
# trained (backend, exact fusions, dropout, loss weighting) or how *fresh* weights start (copied
# ones replace theirs). Any other field changes what a copied weight means and is refused.
MAY_DIFFER: frozenset[str] = frozenset({
    "dropout", "attention_backend", "fuse_target_kv", "prune_last_full_layer", "jagged_padding_slack",
    "loss_weighting", "similarity_init", "content_match_init", "time_bias_init",
    "time_bias_shortest_horizon_s", "time_bias_self_init",
})


class WarmStartError(ValueError):
    """A warm start that cannot be meaningful; the message names the run, field or tensor."""


@dataclass(frozen=True)
class WarmStart:
    """What ``--init-from`` / ``--freeze`` ask for."""

    source: Path  # a run directory, or one checkpoint directory of a run
    freeze: str = "none"

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_MODES:
            raise WarmStartError(f"--freeze must be one of {list(FREEZE_MODES)}, got {self.freeze!r}")


# --------------------------------------------------------------------------------------------
# Which checkpoint, and whether it fits
# --------------------------------------------------------------------------------------------


def source_checkpoint(source: str | Path) -> tuple[Path, str]:
    """The checkpoint to start from and how it was chosen: ``source`` itself when it is a
    checkpoint directory, else the run's ``best`` snapshot (selected on valid), else its latest
    training checkpoint (a run that never finished an epoch)."""
    path = Path(source)
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path, "given checkpoint"
    if not path.is_dir():
        raise WarmStartError(f"--init-from {source}: no such run directory")
    mgr = CheckpointManager(path)
    for ckpt, how in ((mgr.best(), "best"), (mgr.latest(), "latest")):
        if ckpt is not None:
            return ckpt, how
    raise WarmStartError(f"--init-from {source}: {path / 'checkpoints'} holds no checkpoint (train it first)")


def check_model_configs(old: dict, new: dict, where: str) -> None:
    """Refuse when a model-config field outside :data:`MAY_DIFFER` differs (both filled with defaults)."""
    from mtfm.model.config import model_config_from_dict

    a = model_config_from_dict(old, f"{where}: model").model_dump(mode="json")
    b = model_config_from_dict(new, "model config").model_dump(mode="json")
    bad = sorted(k for k in a if k not in MAY_DIFFER and a[k] != b[k])
    if bad:
        detail = ", ".join(f"{k}: {a[k]!r} there, {b[k]!r} here" for k in bad)
        raise WarmStartError(f"{where}: the old run's model config differs in {detail}; its weights would not mean "
                             f"the same in this model (use the same --model; only {sorted(MAY_DIFFER)} may change)")


def _table_features(schema: DataSchema, model_config: dict) -> dict[str, tuple[str, object]]:
    """Embedding table key -> (``field.feature``, feature) of its first reader, as the model names
    its tables (built on the meta device: nothing is allocated)."""
    from mtfm.model.embedding import FeatureEmbeddings
    from mtfm.model.mtfm import embedding_fields

    with torch.device("meta"):
        emb = FeatureEmbeddings(embedding_fields(schema), int(model_config.get("embedding_dim", 16)),
                                int(model_config.get("numeric_dim", 4)))
    features = {(fld, f.name): f for fld, feats in emb.fields.items() for f in feats}
    out: dict[str, tuple[str, object]] = {}
    for (fld, name), key in emb.table_of.items():
        out.setdefault(key, (f"{fld}.{name}", features[(fld, name)]))
    return out


def check_encodings(old: DataSchema, old_model: dict, new: DataSchema, new_model: dict, where: str) -> None:
    """Every embedding table both models have must encode its ids alike (same vocabulary list,
    hash buckets, size): otherwise row ``i`` of the copied table is another value here."""
    before, after = _table_features(old, old_model), _table_features(new, new_model)
    for key in sorted(before.keys() & after.keys()):
        (old_name, old_feat), (new_name, new_feat) = before[key], after[key]
        if old_feat.encoding_key() != new_feat.encoding_key():
            raise WarmStartError(f"{where}: embedding table {key!r} ({old_name} there, {new_name} here) encodes its ids "
                                 "otherwise in this data (vocabulary, hash buckets or size differ), so a copied row "
                                 "would stand for another value; prepare the data with the old run's vocabularies")


def check_content_links(old: DataSchema, new: DataSchema, model_config: dict, where: str) -> None:
    """With the content match on, its per-table weights are columns by link table: the tables a
    scenario shares with a sequence must be the same ones (a new scenario may read them too)."""
    from mtfm.sharing import content_link_shares

    if model_config.get("content_match") and content_link_shares(old) != content_link_shares(new):
        raise WarmStartError(f"{where}: the content match compares tables {content_link_shares(old)} there and "
                             f"{content_link_shares(new)} here; its learned weights are per table, so they would "
                             "move to other tables")


# --------------------------------------------------------------------------------------------
# The plan: copied, new, frozen
# --------------------------------------------------------------------------------------------


@dataclass
class WarmStartPlan:
    copied: list[str]  # parameter names taken from the old checkpoint
    new: list[str]  # parameters only the new model has (fresh init)
    unused: list[str]  # old tensors the new model does not have (a scenario left out, ...)
    frozen: list[str]  # subset of copied
    sizes: dict[str, int]  # parameter name -> numel

    def count(self, names: Iterable[str]) -> str:
        names = list(names)
        return f"{len(names)} tensors ({sum(self.sizes.get(n, 0) for n in names):,} parameters)"


def plan_warm_start(model: nn.Module, old_shapes: dict[str, tuple[int, ...]], freeze: str, where: str) -> WarmStartPlan:
    """Sort ``model``'s parameters into copied and new by name; refuse a shape mismatch, naming
    the tensor; choose the frozen ones (``freeze``, see the module doc)."""
    params = dict(model.named_parameters())
    mismatched = [(n, tuple(old_shapes[n]), tuple(p.shape)) for n, p in params.items()
                  if n in old_shapes and tuple(old_shapes[n]) != tuple(p.shape)]
    if mismatched:
        name, was, now = mismatched[0]
        why = ("an embedding table's rows (vocabulary size) or width changed" if name.startswith("embeddings.")
               else "the model's widths differ (d_model, heads, hidden sizes)")
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise WarmStartError(f"{where}: tensor {name!r} has shape {list(was)} there and {list(now)} in the new "
                             f"model{more}: {why}; cannot warm start")
    copied = [n for n in params if n in old_shapes]
    if not copied:
        raise WarmStartError(f"{where}: no parameter of the new model exists there; nothing to warm start from")
    scope = {"none": lambda n: False, "backbone": lambda n: n.startswith("stack."), "shared": lambda n: True}[freeze]
    frozen = [n for n in copied if scope(n)]
    plan = WarmStartPlan(copied=copied, new=[n for n in params if n not in old_shapes],
                         unused=sorted(set(old_shapes) - set(params)), frozen=frozen,
                         sizes={n: p.numel() for n, p in params.items()})
    if len(frozen) == len(params):
        raise WarmStartError(f"--freeze {freeze} leaves nothing to train: every parameter of the new model comes "
                             f"from {where} (add a scenario with --scenarios, or freeze less)")
    return plan


def module_of(name: str) -> str:
    """A parameter's module as the plan lists it: ``head.towers.SQS__ctr.0.weight`` -> ``head SQS__ctr``,
    any GLN parameter of group ``T_SQS`` -> ``GLN group T_SQS``."""
    parts = name.split(".")
    if parts[-2:-1] in (["weight"], ["bias"]) and ("gln" in name or parts[0] == "final_norm"):
        return f"GLN group {parts[-1]}"
    if parts[0] == "head" and parts[1] in ("gates", "towers"):
        return f"head {parts[2]}"
    if parts[0].endswith("_tokenizers"):
        return f"{parts[0].removesuffix('_tokenizers')} tokenizer {parts[1]}"
    if parts[0] == "embeddings":
        return f"{'table' if parts[1] == 'tables' else 'numeric encoder'} {parts[2]}"
    return ".".join(parts[:2])


def format_plan(plan: WarmStartPlan, ckpt: Path, how: str, freeze: str, same_data: bool) -> str:
    """The lines ``mtfm train --init-from`` prints before training."""
    new_modules = list(dict.fromkeys(module_of(n) for n in plan.new))
    shown = ", ".join(new_modules[:10]) + (f", ... (+{len(new_modules) - 10})" if len(new_modules) > 10 else "")
    trainable = [n for n in plan.sizes if n not in set(plan.frozen)]
    lines = [f"warm start from {ckpt} ({how}; {'the same data' if same_data else 'other data, ids checked per table'})",
             f"  copied: {plan.count(plan.copied)}",
             f"  new (fresh init): {plan.count(plan.new)}" + (f": {shown}" if shown else ""),
             f"  frozen (--freeze {freeze}): {plan.count(plan.frozen)}; trainable: {plan.count(trainable)}"]
    if plan.unused:
        unused = list(dict.fromkeys(module_of(n) for n in plan.unused))
        lines.append(f"  in the old run only (not used): {len(plan.unused)} tensors: {', '.join(unused[:6])}"
                     + (" ..." if len(unused) > 6 else ""))
    return "\n".join(lines)


def freeze_parameters(model: nn.Module, names: Iterable[str]) -> None:
    """``requires_grad = False`` on the named parameters (an unknown name is a broken run record)."""
    params = dict(model.named_parameters())
    for name in names:
        if name not in params:
            raise CheckpointError(f"the run's init record freezes {name!r}, which this model does not have")
        params[name].requires_grad_(False)


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _copy(model: nn.Module, path: Path, names: list[str]) -> None:
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name in names:
            params[name].copy_(f.get_tensor(name).to(params[name].device, params[name].dtype))


# --------------------------------------------------------------------------------------------
# Entry points (called by the trainer)
# --------------------------------------------------------------------------------------------


def warm_start(model: nn.Module, run_config: dict, spec: WarmStart, run_dir: Path, *, verbose: bool) -> dict:
    """Check, copy and freeze as the module doc says; return the ``init`` record of the new run."""
    if Path(run_dir).resolve() == Path(spec.source).resolve():
        raise WarmStartError(f"--init-from {spec.source} and --out {run_dir} are the same run; choose a new --out")
    ckpt, how = source_checkpoint(spec.source)
    verify_checkpoint(ckpt)
    old = read_json(ckpt / "config.json")
    where = str(ckpt)
    if old.get("arch") != "mtfm" or run_config["arch"] != "mtfm":
        raise WarmStartError(f"{where}: --init-from takes MTFM runs into an MTFM run (arch {old.get('arch')!r} "
                             f"there, {run_config['arch']!r} here)")
    if list(old.get("drop_inputs", [])) != list(run_config["drop_inputs"]):
        raise WarmStartError(f"{where}: trained with --drop-inputs {old.get('drop_inputs', [])}, this run with "
                             f"{run_config['drop_inputs']}; give the same input ablation")
    from mtfm.sharing import upgrade_legacy_model_config

    old_model, old_schema = upgrade_legacy_model_config(old["model"], schema_from_dict(old["schema"], f"{where}/config.json"))
    new_schema = schema_from_dict(run_config["schema"], "the new run's schema")
    weights = ckpt / "model.safetensors"
    plan = plan_warm_start(model, _tensor_shapes(weights), spec.freeze, where)  # first: names the tensor
    check_model_configs(old_model, run_config["model"], where)
    check_encodings(old_schema, old_model, new_schema, run_config["model"], where)
    check_content_links(old_schema, new_schema, run_config["model"], where)
    _copy(model, weights, plan.copied)
    freeze_parameters(model, plan.frozen)
    same_data = (old.get("data") or {}).get("fingerprint") == run_config["data"].get("fingerprint")
    if verbose:
        print(format_plan(plan, ckpt, how, spec.freeze, same_data), flush=True)
    return {"from_run": str(Path(spec.source).resolve()), "checkpoint": str(ckpt.resolve()), "chosen": how,
            "freeze": spec.freeze, "old_scenarios": [s.name for s in old_schema.scenarios], "same_data": same_data,
            "copied_tensors": len(plan.copied), "copied_parameters": sum(plan.sizes[n] for n in plan.copied),
            "new_tensors": len(plan.new), "new_parameters": sum(plan.sizes[n] for n in plan.new),
            "frozen_parameters": sum(plan.sizes[n] for n in plan.frozen), "frozen": plan.frozen}


def resume_warm_start(model: nn.Module, saved_config: dict, spec: WarmStart | None, where: str) -> dict | None:
    """On ``--resume``: the run's weights come from its own checkpoint; only its frozen set is
    applied again (before the optimizer is built). The command must ask for the same warm start."""
    saved = saved_config.get("init")
    if saved is None and spec is None:
        return None
    if saved is None or spec is None:
        asked = "without --init-from" if spec is None else f"with --init-from {spec.source}"
        had = "was not warm-started" if saved is None else f"was started --init-from {saved['from_run']} --freeze {saved['freeze']}"
        raise CheckpointError(f"{where}: the run {had}; cannot resume it {asked}")
    if Path(spec.source).resolve() != Path(saved["from_run"]) or spec.freeze != saved["freeze"]:
        raise CheckpointError(f"{where}: the run was started --init-from {saved['from_run']} --freeze {saved['freeze']}; "
                              f"cannot resume it with --init-from {spec.source} --freeze {spec.freeze}")
    freeze_parameters(model, saved["frozen"])
    return saved
