"""The prepared-data store: Parquet shards of aggregated samples plus ``manifest.json``.

Layout of a prepared directory (format version 4)::

    DIR/manifest.json
    DIR/train/part-00000.parquet              one row per sample (the sample file)
    DIR/train/part-00000.H.orders.parquet     one file per sequence type (H and R) and shard:
    DIR/train/part-00000.R.recent.parquet     the actions the shard's samples need, each once
    DIR/train/part-00001.parquet ...
    DIR/valid/...  DIR/test/...

Why two kinds of file: a user's consecutive windows share most of their history and
real-time actions, so storing each sample's own copy of its last ``max_len`` actions (format
version 1) repeated them many times (59 % of all stored values on the synthetic world) and
wrote them through Parquet's slow nested-list encoder. Version 2 stores every action once per
shard and sequence type in flat columns, and each sample points at a row range of that file
(the user-level compression of MTFM section 3.3.1 / MTGR).

Sample file (see :func:`sample_columns`), one row per sample (one user, one time window):

* ``user_id`` int64, ``window_start`` int64 (time unit of the schema);
* per sequence type, history ``H.h`` and real-time ``R.r``: ``<prefix>.start`` and
  ``<prefix>.end`` int64, the sample's rows ``[start, end)`` of the shard's sequence file of
  that type (ascending time; may be empty);
* per scenario ``s``: ``T.s.ts`` (exposure timestamps), ``T.s.user.<f>``, ``T.s.cross.<f>``,
  ``T.s.item.<f>`` (encoded features: int32 ids -- int64 when a cardinality exceeds 2**31 --,
  float32 values, or a list of ids for multi-categorical), ``T.s.label.<task>`` int8 (1, 0,
  or -1 = not observed) and, for tasks with an oracle column, ``T.s.oracle.<task>`` float32
  (NaN = unknown). Every exposure is stored once, so these stay ``large_list`` columns (int64
  offsets): all columns of one scenario share one list length per sample, its exposure count
  in the window, possibly 0.

Sequence file ``<shard stem>.<prefix>.parquet`` (see :func:`sequence_columns` and
:func:`sequence_path`): flat columns ``ts`` int64 and one per feature of the type (encoded as
above; a multi-categorical feature is a ``large_list`` column). Per user of the shard, in
user order, it holds that user's actions sorted by (time, source row) that at least one of
the shard's samples needs: the union of the samples' ranges (a sample's H -- the most recent
``max_len`` actions with ts < window start -- and its R -- the ``max_len`` actions before the
window start and every action inside the window (the first ``max_in_window`` when capped) --
are contiguous runs of the user's sorted actions).

The manifest (:class:`Manifest`) holds the accounting (``input_exposures ==
output_exposures + sum(dropped)``), per split and scenario counts, the shards with their
sequence files and row counts, the full schema, the encoding statistics, the split boundaries
used, the oracle AUC/GAUC table and versions.

Data is verified, not trusted (format 4). Every file of a shard is listed with its row count,
its size in bytes and a CRC-32 of its bytes. :func:`read_manifest` refuses a manifest whose
counts disagree with each other (a split's samples vs its shards', the total vs the splits');
the loader refuses, when it opens a split, a shard whose size or Parquet footer row count
disagrees with the manifest (:func:`check_shard_files`: a ``stat`` and a footer read per
file), and, each time it reads a shard, one whose bytes do not match the CRC
(:func:`read_shard` with ``expect``). Errors name the file and the manifest field. The
checksum is CRC-32 (:mod:`mtfm.checksum`), computed at prepare on the encoded bytes before
they are written. Format 3 (the same layout without sizes and checksums) is still read,
checked by row counts only, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtfm.checksum import checksum
from mtfm.config import DataSchema, ScenarioSpec, SequenceSpec, schema_from_dict
from mtfm.data.encode import FeatureStats
from mtfm.data.vocab import VocabularyInfo
from mtfm.errors import UnknownNameError

MANIFEST_NAME = "manifest.json"
# 4: every shard file carries its size and CRC-32 in the manifest (verified by the loader).
# 3: a real-time range holds the max_len actions before the window plus every in-window action
# (format 2 held the max_len before the window end, which leaked labels; its data is refused).
FORMAT_VERSION = 4
# Format 3 has format 4's layout without sizes and checksums: read, checked by row counts only.
UNVERIFIED_FORMATS: tuple[int, ...] = (3,)
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


def source_row_column(scenario: str) -> str:
    """Per exposure: its 0-based row in the scenario's source table (the key ``mtfm predict`` joins back on)."""
    return f"{scenario_prefix(scenario)}.row"


def scenario_columns(spec: ScenarioSpec) -> list[str]:
    p = scenario_prefix(spec.name)
    cols = [f"{p}.ts", source_row_column(spec.name)]
    cols += [c for group in scenario_feature_columns(spec).values() for _, c in group]
    cols += [label_column(spec.name, t.name) for t in spec.tasks]
    cols += [oracle_column(spec.name, t.name) for t in spec.tasks if t.oracle_column is not None]
    return cols


def sequence_types(schema: DataSchema) -> list[tuple[str, SequenceSpec]]:
    """(column prefix, spec) of every sequence type: history types, then real-time types."""
    return [(history_prefix(h.name), h) for h in schema.history] + [(realtime_prefix(r.name), r) for r in schema.realtime]


def sequence_columns(spec: SequenceSpec) -> list[str]:
    """Columns of a sequence file: ``ts`` then one per feature, in schema order."""
    return ["ts"] + [f.name for f in spec.features]


def bound_columns(prefix: str) -> tuple[str, str]:
    """The sample file's two columns that point into the sequence file of type ``prefix``."""
    return f"{prefix}.start", f"{prefix}.end"


def sample_columns(schema: DataSchema) -> list[str]:
    """Every column of a sample file, in storage order."""
    cols = ["user_id", "window_start"]
    for prefix, _ in sequence_types(schema):
        cols += bound_columns(prefix)
    for s in schema.scenarios:
        cols += scenario_columns(s)
    return cols


def sequence_path(sample_path: str | Path, prefix: str) -> Path:
    """``train/part-00000.parquet`` -> ``train/part-00000.H.orders.parquet``."""
    p = Path(sample_path)
    return p.with_name(f"{p.stem}.{prefix}{p.suffix}")


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


@dataclass
class ShardTables:
    """One shard in memory: the sample table and, per sequence type prefix, its flat table."""

    samples: pa.Table
    sequences: dict[str, pa.Table]


class FileDigest(NamedTuple):
    """What the manifest records of a written file besides its rows: size and checksum."""

    size: int  # bytes on disk
    checksum: str  # "crc32:<8 hex digits>" of those bytes


@dataclass
class ShardDigests:
    """The digests of one written shard: its sample file and each sequence file (by prefix)."""

    samples: FileDigest
    sequences: dict[str, FileDigest] = field(default_factory=dict)


def _write_table(table: pa.Table, path: Path) -> FileDigest:
    """No dictionaries and no column statistics: measured 3-5x faster to write for these
    columns (ids and timestamps with many distinct values), and nothing reads the statistics
    (shards are always read whole). lz4 costs about the CPU time of no compression (zstd
    level 1: +25 %) for a quarter of the size, and reads fastest. The file is encoded in
    memory and checksummed there, so the checksum costs no second read of the file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="lz4", use_dictionary=False, write_statistics=False,
                   data_page_version="2.0", write_batch_size=65536, data_page_size=4 << 20)
    data = sink.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return FileDigest(data.size, checksum(data))


def write_shard(shard: ShardTables, path: str | Path) -> ShardDigests:
    """Write the sample file at ``path`` and each sequence file beside it (:func:`sequence_path`);
    return their sizes and checksums for the manifest."""
    digests = ShardDigests(_write_table(shard.samples, Path(path)))
    for prefix, table in shard.sequences.items():
        digests.sequences[prefix] = _write_table(table, sequence_path(path, prefix))
    return digests


class CorruptDataError(ValueError):
    """Prepared data that disagrees with its manifest (or a manifest with itself); the message
    names the file and the manifest field."""


def _verified_bytes(path: Path, size: int | None, crc: str | None, where: str) -> pa.Buffer:
    """The bytes of ``path`` after checking them against the manifest's size and checksum."""
    data = path.read_bytes()
    if size is not None and len(data) != size:
        raise CorruptDataError(f"{path}: {len(data):,} bytes on disk, {where}.size says {size:,} "
                               "(truncated or replaced? re-run `mtfm prepare`)")
    if crc is not None and (found := checksum(data)) != crc:
        raise CorruptDataError(f"{path}: checksum {found}, {where}.checksum says {crc} "
                               "(damaged or replaced? re-run `mtfm prepare`)")
    return pa.py_buffer(data)


def _read_parquet(path: Path, columns: list[str] | None, info: ShardInfo | SequenceFileInfo | None,
                  where: str) -> pa.Table:
    """Read one shard file; with ``info`` (its manifest entry) verify its bytes and rows first."""
    if info is None:
        return pq.read_table(path, columns=columns)
    source = _verified_bytes(path, info.size, info.checksum, where)
    try:
        table = pq.read_table(source, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise CorruptDataError(f"{path}: not a readable Parquet file ({err})") from None
    rows = info.samples if isinstance(info, ShardInfo) else info.rows
    count = "samples" if isinstance(info, ShardInfo) else "rows"
    if table.num_rows != rows:
        raise CorruptDataError(f"{path}: {table.num_rows:,} rows, {where}.{count} says {rows:,}")
    return table


def read_shard(path: str | Path, schema: DataSchema, columns: list[str] | None = None,
               expect: ShardInfo | None = None, where: str = "manifest.json shard") -> ShardTables:
    """Read a shard written by :func:`write_shard`: the sample file (only ``columns`` when
    given) and the sequence file of every sequence type of ``schema``. Errors name the file.

    ``expect``: the shard's manifest entry (``where`` names it in errors, e.g.
    ``DIR/manifest.json: splits.train.shards[3]``). Every file's rows are then checked, and,
    when the manifest records them (format 4), its size and checksum on the bytes read."""
    path = Path(path)
    files = [(None, path)] + [(prefix, sequence_path(path, prefix)) for prefix, _ in sequence_types(schema)]
    missing = [str(f) for _, f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"shard file(s) missing: {missing} (prepared directory incomplete?)")
    samples = _read_parquet(path, columns, expect, where)
    sequences = {}
    for prefix, spec in sequence_types(schema):
        seq_file = sequence_path(path, prefix)
        seq_info = None if expect is None else _sequence_info(expect, prefix, where)
        table = _read_parquet(seq_file, None, seq_info, f"{where}.sequences.{prefix}")
        wanted = sequence_columns(spec)
        if table.column_names != wanted:
            raise ValueError(f"{seq_file}: columns {table.column_names}, expected {wanted}")
        sequences[prefix] = table
    return ShardTables(samples, sequences)


def _sequence_info(shard: ShardInfo, prefix: str, where: str) -> SequenceFileInfo:
    if prefix not in shard.sequences:
        raise CorruptDataError(f"{where}.sequences: no entry for {prefix} (the manifest lists "
                               f"{sorted(shard.sequences)})")
    return shard.sequences[prefix]


def _footer_rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard file missing (prepared directory incomplete?)") from None
    except (pa.ArrowException, OSError) as err:
        raise CorruptDataError(f"{path}: not a readable Parquet file ({err})") from None


def _check_file(path: Path, size: int | None, rows: int, count: str, where: str) -> None:
    """Cheap checks of one file against its manifest entry: a ``stat`` and the Parquet footer."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard file missing; {where} lists it (prepared directory incomplete?)")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise CorruptDataError(f"{path}: {actual:,} bytes on disk, {where}.size says {size:,} "
                               "(truncated or replaced? re-run `mtfm prepare`)")
    found = _footer_rows(path)
    if found != rows:
        raise CorruptDataError(f"{path}: {found:,} rows in the file, {where}.{count} says {rows:,} "
                               "(manifest.json edited, or the file replaced?)")


def check_shard_files(data_dir: str | Path, shard: ShardInfo, where: str) -> None:
    """Check a shard's files against its manifest entry without reading their data: each
    exists, has the recorded size (format 4) and the recorded row count (Parquet footer).
    The loader runs it for every shard it will read when it opens a split."""
    root = Path(data_dir)
    _check_file(root / shard.path, shard.size, shard.samples, "samples", where)
    for prefix, seq in shard.sequences.items():
        _check_file(root / seq.path, seq.size, seq.rows, "rows", f"{where}.sequences.{prefix}")


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SequenceFileInfo(_Model):
    path: str  # relative to the prepared directory
    rows: int  # actions stored (each once)
    items: int  # sum over the shard's samples of their range lengths (what format 1 stored)
    size: int | None = None  # bytes on disk (format >= 4)
    checksum: str | None = None  # see checksum() (format >= 4)


class ShardInfo(_Model):
    path: str  # the sample file, relative to the prepared directory
    samples: int
    exposures: int
    size: int | None = None  # of the sample file, bytes on disk (format >= 4)
    checksum: str | None = None  # of the sample file (format >= 4)
    sequences: dict[str, SequenceFileInfo] = Field(default_factory=dict)  # type prefix -> its file


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
    # real-time type -> in-window actions left out of samples by its max_in_window cap
    realtime_truncated: dict[str, int] = Field(default_factory=dict)
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
    # ``vocabulary: train`` features: what prepare built (size, OOV per split); the lists are in the schema
    vocabularies: dict[str, VocabularyInfo] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)  # wall seconds per prepare phase
    cpu_s: dict[str, float] = Field(default_factory=dict)  # CPU seconds (all threads) per phase

    @property
    def schema_obj(self) -> DataSchema:
        """The schema of the prepared data (only the prepared scenarios)."""
        full = schema_from_dict(self.data_schema, "manifest.json: schema")
        return full.restrict(self.scenarios_prepared)

    def shard_paths(self, data_dir: str | Path, split: str) -> list[Path]:
        if split not in self.splits:
            raise UnknownNameError(f"unknown split {split!r}; the manifest has {sorted(self.splits)}")
        return [Path(data_dir) / s.path for s in self.splits[split].shards]

    def check_accounting(self) -> None:
        """``input_exposures == output_exposures + sum(dropped)``; raise if not."""
        total = self.output_exposures + sum(self.dropped.values())
        if self.input_exposures != total:
            raise ValueError(
                f"manifest accounting broken: input_exposures {self.input_exposures} != output_exposures "
                f"{self.output_exposures} + dropped {sum(self.dropped.values())} ({self.dropped})"
            )

    def check_counts(self, origin: str = MANIFEST_NAME) -> None:
        """The manifest's counts agree with each other: every split's samples and exposures are
        its shards' sums and its scenarios' sum, the totals are the splits' sums, and (format
        >= 4) every file has a size and a checksum. Raises :class:`CorruptDataError` naming the
        field; the files themselves are checked by :func:`check_shard_files` and :func:`read_shard`."""
        problems = []
        for name, split in self.splits.items():
            for what, total, parts in (
                ("samples", split.samples, sum(s.samples for s in split.shards)),
                ("exposures", split.exposures, sum(s.exposures for s in split.shards)),
            ):
                if total != parts:
                    problems.append(f"splits.{name}.{what} is {total:,}, its shards' {what} sum to {parts:,}")
            per_scenario = sum(split.scenario_exposures.values())
            if split.exposures != per_scenario:
                problems.append(f"splits.{name}.exposures is {split.exposures:,}, "
                                f"splits.{name}.scenario_exposures sum to {per_scenario:,}")
            if self.format_version not in UNVERIFIED_FORMATS:
                problems += [f"{f}: no size or checksum (format {self.format_version} records both)"
                             for f, info in _files(name, split) if info.size is None or info.checksum is None]
        for what, total in (("samples", self.samples), ("output_exposures", self.output_exposures)):
            parts = sum(getattr(s, "samples" if what == "samples" else "exposures") for s in self.splits.values())
            if total != parts:
                problems.append(f"{what} is {total:,}, the splits sum to {parts:,}")
        if problems:
            raise CorruptDataError(f"{origin}: counts disagree (edited or damaged manifest? re-run `mtfm prepare`): "
                                   + "; ".join(problems))


def shard_field(split: str, index: int) -> str:
    """How errors name a shard's manifest entry."""
    return f"splits.{split}.shards[{index}]"


def _files(split: str, info: SplitInfo) -> list[tuple[str, ShardInfo | SequenceFileInfo]]:
    """(manifest field, entry) of every file of a split: sample files and sequence files."""
    out: list[tuple[str, ShardInfo | SequenceFileInfo]] = []
    for i, shard in enumerate(info.shards):
        out.append((shard_field(split, i), shard))
        out += [(f"{shard_field(split, i)}.sequences.{p}", seq) for p, seq in shard.sequences.items()]
    return out


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
    if manifest.format_version in UNVERIFIED_FORMATS:
        warnings.warn(f"{path}: format_version {manifest.format_version} has no shard checksums; its shards are "
                      "checked by row counts only (re-run `mtfm prepare` for a verified store)", stacklevel=2)
    elif manifest.format_version != FORMAT_VERSION:
        readable = sorted({FORMAT_VERSION, *UNVERIFIED_FORMATS})
        raise ValueError(f"{path}: format_version {manifest.format_version}, this code reads {readable} "
                         "(re-run `mtfm prepare`)")
    manifest.check_counts(str(path))
    written_with = manifest.versions.get("polars")
    if written_with is not None and written_with != pl.__version__:
        warnings.warn(
            f"{path}: prepared with polars {written_with}, running polars {pl.__version__}: hashed "
            "categorical ids of new requests may differ (polars hashes are stable within a version only)",
            stacklevel=2,
        )
    return manifest


def data_fingerprint(data_dir: str | Path) -> str:
    """A fingerprint of a prepared directory: the blake2b of its ``manifest.json`` bytes. The
    manifest lists every shard file's checksum (format 4), so the fingerprint covers the data,
    and reading it costs one small file. A run stores it and refuses to resume or be evaluated
    on data with another one (:mod:`mtfm.train.rundata`)."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        return "blake2b:" + hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: manifest not found (run `mtfm prepare --out {data_dir}` first)") from None


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_summary(manifest: Manifest) -> str:
    """Human-readable summary: accounting, drops, vocabularies built on train, per scenario and
    split counts, the embedding sharing plan (:mod:`mtfm.sharing`), oracle table."""
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
    for name, n in manifest.realtime_truncated.items():
        lines.append(f"real-time {name}: {n:,} in-window actions beyond max_in_window left out of samples")
    b = manifest.split_boundaries
    lines.append(f"split boundaries ({b.style}): valid_start={b.valid_start}, test_start={b.test_start}")
    if manifest.vocabularies:
        from mtfm.data.vocab import format_vocabularies

        lines.append(format_vocabularies(manifest.vocabularies))
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
    from mtfm.sharing import format_sharing_plan

    lines.append("")
    lines.append(format_sharing_plan(manifest.schema_obj))
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
