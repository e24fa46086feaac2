"""Serving throughput and latency on loopback (issue 16): `moon3 serve` in its own process, bounded load.

For batching on and off, and reasoning off and on, it sends single-item requests (mbe3-mini queries: text,
image and text+image, as a client would send them: v1 JSON with base64 images) at concurrency 1, 8 and 32, a
fixed number per level, and reports requests/s, p50/p99 latency and the mean items per forward (from the server's
``moon3_batch_size`` histogram). In the same run it measures the model's raw batched forward
(``Moon3Embedder.embed`` on the same items, batch 32, no HTTP) and one-item forwards, and prints the two ratios
the issue asks for: served (batching on, concurrency 32) vs the raw batched forward (target >= 0.8) and vs
one-request-at-a-time serving (batching off, concurrency 32; target >= 3x).

The model is a tiny one built from a generated mbe3-mini sample with reasoning allowed (so both modes can be
served); a random-weight model never closes its trace early, so reasoning-on numbers are for the full
``max_trace_tokens`` budget. The server and the raw forward use ``--threads`` torch threads (default 1); the
load generator is aiohttp in this process (on a 2-core machine it shares the second core with HTTP handling).

    .venv/bin/python bench/bench_serve.py                       # ~4 min on the 2-core dev machine
    .venv/bin/python bench/bench_serve.py --model models/rl/final --json reports/bench/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import requests
import torch

from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.data.schema import QUERIES, read_table, table_path
from moon3.model.config import ModelConfig
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts, query_item

MOON3 = str(Path(sys.executable).parent / "moon3")
PATH = "/v1/models/moon3:predict"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests_for(root: Path, n: int) -> tuple[list[dict], list[dict]]:
    """``n`` queries as model items and as v1 instances (base64 of the image files themselves)."""
    rows = read_table(table_path(root, QUERIES), QUERIES).head(n).to_dict("records")
    items, instances = [], []
    for row in rows:
        items.append(query_item(row, root))
        inst = {}
        if isinstance(row["query_text"], str) and row["query_text"].strip():
            inst["text"] = row["query_text"]
        if isinstance(row["query_image"], str) and row["query_image"]:
            inst["image"] = base64.b64encode((root / row["query_image"]).read_bytes()).decode()
        instances.append(inst)
    return items, instances


def raw_forward(model: Moon3Embedder, items: list[dict], reasoning: bool, batch: int, repeats: int) -> float:
    """Items/s of ``model.embed`` at ``batch`` items per forward (best of ``repeats`` passes over ``items``)."""
    model.embed(items[:batch], reasoning=reasoning, batch_size=batch)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(items), batch):
            model.embed(items[start : start + batch], reasoning=reasoning, batch_size=batch)
        best = min(best, time.perf_counter() - started)
    return len(items) / best


def _batch_counts(base: str) -> tuple[float, float]:
    text = requests.get(f"{base}/metrics", timeout=10).text
    total = re.search(r"^moon3_batch_size_sum ([0-9.e+]+)$", text, re.M)
    count = re.search(r"^moon3_batch_size_count ([0-9.e+]+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0), (float(count.group(1)) if count else 0.0)


async def load(base: str, instances: list[dict], reasoning: bool, concurrency: int, n: int) -> dict:
    """``n`` single-item requests from ``concurrency`` workers; requests/s and latency percentiles."""
    latencies: list[float] = []
    next_index = iter(range(n))
    params = {"reasoning": reasoning}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in next_index:
                body = {"instances": [instances[i % len(instances)]], "parameters": params}
                started = time.perf_counter()
                async with session.post(base + PATH, json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": n, "rps": n / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def serve_and_measure(model_dir: Path, instances: list[dict], batching: bool, args: argparse.Namespace) -> list[dict]:
    """Start `moon3 serve` (batching on/off), run every (reasoning, concurrency) level, stop it."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    settings = {"batching": "true" if batching else "false", "max_batch_size": 32, "max_wait_ms": args.max_wait_ms,
                "torch_threads": args.threads}  # fmt: skip
    cmd = [MOON3, "serve", "--model", str(model_dir), "--no-index", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.items():
        cmd += ["--set", f"serve.{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = open(Path(tempfile.gettempdir()) / f"bench-serve-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    rows = []
    try:
        for _ in range(600):
            try:
                if requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}; see {log.name}")
            time.sleep(0.25)
        for reasoning in (False, True):
            if reasoning and args.skip_reasoning:
                continue
            asyncio.run(load(base, instances, reasoning, 8, 16))  # warm-up
            for c in args.concurrency:
                n = max(args.requests, 16 * c) if not reasoning else max(args.requests_reasoning, 2 * c)
                before = _batch_counts(base)
                row = asyncio.run(load(base, instances, reasoning, c, n))
                after = _batch_counts(base)
                forwards = after[1] - before[1]
                row.update(batching=batching, reasoning=reasoning, concurrency=c,
                           items_per_forward=(after[0] - before[0]) / forwards if forwards else 0.0)  # fmt: skip
                rows.append(row)
                print(f"  batching={'on ' if batching else 'off'} reasoning={'on ' if reasoning else 'off'} c={c:>2}: "
                      f"{row['rps']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"{row['items_per_forward']:.1f} items/forward", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return rows


def main() -> None:
    """Run the benchmark; print Markdown tables (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="A saved model folder (default: a tiny one, built here).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (server and raw forward).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=128, help="Requests per level, reasoning off (>= 16 x c).")
    parser.add_argument("--requests-reasoning", type=int, default=32, help="Requests per level, reasoning on.")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reasoning", action="store_true")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data = work / "data"
    make_sample(DataConfig(n_products=64, n_queries=256, seed=0), data, progress=False)
    if args.model is None:
        model = Moon3Embedder.from_config(ModelConfig(reasoning=True), catalog_texts(data)).eval()
        model_dir = model.save_pretrained(work / "model")
    else:
        model_dir = args.model
        model = Moon3Embedder.from_pretrained(model_dir)
    items, instances = _requests_for(data, 256)
    modes = [False] if args.skip_reasoning else [False, True]
    if not (model.contract.reasoning or model.contract.trained_with_traces) and True in modes:
        print("the model's contract refuses reasoning on: measuring reasoning off only")
        modes, args.skip_reasoning = [False], True
    raw = {}
    for reasoning in modes:
        subset = items if not reasoning else items[:64]
        raw[reasoning] = {b: raw_forward(model, subset, reasoning, b, args.repeats) for b in (1, 32)}
        print(f"raw forward, reasoning {'on' if reasoning else 'off'}: batch 1 {raw[reasoning][1]:.1f} items/s, "
              f"batch 32 {raw[reasoning][32]:.1f} items/s", flush=True)  # fmt: skip
    del model
    rows = []
    for batching in (True, False):
        rows += serve_and_measure(model_dir, instances, batching, args)
    print("\n| reasoning | batching | concurrency | requests | req/s | p50 ms | p99 ms | items/forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['reasoning'] else 'off'} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | "
              f"{r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['items_per_forward']:.1f} |")  # fmt: skip
    summary = []
    top = max(args.concurrency)
    print(f"\n| reasoning | raw forward b1 / b32 (items/s) | served c={top} batched | vs raw b32 (>= 0.8) | "
          f"vs one-at-a-time c={top} (>= 3x) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for reasoning in modes:
        on = next(r for r in rows if r["reasoning"] == reasoning and r["batching"] and r["concurrency"] == top)
        off = next(r for r in rows if r["reasoning"] == reasoning and not r["batching"] and r["concurrency"] == top)
        entry = {"reasoning": reasoning, "raw_b1": raw[reasoning][1], "raw_b32": raw[reasoning][32],
                 "served_batched": on["rps"], "served_unbatched": off["rps"],
                 "vs_raw": on["rps"] / raw[reasoning][32], "vs_unbatched": on["rps"] / off["rps"]}  # fmt: skip
        summary.append(entry)
        mode = "on" if reasoning else "off"
        print(f"| {mode} | {entry['raw_b1']:.1f} / {entry['raw_b32']:.1f} | {entry['served_batched']:.1f} req/s | "
              f"{entry['vs_raw']:.2f} | {entry['vs_unbatched']:.2f}x |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": args.threads, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                "python": sys.version.split()[0], "torch": torch.__version__}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "levels": rows, "summary": summary}, indent=2) + "\n")
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
