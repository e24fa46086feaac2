"""Training-loop efficiency of contrastive pretraining (issue 5).

Two numbers from the same process, same model, same batches:

- **bare**: forward + InfoNCE + backward on batches prepared in advance (no data loading, no optimizer);
- **full**: the real loop of :func:`moon3.train.contrastive.train_contrastive` (sampler, image loading,
  processor, forward, backward, clipping, AdamW, schedule, metric logging every 10 steps, no checkpoint).

The ratio full/bare says how much the loop costs on top of the model's own compute; target >= 0.9.

    .venv/bin/python bench/bench_train.py                      # 40 steps, 1 thread + 1 prefetch worker
    .venv/bin/python bench/bench_train.py --threads 2 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moon3.config import load_config
from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts
from moon3.train.contrastive import BatchBuilder, ContrastiveModel, _positive_index, train_contrastive
from moon3.train.data import HardNegativeSampler, PairData


def main() -> None:
    """Run both measurements and print a Markdown row (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--data", default="", help="dataset folder (default: a fresh 3,000-product mbe3-mini)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.gettempdir()}/moon3-bench-mlruns.db")
    work = Path(tempfile.mkdtemp(prefix="moon3-bench-train-"))
    data_dir = Path(args.data) if args.data else work / "data"
    if not args.data:
        make_sample(DataConfig(), data_dir, progress=False)
    sets = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.num_workers={args.workers}",
        f"train.torch_threads={args.threads}",
        "train.save_every=100000",
        "train.heldout_queries=0",
        "train.warmup_steps=5",
    ]
    cfg = load_config("params.yaml", sets)
    torch.manual_seed(0)
    init = work / "run" / "init"
    Moon3Embedder.from_config(cfg.model, catalog_texts(data_dir)).save_pretrained(init)

    # bare: the same batches, built before the clock starts
    model = ContrastiveModel(Moon3Embedder.from_pretrained(init), 0.05).train()
    head = model.embedder.backbone.get_output_embeddings()
    head.requires_grad_(False)
    data = PairData(data_dir, "train")
    sampler = HardNegativeSampler(data, args.batch_size, cfg.train.hard_negatives_per_query, 0)
    builder = BatchBuilder(data, model.embedder.prepare_batch)
    batches = [builder(sampler.batch(s)) for s in range(args.steps)]
    start = time.perf_counter()
    for b in batches:
        pos = _positive_index(b["n_queries"], b["n_products"], 1, torch.device("cpu"))
        model(b["inputs"], b["n_queries"], pos, b["product_codes"], 0.0)["loss"].backward()
        model.zero_grad(set_to_none=True)
    bare = args.steps * args.batch_size / (time.perf_counter() - start)

    # full: the real loop
    summary = train_contrastive(cfg, data_dir, work / "run", work / "reports", progress=False)
    full = summary["pairs_per_second"]
    row = {
        "steps": args.steps, "batch": args.batch_size, "threads": args.threads, "workers": args.workers,
        "bare_pairs_per_s": round(bare, 1), "full_pairs_per_s": round(full, 1), "ratio": round(full / bare, 3),
    }  # fmt: skip
    print(json.dumps(row))
    print(f"| {args.steps} | {args.batch_size} | {args.threads} | {args.workers} | {bare:.1f} | {full:.1f} | "
          f"{full / bare:.2f} |")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
