"""The HTTP service (FastAPI): ``POST /v1/score``, ``POST /v1/actions``, ``GET /healthz``,
``GET /metrics`` (Prometheus text) and the OpenAPI schema at ``/openapi.json``.

The app is a thin layer over :class:`mtfm.serve.scoring.Scorer`: it validates requests with
pydantic models (unknown fields refused), enforces the limits of :class:`Limits` (body size:
413; candidates, actions and inline rows per request: 413, naming the field), and turns every
error the request caused into a 4xx whose ``detail`` starts with the field
(``candidates[2].cuisine: expected an integer, got str``). Any other exception is a bug: it is
answered 500 and counted, never allowed to stop the process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from mtfm.data.validate import DataError
from mtfm.serve.scoring import Scorer

INT64 = (1 << 63) - 1
Scalar = StrictInt | StrictFloat | StrictStr
Value = Scalar | list[Scalar] | None
Row = dict[Annotated[str, Field(max_length=256)], Value]
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
ROUTES = ("/v1/score", "/v1/actions", "/healthz", "/metrics", "/openapi.json")


@dataclass(frozen=True)
class Limits:
    """What one request may hold (a bound on the work and memory one client can ask for)."""

    max_body_bytes: int = 8 << 20
    max_candidates: int = 4096
    max_actions: int = 1000
    max_inline_rows: int = 10_000
    max_inflight: int = max(1, os.cpu_count() or 1)  # requests scored at once; the others wait their turn


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ScoreRequest(_Strict):
    scenario: str = Field(min_length=1, max_length=128, description="scenario name of the trained run")
    user_id: int = Field(ge=-INT64 - 1, le=INT64)
    timestamp: int | None = Field(default=None, ge=0, le=1 << 62,
                                  description="request time in the schema's unit (default: now)")
    user_features: Row = Field(default_factory=dict, description="the scenario's user features, for every candidate")
    behaviour: dict[Annotated[str, Field(max_length=256)], list[Row]] | None = Field(
        default=None, description="the user's behaviour rows per table, instead of the store's")
    candidates: list[Row] = Field(min_length=1, description="feature columns of each candidate (and optional ts)")


class ScoreResponse(BaseModel):
    scenario: str
    user_id: int
    model_version: str
    scores: dict[str, list[float]] = Field(description="task -> probability per candidate, in request order")
    prefix_cache: str = Field(description="hit, miss, or off (inline behaviour)")


class ActionsRequest(_Strict):
    table: str = Field(min_length=1, max_length=256, description="behaviour table, e.g. clicks")
    user_id: int = Field(ge=-INT64 - 1, le=INT64)
    actions: list[Row] = Field(min_length=1, description="rows: the time column and the table's features")


class ActionsResponse(BaseModel):
    appended: int
    user_version: int


class Health(BaseModel):
    status: str
    model_version: dict[str, str]
    scenarios: list[str]


def _field(loc: tuple | list) -> str:
    """A pydantic error location as a field path: ('body', 'candidates', 0, 'x') -> candidates[0].x"""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_message(errors: list[dict]) -> str:
    """One line naming each invalid field and why (at most five)."""
    parts = [f"body: {e.get('msg')} at character {list(e.get('loc', ()))[-1]}" if e.get("type") == "json_invalid"
             else f"{_field(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app parses it, by its
    Content-Length or, for a streamed (chunked) body, while it is read in: the body is read
    here, at most ``max_bytes`` of it, and handed to the app whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable[[dict], Awaitable[None]]) -> None:
        body = f'{{"detail":"body: larger than the limit of {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _CacheCollector:
    """Prometheus collector of the prefix cache and prefix computations, read at scrape time."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def collect(self):
        cache, stats = self.scorer.cache, self.scorer.stats
        if cache is not None:
            for name, value in (("hits", cache.stats.hits), ("misses", cache.stats.misses),
                                ("evictions", cache.stats.evictions)):
                yield CounterMetricFamily(f"mtfm_prefix_cache_{name}", f"prefix cache {name}", value=value)
            yield GaugeMetricFamily("mtfm_prefix_cache_hit_rate", "prefix cache hits / lookups",
                                    value=cache.stats.hit_rate or 0.0)
            yield GaugeMetricFamily("mtfm_prefix_cache_bytes", "keys and values held", value=cache.nbytes)
            yield GaugeMetricFamily("mtfm_prefix_cache_entries", "users held", value=len(cache))
        yield CounterMetricFamily("mtfm_prefix_computed", "user prefixes computed", value=stats.prefix_computed)
        yield CounterMetricFamily("mtfm_prefix_compute_seconds", "time spent computing prefixes",
                                  value=stats.prefix_seconds)


def _metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    requests = Counter("mtfm_http_requests", "HTTP requests by route and status", ["route", "status"],
                       registry=registry)
    latency = Histogram("mtfm_http_request_seconds", "request latency by route", ["route"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    return requests, latency


def create_app(scorer: Scorer, limits: Limits | None = None) -> FastAPI:
    """The service over ``scorer`` (see the module docstring)."""
    limits = limits or Limits()
    app = FastAPI(title="mtfm", description="MTFM scores per scenario, task and candidate", version="1")
    registry = CollectorRegistry()
    registry.register(_CacheCollector(scorer))
    requests, latency = _metrics(registry)
    # Scoring is CPU work that holds the GIL much of the time: more threads at it than cores only
    # trade throughput for lock hand-offs, so at most max_inflight requests score at once.
    gate = threading.BoundedSemaphore(limits.max_inflight)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        route = request.url.path if request.url.path in ROUTES else "other"
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 -- a bug: answered 500 and counted, the process goes on
            response = JSONResponse({"detail": "internal error"}, status_code=500)
        latency.labels(route).observe(time.perf_counter() - t0)
        requests.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in err.errors()]
        return JSONResponse({"detail": validation_message(errors), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = f"body: {err.detail}" if err.status_code == 400 else err.detail  # e.g. bytes that are not UTF-8
        return JSONResponse({"detail": detail}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(DataError)
    async def bad_data(_: Request, err: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    def too_many(field: str, n: int, limit: int) -> JSONResponse:
        return JSONResponse({"detail": f"{field}: {n} items, the limit is {limit}"}, status_code=413)

    @app.post("/v1/score", response_model=ScoreResponse,
              responses={413: {"description": "body or candidates over the limit"},
                         422: {"description": "invalid request; detail names the field"}})
    def score(req: ScoreRequest):
        if len(req.candidates) > limits.max_candidates:
            return too_many("candidates", len(req.candidates), limits.max_candidates)
        for table, rows in (req.behaviour or {}).items():
            if len(rows) > limits.max_inline_rows:
                return too_many(f"behaviour.{table}", len(rows), limits.max_inline_rows)
        with gate:
            result = scorer.score(req.scenario, req.user_id, req.candidates, req.user_features, req.behaviour,
                                  req.timestamp)
        return ScoreResponse(scenario=req.scenario, user_id=req.user_id, model_version=result.model_version,
                             scores=result.scores, prefix_cache=result.prefix_cache)

    @app.post("/v1/actions", response_model=ActionsResponse,
              responses={413: {"description": "body or actions over the limit"},
                         422: {"description": "invalid request; detail names the field"}})
    def actions(req: ActionsRequest):
        if len(req.actions) > limits.max_actions:
            return too_many("actions", len(req.actions), limits.max_actions)
        with gate:
            n = scorer.append_actions(req.table, req.user_id, req.actions)
        return ActionsResponse(appended=n, user_version=scorer.store.user_version(req.user_id))

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok", scenarios=scorer.scenarios,
                      model_version={s: m.version for s, m in scorer.models.items()})

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    app.openapi = lambda: _openapi_with_names(app, scorer)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


def _openapi_with_names(app: FastAPI, scorer: Scorer) -> dict:
    """The OpenAPI schema with this run's scenario and behaviour table names as enums, so that
    clients (and the fuzzer) see which names are valid."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        props = schema["components"]["schemas"]
        props["ScoreRequest"]["properties"]["scenario"]["enum"] = scorer.scenarios
        props["ActionsRequest"]["properties"]["table"]["enum"] = scorer.store.tables
        app.openapi_schema = schema
    return app.openapi_schema


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread on ``host:port`` (0: a free port, bound
    here first so no other process can take it in between); yields the base URL and stops the
    server on exit. For tests and the load test's in-process mode."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mtfm-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
