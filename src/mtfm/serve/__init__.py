"""Inference: request-level scoring over a cached user prefix (M-Falcon, :mod:`mtfm.serve.falcon`)."""

from mtfm.serve.falcon import UserPrefix, compute_prefix, score_candidates

__all__ = ["UserPrefix", "compute_prefix", "score_candidates"]
