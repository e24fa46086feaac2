"""The GRPO rewards of method.md section 4, as plain functions of tensors and token ids.

- ``r_rank = 1 - log(rank) / log(N)``: ``rank`` is the positive's rank among the batch's ``N`` products for the
  embedding made after the trace, by the evaluation's own rule (:func:`moon3.eval.search.rank_of_positive`:
  ties count against the query, so a collapsed embedding earns 0, never 1);
- ``r_format`` (``rl.format_reward``): ``syntax``: 1 if the trace is well formed: closed by the model itself with
  ``</think>`` and made of ``key: value`` lines (the grounding filter's parser, the format the teachers write),
  else 0. ``grounded``: the same gate, then scored against what the catalog knows of the query's positive (the
  synthesis grounding filter's truth): ``max(0, (right - wrong) / claims) * (1 + coverage) / 2``, where
  ``coverage`` is the share of the truth's keys (category + attributes) claimed right. Under ``syntax`` GRPO was
  seen to converge to one constant, well-formed but false line (``category: medium``) for every query;
  ``grounded`` pays only for true claims and more for covering more of them;
- ``r_len``: 1 inside the trace budget, falling linearly to 0 at twice it.

The trainer (:mod:`moon3.rl.grpo_trainer`) registers each as its own TRL reward function, so TRL logs them apart
and weights them with ``rl.reward_*_weight`` (1.0, 0.5, 0.2 by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moon3.eval.search import rank_of_positive
from moon3.synthesis.grounding import claim_is_right, parse_claims
from moon3.synthesis.teacher import SynthesisItem


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


def grounded_format_reward(
    bodies: Sequence[str], completion_ids: Sequence[Sequence[int]], end_id: int, truths: Sequence[SynthesisItem]
) -> list[float]:
    """The ``grounded`` format reward (module docstring) of each trace against its query's truth.

    Args:
        bodies: the decoded trace texts (special tokens skipped).
        completion_ids: the sampled token ids; a closed trace ends with ``end_id``.
        end_id: the id of ``</think>``.
        truths: per trace, the item whose category path and attributes the claims are checked against (a
            category query's truth has its category only: its positives share nothing else).

    Returns:
        Rewards in ``[0, 1]``: 0 for an unclosed or unparseable trace, or one with as many wrong claims as right.
    """
    out = []
    for body, ids, truth in zip(bodies, completion_ids, truths, strict=True):
        closed = bool(ids) and int(ids[-1]) == end_id
        claims = list(dict.fromkeys(parse_claims(body) or []))  # a repeated claim counts once
        if not closed or not claims:
            out.append(0.0)
            continue
        verdicts = [claim_is_right(truth, k, v) for k, v in claims]
        right, wrong = sum(v is True for v in verdicts), sum(v is False for v in verdicts)
        keys = 1 + len(truth.attributes) if truth.category_path else len(truth.attributes)
        covered = len({k for (k, _), v in zip(claims, verdicts, strict=True) if v is True})
        coverage = min(1.0, covered / keys) if keys else 0.0
        out.append(max(0.0, (right - wrong) / len(claims)) * (1.0 + coverage) / 2.0)
    return out


def length_reward(completion_ids: Sequence[Sequence[int]], end_id: int, budget: int) -> list[float]:
    """1.0 for a trace of at most ``budget`` tokens (``</think>`` not counted), falling linearly to 0.0 at twice it."""
    out = []
    for ids in completion_ids:
        length = len(ids) - int(bool(ids) and int(ids[-1]) == end_id)
        out.append(float(min(1.0, max(0.0, 2.0 - length / budget))))
    return out
