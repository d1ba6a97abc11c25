"""The HTTP service on a real uvicorn server on a free loopback port: valid requests, invalid ones
(4xx naming the field, never 5xx), limits, actions through HTTP, /metrics, the `mtfm serve`
command, and a property-based fuzz of the API from its own OpenAPI schema (schemathesis)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fixtures import behaviour_rows, candidate_of, served  # noqa: F401 -- the session fixture

from mtfm.serve.server import Limits, create_app, running_server

LIMITS = Limits(max_body_bytes=64_000, max_candidates=50, max_actions=20, max_inline_rows=500)


@pytest.fixture(scope="module")
def api(served):
    scorer = served.scorer(served.fresh_store("http"))
    with running_server(create_app(scorer, LIMITS)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, scorer


def _hp_request(served, scorer, user: int = 4, n: int = 3) -> dict:
    hp = served.raw.tables["exposures_hp"].with_row_index("row").filter(pl.col("user_id") == user)
    cols = list(scorer.request_columns["HP"])
    cands = [candidate_of(served.raw, "exposures_hp", int(r), cols) for r in hp["row"][:n]]
    return {"scenario": "HP", "user_id": user, "timestamp": int(hp["ts"][0]), "candidates": cands}


def _detail(response: httpx.Response) -> str:
    return response.json()["detail"]


def test_health_openapi_and_a_valid_score(api, served):
    client, scorer = api
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and set(health["scenarios"]) == {"HP", "PHF", "SQS"}
    schema = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/actions", "/healthz", "/metrics"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["ScoreRequest"]["properties"]["scenario"]["enum"] == ["HP", "PHF", "SQS"]
    body = _hp_request(served, scorer)
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out["scores"]) == {"ctr", "ctcvr"} and all(len(v) == 3 for v in out["scores"].values())
    assert out["model_version"] == health["model_version"]["HP"]
    direct = scorer.score("HP", body["user_id"], body["candidates"], timestamp=body["timestamp"])
    for task, values in direct.scores.items():
        assert out["scores"][task] == pytest.approx(values, abs=1e-6)
    # candidates keep the request's order whatever their timestamps
    shuffled = {**body, "candidates": [{**c, "ts": body["timestamp"] + 10 - i} for i, c in
                                       enumerate(body["candidates"])]}
    rev = client.post("/v1/score", json={**shuffled, "candidates": shuffled["candidates"][::-1]}).json()
    fwd = client.post("/v1/score", json=shuffled).json()
    assert rev["scores"]["ctr"] == pytest.approx(fwd["scores"]["ctr"][::-1], abs=1e-6)


@pytest.mark.parametrize("change, status, field", [
    (lambda b: b.pop("candidates"), 422, "candidates: Field required"),
    (lambda b: b.update(candidates=[]), 422, "candidates"),
    (lambda b: b.update(scenario="NOPE"), 422, "scenario: unknown scenario"),
    (lambda b: b.update(user_id="abc"), 422, "user_id"),
    (lambda b: b.update(extra=1), 422, "extra"),
    (lambda b: b["candidates"][1].update(cuisine="thai"), 422, "candidates[1].cuisine"),
    (lambda b: b["candidates"][0].update(cuisine=99), 422, "cuisine"),
    (lambda b: b["candidates"][0].pop("rating"), 422, "candidates[0]: missing feature(s) ['rating']"),
    (lambda b: b["candidates"][0].update(rating=1e300), 422, "candidates[0].rating"),
    (lambda b: b["candidates"][0].update(bogus=1), 422, "candidates[0]: unknown column(s) ['bogus']"),
    (lambda b: b["candidates"][0].update(ts=1), 422, "candidates[1].ts"),
    (lambda b: b["candidates"][0].update(restaurant_id=[1, 2]), 422, "candidates[0].restaurant_id"),
    (lambda b: b.update(user_features={"nope": 1}), 422, "user_features"),
    (lambda b: b.update(behaviour={"clicks": [{"ts": 1}]}), 422, "behaviour.clicks[0]"),
    (lambda b: b.update(behaviour={"nope": []}), 422, "behaviour: unknown table"),
    (lambda b: b.update(behaviour={"clicks": [{"ts": 5, "scenario": 1, "item_id": 1, "cuisine": 99,
                                               "price_bucket": 1}]}), 422, "behaviour.clicks: "),
    (lambda b: b.update(timestamp=-1), 422, "timestamp"),
    (lambda b: b.update(candidates=b["candidates"] * 20), 413, "candidates: 60 items, the limit is 50"),
])
def test_invalid_requests_get_a_4xx_naming_the_field(api, served, change, status, field):
    client, scorer = api
    body = _hp_request(served, scorer)
    change(body)
    r = client.post("/v1/score", json=body)
    assert r.status_code == status, r.text
    assert field in _detail(r)


def test_malformed_bodies_and_oversized_ones_never_crash_the_process(api, served):
    client, scorer = api
    for raw, field in ((b"{", "body: JSON decode error"), (b"[]", "body"), (b"null", "body"),
                       (b'{"scenario": NaN}', "scenario"), ("\u00ff".encode("latin-1"), "body"),
                       (b'{"candidates": {}}', "candidates: Input should be a valid list")):
        r = client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and field in _detail(r), (raw, r.text)
    big = client.post("/v1/score", content=b" " * 70_000, headers={"content-type": "application/json"})
    assert big.status_code == 413 and _detail(big).startswith("body:")
    streamed = client.post("/v1/score", content=iter([b" " * 40_000, b" " * 40_000]),
                           headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert client.post("/v1/score", content=b"x", headers={"content-type": "text/plain"}).status_code == 422
    assert client.get("/healthz").status_code == 200


def test_actions_through_http_reach_the_next_score_and_bad_ones_are_refused(api, served):
    client, scorer = api
    body = _hp_request(served, scorer, user=9)
    client.post("/v1/score", json=body)
    assert client.post("/v1/score", json=body).json()["prefix_cache"] == "hit"
    before = client.post("/v1/score", json=body).json()["scores"]
    click = {"ts": body["timestamp"] - 5, "scenario": 2, "item_id": 2000077, "cuisine": 4, "price_bucket": 1}
    bad = client.post("/v1/actions", json={"table": "clicks", "user_id": 9, "actions": [{**click, "cuisine": "x"}]})
    assert bad.status_code == 422 and "actions[0].cuisine" in _detail(bad)
    many = client.post("/v1/actions", json={"table": "clicks", "user_id": 9, "actions": [click] * 21})
    assert many.status_code == 413 and "actions" in _detail(many)
    ok = client.post("/v1/actions", json={"table": "clicks", "user_id": 9, "actions": [click]})
    assert ok.status_code == 200 and ok.json() == {"appended": 1, "user_version": 1}
    after = client.post("/v1/score", json=body).json()
    assert after["prefix_cache"] == "miss" and after["scores"] != before
    inline = behaviour_rows(served.raw, scorer.store, 9)
    inline["clicks"].append({"user_id": 9, **click})
    same = client.post("/v1/score", json={**body, "behaviour": inline}).json()
    assert same["prefix_cache"] == "off"
    assert same["scores"]["ctr"] == pytest.approx(after["scores"]["ctr"], abs=1e-5)


def test_metrics_are_prometheus_text_with_counts_latency_and_the_cache(api, served):
    client, scorer = api
    client.post("/v1/score", json=_hp_request(served, scorer))
    text = client.get("/metrics").text
    assert 'mtfm_http_requests_total{route="/v1/score",status="200"}' in text
    assert 'mtfm_http_request_seconds_bucket{le="0.1",route="/v1/score"}' in text
    assert "mtfm_prefix_cache_hit_rate " in text and "mtfm_prefix_cache_hits_total " in text
    client.get("/no/such/path")
    assert 'route="other",status="404"' in client.get("/metrics").text


def _schemathesis_cases(url: str):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    for path, method in (("/v1/score", "POST"), ("/v1/actions", "POST"), ("/healthz", "GET")):
        op = schema[path][method]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if method == "GET" and mode is GenerationMode.NEGATIVE:
                continue
            yield f"{method} {path} {mode.value}", op.as_strategy(generation_mode=mode)


def test_fuzzing_the_api_from_its_openapi_schema_gives_no_5xx(api, served):
    client, scorer = api
    url = str(client.base_url).rstrip("/")
    statuses: dict[str, list[int]] = {}
    started = time.monotonic()
    for name, strategy in _schemathesis_cases(url):
        seen = statuses.setdefault(name, [])

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case) -> None:
            response = case.call(base_url=url, timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.body, response.text)

        fuzz()
    for name, seen in statuses.items():  # shown with -s: the figures BENCHMARKS.md quotes
        print(f"fuzz {name}: {len(seen)} requests, statuses {dict(sorted(Counter(seen).items()))}")
    print(f"fuzz total {time.monotonic() - started:.1f} s")
    assert time.monotonic() - started < 90
    assert sum(len(v) for v in statuses.values()) >= 200
    assert any(s >= 400 for name, v in statuses.items() if "negative" in name for s in v)
    assert client.get("/healthz").status_code == 200


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(payload=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=20),
       keys=st.sampled_from(["candidates", "user_features", "behaviour", "timestamp", "user_id", "scenario"]))
def test_random_json_in_any_field_of_a_valid_request_gives_a_4xx_or_a_score(api, served, payload, keys):
    client, scorer = api
    body = _hp_request(served, scorer, n=1)
    body[keys] = payload
    r = client.post("/v1/score", json=body)
    assert r.status_code in (200, 413, 422), r.text


def _feature_value(value):
    """A strategy around one valid feature value: itself, or another value of any JSON type."""
    other = (st.integers(-(2**70), 2**70) | st.floats(-1e12, 1e12) | st.text(max_size=4) | st.none()
             | st.lists(st.integers(-5, 300), max_size=3))
    return st.just(value) | other


def test_perturbed_feature_values_user_ids_and_times_give_a_4xx_or_finite_scores(api, served):
    client, scorer = api
    statuses: list[int] = []

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def perturb(data) -> None:
        body = _hp_request(served, scorer, n=2)
        body["candidates"] = [{k: data.draw(_feature_value(v), label=k) for k, v in c.items()}
                              for c in body["candidates"]]
        body["user_id"] = data.draw(st.integers(-3, 10**6) | st.just(body["user_id"]), label="user_id")
        body["timestamp"] = data.draw(st.integers(0, 1 << 62) | st.none() | st.just(body["timestamp"]), label="ts")
        r = client.post("/v1/score", json=body)
        statuses.append(r.status_code)
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            assert all(0.0 <= p <= 1.0 for v in r.json()["scores"].values() for p in v)

    perturb()
    assert 200 in statuses and 422 in statuses, Counter(statuses)  # both the deep path and refusals ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_binds_loopback_and_serves(served):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtfm", "serve", "--run", str(served.run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        listening = open("/proc/net/tcp").read() if os.path.exists("/proc/net/tcp") else ""
        if listening:  # bound to 127.0.0.1 (0100007F), not every address
            assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening
    finally:
        proc.terminate()
        proc.wait(20)
    bad = subprocess.run([sys.executable, "-m", "mtfm", "serve", "--run", str(served.run), "--port", "0"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--port" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([sys.executable, "-m", "mtfm", "serve", "--run", str(served.run), "--port",
                               str(taken.getsockname()[1])], capture_output=True, text=True, env=env)
    assert busy.returncode == 2 and "cannot listen there" in busy.stderr, busy.stderr


def test_concurrent_appends_and_scores_keep_every_row_and_an_intact_store(api, served):
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    client, scorer = api
    path = scorer.store.path
    with sqlite3.connect(path) as conn:
        before = conn.execute('SELECT count(*) FROM "b:clicks"').fetchone()[0]
    users = [20, 21, 22, 23]
    body = {u: _hp_request(served, scorer, user=u, n=2) for u in users}

    def work(i: int) -> list[int]:
        u = users[i % len(users)]
        click = {"ts": body[u]["timestamp"] - 1 - i, "scenario": 0, "item_id": 1000 + i, "cuisine": i % 12,
                 "price_bucket": i % 4}
        a = client.post("/v1/actions", json={"table": "clicks", "user_id": u, "actions": [click]})
        s = client.post("/v1/score", json=body[u])
        return [a.status_code, s.status_code]

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for pair in pool.map(work, range(40)) for s in pair]
    assert set(statuses) == {200}
    with sqlite3.connect(path) as conn:
        assert conn.execute('SELECT count(*) FROM "b:clicks"').fetchone()[0] == before + 40
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [scorer.store.user_version(u) for u in users] == [10, 10, 10, 10]
    # the last score of each user saw all of its appends: it equals a fresh score without the cache
    for u in users:
        cached = client.post("/v1/score", json=body[u]).json()
        fresh = scorer.score("HP", u, body[u]["candidates"], timestamp=body[u]["timestamp"],
                             behaviour={t: f.to_dicts() for t, f in scorer.store.user_rows(u).items()})
        assert cached["scores"]["ctr"] == pytest.approx(fresh.scores["ctr"], abs=1e-5)
