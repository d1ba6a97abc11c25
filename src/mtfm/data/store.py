"""The prepared-data store: Parquet shards of aggregated samples plus ``manifest.json``.

Layout of a prepared directory::

    DIR/manifest.json
    DIR/train/part-00000.parquet  DIR/train/part-00001.parquet ...
    DIR/valid/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

One Parquet row = one aggregated sample (one user, one time window). Columns (see
:func:`sample_columns`), every list column a ``large_list`` so its offsets are int64 and reach
the model without conversion:

* ``user_id`` int64, ``window_start`` int64 (time unit of the schema);
* per scenario ``s``: ``T.s.ts`` (exposure timestamps), ``T.s.user.<f>``, ``T.s.cross.<f>``,
  ``T.s.item.<f>`` (encoded features: int32 ids -- int64 when a cardinality exceeds 2**31 --,
  float32 values, or a list of ids for multi-categorical), ``T.s.label.<task>`` int8 (1, 0, or
  -1 = not observed) and, for tasks
  with an oracle column, ``T.s.oracle.<task>`` float32 (NaN = unknown). All columns of one
  scenario share one list length per sample: its exposure count in the window, possibly 0;
* per history type ``h``: ``H.h.ts`` and ``H.h.<f>``; per real-time type ``r``: ``R.r.ts``
  and ``R.r.<f>`` (ascending time within a sample).

The manifest (:class:`Manifest`) holds the accounting (``input_exposures ==
output_exposures + sum(dropped)``), per split and scenario counts, the shards, the full schema,
the encoding statistics, the split boundaries used, the oracle AUC/GAUC table and versions.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtfm.config import DataSchema, ScenarioSpec, SequenceSpec, schema_from_dict
from mtfm.data.encode import FeatureStats

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "valid", "test")


# --------------------------------------------------------------------------------------------
# Column names
# --------------------------------------------------------------------------------------------


def scenario_prefix(name: str) -> str:
    return f"T.{name}"


def history_prefix(name: str) -> str:
    return f"H.{name}"


def realtime_prefix(name: str) -> str:
    return f"R.{name}"


def scenario_feature_columns(spec: ScenarioSpec) -> dict[str, list[tuple[str, str]]]:
    """group ('user' / 'cross' / 'item') -> [(feature name, column name)] in schema order."""
    p = scenario_prefix(spec.name)
    return {g: [(f.name, f"{p}.{g}.{f.name}") for f in feats] for g, feats in spec.feature_groups.items()}


def label_column(scenario: str, task: str) -> str:
    return f"{scenario_prefix(scenario)}.label.{task}"


def oracle_column(scenario: str, task: str) -> str:
    return f"{scenario_prefix(scenario)}.oracle.{task}"


def scenario_columns(spec: ScenarioSpec) -> list[str]:
    p = scenario_prefix(spec.name)
    cols = [f"{p}.ts"] + [c for group in scenario_feature_columns(spec).values() for _, c in group]
    cols += [label_column(spec.name, t.name) for t in spec.tasks]
    cols += [oracle_column(spec.name, t.name) for t in spec.tasks if t.oracle_column is not None]
    return cols


def sequence_columns(prefix: str, spec: SequenceSpec) -> list[str]:
    return [f"{prefix}.ts"] + [f"{prefix}.{f.name}" for f in spec.features]


def sample_columns(schema: DataSchema) -> list[str]:
    """Every column of a shard, in storage order."""
    cols = ["user_id", "window_start"]
    for h in schema.history:
        cols += sequence_columns(history_prefix(h.name), h)
    for r in schema.realtime:
        cols += sequence_columns(realtime_prefix(r.name), r)
    for s in schema.scenarios:
        cols += scenario_columns(s)
    return cols


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def write_shard(table: pa.Table, path: str | Path) -> None:
    """Write one shard. No dictionaries and no column statistics: measured 3-5x faster to write
    for these long list columns (ids and timestamps with many distinct values), and nothing
    reads the statistics (shards are always read whole). lz4 costs about the CPU time of no
    compression (zstd level 1: +25 %) for a quarter of the size, and reads fastest."""
    pq.write_table(table, path, compression="lz4", use_dictionary=False, write_statistics=False,
                   data_page_version="2.0", write_batch_size=65536, data_page_size=4 << 20)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ShardInfo(_Model):
    path: str  # relative to the prepared directory
    samples: int
    exposures: int


class SplitInfo(_Model):
    samples: int
    exposures: int
    scenario_exposures: dict[str, int]
    label_rates: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # scenario -> task -> rate
    shards: list[ShardInfo]


class SplitBoundaries(_Model):
    """Window-start boundaries actually used: train < valid_start <= valid < test_start <= test."""

    style: str  # "absolute" or "fraction"
    valid_start: int
    test_start: int


class ScenarioInfo(_Model):
    exposures: int
    label_rates: dict[str, float | None]  # task -> positives / observed labels (None: none observed)
    observed_labels: dict[str, int]


class Manifest(_Model):
    """Typed ``manifest.json``; written by ``mtfm prepare``, read by the loader and the demo."""

    format_version: int = FORMAT_VERSION
    input_exposures: int
    output_exposures: int
    dropped: dict[str, int]
    users: int  # users with at least one sample
    users_without_exposures: int  # seen only in behaviour tables (or every exposure dropped)
    samples: int
    splits: dict[str, SplitInfo]
    split_boundaries: SplitBoundaries
    scenarios: dict[str, ScenarioInfo]
    data_schema: dict[str, Any] = Field(alias="schema")
    scenarios_prepared: list[str]
    encoding: dict[str, FeatureStats]
    time_unit: str
    window: int
    oracle: dict[str, dict[str, dict[str, dict[str, float | int | None]]]]
    source: dict[str, Any]
    versions: dict[str, str]
    timings_s: dict[str, float] = Field(default_factory=dict)  # wall seconds per prepare phase
    cpu_s: dict[str, float] = Field(default_factory=dict)  # CPU seconds (all threads) per phase

    @property
    def schema_obj(self) -> DataSchema:
        """The schema of the prepared data (only the prepared scenarios)."""
        full = schema_from_dict(self.data_schema, "manifest.json: schema")
        return full.restrict(self.scenarios_prepared)

    def shard_paths(self, data_dir: str | Path, split: str) -> list[Path]:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; the manifest has {sorted(self.splits)}")
        return [Path(data_dir) / s.path for s in self.splits[split].shards]

    def check_accounting(self) -> None:
        """``input_exposures == output_exposures + sum(dropped)``; raise if not."""
        total = self.output_exposures + sum(self.dropped.values())
        if self.input_exposures != total:
            raise ValueError(
                f"manifest accounting broken: input_exposures {self.input_exposures} != output_exposures "
                f"{self.output_exposures} + dropped {sum(self.dropped.values())} ({self.dropped})"
            )


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_manifest(manifest: Manifest, data_dir: str | Path) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    payload = _json_safe(manifest.model_dump(mode="json", by_alias=True))
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str | Path) -> Manifest:
    """Read and validate ``DIR/manifest.json``; errors name the file."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run `mtfm prepare --out {data_dir}` first)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid manifest: {err}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.format_version}, this code reads {FORMAT_VERSION}")
    written_with = manifest.versions.get("polars")
    if written_with is not None and written_with != pl.__version__:
        warnings.warn(
            f"{path}: prepared with polars {written_with}, running polars {pl.__version__}: hashed "
            "categorical ids of new requests may differ (polars hashes are stable within a version only)",
            stacklevel=2,
        )
    return manifest


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_summary(manifest: Manifest) -> str:
    """Human-readable summary: accounting, drops, per scenario and split counts, oracle table."""
    lines = [
        f"exposures: input {manifest.input_exposures:,}, output {manifest.output_exposures:,}, "
        f"dropped {sum(manifest.dropped.values()):,}",
    ]
    if manifest.dropped:
        lines.append("drop reasons:")
        lines += [f"  {reason}: {n:,}" for reason, n in sorted(manifest.dropped.items())]
    else:
        lines.append("drop reasons: none")
    lines.append(
        f"users: {manifest.users:,} with samples, {manifest.users_without_exposures:,} only in behaviour tables"
    )
    b = manifest.split_boundaries
    lines.append(f"split boundaries ({b.style}): valid_start={b.valid_start}, test_start={b.test_start}")
    lines.append("")
    lines.append(f"{'split':<6} {'samples':>10} {'exposures':>11} {'shards':>6}  exposures per scenario")
    for split, info in manifest.splits.items():
        per = ", ".join(f"{s}={n:,}" for s, n in info.scenario_exposures.items())
        lines.append(f"{split:<6} {info.samples:>10,} {info.exposures:>11,} {len(info.shards):>6}  {per}")
    lines.append("")
    lines.append(f"{'split':<6} {'scenario':<10} {'exposures':>11}  label rates")
    for name, info in manifest.scenarios.items():
        rates = ", ".join(f"{t}={_rate(r)}" for t, r in info.label_rates.items())
        lines.append(f"{'all':<6} {name:<10} {info.exposures:>11,}  {rates}")
    for split, split_info in manifest.splits.items():
        for name, per_task in split_info.label_rates.items():
            rates = ", ".join(f"{t}={_rate(r)}" for t, r in per_task.items())
            lines.append(f"{split:<6} {name:<10} {split_info.scenario_exposures[name]:>11,}  {rates}")
    oracle_rows = [
        (split, scen, task, m)
        for split, per_scen in manifest.oracle.items()
        for scen, per_task in per_scen.items()
        for task, m in per_task.items()
    ]
    if oracle_rows:
        lines.append("")
        lines.append("oracle ceiling (true probabilities as scores):")
        lines.append(f"{'split':<6} {'scenario':<10} {'task':<8} {'AUC':>7} {'GAUC':>7} {'exposures':>11}")
        for split, scen, task, m in oracle_rows:
            auc, gauc = m.get("auc"), m.get("gauc")
            lines.append(
                f"{split:<6} {scen:<10} {task:<8} {_rate(auc if isinstance(auc, float) else None):>7} "
                f"{_rate(gauc if isinstance(gauc, float) else None):>7} {int(m.get('exposures') or 0):>11,}"
            )
    return "\n".join(lines)
