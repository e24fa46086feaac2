"""moon3.rl: stage B, GRPO fine-tuning on the model's own traces (method.md section 4).

``grpo_config.py`` (the ``rl`` section of params.yaml), ``grpo_trainer.py`` (TRL's GRPOTrainer driving the moon3
embedder), ``rewards.py`` (r_rank, r_format, r_len), ``finetune.py`` (the stage), ``cli.py`` (``moon3 train rl``).
"""
