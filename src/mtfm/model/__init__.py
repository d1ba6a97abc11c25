"""The MTFM model (paper section 3.2): tokenizers, Hybrid Target Attention stack, MMoE heads.

Public names are loaded on first use (PEP 562), so ``mtfm.kernels`` and ``mtfm.model.mask``
can import each other's modules without an import cycle through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MTFM": "mtfm.model.mtfm",
    "ModelOutput": "mtfm.model.mtfm",
    "ScenarioSubgraph": "mtfm.model.mtfm",
    "ModelConfig": "mtfm.model.config",
    "ModelConfigError": "mtfm.model.config",
    "load_model_config": "mtfm.model.config",
    "parse_hta": "mtfm.model.config",
    "count_parameters": "mtfm.model.flops",
    "count_flops": "mtfm.model.flops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mtfm.model' has no attribute {name!r}")
