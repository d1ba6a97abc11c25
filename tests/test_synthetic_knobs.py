"""`mtfm prepare --source synthetic` world knobs (--num-scenarios, --scenario-shares, --days,
--valid-days, --test-days) end to end at tiny size, the schema.yaml header that describes the
world, and the errors that name the flag."""

from __future__ import annotations

import json
import shlex

import pytest

from mtfm.cli import main
from mtfm.config import load_schema
from mtfm.data.sources.synthetic import DAY, START_TS, SyntheticConfig, schema_yaml, synthetic_schema
from mtfm.data.sources.synthetic import main as synthetic_main
from mtfm.data.store import read_manifest

USERS = "120"


def _prepare(out, *flags: str) -> int:
    return main(["prepare", "--source", "synthetic", "--users", USERS, "--out", str(out), "--quiet", *flags])


def _header(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


def _exposure_shares(data) -> dict[str, float]:
    counts = {s: info.exposures for s, info in read_manifest(data).scenarios.items()}
    return {s: n / sum(counts.values()) for s, n in counts.items()}


def test_num_scenarios_adds_generic_scenarios_and_the_header_lists_them(tmp_path):
    assert _prepare(tmp_path / "d", "--num-scenarios", "4") == 0
    manifest = read_manifest(tmp_path / "d")
    assert list(manifest.scenarios) == ["HP", "PHF", "SQS", "S4"] and manifest.source["config"]["num_scenarios"] == 4
    header = "\n".join(_header(tmp_path / "d" / "schema.yaml"))
    assert "4 scenario(s), share of the exposure volume: HP 0.4211, PHF 0.3684, SQS 0.05263, S4 0.1579" in header
    assert load_schema(tmp_path / "d" / "schema.yaml") == manifest.schema_obj == synthetic_schema(4)


def test_scenario_shares_set_the_exposure_volumes(tmp_path):
    assert _prepare(tmp_path / "default") == 0
    assert _prepare(tmp_path / "even", "--scenario-shares", "1,1,1") == 0
    assert _prepare(tmp_path / "sqs", "--scenario-shares", "0.1,0.1,0.8") == 0
    default, even, sqs = (_exposure_shares(tmp_path / d) for d in ("default", "even", "sqs"))
    assert default["SQS"] < 0.15 < 0.2 < even["SQS"] < 0.5 < sqs["SQS"]  # 1/16, 1/3, 0.8 asked for
    assert max(sqs, key=sqs.get) == "SQS" and max(default, key=default.get) == "HP"
    assert "share of the exposure volume: HP 0.1, PHF 0.1, SQS 0.8" in "\n".join(_header(tmp_path / "sqs" / "schema.yaml"))
    # relative volumes: normalised, so the same shares in other units give the same world
    assert SyntheticConfig(scenario_shares=(1, 1, 8)).shares == pytest.approx((0.1, 0.1, 0.8))


def test_days_and_split_days_set_the_splits(tmp_path):
    assert _prepare(tmp_path / "d", "--days", "6", "--valid-days", "2", "--test-days", "1") == 0
    manifest = read_manifest(tmp_path / "d")
    assert manifest.split_boundaries.valid_start == START_TS + 3 * DAY
    assert manifest.split_boundaries.test_start == START_TS + 5 * DAY
    assert all(manifest.splits[s].samples > 0 for s in ("train", "valid", "test"))
    header = "\n".join(_header(tmp_path / "d" / "schema.yaml"))
    assert "6 exposure days from 2024-01-01" in header
    assert ("split: train 2024-01-01 .. 2024-01-03 (3 days), valid 2024-01-04 .. 2024-01-05 (2 days), "
            "test 2024-01-06 (1 day)") in header
    assert load_schema(tmp_path / "d" / "schema.yaml") == synthetic_schema(3, days=6, valid_days=2, test_days=1)


def test_the_header_describes_the_world_and_its_command_reproduces_it(tmp_path):
    flags = ["--num-scenarios", "4", "--scenario-shares", "4,3,2,1", "--days", "5", "--valid-days", "1",
             "--test-days", "2", "--seed", "3"]
    assert _prepare(tmp_path / "a", *flags) == 0
    header = _header(tmp_path / "a" / "schema.yaml")
    assert header[0].startswith("# Synthetic world this schema belongs to")
    text = "\n".join(header)
    for part in (f"users {USERS}, seed 3", "HP 0.4, PHF 0.3, SQS 0.2, S4 0.1", "5 exposure days",
                 "valid 2024-01-03 (1 day), test 2024-01-04 .. 2024-01-05 (2 days)"):
        assert part in text
    made_by = next(line for line in header if "made by:" in line).split("made by: ", 1)[1]
    assert made_by == (f"mtfm prepare --source synthetic --users {USERS} --seed 3 --num-scenarios 4 "
                       f"--scenario-shares 4,3,2,1 --days 5 --valid-days 1 --test-days 2 --out {tmp_path / 'a'}")
    again = shlex.split(made_by.replace(str(tmp_path / "a"), str(tmp_path / "b")))
    assert again[:2] == ["mtfm", "prepare"] and main([*again[1:], "--quiet"]) == 0
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a.source["config"] == b.source["config"] and a.splits["test"].exposures == b.splits["test"].exposures
    assert {s: i.exposures for s, i in a.scenarios.items()} == {s: i.exposures for s, i in b.scenarios.items()}
    assert (tmp_path / "b" / "schema.yaml").read_text() == (tmp_path / "a" / "schema.yaml").read_text().replace(
        str(tmp_path / "a"), str(tmp_path / "b"))


def test_overwrite_replaces_its_own_schema_file_but_not_a_users(tmp_path, capsys):
    data = tmp_path / "d"
    assert _prepare(data, "--days", "4") == 0
    assert _prepare(data, "--days", "5", "--overwrite") == 0  # the schema.yaml prepare wrote is its own
    assert "5 exposure days" in (data / "schema.yaml").read_text()
    (data / "schema.yaml").write_text("# my notes\nuser_column: user_id\n")
    capsys.readouterr()
    assert _prepare(data, "--days", "6", "--overwrite") == 2
    assert "did not write (schema.yaml)" in capsys.readouterr().err
    assert (data / "schema.yaml").read_text().startswith("# my notes")


@pytest.mark.parametrize("flags, names", [
    (["--scenario-shares", "0.5,0.5"], ["--scenario-shares", "2 value(s) for 3 scenarios", "--num-scenarios"]),
    (["--num-scenarios", "4", "--scenario-shares", "1,1,1"], ["--scenario-shares", "for 4 scenarios"]),
    (["--scenario-shares", "1,-1,1"], ["--scenario-shares", "positive"]),
    (["--scenario-shares", "1,nan,1"], ["--scenario-shares", "positive"]),
    (["--scenario-shares", "1,a,1"], ["--scenario-shares", "'1,a,1'"]),
    (["--days", "4", "--valid-days", "2", "--test-days", "2"], ["--valid-days 2", "--test-days 2", "--days 4"]),
    (["--days", "3", "--test-days", "2"], ["--test-days 2", "--days 3"]),
    (["--valid-days", "0"], ["--valid-days", "greater than or equal to 1"]),
    (["--days", "2"], ["--days", "greater than or equal to 3"]),
    (["--num-scenarios", "0"], ["--num-scenarios"]),
])
def test_invalid_knobs_are_errors_naming_the_flag(tmp_path, capsys, flags, names):
    try:
        code = _prepare(tmp_path / "d", *flags)
    except SystemExit as exit_:  # argparse: a value that is not a number list
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    for name in names:
        assert name in err
    assert not (tmp_path / "d").exists()


def test_knobs_that_do_not_fit_the_source_or_the_schema_are_refused(tmp_path, capsys):
    assert main(["prepare", "--source", "directory", "--path", str(tmp_path), "--days", "5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--days: shape the synthetic world; --source directory" in capsys.readouterr().err
    schema = tmp_path / "schema.yaml"
    schema.write_text(schema_yaml(synthetic_schema(3)))
    assert _prepare(tmp_path / "y", "--schema", str(schema), "--valid-days", "2") == 2
    assert "--valid-days set the split of the generated schema" in capsys.readouterr().err
    assert _prepare(tmp_path / "y", "--schema", str(schema), "--num-scenarios", "2") == 2
    assert "--num-scenarios 2 generates too few scenarios" in capsys.readouterr().err
    assert _prepare(tmp_path / "y", "--schema", str(schema), "--days", "10") == 2
    assert "(--days 10)" in capsys.readouterr().err
    # a schema with its own split and a world with more days: the header says whose split it is
    assert _prepare(tmp_path / "z", "--schema", str(schema), "--days", "16", "--scenarios", "SQS") == 0
    made_by = next(line for line in _header(tmp_path / "z" / "schema.yaml") if "made by:" in line)
    assert made_by.endswith(f"--days 16 --schema {schema} --scenarios SQS --out {tmp_path / 'z'}")  # its split
    assert "test 2024-01-14 .. 2024-01-16 (3 days)" in (tmp_path / "z" / "schema.yaml").read_text()


def test_the_generator_command_line_takes_the_knobs_and_writes_the_header(tmp_path, capsys):
    out = tmp_path / "world"
    assert synthetic_main(["--users", "60", "--days", "5", "--valid-days", "2", "--num-scenarios", "2",
                           "--scenario-shares", "3,1", "--out", str(out)]) == 0
    header = "\n".join(_header(out / "schema.yaml"))
    assert "HP 0.75, PHF 0.25" in header and "valid 2024-01-03 .. 2024-01-04 (2 days)" in header
    assert (f"made by: python -m mtfm.data.sources.synthetic --users 60 --seed 0 --num-scenarios 2 "
            f"--scenario-shares 3,1 --days 5 --valid-days 2 --test-days 1 --out {out}") in header
    assert json.loads((out / "synthetic.json").read_text())["scenario_shares"] == [3.0, 1.0]
    assert load_schema(out / "schema.yaml") == synthetic_schema(2, days=5, valid_days=2)


# ---- --history-days, --history-max-len, --realtime-max-len (issue 13: long histories) ---------------


def _column_bytes(s) -> bytes:
    """A column's values as bytes that do not depend on the polars version (its numbers' text does)."""
    import numpy as np
    import polars as pl

    if isinstance(s.dtype, pl.List):
        rows = s.to_list()
        lengths = np.array([-1 if r is None else len(r) for r in rows], dtype=np.int64)
        flat = [v for r in rows if r for v in r]
        return lengths.tobytes() + _column_bytes(pl.Series(flat, dtype=s.dtype.inner))
    if s.dtype == pl.String:
        return "\x00".join(s.fill_null("\x01").to_list()).encode()
    arr = s.to_numpy()
    return str(arr.dtype).encode() + np.ascontiguousarray(arr).tobytes()


def _world_hash(config: SyntheticConfig) -> str:
    """A digest of every generated table: each column's values (list columns: lengths and values)."""
    import hashlib

    from mtfm.data.sources.synthetic import generate

    raw = generate(config)
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(raw.tables):
        h.update(name.encode())
        frame = raw.tables[name]
        for col in frame.columns:
            h.update(col.encode())
            h.update(_column_bytes(frame[col]))
    return h.hexdigest()


def test_the_behaviour_knobs_at_their_defaults_leave_the_world_unchanged():
    from mtfm.data.sources.synthetic import HISTORY_MAX_LEN, REALTIME_MAX_LEN, load_packaged_schema, world_flags

    explicit = SyntheticConfig(users=40, days=4, history_days=14, history_max_len=HISTORY_MAX_LEN,
                               realtime_max_len=REALTIME_MAX_LEN)
    # the digest of this world as generated before the knobs existed (commit 4247d3c, rehashed there with
    # this _world_hash: column values, not polars' ndjson text, whose number format changed in polars 1.44)
    assert _world_hash(SyntheticConfig(users=40, days=4)) == _world_hash(explicit) == "ae9ed0f912d731ca30ddf4ee796cf38c"
    assert SyntheticConfig().schema() == synthetic_schema() == load_packaged_schema()
    assert "--history" not in world_flags(explicit) and "--realtime" not in world_flags(explicit)


def test_long_history_knobs_set_the_caps_and_lengthen_the_sequences(tmp_path):
    from mtfm.data.loader import BatchLoader

    def hr_tokens(data) -> float:
        batches = list(BatchLoader(data, "train", 64, shuffle=False, seed=0, prefetch=0).iterate(0))
        return sum(b.num_tokens - b.num_exposures for b in batches) / sum(b.batch_size for b in batches)

    assert _prepare(tmp_path / "short") == 0
    flags = ["--history-days", "60", "--history-max-len", "200", "--realtime-max-len", "48"]
    assert _prepare(tmp_path / "long", *flags) == 0
    schema = read_manifest(tmp_path / "long").schema_obj
    assert [q.max_len for q in schema.history] == [200, 200] and [q.max_len for q in schema.realtime] == [48]
    assert hr_tokens(tmp_path / "long") > 2 * hr_tokens(tmp_path / "short")
    header = _header(tmp_path / "long" / "schema.yaml")
    assert "after 60 behaviour-only days" in "\n".join(header)
    made_by = next(line for line in header if "made by:" in line).split("made by: ", 1)[1]
    assert made_by.endswith(" ".join(flags) + f" --out {tmp_path / 'long'}")
    again = shlex.split(made_by.replace(str(tmp_path / "long"), str(tmp_path / "again")))
    assert main([*again[1:], "--quiet"]) == 0
    assert (read_manifest(tmp_path / "again").source["config"] == read_manifest(tmp_path / "long").source["config"])


def test_sequence_caps_are_refused_with_a_schema_and_checked(tmp_path, capsys):
    schema = tmp_path / "schema.yaml"
    schema.write_text(schema_yaml(synthetic_schema(3)))
    assert _prepare(tmp_path / "y", "--schema", str(schema), "--history-max-len", "100") == 2
    assert "--history-max-len set the sequence caps of the generated schema" in capsys.readouterr().err
    assert _prepare(tmp_path / "z", "--realtime-max-len", "0") == 2
    assert "--realtime-max-len" in capsys.readouterr().err
