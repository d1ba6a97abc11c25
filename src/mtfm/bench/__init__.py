"""Benchmarks that are part of the library (so `mtfm bench ...`, the scripts in benchmarks/ and the
tests run the same code): :mod:`mtfm.bench.hta` is the HTA ablation of paper Table 3."""
