"""Seconds per GRPO step (issue 12), split into generation, reward, scoring and update.

- **generation**: sampling ``num_generations`` traces per query with the policy (TRL's ``generate``);
- **reward**: the product traces (greedy) and embeddings, the post-trace query embeddings and their ranks;
- **scoring**: TRL's old-policy and reference log-probabilities of the sampled traces;
- **update**: the clipped GRPO loss, the InfoNCE anchor, backward and the AdamW step.

Runs the real stage (:func:`moon3.rl.finetune.train_rl`) on a trace-trained model for ``--steps`` steps.

    .venv/bin/python bench/bench_rl.py --init /path/to/pretrain/final --data data/validated
    .venv/bin/python bench/bench_rl.py            # a fresh tiny model marked trace-trained, a generated sample
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from moon3.config import load_config
from moon3.data.config import DataConfig
from moon3.data.mini import make_sample
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts
from moon3.rl.finetune import train_rl


def main() -> None:
    """Run the stage and print a Markdown row (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, default=None, help="A trace-trained model folder (default: fresh).")
    parser.add_argument("--data", type=Path, default=None, help="A dataset folder (default: a generated sample).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--queries", type=int, default=8, help="rl.queries_per_step")
    parser.add_argument("--generations", type=int, default=4, help="rl.num_generations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + tempfile.mkdtemp() + "/mlflow.db")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "data"
            make_sample(DataConfig(n_products=400, n_queries=400, seed=0), data, progress=False)
        cfg = load_config(None)
        init = args.init
        if init is None:
            torch.manual_seed(0)
            model = Moon3Embedder.from_config(cfg.model, catalog_texts(data))
            model.contract = model.contract.with_training(trained_with_traces=True, reasoning=True)
            init = model.save_pretrained(work / "start")
        cfg.rl.steps, cfg.rl.save_every = args.steps, args.steps + 1
        cfg.rl.queries_per_step, cfg.rl.num_generations = args.queries, args.generations
        cfg.rl.torch_threads = args.threads
        summary = train_rl(cfg, data, init, work / "out", work / "reports", progress=False)
    timing = summary["timing"]
    row = {"steps": summary["steps"], "queries x G": f"{args.queries} x {args.generations}", **timing,
           "mean trace tokens (last 10%)": summary.get("completions_mean_length_last_10pct")}  # fmt: skip
    print(json.dumps(row, indent=2))
    print("| " + " | ".join(str(k) for k in row) + " |")
    print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
