"""``mtfm explain``: attention heatmaps of a trained MTFM run on a split of its data.

Reads one checkpoint of the run (``best-overall`` by default: a heatmap is one model), rebuilds
it on the reference attention backend (:mod:`mtfm.explain.capture`), scores ``users`` randomly
chosen users of the split (and, with ``user``, one named user) and writes to ``out``:

* ``explain.json``: the options, the checkpoint, the grouping, and for every scope (``users``,
  ``user_<id>``) and view the per-layer matrices (:mod:`mtfm.explain.accumulate`) and their
  mean over layers;
* one PNG per scope, view and statistic (``<scope>_<view>_<stat>.png``) drawing exactly those
  matrices; ``explain.json["plots"]`` says which matrix each panel shows.

The run and the data must match (the run's data fingerprint and schema, as for evaluate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mtfm.dirlock import claim_output_dir, hold_dir_lock
from mtfm.explain.accumulate import BlockSums, from_json
from mtfm.explain.capture import capture, layer_names, load_reference_model
from mtfm.explain.groups import AGE_EDGES_S, make_grouping, token_table
from mtfm.explain.plot import heatmap_figure, pyplot
from mtfm.model.batch_ops import select_users

RESULT_NAME = "explain.json"
CHECKPOINT_CHOICES = ("best-overall", "last")
PLOTTED_STATS = {"source": ("mean_weight", "mass"), "sequence": ("mean_weight", "mass")}  # other views: mean_weight


@dataclass
class ExplainOptions:
    run: Path
    data: Path
    out: Path
    split: str = "test"
    users: int = 256
    user: int | None = None
    seed: int = 0
    checkpoint: str = "best-overall"
    batch_size: int = 32
    source_feature: str | None = "scenario"
    match_feature: str | None = "cuisine"
    overwrite: bool = False
    allow_other_data: bool = False


@dataclass
class ExplainResult:
    """What :func:`explain_run` wrote: the JSON document and, per PNG, the arrays read back from its panels."""

    result: dict
    plotted: dict[str, list[np.ndarray]] = field(default_factory=dict)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Free ``out`` for explain (:func:`mtfm.dirlock.claim_output_dir`: only an earlier explain
    output, holding :data:`RESULT_NAME`, is ever replaced)."""
    claim_output_dir(out, overwrite, RESULT_NAME, "mtfm explain")


def _source_names(data: Path) -> dict[int, str]:
    """Labels of the behaviour tables' ``scenario`` ids in a synthetic world (0 = search); none otherwise."""
    from mtfm.data.sources.synthetic import SCENARIO_SEARCH, SyntheticConfig, scenario_defs
    from mtfm.data.store import read_manifest

    source = read_manifest(data).source or {}
    if source.get("source") != "synthetic" or "config" not in source:
        return {}
    world = SyntheticConfig(**source["config"])
    return {SCENARIO_SEARCH: "search", **{d.index: d.name for d in scenario_defs(world.num_scenarios)}}


def _split_users(loader) -> np.ndarray:
    """User id of every sample of the loader's split, in its order (one read of the split)."""
    return np.concatenate([b.user_ids.numpy() for b in loader.iterate(0)] or [np.zeros(0, np.int64)])


def explain_run(opts: ExplainOptions) -> ExplainResult:
    """Capture, aggregate, write and draw (see the module docstring)."""
    from mtfm.train.evaluate import checkpoint_loader, scenario_checkpoints
    from mtfm.train.rundata import check_checkpoint_data

    if opts.checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {list(CHECKPOINT_CHOICES)}, got {opts.checkpoint!r}")
    if opts.users < 0:
        raise ValueError(f"--users must be >= 0, got {opts.users}")
    if opts.users == 0 and opts.user is None:
        raise ValueError("nothing to explain: --users 0 and no --user")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    pyplot()  # matplotlib missing: say so before any work
    out = Path(opts.out)
    with hold_dir_lock(out, "mtfm explain"):
        check_out_dir(out, opts.overwrite)
        ckpt = next(iter(scenario_checkpoints(opts.run, opts.checkpoint).values()))
        check_checkpoint_data(ckpt, opts.data, action="explain", allow_other_data=opts.allow_other_data)
        model = load_reference_model(ckpt)
        loader = checkpoint_loader(ckpt, opts.data, opts.split, model.schema.scenario_names, opts.batch_size)
        grouping = make_grouping(loader.schema, opts.source_feature, _source_names(Path(opts.data)),
                                 opts.match_feature)
        layers = layer_names(model)

        split_users = _split_users(loader)
        distinct = np.unique(split_users)
        if opts.user is not None and opts.user not in set(distinct.tolist()):
            raise ValueError(f"unknown user id {opts.user}: no sample of split {opts.split!r} of {opts.data} has it "
                             f"({distinct.size} users, e.g. {distinct[:5].tolist()})")
        rng = np.random.default_rng(opts.seed)
        chosen = rng.choice(distinct, size=min(opts.users, distinct.size), replace=False) if opts.users \
            else distinct[:0]
        scopes = {"users": (BlockSums(grouping, layers), torch.as_tensor(np.sort(chosen)))}
        if opts.user is not None:
            scopes[f"user_{opts.user}"] = (BlockSums(grouping, layers), torch.tensor([opts.user]))
        wanted = torch.as_tensor(np.concatenate([np.asarray(u) for _, u in scopes.values()]))

        for batch in loader.iterate(0):
            positions = torch.nonzero(torch.isin(batch.user_ids, wanted)).flatten()
            if positions.numel() == 0:
                continue
            sub = select_users(batch, positions)
            records = capture(model, sub)
            table = token_table(sub, grouping)
            for sums, ids in scopes.values():
                sums.add(records, table, torch.isin(sub.user_ids, ids), sub.user_ids)

        result = {
            "run": str(opts.run), "checkpoint": str(ckpt), "data": str(opts.data), "split": opts.split,
            "seed": opts.seed, "users_requested": opts.users, "user": opts.user, "layers": layers,
            "attention": "reference backend; weights = SiLU(alpha q.k + content match + relative bias) * mask / n, "
                         "averaged over heads",
            "grouping": {"source_feature": grouping.source_feature, "match_feature": grouping.match_feature,
                         "age_edges_s": list(AGE_EDGES_S)},
            "scopes": {name: sums.matrices() for name, (sums, _) in scopes.items()},
            "plots": {},
        }
        out.mkdir(parents=True, exist_ok=True)
        plotted: dict[str, list[np.ndarray]] = {}
        for scope, doc in result["scopes"].items():
            for view, m in doc["views"].items():
                for stat in PLOTTED_STATS.get(view, ("mean_weight",)):
                    name = f"{scope}_{view}_{stat}.png"
                    panels = [(layer, from_json(m["layers"][layer][stat])) for layer in layers]
                    panels.append(("mean over layers", from_json(m["all_layers"][stat])))
                    title = (f"{scope}: T-token attention ({stat.replace('_', ' ')}) by {view.replace('_', ' ')}; "
                             f"{doc['samples']} samples of {doc['users']} users, {opts.split} split")
                    plotted[name] = heatmap_figure(out / name, title, m["rows"], m["columns"], panels)
                    result["plots"][name] = {"scope": scope, "view": view, "stat": stat,
                                             "panels": [p for p, _ in panels]}
        (out / RESULT_NAME).write_text(json.dumps(result, indent=1))
    return ExplainResult(result, plotted)


def format_summary(result: dict, scope: str = "users", view: str = "source", stat: str = "mean_weight") -> str:
    """A markdown table of one scope's view, mean over layers (what the command prints)."""
    doc = result["scopes"][scope]
    if view not in doc["views"]:
        view = "sequence"
    m = doc["views"][view]
    head = ["T scenario \\ key"] + m["columns"]
    lines = [f"{scope}: {doc['samples']} samples, {doc['users']} users; {stat} x 1e3, mean over layers, view {view}",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r, row in zip(m["rows"], m["all_layers"][stat]):
        lines.append("| " + " | ".join([r] + ["-" if x is None else f"{1e3 * x:.3f}" for x in row]) + " |")
    return "\n".join(lines)
