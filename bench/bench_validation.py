"""Validation gate throughput (issue 3): a 1,000,000-row products table, and image decoding apart.

1. The whole gate (``moon3.validation.gate.validate``: Arrow read + schema, image checks, check frames, the GX
   suites, quarantine and accepted writes, reports) on mbe3-mini made with ``--scale``: 3,000 products x 334
   copies = 1,002,000 products, and as many queries. Copies reuse the images of copy 0, so this phase decodes
   only the ~4,800 distinct images; that is what the per-path cache is for. Target: < 60 s on 2 cores.
2. Image checks alone (read + hash + decode every file) on a 10,000-image sample, per thread count.

Reported: wall seconds, process CPU seconds (the machine is shared: CPU time is the steadier number), rows/s,
the per-phase split from ``validation_metrics.json`` and the load average at the start.

Run:  .venv/bin/python -m bench.bench_validation  [--copies 334 --images 10000 --cache /tmp/moon3-bench]
The generated datasets are cached under ``--cache`` (~2 min to make the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.data.schema import PRODUCTS, table_path


def _dataset(root: Path, cfg: DataConfig) -> Path:
    if not table_path(root, PRODUCTS).exists():
        print(f"making {cfg.n_products} x {cfg.scale} products in {root} ...", flush=True)
        make_sample(cfg, root, progress=True)
    return root


def bench_gate(data: Path, workers: int) -> dict:
    import great_expectations  # noqa: F401  the import (5-7 s) is a one-off per process, not per row

    from moon3.validation.config import ValidationConfig
    from moon3.validation.gate import validate

    out = Path(tempfile.mkdtemp(prefix="moon3-bench-validate-"))
    cfg = ValidationConfig(image_workers=workers)
    wall, cpu = time.perf_counter(), time.process_time()
    result = validate(cfg, data, out / "validated", out / "quarantine", out / "reports", progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    m = result.metrics
    products, queries = m["products"]["rows_in"], m["queries"]["rows_in"]
    return {
        "passed": result.passed,
        "products": products,
        "queries": queries,
        "distinct_images": m["images"]["distinct"],
        "near_duplicates_flagged": m["products"]["flagged"]["near_duplicate"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "product_rows_per_s": round(products / wall),
        "all_rows_per_s": round((products + queries) / wall),
        "phases_s": m["seconds"],
    }


def bench_images(data: Path, workers: list[int]) -> list[dict]:
    from moon3.data.schema import read_table
    from moon3.validation.images import check_images

    uris = read_table(table_path(data, PRODUCTS), PRODUCTS)["image"].tolist()
    rows = []
    for n in workers:
        wall, cpu = time.perf_counter(), time.process_time()
        checked = check_images(uris, data, decode=True, workers=n, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ok = sum(c.status == "ok" for c in checked.values())
        rows.append({"workers": n, "images": len(checked), "ok": ok, "wall_s": round(wall, 2),
                     "cpu_s": round(cpu, 2), "images_per_s": round(len(checked) / wall)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=334, help="--scale of the 3,000-product catalog")
    parser.add_argument("--images", type=int, default=10_000, help="distinct images for the decode benchmark")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="image threads to compare")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moon3-bench")
    parser.add_argument("--skip-gate", action="store_true", help="only the image benchmark")
    args = parser.parse_args()

    report = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    if not args.skip_gate:
        big = _dataset(args.cache / f"mini-3000x{args.copies}", DataConfig(n_products=3000, n_queries=3000,
                                                                            scale=args.copies))  # fmt: skip
        report["gate"] = bench_gate(big, max(args.workers))
        print(json.dumps(report["gate"], indent=2), flush=True)
    sample = _dataset(args.cache / f"mini-images-{args.images}", DataConfig(n_products=args.images, n_queries=10))
    report["images"] = bench_images(sample, args.workers)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
