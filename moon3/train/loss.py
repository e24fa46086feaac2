"""Symmetric InfoNCE with a learnable temperature and negatives gathered across data-parallel ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TAU_MIN, TAU_MAX = 0.01, 1.0


class LearnableTemperature(nn.Module):
    """tau = exp(log_tau), clamped to [0.01, 1] (method.md section 4)."""

    def __init__(self, init: float = 0.05):
        super().__init__()
        # Shape (1,), not a 0-dim scalar: DeepSpeed's CPU broadcast cannot view a 0-dim tensor as bytes.
        self.log_tau = nn.Parameter(torch.tensor([math.log(init)]))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(TAU_MIN, TAU_MAX)[0]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order; gradients flow back to each rank's own shard.

    ``torch.distributed.nn.all_gather`` sums the incoming gradients in its backward, so when every rank computes
    the same global loss each shard receives ``world_size`` times its gradient, which the data-parallel gradient
    average divides out again: the update equals the single-process one on the global batch.
    """
    if not is_distributed():
        return x
    return torch.cat(torch.distributed.nn.all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor (ids, indices) from every rank without autograd."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def contrastive_loss(
    queries: torch.Tensor,
    products: torch.Tensor,
    positive_index: torch.Tensor,
    product_ids: torch.Tensor,
    temperature: torch.Tensor,
    relevant: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities.

    Args:
        queries: ``(Q, D)`` unit-norm query embeddings.
        products: ``(P, D)`` unit-norm product embeddings; each query's positive is among them, the rest
            (other positives and hard negatives) are its negatives.
        positive_index: ``(Q,)`` index into ``products`` of each query's positive.
        product_ids: ``(P,)`` integer product identities; a product that appears twice (two queries bought
            the same thing) is masked out as a negative of its own queries instead of pushing them apart.
        temperature: scalar tau.
        relevant: optional ``(Q, P)`` bool, True where a product other than the query's own positive also
            answers the query (every product under the category of a category-name query); those are not
            negatives of that query, in either direction.

    Returns:
        ``(L_q->p + L_p->q) / 2``; the product->query direction runs over the positives only, since hard
        negatives have no query of their own.
    """
    logits = queries @ products.T / temperature
    same = product_ids[positive_index][:, None] == product_ids[None, :]
    if relevant is not None:
        same = same | relevant
    own = F.one_hot(positive_index, num_classes=products.shape[0]).bool()
    logits = logits.masked_fill(same & ~own, float("-inf"))
    loss_q2p = F.cross_entropy(logits, positive_index)
    logits_p2q = logits.T[positive_index]  # (Q, Q): row i = positive of query i against every query
    # Entry (i, j) is the positive of query i scored against query j: masked when it also answers query j.
    same_q = same[:, positive_index].T
    diagonal = torch.eye(len(positive_index), dtype=torch.bool, device=logits.device)
    logits_p2q = logits_p2q.masked_fill(same_q & ~diagonal, float("-inf"))
    loss_p2q = F.cross_entropy(logits_p2q, torch.arange(len(positive_index), device=logits.device))
    return (loss_q2p + loss_p2q) / 2
