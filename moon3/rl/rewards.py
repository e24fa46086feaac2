"""The GRPO rewards of method.md section 4, as plain functions of tensors and token ids.

- ``r_rank = 1 - log(rank) / log(N)``: ``rank`` is the positive's rank among the batch's ``N`` products for the
  embedding made after the trace, by the evaluation's own rule (:func:`moon3.eval.search.rank_of_positive`:
  ties count against the query, so a collapsed embedding earns 0, never 1);
- ``r_format``: 1 if the trace is well formed: closed by the model itself with ``</think>`` and made of
  ``key: value`` lines (the grounding filter's parser, the format the teachers write), else 0;
- ``r_len``: 1 inside the trace budget, falling linearly to 0 at twice it.

The trainer (:mod:`moon3.rl.grpo_trainer`) registers each as its own TRL reward function, so TRL logs them apart
and weights them with ``rl.reward_*_weight`` (1.0, 0.5, 0.2 by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moon3.eval.search import rank_of_positive
from moon3.synthesis.grounding import parse_claims


def rank_reward(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``1 - log(rank) / log(N)`` per query row.

    Args:
        scores: ``(Q, N)`` similarities of each query to the batch's products.
        positives: ``(Q,)`` column of each query's positive.

    Returns:
        ``(Q,)`` float rewards in ``[0, 1]``: 1 at rank 1, 0 at rank N (and for every query of a collapsed model).
    """
    n = scores.shape[1]
    if n < 2:
        raise ValueError(f"rank reward needs at least 2 products in the batch, got {n}")
    ranks = rank_of_positive(scores, positives).to(torch.float32)
    return 1.0 - torch.log(ranks) / math.log(n)


def format_reward(bodies: Sequence[str], completion_ids: Sequence[Sequence[int]], end_id: int) -> list[float]:
    """1.0 for a well-formed trace, else 0.0.

    Args:
        bodies: the decoded trace texts (special tokens skipped).
        completion_ids: the sampled token ids; a closed trace ends with ``end_id``.
        end_id: the id of ``</think>``.
    """
    out = []
    for body, ids in zip(bodies, completion_ids, strict=True):
        closed = bool(ids) and int(ids[-1]) == end_id
        out.append(float(closed and bool(parse_claims(body))))
    return out


def length_reward(completion_ids: Sequence[Sequence[int]], end_id: int, budget: int) -> list[float]:
    """1.0 for a trace of at most ``budget`` tokens (``</think>`` not counted), falling linearly to 0.0 at twice it."""
    out = []
    for ids in completion_ids:
        length = len(ids) - int(bool(ids) and int(ids[-1]) == end_id)
        out.append(float(min(1.0, max(0.0, 2.0 - length / budget))))
    return out
