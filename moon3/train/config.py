"""Configuration of contrastive pretraining (``params.yaml`` section ``train``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Stage A of method.md section 4."""

    out_dir: str = field(default="models/pretrain", metadata={"help": "Checkpoints and the final model."})
    report_dir: str = field(
        default="reports/pretrain", metadata={"help": "train_metrics.json and dvclive plots (loss, temperature)."}
    )
    traces_dir: str = field(
        default="data/traces",
        metadata={"help": "Folder of traces.parquet (synthesize stage); '' = no traces, the model embeds directly."},
    )
    steps: int = field(default=600, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Query/product pairs per process per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(
        default=1e-3,
        metadata={"help": "Peak learning rate of the backbone (cosine schedule); ~1e-5 for a pretrained one."},
    )
    lr_heads: float = field(
        default=1e-3, metadata={"help": "Peak learning rate of the moon3 heads: fusion, FIRE, projection."}
    )
    lr_temperature: float = field(
        default=1e-2, metadata={"help": "Peak learning rate of the InfoNCE log-temperature (no weight decay)."}
    )
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off)."})
    temperature_init: float = field(default=0.05, metadata={"help": "Initial InfoNCE temperature (learnable)."})
    hard_negatives_per_query: int = field(default=1, metadata={"help": "Hard negatives added per query."})
    hard_negative_mode: str = field(
        default="mixed",
        metadata={
            "help": "same_category (a random product of the positive's leaf) | attribute_matched (another leaf "
            "sharing the most attribute values) | mixed (either, half each). Category queries always draw "
            "from sibling categories."
        },
    )
    lambda_sft: float = field(default=0.1, metadata={"help": "Weight of next-token loss on traces, if present."})
    trace_dropout: float = field(
        default=0.5,
        metadata={"help": "Share of items trained with an empty trace (direct embedding, no SFT) when traces exist."},
    )
    save_every: int = field(default=200, metadata={"help": "Checkpoint every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and initialisation."})
    num_workers: int = field(
        default=1, metadata={"help": "DataLoader workers building batches ahead (0: in the training process)."}
    )
    torch_threads: int = field(
        default=0, metadata={"help": "CPU intra-op threads; 0 = cores per process minus num_workers (CPU only)."}
    )
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on a bf16 GPU, else fp32) | fp32 | bf16."})
    heldout_queries: int = field(
        default=200, metadata={"help": "Eval-split text queries for the quick Recall@10 check at start/end (0: off)."}
    )
    log_every: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    deepspeed_config: str = field(default="", metadata={"help": "Path of a DeepSpeed JSON config ('' = off)."})
    mlflow_experiment: str = field(
        default="moon3", metadata={"help": "MLflow experiment name ('' = no MLflow run; dvclive still logs)."}
    )
    ablation: str = field(
        default="",
        metadata={
            "help": "'' for the full model, or one of moon3.train.ablations.ABLATIONS (no_fusion, no_fire, "
            "no_reasoning): that module switched off, same data, steps and seed (set by --ablation)."
        },
    )
