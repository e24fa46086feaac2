"""Worker for test_train_distributed: one rank's InfoNCE loss and gradients on a shard of a fixed global batch.

Run under ``torchrun --nproc_per_node N``; rank 0 writes the loss and the averaged gradients to ``argv[3]``.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from moon3.model.embedder import Moon3Embedder
from moon3.train.contrastive import BatchBuilder, ContrastiveModel, _positive_index, setup_distributed
from moon3.train.data import HardNegativeSampler, PairData
from moon3.train.loss import gather_no_grad


def main(init_dir: str, data_dir: str, out_file: str, global_batch: int = 8) -> None:
    dist = setup_distributed(use_deepspeed=False)
    model = ContrastiveModel(Moon3Embedder.from_pretrained(init_dir), 0.05)
    model.train()
    data = PairData(data_dir, "train")
    sampler = HardNegativeSampler(data, global_batch // dist.world_size, 1, seed=0, world_size=dist.world_size)
    batch = BatchBuilder(data, model.embedder.prepare_batch)(sampler.batch(0, dist.rank))
    codes = gather_no_grad(batch["product_codes"])
    positive_index = _positive_index(batch["n_queries"], batch["n_products"], dist.world_size, torch.device("cpu"))
    parts = model(batch["inputs"], batch["n_queries"], positive_index, codes, 0.0)
    parts["loss"].backward()
    grads = {}
    for name in ("temperature.log_tau", "embedder.proj.weight"):
        grad = dict(model.named_parameters())[name].grad.clone()
        if dist.world_size > 1:  # what DDP does: average over ranks
            torch.distributed.all_reduce(grad)
            grad /= dist.world_size
        grads[name] = grad.reshape(-1)
    if dist.rank == 0:
        save_file({"loss": parts["loss"].detach().reshape(1), **grads}, out_file)
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
