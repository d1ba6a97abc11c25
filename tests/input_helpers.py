"""Helpers for the input-format tests: write a world in a layout, prepare it, compare stores.

Why a shared module: every format test (compressed CSV, Parquet folders, timestamp forms) asks
the same question, "is the prepared store the same as for the plain input?", and must ask it
the same way: every stored file byte for byte, and the manifest without the fields that
legitimately differ (wall times, where the files came from).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from mtfm.config import dump_schema
from mtfm.data.aggregate import prepare
from mtfm.data.raw import RawTables
from mtfm.data.sources.directory import load_source as load_directory

# Manifest fields that depend on the run, not on the data: timings and the files' paths.
VOLATILE = ("timings_s", "cpu_s", "source")


def write_csv(df: pl.DataFrame, path: Path) -> None:
    """``df`` as CSV, list columns joined by ``|`` (the directory source's CSV convention)."""
    as_text = pl.col(pl.List(pl.Int64)).cast(pl.List(pl.String)).list.join("|")
    df.with_columns(as_text).write_csv(path)


def write_compressed(plain: Path, codec: str) -> Path:
    """``plain`` compressed with ``codec`` ("gzip" or "zstd") beside it; the plain file removed."""
    target = plain.with_name(plain.name + {"gzip": ".gz", "zstd": ".zst"}[codec])
    with pa.CompressedOutputStream(str(target), codec) as out:
        out.write(plain.read_bytes())
    plain.unlink()
    return target


def write_parts(df: pl.DataFrame, folder: Path, parts: int) -> None:
    """``df`` as ``folder/part-NNNNN.parquet``, split into ``parts`` consecutive row ranges."""
    folder.mkdir(parents=True)
    step = -(-len(df) // parts)
    for i in range(parts):
        df.slice(i * step, step).write_parquet(folder / f"part-{i:05d}.parquet")


def write_world(raw: RawTables, directory: Path) -> None:
    """Every table of ``raw`` as ``directory/<table>.parquet`` plus the schema."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, df in raw.tables.items():
        df.write_parquet(directory / f"{name}.parquet")
    dump_schema(raw.schema, directory / "schema.yaml")


def prepared(directory: Path, out: Path) -> tuple[dict, dict[str, bytes]]:
    """Prepare ``directory`` into ``out``; (manifest without volatile fields, every other file's bytes)."""
    raw = load_directory(str(directory), raw_schema(directory), None, 0)
    prepare(raw, out)
    return store_contents(out)


def store_contents(out: Path) -> tuple[dict, dict[str, bytes]]:
    """A prepared store as (manifest without volatile fields, every other file's bytes)."""
    manifest = json.loads((out / "manifest.json").read_text())
    for key in VOLATILE:
        manifest.pop(key, None)
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    return manifest, files


def raw_schema(directory: Path):
    from mtfm.config import load_schema

    return load_schema(directory / "schema.yaml")
