"""Low-latency benchmark: `epgen bench --mode low_latency` (kept for old command lines).

    python bench/bench_low_latency.py --ranks 2 --commit SHA --out DIR
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from epgen.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--mode", "low_latency", *sys.argv[1:]]))
