"""Shared fixtures. Environment first: these keep third-party tools quiet and offline in every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread: the tiny models gain nothing from two, and on a busy 2-core runner two threads spin-wait
# for each other (measured 3-10x slower). Subprocesses (torchrun ranks, dvc stages) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moon3.data.config import DataConfig  # noqa: E402
from moon3.data.mini import make_sample  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mini_dataset(tmp_path_factory) -> Path:
    """A small mbe3-mini sample shared by the whole session (read-only: copy it before corrupting)."""
    root = tmp_path_factory.mktemp("mbe3-mini")
    make_sample(DataConfig(n_products=200, n_queries=200, seed=0), root, progress=False)
    return root


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a training subprocess: no inherited rank variables, MLflow in ``tmp_path``, DeepSpeed on
    CPU with a cached extensions folder, one OpenMP thread."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(repo / ".venv" / "torch_extensions")),
    )
    return env


@contextmanager
def mlflow_server_at(root: Path, serve_artifacts: bool = False) -> Iterator[str]:
    """A real MLflow tracking server on a free loopback port with a sqlite store under ``root``; yields its URL.

    Args:
        root: folder for the store and the artifacts.
        serve_artifacts: the server stores and serves artifacts itself (``--artifacts-destination``, what the
            registry needs); else clients write to a local artifact root.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    artifacts = ["--artifacts-destination" if serve_artifacts else "--default-artifact-root", str(root / "art")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db", *artifacts],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not start within 120 s")
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
