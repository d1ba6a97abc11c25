"""Baseline models behind the same interface as MTFM: ``model(batch).logits[scenario]`` and ``model.loss``."""
