"""`mtfm explain`: the heatmaps show the scores the model computes (the reference attention's own
masked score matrix, proven by rebuilding each layer's attention output from it), masked pairs
are exactly zero and never counted, the JSON holds exactly what the PNGs draw, and bad input is
refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T
from mtfm.explain import attention_output, capture, layer_names, load_reference_model, user_scores
from mtfm.explain.accumulate import from_json
from mtfm.explain.groups import AGE_EDGES_S, AGE_LABELS, age_bucket
from mtfm.explain.run import ExplainOptions, explain_run
from mtfm.kernels import jagged_attention
from mtfm.kernels.reference import record_scores
from mtfm.model import MTFM
from mtfm.model.testing import random_batch, tiny_config, tiny_schema

torch.set_num_threads(1)


def _random_model(**overrides) -> MTFM:
    """Every term of the score switched on: content match, time and position bias, GQA (4 heads, 2 groups)."""
    torch.manual_seed(0)
    config = tiny_config(attention_backend="reference", content_match=True, relative_time_bias=True,
                         relative_position_bias=True, num_heads=4, num_kv_groups=2, **overrides)
    model = MTFM(tiny_schema(), config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "match_scale" in name or "time_bias" in name or "position_bias" in name:
                p.add_(torch.randn_like(p))  # non-trivial biases and match weights
    return model


def test_extracted_scores_times_values_reproduce_every_layers_attention_output() -> None:
    """Faithfulness: per user, the captured scores times V equal the attention output the layer
    gets, here recomputed by the jagged backend (independent code) from the same inputs."""
    model = _random_model()
    batch = random_batch(model.schema, 5, seed=3)
    records = capture(model, batch)
    assert len(records) == len(layer_names(model)) == 4  # (1:1)x2
    for rec in records:
        expected = jagged_attention(rec.q, rec.k, rec.v, rec.queries, rec.layout, rec.params)  # [Nq, H, dv]
        row_of_token = {int(t): i for i, t in enumerate(rec.queries.index.tolist())}
        for b in range(batch.batch_size):
            scores = user_scores(rec, b)
            got = attention_output(scores, rec.v)
            rows = torch.tensor([row_of_token[int(t)] for t in scores.q_token])
            torch.testing.assert_close(got, expected[rows], rtol=1e-10, atol=1e-12)


def test_recording_changes_nothing() -> None:
    """The hook only records: outputs and logits are bit-identical with and without it, and the
    model on the reference backend gives the jagged model's logits."""
    model = _random_model()
    batch = random_batch(model.schema, 4, seed=5)
    with torch.no_grad():
        plain = model(batch).logits
        with record_scores() as records:
            recorded = model(batch).logits
        assert len(records) == len(layer_names(model))
        jagged = MTFM(model.schema, model.config.model_copy(update={"attention_backend": "jagged"})).double().eval()
        jagged.load_state_dict(model.state_dict())
        other = jagged(batch).logits
    for name in plain:
        assert torch.equal(plain[name], recorded[name])
        torch.testing.assert_close(plain[name], other[name])


def test_masked_pairs_are_exactly_zero_t_never_sees_another_t_and_r_only_when_earlier() -> None:
    model = _random_model()
    batch = random_batch(model.schema, 6, seed=7)
    ttype, times = batch.layout.token_type, batch.layout.timestamps
    for rec in capture(model, batch):
        assert torch.all(rec.weights[~rec.mask[:, None].expand_as(rec.weights)] == 0)
        for b in range(batch.batch_size):
            s = user_scores(rec, b)
            qt, kt = ttype[s.q_token], ttype[s.k_token]
            t_rows = qt == TOKEN_T
            other_t = (kt[None, :] == TOKEN_T) & (s.q_token[:, None] != s.k_token[None, :])
            assert not s.mask[t_rows][:, :][other_t[t_rows]].any()
            assert torch.all(s.weights[:, t_rows][:, other_t[t_rows]] == 0)
            later_r = (kt[None, :] == TOKEN_R) & (times[s.k_token][None, :] >= times[s.q_token][:, None])
            own = s.q_token[:, None] == s.k_token[None, :]
            assert not s.mask[later_r & ~own].any()
            assert s.mask[:, kt == TOKEN_H].all()  # history: visible to every query


def test_age_buckets_follow_the_edges() -> None:
    ages = torch.tensor([0, 599, 600, 1799, 1800, AGE_EDGES_S[-1] - 1, AGE_EDGES_S[-1], 10**9])
    assert age_bucket(ages).tolist() == [0, 0, 1, 1, 2, len(AGE_EDGES_S) - 1, len(AGE_EDGES_S), len(AGE_EDGES_S)]


# --------------------------------------------------------------------------------------------
# End to end on a tiny trained synthetic run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data, model = prepare_synthetic(root / "data", users=120), write_tiny_model_yaml(root / "tiny.yaml")
    run = str(root / "run")
    assert main(["train", "--data", data, "--out", run, "--model", model, "--quiet", "--batch-size", "16",
                 "--epochs", "1", "--lr", "1e-3"]) == 0
    return root, data, run


def _a_test_user(data: str, run: str) -> tuple[int, object]:
    """A test-split user with exposures of two scenarios and real-time tokens, and its one-user batch."""
    from mtfm.model.batch_ops import select_users
    from mtfm.train.evaluate import checkpoint_loader, scenario_checkpoints

    ckpt = next(iter(scenario_checkpoints(run, "best-overall").values()))
    model = load_reference_model(ckpt)
    loader = checkpoint_loader(ckpt, data, "test", model.schema.scenario_names, 16)
    for batch in loader.iterate(0):
        for b in range(batch.batch_size):
            one = select_users(batch, [b])
            scenarios = sum(sc.num_rows > 0 for sc in one.scenarios.values())
            if scenarios >= 2 and one.realtime["recent_clicks"].num_rows > 0:
                return int(one.user_ids[0]), one
    raise AssertionError("no suitable test user in the tiny world")


def test_explain_writes_pngs_whose_pixels_are_the_json_matrices(world) -> None:
    root, data, run = world
    user, one = _a_test_user(data, run)
    out = root / "out_plot"
    res = explain_run(ExplainOptions(run=Path(run), data=Path(data), out=out, users=10, user=user, batch_size=8))
    doc = json.loads((out / "explain.json").read_text())
    assert set(doc["scopes"]) == {"users", f"user_{user}"}
    assert doc["scopes"]["users"]["users"] == 10 and doc["scopes"][f"user_{user}"]["users"] == 1
    assert set(doc["scopes"]["users"]["views"]) == {"source", "sequence", "age_history", "age_realtime",
                                                     "match_cuisine", "match_cuisine_realtime_age"}
    assert doc["scopes"]["users"]["views"]["source"]["columns"] == [
        "H search", "H HP", "H PHF", "H SQS", "R:recent_clicks", "self"]
    assert len(doc["plots"]) == 2 * 8 and set(res.plotted) == set(doc["plots"])
    for name, spec in doc["plots"].items():
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        view = doc["scopes"][spec["scope"]]["views"][spec["view"]]
        expected = [from_json(view["layers"][layer][spec["stat"]]) for layer in doc["layers"]]
        expected.append(from_json(view["all_layers"][spec["stat"]]))
        assert spec["panels"] == doc["layers"] + ["mean over layers"]
        assert len(res.plotted[name]) == len(expected)
        for drawn, want in zip(res.plotted[name], expected):
            np.testing.assert_array_equal(drawn, want)  # NaN (no visible pair) drawn where JSON says null
    for scope in doc["scopes"].values():
        assert all(v == 0.0 for v in scope["masked_abs_sum"].values())


def test_json_blocks_equal_a_brute_force_count_over_one_users_tokens(world) -> None:
    """The user's ``source`` and ``match_cuisine_realtime_age`` matrices recomputed pair by pair from
    the captured scores and the raw batch (each H action's ``scenario`` id, each R token's cuisine
    and age against the exposure's, the T token itself)."""
    root, data, run = world
    user, one = _a_test_user(data, run)
    out = root / "out_brute"
    doc = explain_run(ExplainOptions(run=Path(run), data=Path(data), out=out, users=0, user=user)).result
    scope = doc["scopes"][f"user_{user}"]
    model = load_reference_model(doc["checkpoint"])
    records = capture(model, one)
    names = {0: "search", 1: "HP", 2: "PHF", 3: "SQS"}
    layout = one.layout
    groups = list(one.history) + list(one.realtime) + list(one.scenarios)
    views = {v: scope["views"][v]["columns"] for v in ("source", "match_cuisine_realtime_age")}

    def cuisine(token: int) -> int:
        group, row = groups[int(layout.group_ids[token])], int(layout.source_row[token])
        part = one.scenarios[group].item if group in one.scenarios else \
            (one.history.get(group) or one.realtime[group]).features
        return int(part.categorical["cuisine"][row])

    def columns(q: int, k: int) -> dict[str, str]:
        group = groups[int(layout.group_ids[k])]
        if k == q:
            return {"source": "self"}
        if int(layout.token_type[k]) == TOKEN_H:
            source = int(one.history[group].features.categorical["scenario"][int(layout.source_row[k])])
            return {"source": f"H {names[source]}"}
        age = int(layout.timestamps[q] - layout.timestamps[k])
        bucket = sum(age >= edge for edge in AGE_EDGES_S)
        same = "same" if cuisine(q) == cuisine(k) else "other"
        return {"source": f"R:{group}", "match_cuisine_realtime_age": f"R {same} {AGE_LABELS[bucket]}"}

    for layer, rec in zip(doc["layers"], records):
        s = user_scores(rec, 0)
        w = s.weights.double().mean(0)  # as the library: heads averaged in float64
        sums = {v: np.zeros((3, len(c))) for v, c in views.items()}
        pairs = {v: np.zeros((3, len(c)), dtype=int) for v, c in views.items()}
        for i, q in enumerate(s.q_token.tolist()):
            if int(layout.token_type[q]) != TOKEN_T:
                continue
            row = model.schema.scenario_names.index(groups[int(layout.group_ids[q])])
            for j, k in enumerate(s.k_token.tolist()):
                if not bool(s.mask[i, j]):
                    assert float(w[i, j]) == 0.0
                    continue
                for view, label in columns(q, k).items():
                    sums[view][row, views[view].index(label)] += float(w[i, j])
                    pairs[view][row, views[view].index(label)] += 1
        for view in views:
            got = scope["views"][view]["layers"][layer]
            assert got["pairs"] == pairs[view].tolist(), view
            want = np.where(pairs[view] > 0, sums[view] / np.maximum(pairs[view], 1), np.nan)
            np.testing.assert_allclose(from_json(got["mean_weight"]), want, rtol=1e-9, atol=1e-15)
        self_pairs = pairs["source"][:, views["source"].index("self")].sum()
        assert self_pairs == sum(sc.num_rows for sc in one.scenarios.values())
        assert pairs["match_cuisine_realtime_age"].sum() > 0


def test_the_command_prints_the_summary_and_refuses_bad_input_by_name(world, capsys) -> None:
    root, data, run = world
    out = root / "out_cli"
    assert main(["explain", "--run", run, "--data", data, "--out", str(out), "--users", "4", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| T scenario \\ key | H search | H HP | H PHF | H SQS | R:recent_clicks | self |" in printed
    assert (out / "users_source_mean_weight.png").is_file()

    # an existing output is refused, replaced with --overwrite; a foreign directory never
    assert main(["explain", "--run", run, "--data", data, "--out", str(out), "--users", "2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["explain", "--run", run, "--data", data, "--out", str(out), "--users", "2", "--overwrite"]) == 0
    assert json.loads((out / "explain.json").read_text())["scopes"]["users"]["users"] == 2
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["explain", "--run", run, "--data", data, "--out", str(foreign), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (foreign / "notes.txt").is_file()

    # an unknown user id, an unknown split
    assert main(["explain", "--run", run, "--data", data, "--out", str(root / "o2"), "--user", "987654321"]) == 2
    assert "unknown user id 987654321" in capsys.readouterr().err
    assert main(["explain", "--run", run, "--data", data, "--out", str(root / "o3"), "--split", "nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err


def test_data_other_than_the_runs_is_refused(world, capsys) -> None:
    root, _, run = world
    other = prepare_synthetic(root / "other", users=40, seed=1)
    assert main(["explain", "--run", run, "--data", other, "--out", str(root / "o4"), "--users", "2"]) == 2
    err = capsys.readouterr().err
    assert "not the data" in err and "--allow-other-data" in err


def test_a_missing_matplotlib_is_named(world, monkeypatch, capsys) -> None:
    root, data, run = world
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["explain", "--run", run, "--data", data, "--out", str(root / "o5"), "--users", "2"]) == 2
    assert "pip install 'mtfm[plots]'" in capsys.readouterr().err
    assert not (root / "o5").exists()
