"""Raw logs as the sources hand them to aggregation.

A source (synthetic, MovieLens, KuaiRand, or a directory of Parquet/CSV files) produces a
:class:`RawTables`: the validated :class:`~mtfm.config.DataSchema` plus one polars DataFrame
per table the schema names (each scenario's exposure table, each behaviour table), and for
every table where it came from (a file path, or ``synthetic:<table>``) so that errors can
name the file.

Source modules (``mtfm.data.sources.<name>``) expose::

    def load_source(path: str | None, schema: DataSchema | None, users: int | None, seed: int) -> RawTables

Column conventions inside every table: the schema's ``user_column`` (integer user id) and
``time.column`` (integer timestamp in ``time.unit``, or a datetime / ISO-8601 text, which
``prepare`` and ``build_request`` convert first: :mod:`mtfm.data.timestamps`); exposure tables also carry every label
column of their scenario's tasks (0/1) and every feature column named in the schema; oracle
columns (true probabilities) when the task names one. Sources may also report rows they
filtered before aggregation in ``pre_dropped`` (reason -> exposure count) so the manifest's
accounting ``input_exposures == output_exposures + sum(dropped)`` covers them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from mtfm.config import DataSchema


@dataclass
class RawTables:
    schema: DataSchema
    tables: dict[str, pl.DataFrame]
    origins: dict[str, str]  # table name -> file path or "synthetic:<table>" (for error messages)
    pre_dropped: dict[str, int] = field(default_factory=dict)  # reason -> exposures a source filtered
    info: dict[str, object] = field(default_factory=dict)  # free-form facts for the manifest (seed, users, ...)
    # files ``prepare`` writes beside the manifest (name -> text), e.g. the synthetic world's schema.yaml
    files: dict[str, str] = field(default_factory=dict)

    def origin(self, table: str) -> str:
        return self.origins.get(table, table)
