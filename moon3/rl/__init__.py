"""moon3.rl: stage B, GRPO fine-tuning on the model's own traces. Not built yet (an empty placeholder)."""
