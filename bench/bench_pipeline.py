"""Kubeflow pipeline timings (issue 7): compile time, and a whole local run step by step.

1. ``compile``: median of ``--compiles`` compilations of the training pipeline from ``params.yaml``.
2. ``run``: the training pipeline under ``kfp.local`` on a small mbe3-mini (the settings of the slow test in
   ``tests/test_pipeline.py``), each step's wall time from kfp.local's own log lines. ``--runner subprocess``
   runs each step as a subprocess of this venv; ``--runner docker --image moon3:TAG`` runs each step in a
   container of the project image (needs a Docker engine and the image built from ``infra/docker/Dockerfile``).

    .venv/bin/python bench/bench_pipeline.py
    .venv/bin/python bench/bench_pipeline.py --runner docker --image moon3:cpu-test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from moon3.config import load_config
from moon3.pipelines.compile import REPO, compile_pipeline, load_module

SMALL = ["data.n_products=120", "data.n_queries=120", "model.reasoning=false", "model.image_size=32",
         "train.steps=6", "train.batch_size=8", "train.warmup_steps=1", "train.num_workers=0", "train.log_every=2",
         "train.hard_negatives_per_query=0", "train.heldout_queries=0", "eval.reasoning_off=false",
         "eval.mlflow_experiment="]  # fmt: skip


class StepTimer(logging.Filter):
    """Turns kfp.local's 'Executing task' / 'finished with status' log lines into per-step seconds.

    A filter on the root logger, because kfp.local replaces the root logger's handlers while it runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        match = re.search(r"'([\w-]+)'", message)
        if match and message.startswith("Executing task"):
            self.started[match.group(1)] = record.created
        elif match and "finished with status" in message and match.group(1) in self.started:
            self.seconds[match.group(1)] = round(record.created - self.started[match.group(1)], 1)
        return True


def bench_compile(n: int) -> float:
    cfg = load_config(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        compile_pipeline(cfg, Path(tmp) / "warm.yaml", version="0+bench")
        times = []
        for i in range(n):
            start = time.perf_counter()
            compile_pipeline(cfg, Path(tmp) / f"p{i}.yaml", version="0+bench")
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_run(runner: str, image: str | None) -> dict:
    from kfp import local

    overrides = ["pipeline.pvc_name=", "pipeline.num_processes=1"] + ([f"pipeline.image={image}"] if image else [])
    pipeline = load_module(REPO / "pipelines" / "training_pipeline.py").build_pipeline(
        load_config(REPO / "params.yaml", overrides), "0+bench"
    )
    timer = StepTimer()
    logging.getLogger().addFilter(timer)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir(mode=0o1777)
        os.chmod(root, 0o1777)  # a non-root image user writes its outputs here
        os.environ.setdefault("MLFLOW_TRACKING_URI", (Path(tmp) / "mlruns").as_uri())
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        kfp_runner = local.DockerRunner() if runner == "docker" else local.SubprocessRunner(use_venv=False)
        local.init(runner=kfp_runner, pipeline_root=str(root))
        start = time.perf_counter()
        pipeline(overrides=SMALL)
        total = time.perf_counter() - start
        (run,) = list(root.iterdir())
        metrics = json.loads((run / "evaluate" / "executor_output.json").read_text())
        summary = {k: round(v, 3) for k, v in metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"].items()
                   if "/summary/" in k}  # fmt: skip
    return {"runner": runner, "total_s": round(total, 1), "steps_s": timer.seconds, "eval_summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiles", type=int, default=5)
    parser.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess")
    parser.add_argument("--image", help="project image for --runner docker")
    args = parser.parse_args()
    if args.runner == "docker" and not args.image:
        parser.error("--runner docker needs --image")
    result = {"compile_s_median": round(bench_compile(args.compiles), 3), "load_average": os.getloadavg()}
    result.update(bench_run(args.runner, args.image))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
