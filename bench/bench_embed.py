"""Embedding throughput of the tiny moon3 model on CPU (issue 4).

Measures embeddings/s with reasoning on (greedy trace of up to ``max_trace_tokens`` with the KV cache, then
the embedding pass) and off (direct), at batch 1 and 32, on a mix of mbe3-mini items (products with image
and text, text / image / multimodal queries). Also times one training step (16 query/product pairs, 64 px,
teacher-forced traces, InfoNCE + trace loss, backward) since the training stages are sized on it.

A random-weight model rarely closes its trace early, so reasoning-on numbers are for the full trace budget:
the worst case.

    .venv/bin/python bench/bench_embed.py                   # tiny qwen2_5_vl, 1 thread
    .venv/bin/python bench/bench_embed.py --threads 2 --arch qwen3_vl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.data.schema import read_dataset
from moon3.model.config import ModelConfig
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts, product_item, query_item


def _items(root, n: int) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """``n`` mixed items (queries and products alternating) and ``n`` (query, positive product) item pairs."""
    products, queries = read_dataset(root)
    by_id = products.set_index("product_id", drop=False)
    qrows = queries.iloc[:n].to_dict("records")
    pairs = [(query_item(q, root), product_item(by_id.loc[q["positive_product_id"]].to_dict(), root)) for q in qrows]
    prods = [product_item(r, root) for r in products.iloc[:n].to_dict("records")]
    mixed = [x for q_p in zip([q for q, _ in pairs], prods, strict=True) for x in q_p][:n]
    return mixed, pairs


def _rate(fn, n_items: int, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    best = min(times)
    return n_items / best, statistics.median(times)


def main() -> None:
    """Run the benchmark and print a Markdown table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-trace-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        make_sample(DataConfig(n_products=64, n_queries=64, seed=0), tmp, progress=False)
        cfg = ModelConfig(tiny_arch=args.arch, max_trace_tokens=args.max_trace_tokens)
        model = Moon3Embedder.from_config(cfg, catalog_texts(tmp)).eval()
        mixed, pairs = _items(tmp, 64)
    rows = []
    for reasoning in (False, True):
        for batch in (1, 32):
            n = 8 if batch == 1 else 32
            items = mixed[:n]
            rate, median = _rate(lambda i=items, b=batch, r=reasoning: model.embed(i, r, b), n, args.repeats)
            rows.append({"reasoning": reasoning, "batch": batch, "items": n, "emb_per_s": rate, "median_s": median})
    # One contrastive training step: 16 pairs -> 32 sequences, traces teacher-forced on the products.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    qs, ps = [q for q, _ in pairs[:16]], [p for _, p in pairs[:16]]
    traces = [None] * 16 + ["category: " + (p["text"] or "")[:40] for p in ps]

    def step():
        out = model(model.prepare_batch(qs + ps, traces))
        q, p = out.embeddings[:16], out.embeddings[16:]
        logits = q @ p.T / 0.05
        target = torch.arange(16)
        loss = (
            torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2
        (loss + 0.1 * out.lm_loss).backward()
        opt.step()
        opt.zero_grad()

    pairs_per_s, step_median = _rate(step, 16, args.repeats)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny {args.arch}, {n_params / 1e6:.2f} M params, {args.threads} thread(s), trace budget "
        f"{args.max_trace_tokens}, torch {torch.__version__}, {platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print("| reasoning | batch | embeddings/s | median s/call |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['reasoning'] else 'off'} | {r['batch']} | {r['emb_per_s']:.1f} | {r['median_s']:.3f} |")
    print(f"| train step (16 pairs, traces) | 16 | {pairs_per_s:.1f} pairs/s | {step_median:.3f} |")
    if args.json:
        print(json.dumps({"arch": args.arch, "threads": args.threads, "rows": rows, "train_pairs_per_s": pairs_per_s}))


if __name__ == "__main__":
    main()
