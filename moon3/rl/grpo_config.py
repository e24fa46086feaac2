"""Configuration of RL fine-tuning with GRPO (``params.yaml`` section ``rl``; method.md section 4, stage B)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RLConfig:
    """Stage B: sample G traces per training query, reward each by how well the embedding made after it ranks
    the query's positive among the batch's products, and update with TRL's clipped GRPO loss plus an InfoNCE
    anchor."""

    enabled: bool = field(
        default=True,
        metadata={
            "help": "false: the rl stage copies the pretrained model unchanged (recorded as 'rl skipped'); a model "
            "trained without traces is always copied, since it has no trace policy to improve."
        },
    )
    init_dir: str = field(
        default="models/pretrain/final", metadata={"help": "The pretrained (trace-SFT) model RL starts from."}
    )
    out_dir: str = field(default="models/rl", metadata={"help": "checkpoints/ and final/."})
    report_dir: str = field(default="reports/rl", metadata={"help": "rl_metrics.json and dvclive plots."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps (one generation batch each)."})
    queries_per_step: int = field(
        default=8, metadata={"help": "Distinct training queries per step and process, num_generations traces each."}
    )
    num_generations: int = field(default=4, metadata={"help": "G: traces sampled per query (8 on GPU)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the traces."})
    lr: float = field(default=1e-4, metadata={"help": "Learning rate of the backbone (~1e-6 for a real one)."})
    lr_heads: float = field(default=1e-4, metadata={"help": "Learning rate of the fusion, FIRE and projection heads."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    beta: float = field(default=0.02, metadata={"help": "KL weight to the frozen reference (the starting model)."})
    epsilon: float = field(default=0.2, metadata={"help": "GRPO ratio clipping."})
    reward_rank_weight: float = field(default=1.0, metadata={"help": "Weight of r_rank = 1 - log(rank)/log(N)."})
    reward_format_weight: float = field(default=0.5, metadata={"help": "Weight of r_format (trace closed)."})
    format_reward: Literal["grounded", "syntax"] = field(
        default="grounded",
        metadata={
            "help": "r_format: grounded = closed key: value lines scored against the query's positive (true claims "
            "pay, false ones cost) | syntax = closed key: value lines, whatever they say."
        },
    )
    reward_len_weight: float = field(default=0.2, metadata={"help": "Weight of r_len (inside the trace budget)."})
    infonce_weight: float = field(
        default=0.1, metadata={"help": "Weight of InfoNCE over the post-trace embeddings (keeps the space in place)."}
    )
    infonce_temperature: float = field(default=0.05, metadata={"help": "Temperature of that InfoNCE term."})
    hard_negatives_per_query: int = field(
        default=1, metadata={"help": "Hard negatives added to the batch's products per query (the rank's competitors)."}
    )
    hard_negative_mode: str = field(
        default="mixed", metadata={"help": "same_category | attribute_matched | mixed (as train.hard_negative_mode)."}
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of the whole backbone."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N steps (resume with --resume)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler, the trace sampling and the updates."})
    torch_threads: int = field(default=0, metadata={"help": "CPU threads (0 = all cores)."})
    deepspeed_config: str = field(
        default="", metadata={"help": "DeepSpeed JSON (infra/deepspeed/zero2.json or zero3.json); '' = none."}
    )
    mlflow_experiment: str = field(default="moon3", metadata={"help": "MLflow experiment of the run."})
