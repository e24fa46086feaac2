"""The ``rl`` stage: GRPO fine-tuning of a pretrained (trace-SFT) model; see :mod:`moon3.rl.grpo_trainer`.

Reads ``rl.init_dir`` (the pretrained model) and a validated dataset's ``train`` split; writes

    <out_dir>/final/                the RL model (self-contained, ``training.stage: rl``)
    <out_dir>/checkpoints/          TRL checkpoints; ``moon3_complete`` marks one whose files are all written
    <report_dir>/rl_metrics.json    reward per step, first vs last 10 % of steps, KL, closure
    <report_dir>/dvclive/           the same curves for ``dvc plots``, also logged to MLflow (a skipped run: only
                                    ``skipped.json``, so that the DVC output exists)
    <report_dir>/rl_run.json        the MLflow run id a resume continues, and the wall-clock numbers (``seconds``,
                                    ``timing`` per step phase): not in the DVC outputs above, which a repeated run
                                    reproduces exactly (TRL's ``step_time`` and the like go to MLflow only)

A model that was never taught to write traces (``trained_with_traces: false``) has no trace policy to improve:
the stage copies it to ``final/`` unchanged and says so (``rl_metrics.json: skipped``), as it does with
``rl.enabled: false``. The evaluation's ``no_rl`` row is always the pretrained model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moon3.config import Moon3Config

# Written last into a checkpoint folder (by the trainer): only a folder holding it is complete enough to resume.
COMPLETE_MARKER = "moon3_complete"


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder whose save finished (it holds :data:`COMPLETE_MARKER`)."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def rl_dataset(data: Any, contract: Any):
    """One row per training query: the contract's prompt as chat messages, its image (resized to the contract's
    side, so TRL's processor sees the pixels the embedder does) and its row in ``data.queries``."""
    from datasets import Dataset, Features, Image, Value

    from moon3.model.items import query_item
    from moon3.rl.grpo_trainer import conversation

    rows = []
    side = contract.image_size
    for q, (_, row) in enumerate(data.queries.iterrows()):
        item = query_item(row, data.root)
        image = item.get("image")
        if image is not None:
            image = image.convert("RGB").resize((side, side), 3)  # 3 = PIL bicubic, as the embedder resizes
        rows.append({"prompt": conversation(item.get("text"), image is not None, contract), "image": image,
                     "query_row": q})  # fmt: skip
    part = {"type": Value("string"), "text": Value("string")}
    message = {"role": Value("string"), "content": [part]}
    features = Features({"prompt": [message], "image": Image(), "query_row": Value("int64")})
    return Dataset.from_list(rows, features=features)


def is_timing(key: str) -> bool:
    """Whether a Trainer/TRL log key is wall-clock time (``step_time``, ``train_runtime``, ``*_per_second``)."""
    return key.endswith(("_time", "_runtime", "_per_second"))


def _callbacks(tracker: Any, history: list[dict[str, float]]):
    from transformers import TrainerCallback

    class Moon3Callback(TrainerCallback):
        """Logs to MLflow/dvclive and keeps the per-step history."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            numeric = {k.replace("/", "_"): float(v) for k, v in logs.items() if isinstance(v, int | float)}
            timing = {k: v for k, v in numeric.items() if is_timing(k)}
            numeric = {k: v for k, v in numeric.items() if k not in timing}
            history.append({"step": state.global_step, **numeric})
            tracker.log_metrics(numeric, state.global_step)
            if timing:
                tracker.log_metrics(timing, state.global_step, live=False)

    return [Moon3Callback()]


def train_rl(
    cfg: Moon3Config,
    data_dir: str | Path,
    init_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run GRPO fine-tuning; see the module docstring for what is written where.

    Args:
        cfg: the whole config (``rl`` drives the run).
        data_dir: a validated dataset folder (its ``train`` split is used).
        init_dir: the starting model (default ``rl.init_dir``).
        out_dir: default ``rl.out_dir``.
        report_dir: default ``rl.report_dir``.
        resume: continue from the latest complete checkpoint (fresh start if none).
        progress: show TRL's progress bar.

    Returns:
        The summary written to ``rl_metrics.json``, with ``seconds`` and ``timing`` (``rl_run.json``).
    """
    from moon3.model.embedder import Moon3Embedder

    rc = cfg.rl
    init = Path(init_dir or rc.init_dir)
    out, reports = Path(out_dir or rc.out_dir), Path(report_dir or rc.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    embedder = Moon3Embedder.from_pretrained(init, trust_remote_code=cfg.model.trust_remote_code)
    start_record = json.loads((init / "moon3_config.json").read_text()).get("training", {})
    if not rc.enabled or not embedder.contract.trained_with_traces:
        why = "rl.enabled is false" if not rc.enabled else "the starting model was never trained to write traces"
        return _skip(init, out, reports, why, start_record)
    if rc.torch_threads > 0:
        torch.set_num_threads(rc.torch_threads)
    torch.manual_seed(rc.seed)
    summary = _run(cfg, embedder, data_dir, init, out, reports, resume, progress, start_record)
    return summary


def _skip(init: Path, out: Path, reports: Path, why: str, start_record: dict) -> dict[str, Any]:
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(init, final)
    summary = {"skipped": True, "reason": why, "steps": 0, "init_dir": str(init), "init_training": start_record}
    (reports / "rl_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    # dvclive/ is a declared output of the DVC stage: it must exist, and hold no curves of an earlier run.
    curves = reports / "dvclive"
    if curves.exists():
        shutil.rmtree(curves)
    curves.mkdir()
    (curves / "skipped.json").write_text(json.dumps({"skipped": True, "reason": why}, indent=2) + "\n")
    print(f"rl skipped: {why}; {final} is a copy of {init}")
    return summary


def _run(cfg, embedder, data_dir, init, out, reports, resume, progress, start_record) -> dict[str, Any]:
    from trl import GRPOConfig

    from moon3.model import contract as C
    from moon3.rl.grpo_trainer import Moon3GRPOTrainer, detach_heads
    from moon3.train.data import PairData
    from moon3.train.tracking import Tracker

    rc = cfg.rl
    data = PairData(data_dir, "train")
    budget = embedder.contract.max_trace_tokens
    group = rc.queries_per_step * rc.num_generations
    use_cuda = torch.cuda.is_available()
    args = GRPOConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=rc.steps,
        per_device_train_batch_size=group,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=rc.num_generations,
        # Up to twice the budget, so r_len can teach closing inside it; the embedding reads at most `budget`.
        max_completion_length=2 * budget,
        temperature=rc.temperature,
        learning_rate=rc.lr,
        warmup_steps=rc.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=rc.weight_decay,
        max_grad_norm=rc.max_grad_norm,
        beta=rc.beta,
        epsilon=rc.epsilon,
        reward_weights=[rc.reward_rank_weight, rc.reward_format_weight, rc.reward_len_weight],
        generation_kwargs={"suppress_tokens": embedder._suppress, "eos_token_id": embedder.token_ids[C.THINK_END]},
        save_strategy="steps",
        save_steps=rc.save_every,
        save_total_limit=2,
        logging_steps=1,
        seed=rc.seed,
        data_seed=rc.seed,
        use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        deepspeed=rc.deepspeed_config or None,
    )
    peft_config = None
    if rc.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=rc.lora_r, lora_alpha=rc.lora_alpha, target_modules="all-linear",
                                 exclude_modules=r".*(visual|moon3_heads|lm_head).*")  # fmt: skip
    checkpoint = latest_complete_checkpoint(out / "checkpoints") if resume else None
    run_id = None
    state_file = reports / "rl_run.json"
    if checkpoint is not None:
        print(f"resuming from {checkpoint}")
        if state_file.exists():
            run_id = json.loads(state_file.read_text()).get("mlflow_run_id")
    tracker = Tracker(True, rc.mlflow_experiment, "rl", reports / "dvclive", cfg.to_dict(), run_id)
    state_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id}) + "\n")
    history: list[dict[str, float]] = []
    trainer = Moon3GRPOTrainer(
        embedder, data, rc, args=args, train_dataset=rl_dataset(data, embedder.contract),
        callbacks=_callbacks(tracker, history), peft_config=peft_config,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:
        tracker.close("FAILED")
        raise
    elapsed = time.perf_counter() - t0
    steps_done = int(trainer.state.global_step)
    summary = _summary(history, trainer, steps_done, elapsed, start_record, init)
    timing = {k: summary.pop(k) for k in ("seconds", "timing")}  # rl_run.json, not the DVC outputs
    state_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id, **timing}, indent=2) + "\n")
    if steps_done >= rc.steps:
        if rc.lora:
            trainer.model = trainer.model.merge_and_unload()
            embedder.backbone = trainer.model
        detach_heads(embedder)
        embedder.processor.chat_template = C.CHAT_TEMPLATE
        embedder.processor.tokenizer.chat_template = C.CHAT_TEMPLATE
        embedder.contract = embedder.contract.with_training(True, embedder.contract.reasoning)
        record = {
            "stage": "rl",
            "steps": steps_done,
            "traces": True,
            "seed": rc.seed,
            "data_dir": str(data_dir),
            "init_dir": str(init),
            "init_training": start_record,
            "num_generations": rc.num_generations,
            "queries_per_step": rc.queries_per_step,
            "lora": rc.lora,
            "ablation": None,
            "switches": start_record.get("switches"),
        }
        embedder.save_pretrained(out / "final", training=record)
        tracker.log_summary({k: v for k, v in {**summary, **timing}.items() if isinstance(v, int | float)})
        (reports / "rl_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracker.close()
    return {**summary, **timing}


def _window_mean(values: list[float], first: bool) -> float:
    n = max(1, math.ceil(0.1 * len(values)))
    part = values[:n] if first else values[-n:]
    return float(np.mean(part)) if part else float("nan")


def _summary(history, trainer, steps, elapsed, start_record, init) -> dict[str, Any]:
    rows = [h for h in history if "reward" in h]
    rewards = [h["reward"] for h in rows]
    out: dict[str, Any] = {
        "skipped": False,
        "steps": steps,
        "init_dir": str(init),
        "init_training": start_record,
        "seconds": elapsed,
        "reward_first_10pct": _window_mean(rewards, True),
        "reward_last_10pct": _window_mean(rewards, False),
    }
    for key in ("rewards_r_rank_mean", "rewards_r_format_mean", "rewards_r_len_mean", "kl", "infonce",
                "completions_mean_length", "completions_clipped_ratio", "closure_rate"):  # fmt: skip
        values = [h[key] for h in rows if key in h]
        if values:
            out[f"{key}_first_10pct"] = _window_mean(values, True)
            out[f"{key}_last_10pct"] = _window_mean(values, False)
    out["history"] = rows
    out["timing"] = trainer.timing_summary() if hasattr(trainer, "timing_summary") else {}
    return out
