"""``mtfm prepare``: raw logs -> user-level multi-scenario samples (Parquet shards + manifest).

Thin: parses options, loads the source, calls :func:`mtfm.data.aggregate.prepare` and prints
:func:`mtfm.data.store.format_summary`.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from mtfm.config import load_schema
from mtfm.data.aggregate import DEFAULT_MAX_SHARD_ROWS, DEFAULT_ORACLE_SPLITS, prepare
from mtfm.data.output import check_out_dir
from mtfm.data.store import format_summary
from mtfm.dirlock import hold_dir_lock

SOURCES = ("synthetic", "movielens", "kuairand", "directory")

DESCRIPTION = """\
Aggregate raw logs per user and time window over all scenarios (MTFM paper, section 3.1):
one sample = one user and one window (schema.window, aligned on the epoch) with every exposure
of every scenario in it (each scenario keeps its own columns), the user's history H (actions
before the window start, most recent max_len per type) and real-time R (the max_len actions
before the window start plus every action inside the window; each exposure sees the max_len
most recent before itself), all with timestamps. Writes, per split (by window start, see
the schema's split) and shard, DIR/<split>/part-NNNNN.parquet (one row per sample: exposures,
and per sequence type a [start, end) row range) and DIR/<split>/part-NNNNN.<H|R>.<type>.parquet
(each behaviour action the shard's samples need, stored once), plus DIR/manifest.json; then
prints counts per scenario and split, label rates, drop reasons and the oracle AUC/GAUC table."""

POLICY = """\
bad-input policy:
  errors (naming file, column, 0-based row and what was expected; exit status 2):
    missing table file or column, wrong dtype, null in a required field (user, timestamp,
    features, labels unless the task sets allow_missing), negative timestamp, label outside
    {0, 1}, categorical id outside [0, num_embeddings), unknown scenario (--scenarios naming
    one not in the schema, or a table the schema does not name), a CSV cell that is not a
    number in a numeric column (named with its row and value), a timestamp text that is not
    ISO-8601, integer timestamps that look like another unit (ms in a schema in s), an empty
    split (train always; valid and test with absolute boundaries), named with the boundaries
    and the data's range.
  warnings (the rows are kept): timestamps far outside the bulk of a table's, with counts.
  counted drops (manifest.json "dropped", printed below the run):
    timestamp_out_of_range  exposures with ts outside [time.min, time.max) of the schema
    duplicate_exposure      exact duplicate exposure rows (every column equal); first kept
    plus any count the source reports (e.g. user_not_selected for --users with a directory).
  users found only in behaviour tables get no sample; they are counted as
  users_without_exposures (behaviour rows are not exposures).
  a real-time type with max_in_window stores at most that many in-window actions per sample
  (the earliest); those left out are counted per type in manifest.json "realtime_truncated"
  and printed (behaviour rows, not exposures).
  accounting, always checked: input_exposures == output_exposures + sum(dropped).

run safety:
  DIR is locked while prepare runs (a second prepare or train on it fails at once, naming the
  holder's pid); the output is written into .DIR.prepare-<pid> beside DIR and swapped in only
  when complete, so a failed --overwrite leaves the old data intact; manifest.json records
  every shard file's rows, size and CRC-32, which the loader checks.

sources:
  synthetic  generated multi-scenario world with oracle probabilities (--users, --seed, and the world
             knobs below); writes DIR/schema.yaml whose header describes the world and the command
  movielens  MovieLens-100K as scenarios (--path: its directory, default shared/data)
  kuairand   KuaiRand-Pure (--path: its directory)
  directory  DIR/<table>.parquet, .csv, .csv.gz, .csv.zst or <table>/*.parquet per table of --schema (required); CSV lists a|b|c
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="aggregate raw logs into user-level multi-scenario samples (Parquet shards + manifest)",
        description=DESCRIPTION,
        epilog=POLICY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True, choices=SOURCES, help="where the raw logs come from (see below)")
    p.add_argument("--path", metavar="P", default=None,
                   help="input location of the source (a directory); synthetic ignores it")
    p.add_argument("--schema", metavar="YAML", default=None,
                   help="data schema overriding the source's default (required for --source directory)")
    p.add_argument("--users", metavar="N", type=int, default=None,
                   help="number of users: generated (synthetic) or kept (the N smallest ids); default: all / "
                        "the source's default")
    p.add_argument("--seed", metavar="S", type=int, default=0, help="random seed of the source (default 0)")
    world = p.add_argument_group(
        "synthetic world (--source synthetic only)",
        "the world's shape; DIR/schema.yaml's header records it with the command that made it")
    world.add_argument("--num-scenarios", metavar="K", type=int, default=None,
                       help="scenarios to generate: HP, PHF, SQS, then generic S4, S5, ... (default 3; 1 to 64)")
    world.add_argument("--scenario-shares", metavar="A,B,...", type=_shares, default=None,
                       help="exposure volume of each scenario relative to the others, one positive number per "
                            "scenario; normalised, so 8,7,1 and 0.5,0.4375,0.0625 are the same (default 8,7,1 for "
                            "HP, PHF, SQS and 3 per generic scenario)")
    world.add_argument("--days", metavar="D", type=int, default=None,
                       help="exposure days (default 14; 3 to 180), after --history-days behaviour-only days")
    world.add_argument("--history-days", metavar="H", type=int, default=None,
                       help="behaviour-only days before the first exposure day (default 14; 1 to 365); more days "
                            "give users longer behaviour logs")
    world.add_argument("--history-max-len", metavar="N", type=int, default=None,
                       help="cap of each history sequence type, orders and clicks (default 64; not with --schema, "
                            "whose sequences are its own)")
    world.add_argument("--realtime-max-len", metavar="N", type=int, default=None,
                       help="cap of the real-time sequence recent_clicks (default 32; not with --schema)")
    world.add_argument("--valid-days", metavar="V", type=int, default=None,
                       help="the days before the test days that form the valid split (default 1; not with --schema, "
                            "whose split is its own)")
    world.add_argument("--test-days", metavar="T", type=int, default=None,
                       help="the last days, the test split (default 1); V + T must be less than D")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--scenarios", metavar="A,B", default=None,
                   help="prepare only these scenarios (comma-separated names from the schema); default: all")
    p.add_argument("--shards", metavar="N", type=int, default=1,
                   help="at least N shards per split, so N torchrun ranks each read their own (default 1)")
    p.add_argument("--max-shard-rows", metavar="N", type=int, default=DEFAULT_MAX_SHARD_ROWS,
                   help="size bound of one shard: exposures + history/real-time items "
                        f"(default {DEFAULT_MAX_SHARD_ROWS:,})")
    p.add_argument("--oracle-splits", metavar="S,S", default=",".join(DEFAULT_ORACLE_SPLITS),
                   help="splits whose oracle AUC/GAUC table (tasks with an oracle column) is computed "
                        f"(default {','.join(DEFAULT_ORACLE_SPLITS)}; add train if wanted, it is the slow one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier prepare's output in DIR (which must hold nothing else); the new "
                        "output is written beside it and swapped in only when complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _shares(text: str) -> tuple[float, ...]:
    """``"0.5,0.3,0.2"`` -> floats (the argparse type of ``--scenario-shares``)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}") from None


WORLD_KNOBS = ("num_scenarios", "scenario_shares", "days", "valid_days", "test_days", "history_days",
               "history_max_len", "realtime_max_len")


def _world_options(args: argparse.Namespace) -> dict:
    """The synthetic world's knobs given on the command line (refused for other sources)."""
    given = {k: getattr(args, k) for k in WORLD_KNOBS if getattr(args, k) is not None}
    if given and args.source != "synthetic":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: shape the synthetic world; --source {args.source} reads its data")
    return given


def _other_flags(args: argparse.Namespace) -> str:
    """The flags besides the world's knobs that a synthetic world's schema.yaml header repeats."""
    parts = [f"--schema {args.schema}"] if args.schema else []
    if args.scenarios:
        parts.append(f"--scenarios {args.scenarios}")
    return " ".join([*parts, f"--out {args.out}"])


def run(args: argparse.Namespace) -> int:
    # The lock first: a second prepare into DIR fails at once, not after loading its source.
    with hold_dir_lock(args.out, "mtfm prepare"):
        check_out_dir(Path(args.out).resolve(), args.overwrite)
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    schema = load_schema(args.schema) if args.schema else None
    try:
        module = importlib.import_module(f"mtfm.data.sources.{args.source}")
    except ModuleNotFoundError as err:
        raise ValueError(f"source '{args.source}' is not available in this installation ({err})") from None
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    t0 = time.perf_counter()
    world = _world_options(args)
    if args.source == "synthetic":  # the header's command names every knob as resolved, so it reproduces the world
        raw = module.load_source(args.path, schema, args.users, args.seed, **world, other_flags=_other_flags(args))
    else:
        raw = module.load_source(args.path, schema, args.users, args.seed)
    load_s = time.perf_counter() - t0
    manifest = prepare(raw, args.out, scenarios=scenarios, shards=args.shards,
                       max_shard_rows=args.max_shard_rows, overwrite=args.overwrite, progress=not args.quiet,
                       oracle_splits=tuple(s.strip() for s in args.oracle_splits.split(",") if s.strip()))
    print(format_summary(manifest))
    total, cpu = manifest.timings_s.get("total", 0.0), manifest.cpu_s.get("total", 0.0)
    rate = manifest.input_exposures / total if total > 0 else float("nan")
    print(f"\nsource load {load_s:.2f} s; prepare {total:.2f} s ({rate:,.0f} input exposures/s, "
          f"{cpu:.2f} CPU-s); wrote {args.out}/manifest.json")
    return 0

