"""Scaling study (paper Figure 4): a thin entry point of `mtfm bench scaling` (the work is in
:mod:`mtfm.bench.scaling`; options: ``python benchmarks/scaling.py --help``).

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --out runs/scaling --workers 2
"""

from __future__ import annotations

import sys

from mtfm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "scaling", *sys.argv[1:]]))
