"""The grounding filter: the trace gate between the teacher and pretraining.

Each trace is parsed into ``key: value`` claims and scored against what the catalog knows of its item (the
product's, or a query's positive's, category path and attributes):

- ``unparseable``: a line that is not ``key: value``, or no claim at all;
- ``contradicts_attribute``: a claim about a known key whose value differs from the truth (the category
  claim must be the true path or a prefix of it);
- ``over_budget``: longer than the contract's trace budget in tokens of the model's tokenizer;
- ``below_grounding``: the share of claims about known keys that are right is below ``min_grounded_score``;
- ``duplicate``: the same item already has this trace;
- ``unknown_item``: the trace names no training product or query of the dataset (only imported traces can: the
  stage builds the teacher's items from the validated tables).

Accepted traces keep the metadata of method.md section 5 and a ``grounded_score`` (right claims / all
claims; a claim about a key the catalog does not have counts as not grounded). Counts always reconcile:
items in = accepted + rejected + failed (the teacher never answered).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moon3.synthesis.attributes import CATEGORY_KEY, PATH_SEPARATOR
from moon3.synthesis.teacher import SynthesisItem

_LINE = re.compile(r"^\s*([^:\n]{1,64}?)\s*:\s*(.+?)\s*$")
UNPARSEABLE, CONTRADICTS, OVER_BUDGET, BELOW_GROUNDING, DUPLICATE, UNKNOWN_ITEM = (
    "unparseable",
    "contradicts_attribute",
    "over_budget",
    "below_grounding",
    "duplicate",
    "unknown_item",
)


@dataclass
class GateResult:
    """The gate's verdict on one trace: ``reason`` None means accepted."""

    reason: str | None
    grounded_score: float
    claims: int
    correct: int
    tokens: int


def parse_claims(trace: str) -> list[tuple[str, str]] | None:
    """``[(key, value), ...]`` of a trace body, or None if any non-empty line is not ``key: value``."""
    claims = []
    for line in trace.splitlines():
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            return None
        claims.append((match.group(1).strip().lower(), match.group(2).strip()))
    return claims


def claim_is_right(item: SynthesisItem, key: str, value: str) -> bool | None:
    """True/False for a claim about a key the item's data has; None for a key it has not."""
    if key == CATEGORY_KEY:
        claimed = [part.strip() for part in value.split(PATH_SEPARATOR.strip())]
        truth = list(item.category_path)
        return bool(truth) and 0 < len(claimed) <= len(truth) and claimed == truth[: len(claimed)]
    attributes = dict(item.attributes)
    if key not in attributes:
        return None
    return value.strip().lower() == str(attributes[key]).strip().lower()


def check_trace(
    item: SynthesisItem, trace: str, count_tokens: Callable[[str], int], budget: int, min_grounded_score: float
) -> GateResult:
    """Score one trace against its item (see the module docstring for the rules, in the order applied)."""
    tokens = count_tokens(trace)
    claims = parse_claims(trace)
    if not claims:
        return GateResult(UNPARSEABLE, 0.0, 0, 0, tokens)
    verdicts = [claim_is_right(item, k, v) for k, v in claims]
    correct = sum(v is True for v in verdicts)
    score = correct / len(claims)
    if any(v is False for v in verdicts):
        return GateResult(CONTRADICTS, score, len(claims), correct, tokens)
    if tokens > budget:
        return GateResult(OVER_BUDGET, score, len(claims), correct, tokens)
    if score < min_grounded_score:
        return GateResult(BELOW_GROUNDING, score, len(claims), correct, tokens)
    return GateResult(None, score, len(claims), correct, tokens)


def gate_traces(
    items: Sequence[SynthesisItem | None],
    traces: Sequence[str | None],
    count_tokens: Callable[[str], int],
    budget: int,
    min_grounded_score: float,
) -> tuple[list[GateResult | None], Counter]:
    """Check every item's trace (None: the teacher failed; an item None: the trace's item is unknown).

    Returns:
        Per-item results (None for failures) and the counts by outcome (``accepted``, each rejection reason,
        ``failed``); they always sum to ``len(items)``.
    """
    seen: set[tuple[str, str, str]] = set()
    results: list[GateResult | None] = []
    counts: Counter = Counter()
    for item, trace in zip(items, traces, strict=True):
        if trace is None:
            results.append(None)
            counts["failed"] += 1
            continue
        if item is None:
            result = GateResult(UNKNOWN_ITEM, 0.0, 0, 0, count_tokens(trace))
            counts[UNKNOWN_ITEM] += 1
            results.append(result)
            continue
        result = check_trace(item, trace, count_tokens, budget, min_grounded_score)
        key = (item.kind, item.item_id, trace.strip())
        if result.reason is None and key in seen:
            result.reason = DUPLICATE
        seen.add(key)
        counts[result.reason or "accepted"] += 1
        results.append(result)
    return results, counts
