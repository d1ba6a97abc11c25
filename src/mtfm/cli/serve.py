"""``mtfm serve``: a trained run as an HTTP service (FastAPI + uvicorn) over a behaviour store."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtfm.train.evaluate import CHECKPOINT_CHOICES

DESCRIPTION = """\
Serve RUN over HTTP: POST /v1/score ({scenario, user_id, candidates, optional timestamp,
user_features and inline behaviour} -> probability per task and candidate, model version),
POST /v1/actions (append a user's new behaviour rows; the next score sees them), GET /healthz,
GET /metrics (Prometheus text) and the OpenAPI schema at /openapi.json (docs at /docs).

Scores come from the training feature code and M-Falcon over the user's prefix, kept in a
per-user cache (LRU under --cache-mb, --cache-ttl seconds, invalidated by an append). User
behaviour is read from a SQLite file (--store, default RUN/serve/behaviour.sqlite), built on
first use from the raw behaviour tables of the source DIR was prepared from."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="an HTTP scoring service (FastAPI) over a behaviour store",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", metavar="RUN", required=True, help="run directory written by `mtfm train`")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="prepared data directory (default: the one the run recorded)")
    p.add_argument("--store", metavar="FILE", default=None, help="behaviour store (default RUN/serve/behaviour.sqlite)")
    p.add_argument("--build-store", action="store_true", help="build the store (if missing) and exit")
    p.add_argument("--rebuild-store", action="store_true", help="build the store again from DIR's source")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                   help="best: each scenario from its own best epoch (default); best-overall; last")
    p.add_argument("--micro-batch", type=int, default=256, help="M-Falcon candidates per micro-batch (default 256)")
    p.add_argument("--cache-mb", type=float, default=256.0, help="prefix cache bound in MiB (0: no cache)")
    p.add_argument("--cache-ttl", type=float, default=300.0, help="prefix cache entry lifetime in seconds")
    p.add_argument("--max-candidates", type=int, default=4096, help="candidates per request (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="request body size (more: 413)")
    p.add_argument("--max-actions", type=int, default=1000, help="actions per append (more: 413)")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="requests scored at once, the others queue (default: the number of CPU cores)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="serve although DIR is not the data RUN was trained on")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("port", "micro_batch", "max_candidates", "max_body_bytes", "max_actions", "max_inflight"):
        value = getattr(args, name)
        if value is None:
            continue
        if value < 1 or (name == "port" and value > 65535):
            raise ValueError(f"--{name.replace('_', '-')}: {value} is out of range")
    if args.cache_mb < 0 or args.cache_ttl <= 0:
        raise ValueError(f"--cache-mb must be >= 0 and --cache-ttl > 0 (got {args.cache_mb}, {args.cache_ttl})")


def _check_bindable(host: str, port: int) -> None:
    """Fail before the models load when the address cannot be bound (in use, not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as err:
        raise ValueError(f"--host/--port {host}:{port}: cannot listen there ({err.strerror or err})") from None


def run(args: argparse.Namespace) -> int:
    from mtfm.serve.scoring import make_scorer, run_data_dir
    from mtfm.serve.store import open_or_build_store

    _check_args(args)
    data = Path(args.data) if args.data else run_data_dir(args.run)
    store_path = Path(args.store) if args.store else Path(args.run) / "serve" / "behaviour.sqlite"
    store = open_or_build_store(data, store_path, rebuild=args.rebuild_store)
    print(f"behaviour store {store_path}: tables {store.tables}")
    if args.build_store:
        return 0
    try:
        import fastapi  # noqa: F401 -- the serve extra, checked before the models load
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ValueError(f"mtfm serve needs the serve extra ({err.name} is missing): pip install 'mtfm[serve]'") from None
    _check_bindable(args.host, args.port)
    scorer = make_scorer(args.run, data, store, checkpoint=args.checkpoint, cache_bytes=int(args.cache_mb * 2**20),
                         cache_ttl_s=args.cache_ttl, micro_batch=args.micro_batch,
                         allow_other_data=args.allow_other_data)
    from mtfm.serve.server import Limits, create_app

    limits = Limits(max_body_bytes=args.max_body_bytes, max_candidates=args.max_candidates,
                    max_actions=args.max_actions, **({"max_inflight": args.max_inflight} if args.max_inflight else {}))
    print(f"serving {sorted(scorer.models)} on http://{args.host}:{args.port} (OpenAPI: /openapi.json)", flush=True)
    uvicorn.run(create_app(scorer, limits), host=args.host, port=args.port, log_level="warning")
    return 0
