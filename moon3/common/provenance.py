"""Where a result came from: the git commit of the code and a hash of the configuration that produced it.

Reports (evaluation), pipeline versions (KFP compile) and run metadata use these, so one commit and one
configuration have one name everywhere.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

# The checkout this package was imported from (a site-packages install has no .git: the helpers return None).
REPO = Path(__file__).resolve().parents[2]
# Beside each stage's reports: what differs between two runs of the same inputs (wall-clock seconds, rates, the
# MLflow run id, cache hits). Not a DVC output, so a repeated run reproduces every tracked file byte for byte.
RUN_FILE = "run.json"


def git_output(repo: Path, *args: str) -> str | None:
    """Standard output of ``git -C repo ARGS``, or None when git is missing or fails (not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_sha(repo: str | Path = REPO, short: bool = True) -> str | None:
    """The commit of ``HEAD`` in ``repo`` (``git rev-parse [--short] HEAD``), or None outside a git checkout."""
    out = git_output(Path(repo), "rev-parse", *(["--short"] if short else []), "HEAD")
    return (out or "").strip() or None


def git_dirty(repo: str | Path = REPO) -> bool | None:
    """Whether tracked files differ from ``HEAD`` (untracked files do not count); None outside a git checkout."""
    out = git_output(Path(repo), "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def params_hash(params: dict[str, Any], length: int = 12) -> str:
    """First ``length`` hex characters of the sha256 of ``params`` as canonical JSON (sorted keys, no spaces).

    Two configurations hash alike exactly when they are equal as JSON, whatever their key order.
    """
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]
