"""User-level aggregation vs one sample per exposure: training throughput and storage (issue 13).

MTFM trains on aggregated samples (one user's window: the user's H and R sequences once,
every exposure of the window as a T-token; paper section 3.1 / 3.3.1, after MTGR). A
conventional pipeline stores one sample per exposure, each repeating its user's sequences.
This script measures both on the same data, model and weights, in one run:

* **training**: the real step (``Trainer.train_step``: forward, loss, backward, grad clipping,
  Adam) on batches in memory, one torch thread by default. Three forms, each with its own copy
  of the same initial model and optimizer, timed in alternating rounds (the order reverses
  every round) so machine noise hits all of them:

  - ``aggregated``: ``--batches`` loader batches of ``--batch-size`` users;
  - ``per-exposure, same exposures``: each of those batches converted
    (:func:`mtfm.data.per_exposure.per_exposure_batch`): one step holds exactly the
    exposures of the aggregated step (same optimizer steps per exposure, far more tokens);
  - ``per-exposure, same tokens``: the same per-exposure samples cut into consecutive steps of
    at most the aggregated batch's token count (what a fixed memory budget allows: same
    tokens per step, more steps for the same exposures).

  The per-exposure form keeps the R actions before each exposure (``--realtime past``, which
  gives the aggregated model's logits exactly; ``window`` keeps the whole window's, ``view``
  only the exposure's own ``max_len``, which does not: see the module's docstring).
* **storage**: rows and bytes of sequence data. ``aggregated store``: the prepared train split
  as written (each action once per shard, windows share ranges; sizes from the manifest,
  decoded Arrow bytes from reading it). ``one copy per aggregated sample`` and
  ``per-exposure``: every train batch converted and written by the store's own writer
  (:func:`mtfm.data.store.write_shard`, same columns, types and Parquet settings), each sample
  with its own sequence rows (:func:`mtfm.data.per_exposure.shard_tables`), one file set per
  ``--storage-batch-size`` users.

    OMP_NUM_THREADS=1 python benchmarks/bench_aggregation.py --users 2000 --batch-size 32 --batches 4 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtfm.data.aggregate import prepare
from mtfm.data.batch import JaggedBatch
from mtfm.data.loader import BatchLoader
from mtfm.data.per_exposure import REALTIME_VIEWS, per_exposure_batch, shard_tables, stored_types
from mtfm.data.sources.synthetic import load_source
from mtfm.data.store import read_manifest, read_shard, write_shard
from mtfm.model.batch_ops import select_users
from mtfm.model.config import load_model_config
from mtfm.train.config import TrainConfig
from mtfm.train.distributed import DistContext
from mtfm.train.models import build_model
from mtfm.train.trainer import Trainer, seed_everything

FORMS = ("aggregated", "per-exposure, same exposures", "per-exposure, same tokens")


# --------------------------------------------------------------------------------------------
# Training throughput
# --------------------------------------------------------------------------------------------


def token_chunks(batch: JaggedBatch, max_tokens: int) -> list[JaggedBatch]:
    """``batch``'s samples cut into consecutive batches of at most ``max_tokens`` tokens (a
    sample longer than that gets a batch of its own)."""
    lengths = batch.layout.lengths.tolist()
    chunks, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used and used + n > max_tokens:
            chunks.append(select_users(batch, list(range(start, i))))
            start, used = i, 0
        used += n
    chunks.append(select_users(batch, list(range(start, len(lengths)))))
    return chunks


@dataclass
class Timing:
    """What one form's steps accumulated over the rounds."""

    seconds: float = 0.0
    steps: int = 0
    exposures: int = 0
    tokens: int = 0
    per_round: list[float] = field(default_factory=list)  # exposures/s of each round

    def add(self, batches: list[JaggedBatch], seconds: float) -> None:
        exposures = sum(b.num_exposures for b in batches)
        self.seconds += seconds
        self.steps += len(batches)
        self.exposures += exposures
        self.tokens += sum(b.num_tokens for b in batches)
        self.per_round.append(exposures / seconds)


def _trainer(model: torch.nn.Module, loader: BatchLoader, run_dir: Path) -> Trainer:
    cfg = TrainConfig(batch_size=loader.batch_size, progress=False)
    return Trainer(model, loader, loader, loader.schema, cfg, run_dir, {"arch": "mtfm"}, DistContext())


def _timed(trainer: Trainer, batches: list[JaggedBatch]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        trainer.train_step(b)
    return time.perf_counter() - t0


def train_throughput(data: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Timing]:
    """Alternating rounds of the three forms (module docstring); returns each form's totals."""
    loader = BatchLoader(data, "train", args.batch_size, shuffle=True, seed=0, prefetch=0)
    aggregated = [copy.deepcopy(b) for _, b in zip(range(args.batches + 1), loader.iterate(0))]
    if len(aggregated) < args.batches + 1:
        raise ValueError(f"{data}: fewer than {args.batches + 1} train batches of {args.batch_size} users")
    warm, aggregated = aggregated[0], aggregated[1:]
    same = [per_exposure_batch(b, args.realtime) for b in aggregated]
    tokens = [c for b, p in zip(aggregated, same) for c in token_chunks(p, b.num_tokens)]
    forms = {FORMS[0]: aggregated, FORMS[1]: same, FORMS[2]: tokens}
    warmup = {FORMS[0]: [warm], FORMS[1]: [per_exposure_batch(warm, args.realtime)],
              FORMS[2]: token_chunks(per_exposure_batch(warm, args.realtime), warm.num_tokens)[:3]}

    seed_everything(0, True)
    initial = build_model("mtfm", load_model_config(args.model).model_dump(mode="json"), loader.schema)
    trainers = {f: _trainer(copy.deepcopy(initial), loader, run_dir / str(i)) for i, f in enumerate(FORMS)}
    for f in FORMS:
        _timed(trainers[f], warmup[f])
    timings = {f: Timing() for f in FORMS}
    for r in range(args.rounds):
        for f in FORMS if r % 2 == 0 else reversed(FORMS):
            timings[f].add(forms[f], _timed(trainers[f], forms[f]))
    return timings


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """Sequence rows, file bytes (Parquet as written) and decoded Arrow bytes of one layout."""

    exposures: int = 0
    sequence_rows: int = 0
    sequence_bytes: int = 0
    sample_bytes: int = 0
    arrow_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.sequence_bytes + self.sample_bytes


def store_storage(data: str) -> Storage:
    """The prepared train split as written: each action once per shard."""
    manifest = read_manifest(data)
    schema = manifest.schema_obj
    out = Storage(exposures=manifest.splits["train"].exposures)
    for shard in manifest.splits["train"].shards:
        out.sample_bytes += shard.size or 0
        out.sequence_rows += sum(s.rows for s in shard.sequences.values())
        out.sequence_bytes += sum(s.size or 0 for s in shard.sequences.values())
        tables = read_shard(Path(data) / shard.path, schema)
        out.arrow_bytes += tables.samples.nbytes + sum(t.nbytes for t in tables.sequences.values())
    return out


def _add_written(acc: Storage, batch: JaggedBatch, loader: BatchLoader, types: tuple, path: Path) -> None:
    tables = shard_tables(batch, loader.schema, types)
    digests = write_shard(tables, path)
    acc.exposures += batch.num_exposures
    acc.sequence_rows += sum(t.num_rows for t in tables.sequences.values())
    acc.sequence_bytes += sum(d.size for d in digests.sequences.values())
    acc.sample_bytes += digests.samples.size
    acc.arrow_bytes += tables.samples.nbytes + sum(t.nbytes for t in tables.sequences.values())


def written_storage(data: str, batch_size: int, realtime: str, tmp: Path) -> tuple[Storage, Storage]:
    """(one copy per aggregated sample, per-exposure) of the whole train split, written by the
    store's writer one ``batch_size``-user file set at a time (each deleted after measuring)."""
    loader = BatchLoader(data, "train", batch_size, shuffle=False, seed=0, prefetch=0)
    first = read_manifest(data).splits["train"].shards[0].path
    types = stored_types(Path(data) / first, loader.schema)
    copies, per_exposure = Storage(), Storage()
    for i, batch in enumerate(loader.iterate(0)):
        for acc, form in ((copies, batch), (per_exposure, per_exposure_batch(batch, realtime))):
            path = tmp / f"part-{i:05d}.parquet"
            _add_written(acc, form, loader, types, path)
            for f in tmp.glob("part-*"):
                f.unlink()
    return copies, per_exposure


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def report(timings: dict[str, Timing], storage: dict[str, Storage], args: argparse.Namespace, data: str) -> dict:
    rate = {f: t.exposures / t.seconds for f, t in timings.items()}
    print(f"\n## Training (one torch thread x {torch.get_num_threads()}; {args.rounds} alternating rounds; "
          f"model {args.model}; per-exposure R view: {args.realtime})\n")
    print("| form | steps/round | exposures/step | tokens/step | tokens/exposure | exposures/s (total) "
          "| exposures/s per round (min-max) | aggregated / this | same, per round (min-max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f, t in timings.items():
        steps = t.steps // args.rounds
        paired = [a / b for a, b in zip(timings[FORMS[0]].per_round, t.per_round)]
        print(f"| {f} | {steps} | {t.exposures / t.steps:,.0f} | {t.tokens / t.steps:,.0f} | "
              f"{t.tokens / t.exposures:.1f} | {rate[f]:,.0f} | {min(t.per_round):,.0f}-{max(t.per_round):,.0f} | "
              f"{rate[FORMS[0]] / rate[f]:.2f}x | {min(paired):.2f}-{max(paired):.2f}x |")
    base = storage["aggregated store"]
    print(f"\n## Storage (train split, {base.exposures:,} exposures; Parquet lz4 as `mtfm prepare` writes it)\n")
    print("| layout | sequence rows (per exposure) | sequence files | sample files | total on disk (per exposure) "
          "| decoded Arrow | vs aggregated store: sequence rows / sequence bytes / total bytes / decoded bytes |")
    print("|---|---|---|---|---|---|---|")

    def per(s: Storage, attr: str) -> float:
        return getattr(s, attr) / s.exposures

    for name, s in storage.items():
        ratios = " / ".join(f"{per(s, a) / per(base, a):.2f}x"
                            for a in ("sequence_rows", "sequence_bytes", "total_bytes", "arrow_bytes"))
        print(f"| {name} | {s.sequence_rows:,} ({per(s, 'sequence_rows'):.1f}) | {_mb(s.sequence_bytes)} | "
              f"{_mb(s.sample_bytes)} | {_mb(s.total_bytes)} ({per(s, 'total_bytes'):,.0f} B) | "
              f"{_mb(s.arrow_bytes)} | {ratios} |")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    print(f"\nload average at the end: {' '.join(load)} on {os.cpu_count()} CPUs; data: {data}")
    return {
        "config": vars(args),
        "training": {f: {**vars(t), "exposures_per_s": rate[f], "aggregated_over_this": rate[FORMS[0]] / rate[f]}
                     for f, t in timings.items()},
        "storage": {k: {**vars(s), "total_bytes": s.total_bytes} for k, s in storage.items()},
        "aggregated_exposures_per_s": rate[FORMS[0]],
        "tokens_per_exposure": {f: t.tokens / t.exposures for f, t in timings.items()},
        "load_average": load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="prepared data directory (default: a fresh synthetic world)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users when --data is not given")
    p.add_argument("--model", default="small", help="model config / preset (default small)")
    p.add_argument("--batch-size", type=int, default=32, help="users (aggregated samples) per aggregated step")
    p.add_argument("--batches", type=int, default=4,
                   help="aggregated batches per round (the same exposures in every form)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--realtime", choices=REALTIME_VIEWS, default="past", help="R rows of a per-exposure sample")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--storage-batch-size", type=int, default=256, help="users per written file set (storage)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mtfm-bench-agg-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "data")
            prepare(load_source(None, None, args.users, 0), data)
        timings = train_throughput(data, args, Path(tmp) / "runs")
        written = Path(tmp) / "written"
        written.mkdir()
        copies, per_exposure = written_storage(data, args.storage_batch_size, args.realtime, written)
        storage = {"aggregated store": store_storage(data), "one copy per aggregated sample": copies,
                   f"per-exposure ({args.realtime})": per_exposure}
        out = report(timings, storage, args, data if args.data else f"synthetic --users {args.users} (temporary)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
