"""Hostile inputs (issue 14): model folders that ask to run their own code, corrupt model files, bad config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moon3.config import ConfigError, load_config
from moon3.model.contract import ContractError
from moon3.model.embedder import BACKBONE_DIR, HEADS_FILE, Moon3Embedder
from moon3.model.items import catalog_texts

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def saved_model(mini_dataset, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Moon3Embedder.from_config(load_config(None).model, catalog_texts(mini_dataset))
    return model.save_pretrained(tmp_path_factory.mktemp("hardening") / "model")


def _copy(saved_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_model, tmp_path / "copy"))


def _edit_json(path: Path, edit) -> None:
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


def test_folder_asking_for_its_own_code_is_refused_and_its_code_never_runs(saved_model, mini_dataset, tmp_path):
    folder = _copy(saved_model, tmp_path)
    marker = tmp_path / "pwned"
    # A folder that would run Python on load: trust_remote_code in its contract file, an auto_map to its own module.
    (folder / BACKBONE_DIR / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    _edit_json(folder / "moon3_config.json", lambda p: p["model"].update(trust_remote_code=True))
    _edit_json(folder / BACKBONE_DIR / "config.json", lambda p: p.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    with pytest.raises(ContractError, match="asks to run its own code .*trust_remote_code.*auto_map.*refused"):
        Moon3Embedder.from_pretrained(folder)
    assert not marker.exists()
    # The CLI too: one readable line, non-zero exit, nothing executed.
    result = subprocess.run([str(BIN / "moon3"), "embed", str(mini_dataset / "queries.parquet"), "--out",
                             str(tmp_path / "e.npy"), "--model", str(folder), "--params", str(REPO / "params.yaml")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "refused" in " ".join(result.stderr.split())
    assert not marker.exists()


def test_trust_from_the_file_alone_is_refused_even_without_auto_map(saved_model, tmp_path):
    folder = _copy(saved_model, tmp_path)
    _edit_json(folder / "moon3_config.json", lambda p: p["model"].update(trust_remote_code=True))
    with pytest.raises(ContractError, match="trust_remote_code in moon3_config.json"):
        Moon3Embedder.from_pretrained(folder)
    # The user's own explicit choice loads it (the folder carries no code, so nothing runs).
    Moon3Embedder.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / HEADS_FILE).write_bytes((f / HEADS_FILE).read_bytes()[:100]), "not a readable safetensors"),
        (lambda f: (f / HEADS_FILE).write_bytes(b"\x80\x04K\x01."), "not a readable safetensors"),  # a pickle
        (lambda f: (f / BACKBONE_DIR / "config.json").write_text('{"model_type": "qwen2'), "not a readable backbone"),
        (lambda f: (f / "moon3_config.json").write_text('{"contract": '), "not a moon3 contract file"),
        (lambda f: _edit_json(f / "moon3_config.json", lambda p: p["model"].update(embed_dim="8")), "model.embed_dim"),
        (lambda f: (f / BACKBONE_DIR / "model.safetensors").write_bytes(b"\0" * 64), "not a loadable backbone"),
    ],
    ids=[
        "truncated-heads",
        "pickle-as-heads",
        "truncated-backbone-config",
        "truncated-contract",
        "wrong-type",
        "corrupt-backbone-weights",
    ],  # fmt: skip
)
def test_corrupt_model_files_give_one_clear_error(saved_model, tmp_path, damage, message):
    folder = _copy(saved_model, tmp_path)
    damage(folder)
    with pytest.raises(ContractError, match=message) as info:
        Moon3Embedder.from_pretrained(folder)
    assert "\n" not in str(info.value)


# --- configuration -----------------------------------------------------------------------------------------------

BAD_SETS = {
    "train.lr=nan": "train.lr",
    "train.lr=0": "train.lr",
    "train.steps=-5": "train.steps",
    "train.batch_size=0": "train.batch_size",
    "model.embed_dim=0": "model.embed_dim",
    "validation.max_reject_fraction=nan": "validation.max_reject_fraction",
    "validation.max_reject_fraction=1.5": "validation.max_reject_fraction",
    "data.eval_fraction=0": "data.eval_fraction",
    "train.trace_dropout=2": "train.trace_dropout",
    "rl.num_generations=1": "rl.num_generations",
    "eval.ks=[0, 5]": "eval.ks",
    "train.steps=ten": "train.steps",
    "model.fusion=maybe": "model.fusion",
    "train.nope=1": "train.nope",
    "train.lr=inf": "train.lr",
}


@pytest.mark.parametrize("override", list(BAD_SETS))
def test_bad_set_values_exit_with_a_message_naming_the_key(override):
    result = subprocess.run([str(BIN / "moon3"), "config", "show", "--params", str(REPO / "params.yaml"),
                             "--set", override], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stdout[-500:]
    assert BAD_SETS[override] in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("train:\n  lr: [1, 2\n", r"line \d+, column \d+: invalid YAML"),
        ("train: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping of sections"),
        (b"\xff\xfe bad bytes", "not UTF-8 text"),
    ],
    ids=["syntax-error", "python-tag", "not-a-mapping", "not-utf8"],
)
def test_broken_params_files_give_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_or_folder_params_is_an_error_not_the_defaults(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)
    result = subprocess.run([str(BIN / "moon3"), "config", "show", "--params", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr


# --- secrets -----------------------------------------------------------------------------------------------------


def test_credentials_in_uris_are_redacted_in_mlflow_params_and_the_compiled_pipeline(tmp_path, monkeypatch):
    from moon3.common.redact import redact_text
    from moon3.pipelines.compile import compile_pipeline
    from moon3.train.tracking import Tracker

    secret_uri = "https://alice:s3cr3t@mlflow.example.com/api?token=abc123"
    assert "s3cr3t" not in redact_text(f"tracking at {secret_uri} failed") and "abc123" not in redact_text(secret_uri)
    assert redact_text("gs://bucket/data/prepared") == "gs://bucket/data/prepared"
    cfg = load_config(REPO / "params.yaml", [f"pipeline.mlflow_tracking_uri={secret_uri}",
                                             f"synthesis.openai_base_url={secret_uri}"])  # fmt: skip
    compiled = compile_pipeline(cfg, tmp_path / "p.yaml", version="0+test").read_text()
    assert "s3cr3t" not in compiled and "abc123" not in compiled and "mlflow.example.com" in compiled
    # MLflow params of a training run: the flattened config, redacted.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    tracker = Tracker(True, "redaction", "run", tmp_path / "live", cfg.to_dict())
    tracker.close()
    import mlflow

    run = mlflow.get_run(tracker.run_id)
    values = " ".join(run.data.params.values())
    assert "s3cr3t" not in values and "abc123" not in values and "<redacted>@mlflow.example.com" in values


# --- checkpoints ---------------------------------------------------------------------------------------------------

TRAIN_FAST = ["train.traces_dir=", "train.heldout_queries=0", "train.batch_size=8", "train.warmup_steps=1",
              "train.steps=4", "train.save_every=2", "train.torch_threads=1", "train.num_workers=0"]  # fmt: skip


def _train(out: Path, data: Path, sets: list[str], *flags: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "moon3"), "train", "contrastive", "--params", str(REPO / "params.yaml"), "--data-dir",
           str(data), "--out-dir", str(out), "--report-dir", str(out / "reports"), *flags]  # fmt: skip
    for item in TRAIN_FAST + sets:
        cmd += ["--set", item]
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent}/mlruns.db",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def trained_run(mini_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = _train(out, mini_dataset, [])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(trained_run, mini_dataset, tmp_path):
    out = Path(shutil.copytree(trained_run, tmp_path / "run"))
    shutil.rmtree(out / "final")
    latest = out / "checkpoints" / "step-000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    result = _train(out, mini_dataset, [], "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step-000004 does not load" in result.stdout and "resuming from" in result.stdout
    assert "(step 2)" in result.stdout and (out / "final" / "moon3_config.json").exists()


def test_resume_with_changed_settings_is_refused_unless_allowed(trained_run, mini_dataset, tmp_path):
    out = Path(shutil.copytree(trained_run, tmp_path / "run"))
    refused = _train(out, mini_dataset, ["train.lr=0.1", "train.batch_size=4"], "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert "resume refused" in message and "train.lr: 0.001 -> 0.1" in message and "train.batch_size: 8 -> 4" in message
    # Where it writes and how often it saves are not training settings.
    same = _train(out, mini_dataset, ["train.save_every=4", "train.log_every=1"], "--resume")
    assert same.returncode == 0, same.stderr[-2000:]
    allowed = _train(out, mini_dataset, ["train.lr=0.1", "train.steps=6"], "--resume", "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "resuming with a changed setting (--allow-config-change): train.lr: 0.001 -> 0.1" in allowed.stdout


def test_a_huge_title_is_cut_to_the_contract_and_counted(saved_model):
    model = Moon3Embedder.from_pretrained(saved_model)
    limit = model.contract.max_text_tokens
    huge = "red cotton mug " * 200_000  # 3 MB of text
    batch = model.prepare_batch([{"text": huge, "image": None}, {"text": "red mug", "image": None}])
    assert int(batch["text_mask"][0].sum()) == limit and model.truncated_texts == 1
    embedding = model.embed([{"text": huge, "image": None}])
    assert embedding.shape == (1, model.contract.embed_dim) and model.truncated_texts == 2


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path):
    """A failure no command handles itself (here: statistics of a folder that is not a dataset) ends as one line."""
    args = [str(BIN / "moon3"), "data", "stats", str(tmp_path)]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().count("\n") == 0 and "moon3: error: SchemaError" in plain.stderr
    assert "products.parquet: file not found" in plain.stderr
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
