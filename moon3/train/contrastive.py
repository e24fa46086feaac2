"""Stage A, contrastive pretraining (method.md section 4): the training loop.

One code path for a single CPU process, several data-parallel processes (``torchrun``, DDP) and DeepSpeed
ZeRO-2/3 (``train.deepspeed_config``, launched with ``deepspeed`` or ``torchrun``). Each step:

1. the :class:`~moon3.train.data.HardNegativeSampler` picks this rank's pairs and hard negatives for ``step``;
2. queries and products go through the embedder in one batch (with their teacher traces when
   ``model.reasoning`` is on and ``train.traces_dir`` holds a ``traces.parquet``: the next-token loss on the
   traces is added, and ``train.trace_dropout`` of the items embed with an empty trace);
3. embeddings are gathered from every rank and symmetric InfoNCE runs over the global batch;
4. AdamW with warmup + cosine, gradient clipping; a checkpoint every ``save_every`` steps.

Outputs in ``out_dir``: ``init/`` (the untrained model, the baseline for evaluation), ``final/`` (the trained
model, self-contained, with ``training_probe.safetensors``) and ``checkpoints/``; in ``train.report_dir``:
``train_metrics.json`` and ``dvclive/``, and ``run.json`` (the MLflow run id a resume continues, wall-clock seconds
and pairs/s): what changes from run to run stays out of the DVC outputs, which a repeated run reproduces exactly.

Precision (issue 15): without DeepSpeed the backbone is trained in float32 (fp32 master weights, loaded so even
from a bf16 checkpoint) under bf16 autocast on a bf16 GPU; with DeepSpeed bf16 the module is bf16 and DeepSpeed
keeps the fp32 master copy. Learning rates per group follow ``model.preset`` (:mod:`moon3.model.presets`). Under
ZeRO-3 the held-out check, the probe and the final save run on every rank (the save gathers the weights onto
rank 0), so nothing waits on a rank that holds only a shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moon3.common.progress import Progress
from moon3.common.provenance import RUN_FILE
from moon3.config import Moon3Config
from moon3.model.presets import learning_rates
from moon3.train.checkpoint import resume_from_latest, resume_settings, save_checkpoint
from moon3.train.data import HardNegativeSampler, PairBatch, PairData
from moon3.train.heldout import heldout_text_recall, record_heldout
from moon3.train.loss import LearnableTemperature, contrastive_loss, gather_no_grad, gather_with_grad


@dataclass
class DistInfo:
    """Where this process sits in the data-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(use_deepspeed: bool) -> DistInfo:
    """Join the process group the launcher (torchrun / deepspeed) describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    elif world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


class ContrastiveModel(nn.Module):
    """The embedder plus the learnable temperature: one module, one state dict, one optimizer."""

    def __init__(self, embedder: nn.Module, temperature_init: float):
        super().__init__()
        self.embedder = embedder
        self.temperature = LearnableTemperature(temperature_init)

    def forward(self, inputs: dict[str, Any], n_queries: int, positive_index: torch.Tensor,
                product_ids: torch.Tensor, lambda_sft: float,
                relevant: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        out = self.embedder(inputs)
        queries = gather_with_grad(out.embeddings[:n_queries])
        products = gather_with_grad(out.embeddings[n_queries:])
        tau = self.temperature()
        infonce = contrastive_loss(queries, products, positive_index, product_ids, tau, relevant)
        loss = infonce
        if out.lm_loss is not None and lambda_sft > 0:
            loss = loss + lambda_sft * out.lm_loss
        parts = {"loss": loss, "infonce": infonce.detach(), "temperature": tau.detach()}
        if out.lm_loss is not None:
            parts["lm_loss"] = out.lm_loss.detach()
        return parts


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    """LR multiplier: linear warmup to 1, then cosine down to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class BatchBuilder:
    """Turns a :class:`PairBatch` into model inputs; also run inside DataLoader workers."""

    def __init__(self, data: PairData, prepare_batch, trace_dropout: float = 0.0, seed: int = 0):
        from moon3.model.items import product_item, query_item

        self.data = data
        self.prepare_batch = prepare_batch
        self.trace_dropout = trace_dropout
        self.seed = seed
        self._product_item, self._query_item = product_item, query_item

    def __call__(self, batch: PairBatch) -> dict[str, Any]:
        queries = self.data.queries.iloc[batch.query_rows]
        products = self.data.products.iloc[batch.product_rows]
        items = [self._query_item(row, self.data.root) for _, row in queries.iterrows()]
        view = self.data.product_view  # the image alone for the intra-product pairs of a products-only catalog
        items += [self._product_item(row, self.data.root, **view) for _, row in products.iterrows()]
        traces = None
        if self.data.traces or self.data.query_traces:
            traces = [self.data.query_traces.get(qid) for qid in queries["query_id"]]
            traces += [self.data.traces.get(pid) for pid in products["product_id"]]
            # Trace dropout: some items embed directly (empty trace, no SFT), so the embedding does not come to
            # rest on the teacher's trace, which holds the item's true attributes and is not there at inference.
            keep = np.random.default_rng([self.seed, batch.step, 7]).random(len(traces)) >= self.trace_dropout
            traces = [t if k else None for t, k in zip(traces, keep, strict=True)]
        return {
            "inputs": self.prepare_batch(items, traces),
            "n_queries": len(queries),
            "n_products": len(products),
            # A product's row is its identity: duplicates across ranks are masked by it in the loss.
            "product_codes": torch.as_tensor(batch.product_rows, dtype=torch.long),
            "query_rows": torch.as_tensor(batch.query_rows, dtype=torch.long),
        }


class StepBatches(torch.utils.data.IterableDataset):
    """Model inputs for steps ``start..end`` of one rank, built ahead by DataLoader workers."""

    def __init__(self, sampler: HardNegativeSampler, builder: BatchBuilder, rank: int, start: int, end: int):
        super().__init__()
        self.sampler, self.builder, self.rank, self.start, self.end = sampler, builder, rank, start, end

    def __iter__(self):
        for micro_step in range(self.start, self.end):
            yield self.builder(self.sampler.batch(micro_step, self.rank))


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _positive_index(n_queries: int, n_products: int, world_size: int, device: torch.device) -> torch.Tensor:
    """Index of each gathered query's positive in the gathered products: rank r's positives start at r*P."""
    local = torch.arange(n_queries, device=device)
    return torch.cat([r * n_products + local for r in range(world_size)])


def build_or_load_init(
    cfg: Moon3Config, data_dir: str | Path, out_dir: Path, dist: DistInfo, dtype: torch.dtype | None = None
):
    """The starting model, identical on every rank: rank 0 builds and saves ``init/``, the others load it.

    ``dtype`` is the backbone's training dtype (float32 = fp32 master weights; None = as saved, for DeepSpeed bf16,
    which keeps its own fp32 master copy).
    """
    from moon3.model.embedder import Moon3Embedder
    from moon3.model.items import catalog_texts

    init_dir = out_dir / "init"
    if dist.is_main and not (init_dir / "moon3_config.json").exists():
        torch.manual_seed(cfg.model.seed)
        # The traces join the tokenizer's corpus only when the model will be trained on them.
        traces_dir = cfg.train.traces_dir if (cfg.model.reasoning and cfg.train.lambda_sft > 0) else None
        model = Moon3Embedder.from_config(cfg.model, catalog_texts(data_dir, traces_dir or None))
        # Never trained to write traces: embeds with reasoning off (method.md section 1, honest reasoning flag).
        model.contract = model.contract.with_training(trained_with_traces=False, reasoning=cfg.model.reasoning)
        model.save_pretrained(init_dir, training=_training_record(cfg, data_dir, "init", 0, traces=False))
    if dist.world_size > 1:
        torch.distributed.barrier()
    return Moon3Embedder.from_pretrained(init_dir, trust_remote_code=cfg.model.trust_remote_code, dtype=dtype)


def train_contrastive(
    cfg: Moon3Config,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Run contrastive pretraining; see the module docstring for what is written where.

    Args:
        cfg: the whole config (``model`` builds the embedder, ``train`` drives the loop).
        data_dir: a validated dataset folder (its ``train`` split is used).
        out_dir: defaults to ``cfg.train.out_dir``.
        report_dir: defaults to ``cfg.train.report_dir``.
        resume: continue from the latest complete checkpoint in ``out_dir`` (fresh start if none).
        progress: show progress on rank 0: a bar on a terminal, plain lines with rate and ETA elsewhere
            (:class:`moon3.common.progress.Progress`).
        max_steps: stop after this many steps of *this* invocation (tests use it to interrupt a run);
            the schedule still spans ``cfg.train.steps``.
        allow_config_change: resume even though the model/train settings differ from the checkpoint's (each
            change is printed and logged to MLflow as a ``resumed_with_changes`` tag); otherwise that is an error.

    Returns:
        Summary metrics (final loss, temperature, steps: ``train_metrics.json``) with this invocation's
        ``seconds`` and ``pairs_per_second`` (``run.json``).
    """
    tc = cfg.train
    out = Path(out_dir or tc.out_dir)
    reports = Path(report_dir or tc.report_dir)
    use_ds = bool(tc.deepspeed_config)
    dist = setup_distributed(use_ds)
    _set_cpu_threads(tc, dist)
    torch.manual_seed(tc.seed + dist.rank)
    out.mkdir(parents=True, exist_ok=True)

    ds_config = deepspeed_config(tc, dist.device) if use_ds else None
    # fp32 master weights: without DeepSpeed the optimizer updates the module's own weights, so they are float32
    # even when the checkpoint is bf16 (bf16 happens inside autocast); DeepSpeed bf16 keeps its own fp32 copy.
    ds_bf16 = bool(ds_config and ds_config.get("bf16", {}).get("enabled"))
    embedder = build_or_load_init(cfg, data_dir, out, dist, dtype=None if ds_bf16 else torch.float32)
    if tc.gradient_checkpointing:
        embedder.backbone.gradient_checkpointing_enable()
    data = PairData(data_dir, "train", tc.traces_dir or None)
    if data.notice and dist.is_main:
        print(data.notice, flush=True)
    # Trace SFT only when traces exist and the model is to reason; otherwise the model is trained (and saved)
    # as a direct embedder.
    use_traces = bool(data.traces or data.query_traces) and cfg.model.reasoning and tc.lambda_sft > 0
    if not use_traces:
        data.traces, data.query_traces = {}, {}
        _freeze_unused_lm_head(embedder)
    model = ContrastiveModel(embedder, tc.temperature_init).to(dist.device)
    lrs = learning_rates(tc, embedder.cfg.preset, embedder.backbone.config)
    optimizer = torch.optim.AdamW(parameter_groups(model, tc, lrs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.steps))

    engine = None
    runner: nn.Module = model
    if use_ds:
        import deepspeed

        _zero3_leaf_modules(model)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        runner = engine
    elif dist.world_size > 1:
        runner = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)

    start_step, run_id = 0, None
    settings = resume_settings({"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(tc)})
    latest, changes = None, {}
    run_file = reports / RUN_FILE
    if resume:
        latest, state, changes = resume_from_latest(out, model, optimizer, scheduler, settings, allow_config_change,
                                                    rank=dist.rank, engine=engine)  # fmt: skip
    if latest is not None:
        # Checkpoints written before run.json existed hold the run id themselves.
        start_step, run_id = state["step"], _read_json(run_file).get("mlflow_run_id") or state.get("mlflow_run_id")
        if dist.is_main:
            print(f"resuming from {latest} (step {start_step})")
            for key, (before, after) in changes.items():
                print(f"resuming with a changed setting (--allow-config-change): {key}: {before!r} -> {after!r}")

    from moon3.train.tracking import Tracker

    tracker = Tracker(dist.is_main, tc.mlflow_experiment, "pretrain", reports / "dvclive", cfg.to_dict(), run_id)
    if dist.is_main:
        _write_json(run_file, {"mlflow_run_id": tracker.run_id})
    if changes:
        tracker.set_tag("resumed_with_changes", "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    sampler = HardNegativeSampler(
        data, tc.batch_size, tc.hard_negatives_per_query, tc.seed, dist.world_size, tc.hard_negative_mode
    )
    builder = BatchBuilder(data, embedder.prepare_batch, tc.trace_dropout, tc.seed)
    end_step = tc.steps if max_steps is None else min(tc.steps, start_step + max_steps)
    loader = torch.utils.data.DataLoader(
        StepBatches(sampler, builder, dist.rank, start_step * tc.grad_accum, end_step * tc.grad_accum),
        batch_size=None,
        num_workers=tc.num_workers,
        prefetch_factor=2 if tc.num_workers > 0 else None,
        worker_init_fn=_single_threaded_worker,
    )
    # DeepSpeed casts the model itself when its config enables bf16.
    autocast = _autocast(tc.precision if engine is None else "fp32", dist.device)
    # Under ZeRO-3 every rank holds a shard of each weight: the held-out check, the probe and the save run their
    # forwards (and gathers) on every rank in step, and rank 0 alone records and writes.
    collective = is_zero3(engine)
    heldout_init = None
    if start_step == 0 and (dist.is_main or collective) and tc.heldout_queries > 0:
        heldout_init = heldout_text_recall(embedder, data_dir, max_queries=tc.heldout_queries)
        if heldout_init.value is not None and dist.is_main:
            tracker.log_metrics({"heldout_text_recall_at_10": heldout_init.value}, 0)
    # A bar on a terminal, a plain line every $MOON3_PROGRESS_INTERVAL s elsewhere (dvc repro in CI, a log file).
    bar = Progress(total=end_step - start_step, desc="pretrain", unit="step", disable=not (progress and dist.is_main))
    model.train()
    pairs_done, t0, last = 0, time.perf_counter(), {}
    batches = iter(loader)
    try:
        for step in range(start_step, end_step):
            for micro in range(tc.grad_accum):
                batch = next(batches)
                inputs = _to_device(batch["inputs"], dist.device)
                codes = gather_no_grad(batch["product_codes"].to(dist.device))
                query_rows = gather_no_grad(batch["query_rows"].to(dist.device))
                relevant = torch.as_tensor(data.relevant(query_rows.cpu().numpy(), codes.cpu().numpy()))
                positive_index = _positive_index(batch["n_queries"], batch["n_products"], dist.world_size, dist.device)
                sync = micro == tc.grad_accum - 1
                is_ddp = isinstance(runner, nn.parallel.DistributedDataParallel)
                ctx = runner.no_sync() if (is_ddp and not sync) else contextlib.nullcontext()
                with ctx, autocast:
                    parts = runner(inputs, batch["n_queries"], positive_index, codes, tc.lambda_sft,
                                   relevant.to(dist.device))  # fmt: skip
                if engine is not None:
                    engine.backward(parts["loss"])
                    engine.step()
                else:
                    (parts["loss"] / tc.grad_accum).backward()
                pairs_done += batch["n_queries"] * dist.world_size
            if engine is None:
                if tc.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            last = {k: float(v.detach()) for k, v in parts.items()}
            last["lr"] = scheduler.get_last_lr()[0]
            last.update(module_gates(embedder))
            if dist.is_main and ((step + 1) % tc.log_every == 0 or step == start_step):
                tracker.log_metrics(last, step + 1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", tau=f"{last['temperature']:.3f}", refresh=False)
            bar.update(1)
            if (step + 1) % tc.save_every == 0 or step + 1 == tc.steps:
                save_checkpoint(out, step + 1, model, optimizer, scheduler,
                                {"settings": settings},
                                dist.rank, dist.world_size, engine=engine)  # fmt: skip
    except BaseException:
        tracker.close("FAILED")
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    # Wall-clock numbers go to run.json, not to train_metrics.json (a DVC output a repeated run reproduces).
    timing = {"seconds": elapsed, "pairs_per_second": pairs_done / max(elapsed, 1e-9)}
    if dist.is_main:
        _write_json(run_file, {"mlflow_run_id": tracker.run_id, **timing})
    # No NaN in a metrics file: a value this invocation did not measure is left out and listed under "skipped".
    summary: dict[str, Any] = {
        "steps": end_step,
        **{f"final_{k}": last[k] for k in ("loss", "infonce", "temperature") if k in last},
        "temperature_init": tc.temperature_init,
        **{f"final_{k}": v for k, v in module_gates(embedder).items() if k.endswith("_mean")},
        "trained_with_traces": use_traces,
        "world_size": dist.world_size,
    }
    if dist.device.type == "cuda":
        summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    if not last:
        unmeasured = ("loss", "infonce", "temperature")
        summary["skipped"] = {f"final_{k}": "no step ran in this invocation" for k in unmeasured}
    if end_step == tc.steps and (dist.is_main or collective):
        heldout = None
        if tc.heldout_queries > 0:
            heldout = heldout_text_recall(embedder, data_dir, max_queries=tc.heldout_queries)
        probe = probe_embeddings(embedder, data)
        # ZeRO-3: the full weights, gathered one module at a time onto rank 0 (None on the other ranks).
        state = consolidated_state_dict(engine) if collective else None
    if end_step == tc.steps and dist.is_main:
        if heldout is not None:
            record_heldout(summary, "heldout_text_recall_at_10", heldout)
            if heldout.value is not None:
                tracker.log_metrics({"heldout_text_recall_at_10": heldout.value}, end_step)
            if heldout_init is not None:
                record_heldout(summary, "heldout_text_recall_at_10_init", heldout_init)
        final = out / "final"
        if cfg.model.reasoning and not use_traces:
            print("no reasoning traces were trained (none in the data): the model is saved with reasoning off")
        embedder.contract = embedder.contract.with_training(use_traces, cfg.model.reasoning)
        record = _training_record(cfg, data_dir, "pretrain", end_step, traces=use_traces)
        record["learning_rates"] = lrs
        embedder.save_pretrained(final, training=record, state_dict=state)
        save_probe(final, *probe)
        reports.mkdir(parents=True, exist_ok=True)
        (reports / "train_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracker.log_summary({k: v for k, v in {**summary, **timing}.items() if isinstance(v, int | float)})
        tracker.log_model_dir(final)
    tracker.close()
    return {**summary, **timing}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2) + "\n")


def parameter_groups(model: ContrastiveModel, tc, lrs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups with their own learning rates (method.md section 4): the backbone, the moon3 heads (fusion,
    FIRE, projection) and the log-temperature; biases, norms and FIRE's gates (1-D) get no weight decay.

    ``lrs`` maps each group to its peak rate (:func:`moon3.model.presets.learning_rates`: the preset's while the
    ``train.lr*`` keys are left at their defaults); default: the keys as written."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("temperature."):
            role = "temperature"
        elif name.startswith("embedder.backbone."):
            role = "backbone"
        else:
            role = "heads"
        groups.setdefault((role, role != "temperature" and param.ndim >= 2), []).append(param)
    lr = lrs or {"backbone": tc.lr, "heads": tc.lr_heads, "temperature": tc.lr_temperature}
    return [
        {"params": params, "lr": lr[role], "weight_decay": tc.weight_decay if decay else 0.0, "name": role}
        for (role, decay), params in sorted(groups.items())
    ]


def module_gates(embedder: nn.Module) -> dict[str, float]:
    """How open the MOON3 modules are: FIRE's ``tanh(alpha_l)`` (mean of absolute values and per layer) and the
    fusion head's mean gates of the last batch (``<emb>`` state, image read-out, text read-out)."""
    out: dict[str, float] = {}
    fire = getattr(embedder, "fire", None)
    gates = []
    if fire is not None:
        with gathered([fire.alpha]):  # a ZeRO-3 shard otherwise (every rank calls this, in step)
            gates = fire.gate_values()
    if gates and len(gates) == len(fire.layers):  # not on a ZeRO-3 rank holding only a shard of alpha
        out["fire_gate_abs_mean"] = sum(abs(g) for g in gates) / len(gates)
        out.update({f"fire_gate_l{layer}": g for layer, g in zip(fire.layers, gates, strict=True)})
    fusion = getattr(embedder, "fusion", None)
    if fusion is not None and fusion.last_gates is not None:
        mean = fusion.last_gates.float().mean(dim=0).tolist()
        out.update({"fusion_gate_h_mean": mean[0], "fusion_gate_v_mean": mean[1], "fusion_gate_t_mean": mean[2]})
    return out


def deepspeed_config(tc, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config of ``train.deepspeed_config`` with its ``auto`` values filled from ``tc``: micro-batch,
    accumulation, clipping, and bf16 (``train.precision``: auto = a bf16 GPU)."""
    ds_config = json.loads(Path(tc.deepspeed_config).read_text())
    ds_config["train_micro_batch_size_per_gpu"] = tc.batch_size
    ds_config["gradient_accumulation_steps"] = tc.grad_accum
    ds_config["gradient_clipping"] = tc.max_grad_norm
    if ds_config.get("bf16", {}).get("enabled") == "auto":
        ds_config["bf16"]["enabled"] = _use_bf16(tc.precision, device)
    return ds_config


def is_zero3(engine: Any) -> bool:
    """Whether ``engine`` is a DeepSpeed engine that partitions the weights (ZeRO stage 3)."""
    return engine is not None and bool(engine.zero_optimization_partition_weights())


def gathered(params: list[nn.Parameter]):
    """Context in which ``params`` are whole: DeepSpeed's ``GatheredParameters`` for ZeRO-3 partitioned ones (a
    collective: every rank must enter it), else nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The embedder's full state dict from a ZeRO-3 engine, 16-bit, on rank 0 (None elsewhere); every rank must
    call it. Needs ``stage3_gather_16bit_weights_on_model_save`` (``infra/deepspeed/zero3.json`` sets it)."""
    state = engine._zero3_consolidated_16bit_state_dict()
    if state is None:
        return None
    prefix = "embedder."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


PROBE_ITEMS = 8


@torch.no_grad()
def probe_embeddings(embedder: nn.Module, data: PairData, n: int = PROBE_ITEMS) -> tuple[torch.Tensor, list[str]]:
    """Direct embeddings of the first ``n`` training products by the in-memory trained model (every rank under
    ZeRO-3), with their product ids: the training-time side of the saved-vs-trained check (method.md section 1:
    cosine >= 0.999 for the same input)."""
    from moon3.model.items import product_item

    rows = data.products.head(n)
    items = [product_item(row, data.root) for _, row in rows.iterrows()]
    return embedder.embed(items, reasoning=False, batch_size=n), [str(p) for p in rows["product_id"]]


def save_probe(folder: Path, embeddings: torch.Tensor, product_ids: list[str]) -> Path:
    """Write :data:`moon3.model.embedder.PROBE_FILE` into a saved model folder (embeddings float32, product ids
    in the metadata)."""
    from safetensors.torch import save_file

    from moon3.model.embedder import PROBE_FILE

    path = Path(folder) / PROBE_FILE
    save_file({"embeddings": embeddings.float().contiguous()}, path, metadata={"product_ids": json.dumps(product_ids)})
    return path


def load_probe(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """What :func:`save_probe` wrote: ``(embeddings, product_ids)``."""
    from safetensors import safe_open

    from moon3.model.embedder import PROBE_FILE

    with safe_open(str(Path(folder) / PROBE_FILE), framework="pt") as handle:
        ids = json.loads(handle.metadata()["product_ids"])
        return handle.get_tensor("embeddings"), ids


def _zero3_leaf_modules(model: nn.Module) -> None:
    """Tell ZeRO-3 to gather ``nn.MultiheadAttention`` (the fusion head) whole: its forward reads its ``out_proj``
    weights without calling that submodule, which ZeRO-3 would otherwise leave as an empty shard."""
    from deepspeed.utils import set_z3_leaf_modules

    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        set_z3_leaf_modules(model, [nn.MultiheadAttention])


def _training_record(cfg: Moon3Config, data_dir: str | Path, stage: str, steps: int, traces: bool) -> dict:
    """What produced a saved model, kept in its ``moon3_config.json`` for reports and lineage."""
    return {
        "stage": stage,
        "steps": steps,
        "traces": traces,
        "seed": cfg.train.seed,
        "data_dir": str(data_dir),
        "ablation": cfg.train.ablation or None,
        "switches": {"fusion": cfg.model.fusion, "fire": cfg.model.fire, "reasoning": cfg.model.reasoning},
        "batch_size": cfg.train.batch_size,
        "hard_negatives_per_query": cfg.train.hard_negatives_per_query,
        "hard_negative_mode": cfg.train.hard_negative_mode,
    }


def _set_cpu_threads(tc, dist: DistInfo) -> None:
    """On CPU, leave one core per data worker: OpenMP threads spin-wait and starve the Python batch builder."""
    if dist.device.type != "cpu":
        return
    threads = tc.torch_threads
    if threads <= 0:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_ranks) - tc.num_workers)
    torch.set_num_threads(threads)


def _single_threaded_worker(_: int) -> None:
    # A forked worker inherits the trainer's intra-op thread pool; two pools on the same cores thrash.
    torch.set_num_threads(1)


def _freeze_unused_lm_head(embedder: nn.Module) -> None:
    """Without traces the LM head gets no gradient; freezing it keeps DDP/ZeRO from waiting on it."""
    head = embedder.backbone.get_output_embeddings()
    if head is not None and head.weight is not embedder.backbone.get_input_embeddings().weight:
        head.requires_grad_(False)


def _use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def _autocast(precision: str, device: torch.device):
    if _use_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
