"""Serving (issue 16): the real KServe ModelServer on 127.0.0.1 over HTTP (v1 and v2), the search model against
the evaluation's exact search, malformed requests, readiness, metrics, the demo page in headless Chromium, and the
KServe manifests / deploy step (Kubernetes API mocked: no cluster is reachable here)."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from PIL import Image
from typer.testing import CliRunner

from moon3.cli import app
from moon3.config import ConfigError, load_config
from moon3.data.schema import PRODUCTS, QUERIES, read_table, table_path, write_table
from moon3.eval.search import exact_search
from moon3.model.contract import ContractError
from moon3.model.embed import embed_table, load_embeddings
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts, query_item

REPO = Path(__file__).resolve().parents[1]
MOON3 = str(Path(sys.executable).parent / "moon3")
V1, S1 = "/v1/models/moon3:predict", "/v1/models/moon3-search:predict"
V2, S2 = "/v2/models/moon3/infer", "/v2/models/moon3-search/infer"
MAX_IMAGE_BYTES = 200_000  # lowered for the test server, so an oversized image is cheap to send


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def model_dir(mini_dataset, tmp_path_factory) -> Path:
    """The tiny untrained model from params defaults (contract: reasoning on, never trained with traces)."""
    model = Moon3Embedder.from_config(load_config(None).model, catalog_texts(mini_dataset))
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def model(model_dir) -> Moon3Embedder:
    return Moon3Embedder.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def index_dir(model_dir, mini_dataset) -> Path:
    """Built by the real CLI (`moon3 index build`) over every product."""
    out = model_dir.parent / "index"
    args = ["index", "build", "--params", str(REPO / "params.yaml"), "--model", str(model_dir),
            "--data", str(mini_dataset), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([MOON3, "serve", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=log.parent)  # fmt: skip


def _wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(model_dir, index_dir) -> str:
    """`moon3 serve` in its own process on 127.0.0.1 (a free port), gRPC off; yields the base URL."""
    port = _free_port()
    log = model_dir.parent / "server.log"
    args = ["--params", str(REPO / "params.yaml"), "--model", str(model_dir), "--index", str(index_dir),
            "--host", "127.0.0.1", "--port", str(port), "--set", "serve.enable_grpc=false",
            "--set", f"serve.max_image_bytes={MAX_IMAGE_BYTES}", "--set", "serve.max_wait_ms=10"]  # fmt: skip
    proc = _start(args, log)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def sample_tables(mini_dataset, tmp_path_factory) -> Path:
    """A dataset folder with 9 queries (3 of each type) and 3 products of mini_dataset (same images)."""
    root = tmp_path_factory.mktemp("subset")
    (root / "images").symlink_to(mini_dataset / "images")
    queries = read_table(table_path(mini_dataset, QUERIES), QUERIES)
    picked = [queries[queries["query_type"] == t].head(3) for t in ("text", "image", "multimodal")]
    write_table(pd.concat(picked, ignore_index=True), root / "queries.parquet", QUERIES)
    write_table(read_table(table_path(mini_dataset, PRODUCTS), PRODUCTS).head(3), root / "products.parquet", PRODUCTS)
    return root


def _instances(root: Path, table: str) -> list[dict]:
    """The rows of a table as v1 instances: text and base64 image file bytes, exactly what the files hold."""
    df = read_table(table_path(root, table), table)
    out = []
    for row in df.to_dict("records"):
        if table == QUERIES:
            text, image = row["query_text"], row["query_image"]
        else:
            from moon3.model.items import product_text

            text, image = product_text(row) or None, row["image"]
        inst = {}
        if isinstance(text, str) and text.strip():
            inst["text"] = text
        if isinstance(image, str) and image:
            inst["image"] = _b64((root / image).read_bytes())
        out.append(inst)
    return out


def _v2_body(instances: list[dict], **parameters) -> dict:
    n = len(instances)
    body = {"id": "req-1", "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [n], "data": [i.get("text", "") for i in instances]},
        {"name": "image", "datatype": "BYTES", "shape": [n], "data": [i.get("image", "") for i in instances]},
    ]}  # fmt: skip
    if parameters:
        body["parameters"] = parameters
    return body


# --- config and batching (in process) ------------------------------------------------------------------------


def test_serve_section_and_ranges():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.serve.model_name == "moon3" and cfg.serve.search_name == "moon3-search"
    for bad in ("serve.canary_traffic_percent=101", "serve.max_batch_size=0", "serve.http_port=70000"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(REPO / "params.yaml", [bad])


def test_batcher_merges_concurrent_requests_and_keeps_modes_apart():
    from moon3.serve.batching import DynamicBatcher

    calls = []

    def forward(items, reasoning):
        calls.append((len(items), reasoning))
        time.sleep(0.01)
        traces = [f"t{it['i']}" for it in items] if reasoning else None
        return np.array([[it["i"]] for it in items], np.float32), traces

    async def run(enabled: bool):
        batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_ms=20, enabled=enabled)
        jobs = [batcher.submit([{"i": i}], reasoning=i % 3 == 0) for i in range(12)]
        results = await asyncio.gather(*jobs)
        batcher.close()
        return results

    results = asyncio.run(run(True))
    # Every request gets its own rows back, whatever batch it rode in.
    assert [int(r[0][0, 0]) for r in results] == list(range(12))
    assert [r[1] for r in results] == [["t0"], None, None, ["t3"], None, None, ["t6"], None, None, ["t9"], None, None]
    assert all(n <= 4 for n, _ in calls) and sum(n for n, _ in calls) == 12
    assert len(calls) <= 4  # 8 off + 4 on, at most 4 per forward: 3 forwards would be ideal, arrival order adds one
    calls.clear()
    asyncio.run(run(False))
    assert len(calls) == 12 and all(n == 1 for n, _ in calls)


# --- the real server over HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize("reasoning", [None, False], ids=["contract-default", "reasoning-off"])
def test_served_embeddings_equal_moon3_embed(server, model, sample_tables, tmp_path, reasoning):
    """Both protocols return what `moon3 embed` (embed_table) writes for the same rows: queries and products."""
    params = {} if reasoning is None else {"reasoning": reasoning}
    for table in (QUERIES, PRODUCTS):
        out = embed_table(model, table_path(sample_tables, table), table, tmp_path / f"{table}.parquet",
                          reasoning=reasoning, progress=False)  # fmt: skip
        _, expected, meta = load_embeddings(out)
        assert meta["reasoning_used"] == (model.contract.reasoning if reasoning is None else reasoning)
        instances = _instances(sample_tables, table)
        r1 = requests.post(server + V1, json={"instances": instances, "parameters": params}, timeout=60)
        assert r1.status_code == 200, r1.text
        v1 = np.array([p["embedding"] for p in r1.json()["predictions"]], np.float32)
        r2 = requests.post(server + V2, json=_v2_body(instances, **params), timeout=60)
        assert r2.status_code == 200, r2.text
        body = r2.json()
        assert body["id"] == "req-1"
        (out2,) = body["outputs"]
        assert out2["name"] == "embedding" and out2["datatype"] == "FP32" and out2["shape"] == list(expected.shape)
        v2 = np.array(out2["data"], np.float32).reshape(out2["shape"])
        assert _cos(v1, expected).min() >= 0.999 and _cos(v2, expected).min() >= 0.999


def test_trace_returned_on_request(server):
    r = requests.post(server + V1, json={"instances": ["red cotton shirt"], "parameters": {"return_trace": True}})
    assert r.status_code == 200 and r.json()["reasoning"] is True
    assert isinstance(r.json()["predictions"][0]["trace"], str)
    r = requests.post(server + V2, json={**_v2_body([{"text": "red"}]), "outputs": [{"name": "trace"}]})
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["trace"]
    params = {"reasoning": False, "return_trace": True}
    off = requests.post(server + V1, json={"instances": ["red"], "parameters": params})
    assert off.status_code == 200 and "trace" not in off.json()["predictions"][0]


def test_v2_binary_tensor_extension(server, sample_tables):
    """v2's binary extension (JSON header + raw tensor bytes): base64 image rows serve as in JSON; raw image bytes
    (KServe's REST decoder needs UTF-8 BYTES rows) are a 400 that says to send base64, not KServe's 500."""
    from moon3.serve.kserve_compat import kserve

    instances = [i for i in _instances(sample_tables, QUERIES) if "image" in i][:2]

    def post(rows: list) -> requests.Response:
        image = kserve.InferInput("image", [len(rows)], "BYTES")
        image.set_data_from_numpy(np.array(rows, dtype=object), binary_data=True)
        body, json_length = kserve.InferRequest("moon3", [image], request_id="bin-1").to_rest()
        headers = {"inference-header-content-length": str(json_length), "content-type": "application/octet-stream"}
        return requests.post(server + V2, data=body, headers=headers, timeout=60)

    r = post([i["image"].encode() for i in instances])
    assert r.status_code == 200, r.text
    binary = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(len(instances), -1)
    as_json = requests.post(server + V2, json=_v2_body([{"image": i["image"]} for i in instances]), timeout=60)
    expected = np.array(as_json.json()["outputs"][0]["data"], np.float32).reshape(len(instances), -1)
    assert _cos(binary, expected).min() >= 0.999
    raw = post([base64.b64decode(i["image"]) for i in instances])
    assert raw.status_code == 400 and "base64" in raw.json()["error"]


def test_search_equals_exact_search(server, model, index_dir, sample_tables):
    """moon3-search's top-k (v1 and v2) is the evaluation's exact search over the index's own gallery."""
    instances = _instances(sample_tables, QUERIES)
    rows = read_table(table_path(sample_tables, QUERIES), QUERIES).to_dict("records")
    items = [query_item(r, sample_tables) for r in rows]
    meta = json.loads((index_dir / "index.json").read_text())
    queries = model.embed(items, reasoning=meta["reasoning"], batch_size=len(items)).numpy()
    ids, gallery, _ = load_embeddings(index_dir / "embeddings.parquet")
    scores, top = exact_search(queries, gallery, 10)
    expected = [[ids[j] for j in row] for row in top]
    r1 = requests.post(server + S1, json={"instances": instances, "parameters": {"top_k": 10}}, timeout=60)
    assert r1.status_code == 200, r1.text
    got = [[h["product_id"] for h in p["results"]] for p in r1.json()["predictions"]]
    assert got == expected
    got_scores = np.array([[h["score"] for h in p["results"]] for p in r1.json()["predictions"]])
    assert np.allclose(got_scores, scores, atol=1e-4)
    assert all(h["title"] for p in r1.json()["predictions"] for h in p["results"])
    r2 = requests.post(server + S2, json=_v2_body(instances, top_k=10), timeout=60)
    assert r2.status_code == 200, r2.text
    outputs = {o["name"]: o for o in r2.json()["outputs"]}
    assert outputs["product_id"]["shape"] == [len(items), 10] and outputs["score"]["datatype"] == "FP32"
    assert np.array(outputs["product_id"]["data"]).reshape(len(items), 10).tolist() == expected


def _malformed_cases(small_png: str) -> list[tuple[str, str, bytes, dict]]:
    def inp(name="text", dt="BYTES", shape=(1,), data=("red",)):
        return {"name": name, "datatype": dt, "shape": list(shape), "data": list(data)}

    huge = _b64(_png(5000, 5000))  # 25 Mpx: over max_image_pixels (16.7 M), small on the wire
    cases = [
        ("empty body", V1, b""),
        ("invalid JSON", V1, b"{not json"),
        ("a JSON list", V1, [1, 2]),
        ("no instances", V1, {}),
        ("instances not a list", V1, {"instances": "abc"}),
        ("no instance", V1, {"instances": []}),
        ("instance not an object", V1, {"instances": [42]}),
        ("instance without text or image", V1, {"instances": [{}]}),
        ("text not a string", V1, {"instances": [{"text": 5}]}),
        ("unknown field", V1, {"instances": [{"txt": "x"}]}),
        ("bad base64", V1, {"instances": [{"image": "@@@ not base64"}]}),
        ("not an image", V1, {"instances": [{"image": _b64(b"hello, not a picture")}]}),
        ("huge image (pixels)", V1, {"instances": [{"image": huge}]}),
        ("image over max_image_bytes", V1, {"instances": [{"image": _b64(os.urandom(MAX_IMAGE_BYTES + 1000))}]}),
        ("text over max_text_chars", V1, {"instances": [{"text": "x" * 9000}]}),
        ("oversized batch", V1, {"instances": ["x"] * 65}),
        ("parameters not an object", V1, {"instances": ["x"], "parameters": 3}),
        ("reasoning not a bool", V1, {"instances": ["x"], "parameters": {"reasoning": "yes"}}),
        ("unknown parameter", V1, {"instances": ["x"], "parameters": {"foo": 1}}),
        ("top_k on the embedding model", V1, {"instances": ["x"], "parameters": {"top_k": 3}}),
        ("top_k 0", S1, {"instances": ["x"], "parameters": {"top_k": 0}}),
        ("top_k over max_top_k", S1, {"instances": ["x"], "parameters": {"top_k": 1000}}),
        ("top_k a string", S1, {"instances": ["x"], "parameters": {"top_k": "5"}}),
        ("search in the gallery's other mode", S1, {"instances": ["x"], "parameters": {"reasoning": False}}),
        ("unknown model (v1)", "/v1/models/nope:predict", {"instances": ["x"]}),
        ("not JSON (text/plain)", V1, b"hello"),
        ("v2 empty body", V2, b""),
        ("v2 no inputs field", V2, {}),
        ("v2 inputs not a list", V2, {"inputs": "x"}),
        ("v2 empty inputs", V2, {"inputs": []}),
        ("v2 wrong datatype", V2, {"inputs": [inp(dt="FP32", data=[1.0])]}),
        ("v2 shape/data mismatch", V2, {"inputs": [inp(shape=(2,))]}),
        ("v2 wrong shape", V2, {"inputs": [inp(shape=(1, 2), data=("a", "b"))]}),
        ("v2 unknown input", V2, {"inputs": [inp(name="txt")]}),
        ("v2 input twice", V2, {"inputs": [inp(), inp()]}),
        ("v2 rows disagree", V2, {"inputs": [inp(shape=(2,), data=("a", "b")), inp("image", data=(small_png,))]}),
        ("v2 bad base64", V2, {"inputs": [inp("image", data=("@@@",))]}),
        ("v2 non-string row", V2, {"inputs": [inp(data=(1,))]}),
        ("v2 empty row", V2, {"inputs": [inp(data=("",))]}),
        ("v2 bad parameter", V2, {"inputs": [inp()], "parameters": {"reasoning": "x"}}),
        ("v2 unknown output", V2, {"inputs": [inp()], "outputs": [{"name": "nope"}]}),
        ("v2 unknown model", "/v2/models/nope/infer", {"inputs": [inp()]}),
        ("v2 search top_k -1", S2, {"inputs": [inp()], "parameters": {"top_k": -1}}),
        ("body over max_request_bytes", V1, b"{" + b" " * (33 * 1024 * 1024) + b"}"),
    ]
    out = []
    for name, path, body in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        ctype = "text/plain" if name.startswith("not JSON") else "application/json"
        out.append((name, path, data, {"content-type": ctype}))
    return out


def test_malformed_requests_get_4xx_with_a_message(server):
    cases = _malformed_cases(_b64(_png(8, 8)))
    assert len(cases) >= 25
    failures = []
    for name, path, data, headers in cases:
        r = requests.post(server + path, data=data, headers=headers, timeout=60)
        body = r.json()
        message = body.get("error") or body.get("detail")
        if not (400 <= r.status_code < 500 and message):
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, failures
    # The server is still healthy and serves a good request.
    assert requests.get(server + "/v2/health/live").json() == {"live": True}
    assert requests.get(server + "/v2/health/ready").json() == {"ready": True}
    good = requests.post(server + V1, json={"instances": [{"text": "red cotton shirt"}]}, timeout=60)
    assert good.status_code == 200 and len(good.json()["predictions"][0]["embedding"]) == 256
    metrics = requests.get(server + "/metrics").text
    assert re.search(r'moon3_requests_total\{model="moon3",protocol="v1",status="400"\} [1-9]', metrics)
    assert re.search(r'moon3_requests_total\{model="moon3",protocol="v2",status="400"\} [1-9]', metrics)
    assert re.search(r'moon3_requests_total\{model="unknown",protocol="v2",status="404"\} 1', metrics)
    assert 'moon3_requests_total{model="moon3",protocol="v1",status="413"}' in metrics


def test_health_metrics_and_model_endpoints(server):
    assert requests.get(server + "/v1/models/moon3").json() == {"name": "moon3", "ready": True}
    assert requests.get(server + "/v2/models/moon3-search/ready").json()["ready"] is True
    requests.post(server + V1, json={"instances": ["blue jeans"]})
    metrics = requests.get(server + "/metrics").text
    for name in ("moon3_request_seconds_bucket", "moon3_batch_size_bucket", "moon3_forward_seconds_count"):
        assert name in metrics
    assert re.search(r'moon3_requests_total\{model="moon3",protocol="v1",status="200"\} [1-9]', metrics)
    meta = requests.get(server + "/v2/models/moon3").json()
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 256]}]


def test_readiness_false_until_model_and_index_load(model_dir, index_dir):
    from moon3.serve.config import ServeConfig
    from moon3.serve.engine import Moon3Engine
    from moon3.serve.kserve_compat import kserve
    from moon3.serve.server import Moon3DataPlane, build_models

    engine = Moon3Engine(ServeConfig(), str(model_dir), str(index_dir))
    models = build_models(engine)
    assert [m.name for m in models] == ["moon3", "moon3-search"]
    plane = Moon3DataPlane(model_registry=kserve.ModelRepository())
    for m in models:
        plane.model_registry.update(m)
    assert asyncio.run(plane.ready()) is False
    engine.load()
    assert asyncio.run(plane.ready()) is True
    engine.close()


def test_index_refused_on_contract_or_model_mismatch(model_dir, index_dir, tmp_path, model):
    from moon3.serve.index import load_index, model_fingerprint

    fingerprint = model_fingerprint(model_dir)
    assert load_index(index_dir, model.contract, fingerprint).meta["count"] == 200
    bad = tmp_path / "index"
    shutil.copytree(index_dir, bad)
    meta = json.loads((bad / "index.json").read_text())
    (bad / "index.json").write_text(json.dumps({**meta, "contract_version": "0.9"}))
    with pytest.raises(ContractError, match="contract version '0.9'"):
        load_index(bad, model.contract, fingerprint)
    (bad / "index.json").write_text(json.dumps({**meta, "contract": {**meta["contract"], "embed_dim": 128}}))
    with pytest.raises(ContractError, match="embed_dim: index 128, model 256"):
        load_index(bad, model.contract, fingerprint)
    (bad / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ContractError, match="built with another model"):
        load_index(bad, model.contract, "0" * 64)
    # End to end: `moon3 serve` with that index stops with exit code 1 and says why.
    (bad / "index.json").write_text(json.dumps({**meta, "contract_version": "0.9"}))
    log = tmp_path / "refused.log"
    proc = _start(["--params", str(REPO / "params.yaml"), "--model", str(model_dir), "--index", str(bad),
                   "--host", "127.0.0.1", "--port", str(_free_port())], log)  # fmt: skip
    assert proc.wait(timeout=120) == 1
    assert "contract version '0.9'" in log.read_text()


def test_kserve_never_reads_our_command_line():
    code = ("import sys; sys.argv = ['moon3', 'serve', '--model', 'x', '--http_port', '9', '--enable_grpc', 'false'];"
            "from moon3.serve.kserve_compat import kserve; a = kserve.model_server.args;"
            "print(a.http_port, a.enable_grpc, a.model_name, sys.argv[2])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8080", "True", "model", "--model"]


def test_mlflow_model_uri_resolves_to_the_model_folder(model_dir, tmp_path, monkeypatch):
    import mlflow

    from moon3.serve.resolve import resolve_model_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    mlflow.set_experiment("serve-resolve")  # not an experiment id an earlier test left active in another store
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
    local = resolve_model_uri(f"runs:/{run.info.run_id}/model", dst=tmp_path / "dl")
    assert (local / "moon3_config.json").read_text() == (model_dir / "moon3_config.json").read_text()
    with pytest.raises(FileNotFoundError, match="MLflow download failed"):
        resolve_model_uri("runs:/0123456789abcdef/model", dst=tmp_path / "dl2")


# --- the demo page in a real headless Chromium ------------------------------------------------------------------


class _Chromium:
    """A headless Chromium driven over the DevTools protocol (websocket-client), no extra test dependency."""

    def __init__(self, binary: str, profile: Path):
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        url = None
        for line in self.proc.stderr:
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                url = m.group(1)
                break
        assert url, "chromium did not start its DevTools endpoint"
        port = re.search(r":(\d+)/", url).group(1)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        import websocket

        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.js(expression):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def type(self, text: str) -> None:
        for ch in text:
            self.call("Input.dispatchKeyEvent", type="keyDown", text=ch, key=ch, unmodifiedText=ch)
            self.call("Input.dispatchKeyEvent", type="keyUp", key=ch)

    def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.call("Input.dispatchKeyEvent", type="keyUp", **key)

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=20)


def test_demo_page_in_headless_chromium(server, tmp_path, sample_tables):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    browser = _Chromium(binary, Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{server}/demo")
        browser.wait("document.body && document.body.dataset.ready === '1'")
        assert "200 products" in browser.js("document.getElementById('info').textContent")
        browser.js("document.getElementById('q').focus()")
        browser.type("red cotton shirt")
        assert browser.js("document.getElementById('q').value") == "red cotton shirt"
        browser.press_enter()
        loaded = (
            "document.querySelectorAll('#results img').length === 10 && "
            "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        browser.wait(loaded)
        shown = browser.js("[...document.querySelectorAll('#results figure')].map(f => f.dataset.productId)")
        api = requests.post(server + S1, json={"instances": ["red cotton shirt"], "parameters": {"top_k": 10}})
        assert shown == [h["product_id"] for h in api.json()["predictions"][0]["results"]]
        assert browser.js("document.getElementById('trace').textContent").startswith("trace:")  # reasoning on
        shot = browser.call("Page.captureScreenshot", format="png")
        path = tmp_path / "demo.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        with Image.open(path) as image:
            assert image.size[0] >= 800
        # Dropping an image: the file input path (the drop zone reads the same way).
        doc = browser.call("DOM.getDocument")
        node = browser.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        picture = next((sample_tables / "images").rglob("*.png"))
        browser.js("document.getElementById('q').value = ''")
        browser.call("DOM.setFileInputFiles", files=[str(picture.resolve())], nodeId=node["nodeId"])
        browser.wait("document.getElementById('preview').style.display === 'inline' && " + loaded)
        browser.call("Page.captureScreenshot", format="png")
    finally:
        browser.close()
    assert requests.get(server + "/demo/images/nope").status_code == 404


# --- manifests and deploy ----------------------------------------------------------------------------------


def test_manifests_round_trip_with_gpu_placement_and_canary():
    from moon3.serve.manifests import inference_service, render, round_trip, serving_runtime, to_dict

    cfg = load_config(REPO / "params.yaml", ["serve.canary_traffic_percent=20", "serve.min_replicas=2"]).serve
    runtime, isvc = render(cfg, "gpu")
    for manifest in (runtime, isvc):
        assert round_trip(manifest) == manifest
    predictor = isvc["spec"]["predictor"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert predictor["canaryTrafficPercent"] == 20 and predictor["minReplicas"] == 2
    assert predictor["maxReplicas"] == cfg.max_replicas
    assert predictor["nodeSelector"] == cfg.gpu_node_selector
    assert predictor["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    model = predictor["model"]
    assert model["resources"]["limits"][cfg.gpu_resource] == str(cfg.gpu_count)
    assert model["image"] == cfg.gpu_image and model["runtime"] == runtime["metadata"]["name"]
    assert model["storageUri"] == cfg.storage_uri and model["modelFormat"] == {"name": "moon3", "version": "1"}
    args = model["args"]
    assert args[:2] == ["--index", cfg.index_uri] and "serve.device=cuda" in args
    assert "serve.max_batch_size=32" in args
    container = runtime["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2"]
    # CPU variant: no GPU anywhere, no canary at 100 %, no search model without an index URI.
    cfg.canary_traffic_percent, cfg.index_uri = 100, ""
    cpu = to_dict(inference_service(cfg, "cpu"))["spec"]["predictor"]
    assert "canaryTrafficPercent" not in cpu and "nodeSelector" not in cpu and "tolerations" not in cpu
    assert cfg.gpu_resource not in json.dumps(cpu) and "image" not in cpu["model"]
    assert cpu["model"]["args"][0] == "--no-index" and "serve.device=cpu" in cpu["model"]["args"]
    # A typo or a wrong type does not survive the round trip through the models.
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["resourcez"] = {}
    with pytest.raises(ValueError, match="resourcez"):
        round_trip(typo)
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["minReplicas"] = "2"
    with pytest.raises(ValueError, match="minReplicas: expected int"):
        round_trip(wrong)
    assert to_dict(serving_runtime(cfg))["kind"] == "ServingRuntime"
    with pytest.raises(ValueError, match="min_replicas"):
        inference_service(load_config(REPO / "params.yaml", ["serve.min_replicas=5"]).serve)


def test_committed_manifests_match_params():
    """infra/kserve/*.yaml are `moon3 deploy --dry-run --out infra/kserve` of this params.yaml."""
    from moon3.serve.manifests import inference_service, serving_runtime, to_dict

    cfg = load_config(REPO / "params.yaml").serve
    expected = {"servingruntime.yaml": to_dict(serving_runtime(cfg)),
                "inferenceservice-cpu.yaml": to_dict(inference_service(cfg, "cpu")),
                "inferenceservice-gpu.yaml": to_dict(inference_service(cfg, "gpu"))}  # fmt: skip
    for name, manifest in expected.items():
        committed = yaml.safe_load((REPO / "infra" / "kserve" / name).read_text())
        assert committed == manifest, f"infra/kserve/{name} is stale: run `moon3 deploy --dry-run --out infra/kserve`"


def test_deploy_dry_run_prints_the_manifests():
    args = ["deploy", "--dry-run", "--params", str(REPO / "params.yaml"), "--variant", "gpu",
            "--set", "serve.canary_traffic_percent=25", "--storage-uri", "gs://b/models/v2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runtime, isvc = list(yaml.safe_load_all(result.stdout))
    assert runtime["kind"] == "ServingRuntime" and isvc["kind"] == "InferenceService"
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "gs://b/models/v2"
    bad = CliRunner().invoke(app, ["deploy", "--dry-run", "--params", str(REPO / "params.yaml"), "--variant", "tpu"])
    assert bad.exit_code == 2 and "variant" in bad.output


class FakeCustomObjectsApi:
    """Stands in for kubernetes.client.CustomObjectsApi: the Kubernetes API is mocked here (no cluster in
    tests); it keeps objects in a dict and answers 409 on a second create, like the API server."""

    def __init__(self, fail_status: int | None = None):
        self.objects: dict[tuple, dict] = {}
        self.calls: list[tuple] = []
        self.fail_status = fail_status

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("create", plural, body["metadata"]["name"]))
        if self.fail_status:
            raise ApiException(status=self.fail_status, reason="Forbidden")
        key = (group, version, namespace, plural, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[key] = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
        return self.objects[key]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", plural, name))
        return self.objects[(group, version, namespace, plural, name)]

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("replace", plural, name, body["metadata"].get("resourceVersion")))
        key = (group, version, namespace, plural, name)
        version_now = int(self.objects[key]["metadata"]["resourceVersion"])
        assert body["metadata"]["resourceVersion"] == str(version_now), "replace must carry the current version"
        self.objects[key] = {**body, "metadata": {**body["metadata"], "resourceVersion": str(version_now + 1)}}
        return self.objects[key]


def test_deploy_step_creates_then_replaces_with_mocked_kubernetes_api(tmp_path):
    from moon3.pipelines.params import pipeline_params
    from moon3.serve.deploy import DeployError, deploy_step

    params = pipeline_params(load_config(REPO / "params.yaml"))
    api = FakeCustomObjectsApi()
    first = deploy_step(params, [], "gs://b/models/v1", str(tmp_path / "a"), api=api)
    assert [a["action"] for a in first["applied"]] == ["created", "created"]
    # A new model version as a canary: the same objects are replaced at their current resourceVersion.
    second = deploy_step(params, ["serve.canary_traffic_percent=10"], "gs://b/models/v2", str(tmp_path / "b"), api=api)
    assert [a["action"] for a in second["applied"]] == ["replaced", "replaced"]
    assert ("replace", "inferenceservices", "moon3", "1") in api.calls
    isvc = api.objects[("serving.kserve.io", "v1beta1", "moon3", "inferenceservices", "moon3")]
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "gs://b/models/v2"
    assert "canary 10%" in second["summary"]
    written = list(yaml.safe_load_all((tmp_path / "b" / "manifests.yaml").read_text()))
    assert [m["kind"] for m in written] == ["ServingRuntime", "InferenceService"]
    with pytest.raises(DeployError, match="403 Forbidden"):
        deploy_step(params, [], "gs://b/m", str(tmp_path / "c"), api=FakeCustomObjectsApi(fail_status=403))
    dry = FakeCustomObjectsApi()
    assert deploy_step(params, [], "gs://b/m", str(tmp_path / "d"), dry_run=True, api=dry)["applied"] == []
    assert dry.calls == []


def test_deploy_component_renders_and_applies(tmp_path, monkeypatch):
    """The KFP component's function with artifacts standing in for KFP's and the Kubernetes API mocked."""
    from kfp import compiler

    import moon3.serve.deploy as deploy_mod
    from moon3.pipelines.compile import REPO, load_module
    from moon3.pipelines.params import pipeline_params

    deploy = load_module(REPO / "components" / "deploy" / "component.py").deploy  # as the pipeline loads components

    api = FakeCustomObjectsApi()
    monkeypatch.setattr(deploy_mod, "make_api", lambda context=None: api)

    class Art:
        def __init__(self, uri: str = "", path: str = ""):
            self.uri, self.path = uri, path

    params = pipeline_params(load_config(REPO / "params.yaml"))
    out = Art(path=str(tmp_path / "out"))
    summary = deploy.python_func(params=params, overrides=["serve.variant=gpu"], model=Art(uri="gs://b/models/v3"),
                                 manifests=out, index=Art(uri="gs://b/index/v3"))  # fmt: skip
    assert "moon3/moon3 (gpu)" in summary and "InferenceService created" in summary
    isvc = api.objects[("serving.kserve.io", "v1beta1", "moon3", "inferenceservices", "moon3")]
    assert isvc["spec"]["predictor"]["model"]["args"][:2] == ["--index", "gs://b/index/v3"]
    assert isvc["spec"]["predictor"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    compiler.Compiler().compile(deploy, str(tmp_path / "deploy.yaml"))
    assert "moon3.serve.deploy" in (tmp_path / "deploy.yaml").read_text()
