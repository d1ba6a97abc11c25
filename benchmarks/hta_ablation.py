"""HTA ablation with accuracy (paper Table 3): a thin entry point of `mtfm bench hta`
(the work is in :mod:`mtfm.bench.hta`; options: ``python benchmarks/hta_ablation.py --help``).

    OMP_NUM_THREADS=1 python benchmarks/hta_ablation.py --out runs/hta --layers 4 --seeds 0 --max-steps 20
"""

from __future__ import annotations

import sys

from mtfm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "hta", *sys.argv[1:]]))
