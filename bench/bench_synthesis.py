"""Synthesis client throughput: traces/s against a loopback teacher with fixed latency and fixed capacity.

The teacher is an OpenAI-compatible ``/chat/completions`` server (aiohttp, in its own process so it does not
share the client's GIL) that answers each request after ``--latency`` seconds and serves at most
``--capacity`` requests at once (an asyncio semaphore; beyond it requests queue). Its ceiling is therefore
capacity / latency traces/s (32 / 0.2 s = 160/s). The client is the real one: ``run_teacher`` with an
``OpenAITeacher`` and a fresh ``TraceCache`` file (every trace committed), as the synthesis stage runs it.

Run:  .venv/bin/python -m bench.bench_synthesis  [--latency 0.2 --capacity 32 --concurrency 1 8 32 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from moon3.synthesis.cache import TraceCache
from moon3.synthesis.client import run_teacher_sync
from moon3.synthesis.openai_teacher import OpenAITeacher
from moon3.synthesis.teacher import SynthesisItem


def serve(port_queue: mp.Queue, latency_s: float, capacity: int) -> None:
    """The loopback teacher; puts its port on ``port_queue`` and serves until terminated."""
    from aiohttp import web

    async def main() -> None:
        slots = asyncio.Semaphore(capacity)

        async def complete(request: web.Request) -> web.Response:
            body = await request.json()
            async with slots:
                await asyncio.sleep(latency_s)
            text = body["messages"][-1]["content"][0]["text"].rsplit(": ", 1)[-1]
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": f"title: {text}"}}]})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", complete)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_queue.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()  # until the parent terminates the process

    asyncio.run(main())


def measure(base_url: str, concurrency: int, n_items: int, tag: str) -> dict:
    """One run of ``n_items`` distinct products at ``concurrency``; returns traces/s and counts."""
    items = [SynthesisItem(f"{tag}-{i}", "product", f"bench item {tag} {i}", None, ".") for i in range(n_items)]
    teacher = OpenAITeacher(base_url, "bench-vl", api_key_env="BENCH_SYNTH_KEY", max_tokens=64)
    with tempfile.TemporaryDirectory() as tmp, TraceCache(Path(tmp) / "cache.db") as cache:
        start = time.perf_counter()
        outcomes = run_teacher_sync(items, teacher, cache=cache, concurrency=concurrency, timeout_s=30.0,
                                    max_retries=2, backoff_base_s=0.1, backoff_max_s=1.0, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        rows = len(cache)
    ok = sum(o.status == "ok" for o in outcomes)
    return {"concurrency": concurrency, "items": n_items, "ok": ok, "cached_rows": rows, "seconds": seconds,
            "traces_per_s": ok / seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="teacher latency per request (s)")
    parser.add_argument("--capacity", type=int, default=32, help="requests the teacher serves at once")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=3.2, help="ideal duration of each run (sets item count)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    server = ctx.Process(target=serve, args=(ports, args.latency, args.capacity), daemon=True)
    server.start()
    try:
        base_url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
        measure(base_url, 4, 8, "warmup")  # imports, first connections
        results = []
        for c in args.concurrency:
            ceiling = min(c, args.capacity) / args.latency
            n_items = max(16, round(ceiling * args.seconds))
            row = measure(base_url, c, n_items, f"c{c}")
            row["ceiling_per_s"] = ceiling
            row["of_ceiling"] = row["traces_per_s"] / ceiling
            row["of_capacity"] = row["traces_per_s"] / (args.capacity / args.latency)
            results.append(row)
    finally:
        server.terminate()
        server.join(10)

    print(f"teacher: {args.latency * 1000:.0f} ms latency, capacity {args.capacity} -> "
          f"{args.capacity / args.latency:.0f} traces/s; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| concurrency | items | ok | traces/s | ideal min(c, cap)/latency | of ideal | of teacher capacity |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['items']} | {r['ok']} | {r['traces_per_s']:.1f} | "
              f"{r['ceiling_per_s']:.0f} | {r['of_ceiling']:.0%} | {r['of_capacity']:.0%} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
