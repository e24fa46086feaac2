"""Run a teacher over many items: bounded concurrency, per-request timeouts, retries with backoff, the cache.

Every item ends as an :class:`Outcome`, ``ok`` (with a trace) or ``failed`` (with the last error), in input
order: nothing is lost, so ``len(items) == ok + failed`` always. Items with the same content (the same cache
key) are asked once and share the answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from moon3.common.retry import backoff_delay
from moon3.synthesis.cache import TraceCache, canonical_json
from moon3.synthesis.teacher import SynthesisItem, Teacher, TeacherError

log = logging.getLogger(__name__)

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of one item.

    Attributes:
        item_id: the item's id.
        status: ``ok`` or ``failed``.
        trace: the trace body (None when failed).
        error: the last error, one line (None when ok).
        attempts: teacher calls made for it in this run (0 when it came from the cache).
        cached: the trace came from the cache, no request was made.
        teacher, model, prompt_hash: which teacher and prompt produced it.
        decoding: the teacher's decoding parameters as canonical JSON.
    """

    item_id: str
    status: str
    trace: str | None
    error: str | None
    attempts: int
    cached: bool
    teacher: str
    model: str
    prompt_hash: str
    decoding: str


@dataclass(frozen=True)
class _Result:
    trace: str | None
    error: str | None
    attempts: int
    cached: bool


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


async def run_teacher(
    items: Sequence[SynthesisItem],
    teacher: Teacher,
    cache: TraceCache | None = None,
    concurrency: int = 8,
    timeout_s: float = 120.0,
    max_retries: int = 4,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: bool = True,
) -> list[Outcome]:
    """Ask ``teacher`` for a trace for every item; return one :class:`Outcome` per item, in input order.

    Args:
        items: the items (ids need not be unique; content decides the cache key).
        teacher: the teacher; its ``aclose()`` (if it has one) is awaited at the end.
        cache: cached traces are returned without a request; new ones are stored as each item completes.
        concurrency: at most this many teacher calls at once.
        timeout_s: per-call limit; a call past it is cancelled and counts as a retryable failure.
        max_retries: retries after the first attempt for retryable errors (so at most ``max_retries + 1`` calls).
        backoff_base_s: first backoff ceiling; doubles per retry (full jitter).
        backoff_max_s: ceiling of every wait, ``Retry-After`` included.
        progress: show a tqdm bar with rate and ETA.

    Returns:
        One outcome per item, same order as ``items``.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    decoding = canonical_json(teacher.decoding)
    prompt_hash = teacher.prompt_hash()
    meta = {"teacher": teacher.name, "model": teacher.model, "prompt_hash": prompt_hash, "decoding": decoding}
    keys = [TraceCache.key_for(item, teacher) for item in items]
    first_item: dict[str, SynthesisItem] = {}
    for key, item in zip(keys, items, strict=True):
        first_item.setdefault(key, item)

    slots = asyncio.Semaphore(concurrency)
    rng = random.Random()
    counts = {OK: 0, FAILED: 0, "cached": 0}
    bar = tqdm(total=len(first_item), unit="trace", desc=f"synthesis[{teacher.name}]", disable=not progress)

    def done(result: _Result) -> _Result:
        counts[OK if result.trace is not None else FAILED] += 1
        counts["cached"] += result.cached
        bar.update(1)
        bar.set_postfix(counts, refresh=False)
        return result

    async def ask(key: str, item: SynthesisItem) -> _Result:
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            return done(_Result(hit.trace, None, 0, True))
        error = "not attempted"
        for attempt in range(1, max_retries + 2):
            retry_after = None
            async with slots:  # held only for the call: a backing-off item does not block the others
                try:
                    trace = await asyncio.wait_for(teacher.complete(item), timeout_s)
                except TimeoutError:
                    error, retryable = f"timed out after {timeout_s:g} s", True
                except TeacherError as exc:
                    error, retryable, retry_after = _one_line(exc), exc.retryable, exc.retry_after
                except Exception as exc:  # a teacher bug must fail its item, not the run (and not lose the rest)
                    error, retryable = f"{type(exc).__name__}: {_one_line(exc)}", False
                else:
                    if cache is not None:
                        cache.put(key, trace, {**meta, "content_hash": item.content_hash()})
                    return done(_Result(trace, None, attempt, False))
            if not retryable or attempt > max_retries:
                break
            delay = backoff_delay(attempt, backoff_base_s, backoff_max_s, retry_after, rng)
            log.debug("item %s attempt %d failed (%s); retrying in %.3f s", item.item_id, attempt, error, delay)
            await asyncio.sleep(delay)
        log.warning("item %s failed after %d attempt(s): %s", item.item_id, attempt, error)
        return done(_Result(None, error, attempt, False))

    try:
        results = await asyncio.gather(*(ask(key, item) for key, item in first_item.items()))
    finally:
        bar.close()
        aclose = getattr(teacher, "aclose", None)
        if aclose is not None:
            await aclose()
    by_key = dict(zip(first_item, results, strict=True))
    return [
        Outcome(
            item_id=item.item_id,
            status=OK if by_key[key].trace is not None else FAILED,
            trace=by_key[key].trace,
            error=by_key[key].error,
            attempts=by_key[key].attempts,
            cached=by_key[key].cached,
            teacher=teacher.name,
            model=teacher.model,
            prompt_hash=prompt_hash,
            decoding=decoding,
        )
        for key, item in zip(keys, items, strict=True)
    ]


def run_teacher_sync(items: Sequence[SynthesisItem], teacher: Teacher, **kwargs) -> list[Outcome]:
    """:func:`run_teacher` from synchronous code (a stage, a script): ``asyncio.run`` around it."""
    return asyncio.run(run_teacher(items, teacher, **kwargs))
