"""Run every benchmark in turn (`make bench`); each prints its own table. Results go in BENCHMARKS.md by hand.

.venv/bin/python -m bench.run_all                 # all
.venv/bin/python -m bench.run_all train search    # a subset, by name
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHES = {
    "embed": ["bench/bench_embed.py"],
    "train": ["bench/bench_train.py"],
    "validation": ["-m", "bench.bench_validation"],
    "search": ["-m", "bench.bench_search"],
    "pipeline": ["bench/bench_pipeline.py"],
    "synthesis": ["-m", "bench.bench_synthesis"],
}


def main(names: list[str]) -> int:
    """Run the named benchmarks (all when none is named); return the number that failed."""
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    failed = 0
    for name in names or list(BENCHES):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, *BENCHES[name]]).returncode
        print(f"=== {name}: exit {rc}, {time.perf_counter() - start:.0f} s ===", flush=True)
        failed += rc != 0
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
