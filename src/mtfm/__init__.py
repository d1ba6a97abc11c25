"""mtfm: multi-scenario recommendation foundation model (MTFM, Meituan 2026)."""

__version__ = "0.1.0"
