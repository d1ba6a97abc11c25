"""A tiny trained run with its behaviour store, shared by the service and store tests (built
once per session: prepare 60 synthetic users, one epoch of the tiny MTFM, the SQLite store)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.data.raw import RawTables
from mtfm.serve.scoring import Scorer, make_scorer
from mtfm.serve.store import BehaviourStore, open_or_build_store, reload_source

USERS = 60


@dataclass
class ServedRun:
    root: Path
    data: str
    run: Path
    store_path: Path
    raw: RawTables

    def scorer(self, store: BehaviourStore | None = None, cache_bytes: int = 64 << 20) -> Scorer:
        return make_scorer(self.run, self.data, store or BehaviourStore(self.store_path), cache_bytes=cache_bytes,
                           micro_batch=2)

    def fresh_store(self, name: str) -> BehaviourStore:
        """A copy of the store's source as a new store file (tests that append get their own)."""
        return open_or_build_store(self.data, self.root / f"{name}.sqlite")


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> ServedRun:
    root = tmp_path_factory.mktemp("served")
    data = prepare_synthetic(root / "data", users=USERS)
    model = write_tiny_model_yaml(root / "tiny.yaml")
    run = root / "run"
    assert main(["train", "--data", data, "--out", str(run), "--model", model, "--quiet", "--batch-size", "16",
                 "--epochs", "1"]) == 0
    assert main(["serve", "--run", str(run), "--build-store"]) == 0
    return ServedRun(root, data, run, run / "serve" / "behaviour.sqlite", reload_source(data))


def candidate_of(raw: RawTables, scenario_table: str, row: int, columns: list[str]) -> dict[str, Any]:
    """The request form (a JSON object) of one source exposure's feature columns."""
    src = raw.tables[scenario_table][row]
    return {c: (v.to_list() if isinstance(v, pl.Series) else v) for c, v in ((c, src[c][0]) for c in columns)}


def behaviour_rows(raw: RawTables, store: BehaviourStore, user: int) -> dict[str, list[dict[str, Any]]]:
    """The user's source behaviour rows as a request's inline behaviour (store columns only)."""
    ucol = store.user_column
    return {t: raw.tables[t].filter(pl.col(ucol) == user).select(list(cols)).to_dicts()
            for t, cols in store.columns.items()}
