"""Inference: request-level scoring over a cached user prefix (M-Falcon, :mod:`mtfm.serve.falcon`),
a per-user cache of prefixes across requests (:mod:`mtfm.serve.prefix_cache`) and batch
prediction of a prepared split (:mod:`mtfm.serve.predict`)."""

from mtfm.serve.falcon import UserPrefix, compute_prefix, score_candidates
from mtfm.serve.prefix_cache import PrefixCache

__all__ = ["PrefixCache", "UserPrefix", "compute_prefix", "score_candidates"]
