"""Attention heatmaps of a trained MTFM run (``mtfm explain``, issue 16).

Which behaviour does a scenario's T-token attend to: the actions of which source scenario, how
old, of the same item attribute or not? :mod:`~mtfm.explain.capture` takes the scores from the
model's own reference attention (no second implementation), :mod:`~mtfm.explain.groups` sorts
query and key tokens into heatmap rows and columns, :mod:`~mtfm.explain.accumulate` sums them
block-wise over users, :mod:`~mtfm.explain.plot` draws them and :mod:`~mtfm.explain.run` ties it
to a run directory and a split.
"""

from mtfm.explain.capture import UserScores, attention_output, capture, layer_names, load_reference_model, user_scores
from mtfm.explain.groups import Grouping, make_grouping, token_table
from mtfm.explain.run import ExplainOptions, ExplainResult, explain_run, format_summary

__all__ = [
    "ExplainOptions",
    "ExplainResult",
    "Grouping",
    "UserScores",
    "attention_output",
    "capture",
    "explain_run",
    "format_summary",
    "layer_names",
    "load_reference_model",
    "make_grouping",
    "token_table",
    "user_scores",
]
