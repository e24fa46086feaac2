"""Real-size backbone on GPUs (issue 15): training samples/s, peak memory and MFU, embeddings/s.

``bench/gpu.sh`` runs the whole thing on a CUDA machine; this module is its Python part, with four commands:

- ``data``: an mbe3-mini sample with large product photos (``--image-size 512``: 256 image tokens each under the
  real preset; query views stay 64-128 px, 64 tokens);
- ``train`` (under ``torchrun``, one process per GPU): a random-init model built from ``--config`` (default the
  Qwen2.5-VL-3B layout), the trainer's own pieces (:class:`~moon3.train.contrastive.ContrastiveModel`, the
  sampler and batch builder, the preset's parameter groups, :func:`~moon3.train.contrastive.deepspeed_config`),
  DeepSpeed ZeRO-2 (``--zero 3`` for stage 3), bf16, gradient checkpointing. After ``--warmup`` steps it times
  ``--steps`` steps and reports query/product pairs per second (all GPUs), peak GPU memory (the largest rank's
  ``torch.cuda.max_memory_allocated``) and MFU: model FLOPs of the real batches
  (:func:`moon3.model.plan.train_flops`: padding and gradient-checkpointing recomputation not counted) per
  second over the GPUs' bf16 dense peak (:data:`moon3.model.plan.PEAK_BF16_TFLOPS`, or ``--peak-tflops``);
- ``embed`` (one process): the same model in bf16 embeds products and queries with reasoning off and on
  (a random model never closes its trace: every trace runs to the full budget, the worst case);
- ``report``: the JSON files of a run folder as Markdown rows for BENCHMARKS.md.

On a CPU (no GPU needed) the same code runs with a tiny config, which is how it is tested::

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 1 -m bench.bench_gpu train \\
        --config moon3/model/tiny/qwen2_5_vl.json --data DIR --batch 2 --steps 2 --warmup 1 --out train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "moon3" / "model" / "real" / "qwen2_5_vl_3b.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_tflops(device: torch.device, override: float) -> tuple[float | None, str]:
    from moon3.model.plan import PEAK_BF16_TFLOPS

    if override > 0:
        return override, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value, name
    return None, name


def cmd_data(args: argparse.Namespace) -> None:
    """Write the benchmark's dataset."""
    from moon3.data.config import DataConfig
    from moon3.data.mini import make_sample

    out = Path(args.out)
    if (out / "products.parquet").exists():
        print(f"{out}: exists, kept")
        return
    make_sample(DataConfig(n_products=args.products, n_queries=args.products, image_size=args.image_size), out,
                progress=False)  # fmt: skip
    print(f"wrote {out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Time training steps (see the module docstring); rank 0 writes ``--out``."""
    import deepspeed

    from moon3.model.config import ModelConfig
    from moon3.model.embedder import Moon3Embedder
    from moon3.model.items import catalog_texts
    from moon3.model.plan import dims_of, train_flops
    from moon3.model.presets import learning_rates
    from moon3.train.config import TrainConfig
    from moon3.train.contrastive import (
        BatchBuilder,
        ContrastiveModel,
        StepBatches,
        _freeze_unused_lm_head,
        _positive_index,
        _single_threaded_worker,
        _to_device,
        _zero3_leaf_modules,
        deepspeed_config,
        parameter_groups,
        setup_distributed,
        warmup_cosine,
    )
    from moon3.train.data import HardNegativeSampler, PairData
    from moon3.train.loss import gather_no_grad

    dist = setup_distributed(use_deepspeed=True)
    total_steps = args.warmup + args.steps
    tc = TrainConfig(
        batch_size=args.batch,
        steps=total_steps,
        warmup_steps=min(20, total_steps),
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        deepspeed_config=str(REPO / "infra" / "deepspeed" / f"zero{args.zero}.json"),
        traces_dir="",
        num_workers=args.workers,
    )
    ds_config = deepspeed_config(tc, dist.device)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    data = PairData(args.data, "train", None)
    mcfg = ModelConfig(backbone=str(args.config), reasoning=False)
    started = time.perf_counter()
    embedder = Moon3Embedder.from_config(mcfg, catalog_texts(args.data), device=dist.device,
                                         dtype=torch.bfloat16 if bf16 else torch.float32)  # fmt: skip
    build_s = time.perf_counter() - started
    if tc.gradient_checkpointing:
        embedder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _freeze_unused_lm_head(embedder)
    model = ContrastiveModel(embedder, tc.temperature_init).to(dist.device)
    lrs = learning_rates(tc, embedder.cfg.preset)
    optimizer = torch.optim.AdamW(parameter_groups(model, tc, lrs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, tc.steps))
    _zero3_leaf_modules(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    sampler = HardNegativeSampler(data, tc.batch_size, tc.hard_negatives_per_query, tc.seed, dist.world_size,
                                  tc.hard_negative_mode)  # fmt: skip
    builder = BatchBuilder(data, embedder.prepare_batch, 0.0, tc.seed)
    loader = torch.utils.data.DataLoader(
        StepBatches(sampler, builder, dist.rank, 0, total_steps),
        batch_size=None,
        num_workers=tc.num_workers,
        prefetch_factor=2 if tc.num_workers > 0 else None,
        worker_init_fn=_single_threaded_worker,
    )
    dims = dims_of(embedder.backbone)
    fire_layers = len(embedder.fire.layers) if embedder.fire is not None else 0
    flops, pairs, tokens, sequences, losses = 0.0, 0, 0, 0, []
    model.train()
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == args.warmup:
            _sync(dist.device)
            t0 = time.perf_counter()
        inputs = _to_device(batch["inputs"], dist.device)
        codes = gather_no_grad(batch["product_codes"].to(dist.device))
        query_rows = gather_no_grad(batch["query_rows"].to(dist.device))
        relevant = torch.as_tensor(data.relevant(query_rows.cpu().numpy(), codes.cpu().numpy())).to(dist.device)
        positive = _positive_index(batch["n_queries"], batch["n_products"], dist.world_size, dist.device)
        parts = engine(inputs, batch["n_queries"], positive, codes, tc.lambda_sft, relevant)
        engine.backward(parts["loss"])
        engine.step()
        losses.append(float(parts["loss"].detach()))
        if step >= args.warmup:
            seq_lens = inputs["attention_mask"].sum(dim=1).tolist()
            grid = inputs.get("image_grid_thw")
            patches = grid.prod(dim=-1).tolist() if grid is not None else []
            flops += train_flops(dims, seq_lens, patches, 0, fire_layers, embedder.fusion is not None)
            pairs += batch["n_queries"]
            tokens += int(sum(seq_lens))
            sequences += len(seq_lens)
    _sync(dist.device)
    elapsed = time.perf_counter() - t0
    totals = torch.tensor([flops, pairs, tokens, sequences], dtype=torch.float64, device=dist.device)
    peak = torch.tensor(
        [torch.cuda.max_memory_allocated(dist.device) / 2**30 if dist.device.type == "cuda" else 0.0],
        device=dist.device,
    )
    if dist.world_size > 1:
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    flops, pairs, tokens, sequences = totals.tolist()
    peak_tflops, device_name = _peak_tflops(dist.device, args.peak_tflops)
    achieved = flops / max(elapsed, 1e-9) / 1e12
    result = {
        "what": "train",
        "config": str(args.config),
        "preset": embedder.cfg.preset,
        "zero": args.zero,
        "bf16": bf16,
        "gradient_checkpointing": tc.gradient_checkpointing,
        "gpus": dist.world_size,
        "device": device_name,
        "pairs_per_gpu_step": args.batch,
        "sequences_per_pair": 2 + tc.hard_negatives_per_query,
        "timed_steps": args.steps,
        "seconds": elapsed,
        "pairs_per_second": pairs / max(elapsed, 1e-9),
        "pairs_per_second_per_gpu": pairs / max(elapsed, 1e-9) / dist.world_size,
        "mean_tokens_per_sequence": tokens / max(sequences, 1),
        "model_tflops_per_pair": flops / max(pairs, 1) / 1e12,
        "achieved_tflops_per_gpu": achieved / dist.world_size,
        "peak_tflops_per_gpu": peak_tflops,
        "mfu": achieved / (peak_tflops * dist.world_size) if peak_tflops else None,
        "peak_memory_gib": float(peak.item()) if dist.device.type == "cuda" else None,
        "build_seconds": build_s,
        "parameters": sum(p.numel() for p in embedder.parameters()) if args.zero == 2 else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "host": platform.node(),
    }
    if dist.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    if dist.world_size > 1:
        torch.distributed.barrier()


def cmd_embed(args: argparse.Namespace) -> None:
    """Time embeddings with reasoning off and on (one process; the GPU if there is one)."""
    from moon3.data.schema import read_dataset
    from moon3.model.config import ModelConfig
    from moon3.model.embedder import Moon3Embedder, TraceStats
    from moon3.model.items import catalog_texts, product_item, query_item

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = Moon3Embedder.from_config(ModelConfig(backbone=str(args.config), reasoning=True),
                                      catalog_texts(args.data), device=device, dtype=dtype)  # fmt: skip
    model = model.to(dtype).eval()
    products, queries = read_dataset(args.data)
    half = args.items // 2
    items = [product_item(r, args.data) for _, r in products.head(half).iterrows()]
    items += [query_item(r, args.data) for _, r in queries.head(args.items - half).iterrows()]
    result: dict[str, Any] = {"what": "embed", "config": str(args.config), "preset": model.cfg.preset,
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "dtype": str(dtype).replace("torch.", ""), "items": len(items), "batch": args.batch,
                              "trace_budget": model.contract.max_trace_tokens}  # fmt: skip
    for reasoning in (False, True):
        model.embed(items[: args.batch], reasoning=reasoning, batch_size=args.batch)  # warm-up
        stats = TraceStats()
        _sync(device)
        started = time.perf_counter()
        out = model.embed(items, reasoning=reasoning, batch_size=args.batch, trace_stats=stats)
        _sync(device)
        seconds = time.perf_counter() - started
        key = "reasoning_on" if reasoning else "reasoning_off"
        result[key] = {"embeddings_per_second": len(items) / seconds, "seconds": seconds, **stats.summary()}
        assert out.shape == (len(items), model.contract.embed_dim) and out.dtype == torch.float32
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def cmd_report(args: argparse.Namespace) -> None:
    """Markdown rows of a run folder's ``train.json`` and ``embed.json``."""
    folder = Path(args.folder)
    train = json.loads((folder / "train.json").read_text()) if (folder / "train.json").exists() else None
    embed = json.loads((folder / "embed.json").read_text()) if (folder / "embed.json").exists() else None
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    if train:
        print("| config | GPUs | ZeRO | pairs/GPU/step | pairs/s | pairs/s/GPU | peak GiB | TFLOP/s/GPU | MFU |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {Path(train['config']).stem} ({train['device']}) | {train['gpus']} | {train['zero']} | "
              f"{train['pairs_per_gpu_step']} | {train['pairs_per_second']:.1f} | "
              f"{train['pairs_per_second_per_gpu']:.1f} | {fmt(train['peak_memory_gib'], '.1f')} | "
              f"{train['achieved_tflops_per_gpu']:.0f} | {fmt(train['mfu'], '.1%')} |")  # fmt: skip
    if embed:
        print()
        print("| config | dtype | batch | reasoning | embeddings/s | mean trace tokens |")
        print("|---|---|---|---|---|---|")
        for key in ("reasoning_off", "reasoning_on"):
            row = embed[key]
            print(f"| {Path(embed['config']).stem} ({embed['device']}) | {embed['dtype']} | {embed['batch']} | "
                  f"{key.split('_')[1]} | {row['embeddings_per_second']:.1f} | "
                  f"{fmt(row.get('mean_trace_tokens'), '.0f')} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    data = sub.add_parser("data", help="write the benchmark dataset")
    data.add_argument("--out", required=True)
    data.add_argument("--products", type=int, default=2000)
    data.add_argument("--image-size", type=int, default=512, help="product photo side in px")
    train = sub.add_parser("train", help="time training steps (run under torchrun)")
    embed = sub.add_parser("embed", help="time embeddings, reasoning off and on")
    for p in (train, embed):
        p.add_argument("--config", default=str(DEFAULT_CONFIG), help="backbone config JSON")
        p.add_argument("--data", required=True, help="dataset folder (bench_gpu data)")
        p.add_argument("--out", required=True, help="JSON result file")
    train.add_argument("--batch", type=int, default=8, help="query/product pairs per GPU per step")
    train.add_argument("--steps", type=int, default=20, help="timed steps")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    train.add_argument("--zero", type=int, choices=(2, 3), default=2)
    train.add_argument("--precision", default="bf16", help="bf16 | fp32 | auto")
    train.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    train.add_argument("--workers", type=int, default=4, help="DataLoader workers building batches")
    train.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak per GPU (0: from the name)")
    embed.add_argument("--items", type=int, default=256)
    embed.add_argument("--batch", type=int, default=32)
    report = sub.add_parser("report", help="Markdown rows of a run folder")
    report.add_argument("folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"data": cmd_data, "train": cmd_train, "embed": cmd_embed, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
