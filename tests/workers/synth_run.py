"""Worker for the synthesis fault test: synthesize N numbered products against a teacher server, with a cache.

Usage: ``synth_run.py BASE_URL CACHE_DB OUT_JSON N CONCURRENCY``. Writes the outcomes as a JSON list. The test
SIGKILLs it half-way and runs it again; the API key comes from ``SYNTH_TEST_KEY``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from moon3.synthesis.cache import TraceCache
from moon3.synthesis.client import run_teacher_sync
from moon3.synthesis.openai_teacher import OpenAITeacher
from moon3.synthesis.teacher import SynthesisItem


def items(n: int) -> list[SynthesisItem]:
    """``n`` products with distinct titles (and so distinct cache keys)."""
    return [SynthesisItem(f"p{i:03d}", "product", f"widget number {i}", None, ".") for i in range(n)]


def main(base_url: str, cache_db: str, out_json: str, n: str, concurrency: str) -> None:
    teacher = OpenAITeacher(base_url, "scripted-vl", api_key_env="SYNTH_TEST_KEY", max_tokens=64)
    with TraceCache(cache_db) as cache:
        outcomes = run_teacher_sync(
            items(int(n)), teacher, cache=cache, concurrency=int(concurrency), timeout_s=5.0,
            max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05, progress=False,
        )  # fmt: skip
    with open(out_json, "w") as f:
        json.dump([dataclasses.asdict(o) for o in outcomes], f)


if __name__ == "__main__":
    main(*sys.argv[1:])
