"""Scenario export (issue 12 item 5): the request backend equals the reference, the request graph
equals the model's forward, the host's padding is exact, the exported program (and its AOTInductor
and ONNX forms) equals eager PyTorch at every request length, holds only its scenario's weights,
and a trained run's artifact scores raw rows as `mtfm predict` does."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_fixtures import candidate_of, served  # noqa: F401 -- the session fixture

from mtfm.cli import main
from mtfm.data.batch import TOKEN_T
from mtfm.kernels import AttentionParams, reference_attention
from mtfm.kernels.common import AttentionLayout
from mtfm.kernels.request import request_attention, request_layout
from mtfm.model import MTFM
from mtfm.model.batch_ops import restrict_batch
from mtfm.model.testing import BatchShape, random_batch, tiny_config, tiny_schema
from mtfm.serve.artifact import SPEC_FILE, ExportedScenario, write_artifact
from mtfm.serve.export import RequestInputs, pad_request, request_inputs
from mtfm.serve.predict import predict_split

SCHEMA = tiny_schema()


def _model(scenario_seed: int = 0, additions: bool = True, hta: str = "(1:1)x2", heads: int = 4,
           groups: int = 2) -> MTFM:
    torch.manual_seed(scenario_seed)
    config = tiny_config(relative_time_bias=additions, relative_position_bias=additions, final_norm=additions,
                         content_match=additions, num_heads=heads, num_kv_groups=groups).with_hta(hta)
    model = MTFM(SCHEMA, config).eval()
    with torch.no_grad():  # move the parameters initialised to constants, so every one of them matters
        for name, p in model.named_parameters():
            if "gln" in name or "_bias" in name or "norm" in name or "match_scale" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _request(scenario: str, seed: int, history: int, realtime: int, candidates: int):
    lengths = {s.name: [history] for s in SCHEMA.history}
    lengths.update({s.name: [realtime] for s in SCHEMA.realtime})
    lengths[scenario] = [candidates]
    shape = BatchShape(history=max(history, 1), realtime=max(realtime, 1), exposures=max(candidates, 1))
    return restrict_batch(random_batch(SCHEMA, 1, seed=seed, shape=shape, lengths=lengths), [scenario])


# ---- the request attention backend against the reference -------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), context=st.integers(0, 9), candidates=st.integers(0, 6),
       heads_groups=st.sampled_from([(2, 1), (4, 2), (4, 4)]), time_b=st.sampled_from([0, 5]),
       pos_b=st.sampled_from([0, 4]), target_only=st.booleans())
def test_request_attention_equals_the_reference_forward_and_backward(seed, context, candidates, heads_groups,
                                                                     time_b, pos_b, target_only):
    g = torch.Generator().manual_seed(seed)
    heads, groups = heads_groups
    n = context + candidates
    token_type = torch.cat([torch.randint(0, 2, (context,), generator=g), torch.full((candidates,), TOKEN_T)])
    timestamps = torch.randint(0, 40, (n,), generator=g)
    expiry = timestamps + torch.randint(-3, 30, (n,), generator=g)  # some R tokens are never seen
    layout = request_layout(token_type, timestamps, expiry, context)
    plain = AttentionLayout(layout.offsets, token_type, timestamps, torch.zeros(n, dtype=torch.long), expiry)
    kind = "target" if target_only else "all"
    queries = layout.queries(kind)
    bias = torch.randn(heads, max(time_b, 1) * max(pos_b, 1), dtype=torch.float64, generator=g) \
        if time_b or pos_b else None
    params = AttentionParams(alpha=0.4, norm=1 / 8, num_kv_groups=groups, bias=bias, time_buckets=time_b,
                             position_buckets=pos_b)
    q = torch.randn(queries.index.numel(), heads, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(n, groups, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(n, groups, 2, dtype=torch.float64, generator=g, requires_grad=True)
    got = request_attention(q, k, v, queries, layout, params)
    want = reference_attention(q, k, v, plain.queries(kind), plain, params)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if got.numel():
        w = torch.randn(got.shape, dtype=torch.float64, generator=g)
        grads = torch.autograd.grad((got * w).sum(), (q, k, v))
        ref = torch.autograd.grad((want * w).sum(), (q, k, v))
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_the_request_backend_refuses_a_layout_that_is_not_one_request():
    token_type = torch.tensor([0, TOKEN_T, 1, TOKEN_T])  # a context token after a T-token
    with pytest.raises(ValueError, match="context tokens first"):  # checked once, when the layout is built
        request_layout(token_type, torch.arange(4), None, 2)
    plain = AttentionLayout(torch.tensor([0, 4]), token_type, torch.arange(4), torch.zeros(4, dtype=torch.long))
    q, k = torch.randn(4, 2, 3), torch.randn(4, 1, 3)
    with pytest.raises(ValueError, match="request_layout"):  # a layout that is not a request's
        request_attention(q, k, k, plain.queries("all"), plain, AttentionParams(1.0, 1.0, 1))


# ---- the request graph and the host's padding, eagerly, in float64 -------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), scenario=st.sampled_from(SCHEMA.scenario_names), additions=st.booleans(),
       hta=st.sampled_from(["(1:1)x2", "(2:1)x1", "(0:2)x1", "(2:0)x1"]), history=st.integers(0, 9),
       realtime=st.integers(0, 6), candidates=st.integers(1, 7))
def test_forward_request_and_its_padding_equal_the_plain_forward(seed, scenario, additions, hta, history, realtime,
                                                                 candidates):
    model = _model(seed % 3, additions, hta).double()
    batch = _request(scenario, seed, history, realtime, candidates)
    with torch.no_grad():
        want = model(batch).logits[scenario]
        torch.testing.assert_close(model.forward_request(batch), want, atol=1e-12, rtol=1e-12)
        sub = model.scenario_subgraph(scenario)
        spec = RequestInputs(sub.schema)
        padded = pad_request(batch, spec)
        assert padded.scenarios[scenario].num_rows >= 2 and padded.layout.token_type.numel() >= candidates + 2
        torch.testing.assert_close(sub.forward_request(padded)[:candidates], want, atol=1e-12, rtol=1e-12)


def test_host_checks_name_the_field_and_refuse_what_the_graph_cannot_check():
    model = _model()
    spec = RequestInputs(model.scenario_subgraph("feed").schema)
    batch = _request("feed", 1, 4, 3, 3)
    bad = restrict_batch(random_batch(SCHEMA, 1, seed=1, shape=BatchShape(history=4, realtime=3, exposures=3),
                                      lengths={"feed": [3]}), ["feed"])
    bad.history["orders"].features.categorical["shop"][0] = 13  # hash_buckets 13: ids 0..12
    with pytest.raises(ValueError, match=r"history sequence 'orders': feature 'shop': id 13 at row 0"):
        request_inputs(spec, bad)
    with pytest.raises(ValueError, match="scores scenario 'feed'"):
        request_inputs(spec, restrict_batch(random_batch(SCHEMA, 1, seed=2, lengths={"food": [2]}), ["food"]))
    with pytest.raises(ValueError, match="one user"):
        request_inputs(spec, restrict_batch(random_batch(SCHEMA, 2, seed=3), ["feed"]))
    inputs = request_inputs(spec, batch)
    assert list(inputs) == list(spec.keys()) and all(t.dim() == 1 for t in inputs.values())


# ---- the exported program ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model(1)
    out = tmp_path_factory.mktemp("export") / "feed"
    meta = write_artifact(out, model.scenario_subgraph("feed"), None, {"run": "test"})
    return model, out, meta


LENGTHS = [(8, 7, 6), (0, 0, 1), (1, 1, 1), (0, 5, 2), (25, 11, 40), (3, 0, 0), (1, 0, 3), (0, 0, 0), (0, 1, 1),
           (2, 2, 300)]


def test_the_program_equals_eager_at_every_request_length(exported):
    model, out, _ = exported
    artifact = ExportedScenario.load(out, "program")
    for seed, (history, realtime, candidates) in enumerate(LENGTHS):
        batch = _request("feed", seed, history, realtime, candidates)
        with torch.no_grad():
            want = model(batch).logits["feed"]
        got = artifact.logits(batch)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_artifact_holds_only_its_scenarios_weights(exported):
    model, out, meta = exported
    program = torch.export.load(str(out / "program.pt2"))
    names = list(program.state_dict)
    sub = model.scenario_subgraph("feed")
    assert meta["parameters"] == sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    assert not [n for n in names if "food" in n or "coupon" in n]
    assert any("feed" in n for n in names)
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["scenario"] == "feed" and spec["tasks"] == ["ctr", "ctcvr"] and spec["inputs"] == meta["inputs"]
    with pytest.raises(FileNotFoundError, match="export it with --aoti"):
        ExportedScenario.load(out, "aoti")


# ---- a trained run, end to end: the CLI, every runtime, and `mtfm predict`'s scores ------------------


def test_export_cli_writes_every_runtime_and_scores_raw_rows_as_predict_does(served, tmp_path):  # noqa: F811
    out = tmp_path / "hp"
    assert main(["export", "--run", str(served.run), "--scenario", "HP", "--out", str(out), "--aoti", "--onnx",
                 "--parity-requests", "8"]) == 0
    meta = json.loads((out / SPEC_FILE).read_text())
    assert set(meta["files"]) == {"program.pt2", "aoti.pt2", "model.onnx", "data_manifest.json"}
    for runtime in ("program", "aoti", "onnx"):
        assert meta["parity"][runtime]["requests"] == 8 and meta["parity"][runtime]["max_abs_logit_diff"] <= 1e-4
    assert main(["export", "--run", str(served.run), "--scenario", "HP", "--out", str(out)]) == 2  # no --overwrite
    assert main(["export", "--run", str(served.run), "--scenario", "nope", "--out", str(tmp_path / "x")]) == 2

    pred = predict_split(served.run, served.data, "test", tmp_path / "p.parquet").filter(pl.col("scenario") == "HP")
    scorer = served.scorer()
    columns = list(scorer.request_columns["HP"])
    artifacts = {r: ExportedScenario.load(out, r) for r in ("program", "aoti", "onnx")}
    checked = 0
    for r in pred.head(4).iter_rows(named=True):
        candidate = candidate_of(served.raw, r["source_table"], r["source_row"], columns)
        frame = scorer.candidates_frame("HP", r["user_id"], [candidate], {})
        tables = scorer.behaviour_tables(r["user_id"], r["ts"], None)
        for artifact in artifacts.values():
            scores = artifact.score_rows(tables, r["user_id"], frame, r["ts"])
            for task, values in scores.items():
                assert values[0] == pytest.approx(r[f"score.{task}"], abs=1e-5)
                checked += 1
    assert checked == 4 * 3 * 2
