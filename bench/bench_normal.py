"""Normal-mode benchmark: `epgen bench --mode normal` (kept for old command lines).

    python bench/bench_normal.py --ranks 2 --commit SHA --out DIR
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from epgen.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--mode", "normal", *sys.argv[1:]]))
