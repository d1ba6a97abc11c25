"""Inference: request-level scoring over a cached user prefix (M-Falcon, :mod:`mtfm.serve.falcon`),
a per-user cache of prefixes across requests (:mod:`mtfm.serve.prefix_cache`), batch
prediction of a prepared split (:mod:`mtfm.serve.predict`) and the HTTP service: the SQLite
behaviour store (:mod:`mtfm.serve.store`), request scoring (:mod:`mtfm.serve.scoring`) and the
FastAPI app (:mod:`mtfm.serve.server`, imported on its own: FastAPI is the ``serve`` extra)."""

from mtfm.serve.falcon import UserPrefix, compute_prefix, score_candidates
from mtfm.serve.prefix_cache import PrefixCache

__all__ = ["PrefixCache", "UserPrefix", "compute_prefix", "score_candidates"]
