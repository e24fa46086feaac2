"""moon3.common.progress: a tqdm bar on a terminal, plain timed lines with rate and ETA everywhere else."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

from moon3.common.progress import INTERVAL_ENV, Progress, default_interval

LINE = re.compile(r"(?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) \(\d+%\) elapsed \S+, ETA \S+, [\d.]+\S+/s(, .*)?")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eval_embedding_loop_prints_plain_lines_when_output_is_piped():
    """The evaluation's embedding loop in a subprocess whose stdout and stderr are pipes (dvc repro in CI)."""
    script = textwrap.dedent(
        """
        import time
        import numpy as np
        import pandas as pd
        from moon3.eval.tasks import embed_rows

        def embed(items):
            time.sleep(0.02)
            return np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(items), 1))  # unit rows

        frame = pd.DataFrame({"title": [f"t{i}" for i in range(12)]})
        out = embed_rows(embed, frame, lambda row: {"text": row["title"]}, 3, "model products", progress=True)
        print("rows", len(out))
        """
    )
    env = {**os.environ, INTERVAL_ENV: "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "rows 12"  # progress never mixes into stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("embed model products:")]
    assert [LINE.fullmatch(line)["n"] for line in lines] == ["1", "2", "3", "4"], result.stderr
    assert lines[-1].startswith("embed model products: 4/4 (100%)") and "chunk/s" in lines[-1]
    assert "\r" not in result.stderr


def test_plain_lines_respect_the_interval_and_end_with_a_final_line():
    stream = io.StringIO()
    bar = Progress(total=50, desc="steps", file=stream, interval=3600, disable=False)
    for i in range(50):
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}", refresh=False)
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), lines  # within the interval: only the closing line
    assert lines[0].startswith("steps: 50/50 (100%)") and lines[0].endswith("loss=0.02")

    stream = io.StringIO()
    for _ in Progress(range(4), desc="it", file=stream, interval=0, disable=False):
        pass
    assert [LINE.fullmatch(line)["n"] for line in stream.getvalue().splitlines()] == ["1", "2", "3", "4"]

    stream = io.StringIO()
    for _ in Progress(range(4), desc="off", file=stream, interval=0, disable=True):
        pass
    assert stream.getvalue() == ""


def test_a_terminal_gets_the_usual_tqdm_bar():
    stream = _Terminal()
    bar = Progress(total=3, desc="tty", file=stream, interval=0, disable=False, mininterval=0)
    assert not bar.plain
    bar.update(3)
    bar.close()
    assert "\r" in stream.getvalue() and "tty: 100%" in stream.getvalue()


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert default_interval() == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    assert default_interval() == 30.0
    monkeypatch.delenv(INTERVAL_ENV)
    assert default_interval() == 30.0
