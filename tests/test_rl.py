"""Stage B (GRPO) for real: rewards on hand-made embeddings, the contract's prompt through TRL, a short run with
its checkpoints and reference model, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moon3.config import load_config
from moon3.model import contract as C
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import catalog_texts, query_item
from moon3.rl.finetune import COMPLETE_MARKER, latest_complete_checkpoint
from moon3.rl.rewards import format_reward, length_reward, rank_reward

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAST = ["rl.steps=4", "rl.queries_per_step=2", "rl.num_generations=2", "rl.save_every=2", "rl.warmup_steps=1",
        "rl.torch_threads=1"]  # fmt: skip


# --- rewards ---------------------------------------------------------------------------------------------------


def test_rank_reward_is_one_at_rank_one_zero_at_rank_n_and_ties_count_against():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # positive 0 first: rank 1
            [0.9, 0.1, 0.2, 0.3],  # positive 1 last: rank 4 = N
            [0.5, 0.5, 0.5, 0.5],  # collapsed: every score ties with the positive's -> rank N
            [0.1, 0.8, 0.9, 0.2],  # positive 1 second: rank 2
        ]
    )
    rewards = rank_reward(scores, torch.tensor([0, 1, 2, 1]))
    assert rewards[0] == pytest.approx(1.0)
    assert rewards[1] == pytest.approx(0.0)
    assert rewards[2] == pytest.approx(0.0)
    assert rewards[3] == pytest.approx(1 - torch.log(torch.tensor(2.0)).item() / torch.log(torch.tensor(4.0)).item())
    with pytest.raises(ValueError, match="at least 2 products"):
        rank_reward(torch.ones(1, 1), torch.tensor([0]))


def test_empty_or_unclosed_trace_scores_lower_than_well_formed():
    end, budget = 99, 4
    good = ("category: Home > Kitchen\ncolor: red", [5, 6, 7, end])
    empty = ("", [end])
    unclosed = ("category: Home > Kitchen\ncolor: red", [5, 6, 7, 8])
    prose = ("a nice red mug", [5, 6, 7, end])
    long = ("category: Home > Kitchen\ncolor: red", [5] * 8 + [end])  # twice the budget
    bodies, ids = zip(good, empty, unclosed, prose, long, strict=True)
    fmt = format_reward(list(bodies), list(ids), end)
    length = length_reward(list(ids), end, budget)
    assert fmt == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert length[0] == 1.0 and length[4] == 0.0
    total = [0.5 * f + 0.2 * n for f, n in zip(fmt, length, strict=True)]
    assert total[0] > max(total[1], total[2], total[3], total[4])
    assert length_reward([[5] * 6 + [end]], end, budget) == [pytest.approx(0.5)]


def test_grounded_format_reward_pays_for_true_claims_only():
    """The constant line GRPO converged to under the syntax reward (``category: medium`` for every query) is well
    formed and false: the grounded reward gives it nothing, and more true keys earn more."""
    from moon3.rl.rewards import grounded_format_reward
    from moon3.synthesis.teacher import QUERY, SynthesisItem

    end = 99
    truth = SynthesisItem("q1", QUERY, None, None, "", ("Home", "Kitchen"), (("color", "red"), ("material", "steel")))
    category_only = SynthesisItem("q2", QUERY, None, None, "", ("Home", "Kitchen"), ())
    traces = {
        "hacked": "category: medium",
        "one_true": "category: Home",
        "all_true": "category: Home > Kitchen\ncolor: red\nmaterial: steel",
        "repeated": "color: red\ncolor: red\ncolor: red",
        "half_wrong": "color: red\nmaterial: wood",
        "unknown_key": "category: Home\nvibe: cozy",
        "prose": "a nice red mug",
    }
    bodies = list(traces.values())
    closed = [[5, end]] * len(bodies)
    r = dict(zip(traces, grounded_format_reward(bodies, closed, end, [truth] * len(bodies)), strict=True))
    assert r["hacked"] == 0.0 and r["prose"] == 0.0 and r["half_wrong"] == 0.0
    assert r["all_true"] == 1.0 and 0.0 < r["one_true"] < r["all_true"]
    assert r["repeated"] == r["one_true"]  # a repeated claim counts once
    assert 0.0 < r["unknown_key"] < r["one_true"]  # an uncheckable claim is not grounded
    unclosed = grounded_format_reward([traces["all_true"]], [[5, 6]], end, [truth])
    assert unclosed == [0.0]
    # A category query's positives share only the category: that is all its truth holds.
    assert grounded_format_reward(["category: Home > Kitchen"], [[5, end]], end, [category_only]) == [1.0]


# --- the policy TRL trains is the one that embeds ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trace_model(mini_dataset, tmp_path_factory) -> Path:
    """An untrained tiny model whose contract is marked as trace-trained, so the rl stage runs on it (these
    tests check the mechanics; the learning is measured on mbe3-mini in `make run`)."""
    cfg = load_config(None)
    torch.manual_seed(0)
    model = Moon3Embedder.from_config(cfg.model, catalog_texts(mini_dataset))
    model.contract = model.contract.with_training(trained_with_traces=True, reasoning=True)
    return model.save_pretrained(tmp_path_factory.mktemp("rl") / "start")


def test_trl_renders_the_contract_prompt(trace_model, mini_dataset):
    import pandas as pd

    from moon3.rl.grpo_trainer import RL_CHAT_TEMPLATE, conversation

    model = Moon3Embedder.from_pretrained(trace_model)
    queries = pd.read_parquet(mini_dataset / "queries.parquet")
    rows = [queries[queries["query_type"] == t].iloc[0] for t in ("text", "image", "multimodal", "category")]
    model.processor.chat_template = RL_CHAT_TEMPLATE
    side = model.contract.image_size
    for row in rows:
        item = query_item(row, mini_dataset)
        content = conversation(item.get("text"), item.get("image") is not None, model.contract)
        if item.get("image") is not None:
            content[1]["content"][0]["image"] = item["image"].convert("RGB").resize((side, side), 3)
        rendered = model.processor.apply_chat_template([content], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"][0]  # fmt: skip
        ours = model.prepare_batch([item], open_trace=True)["input_ids"][0].tolist()
        assert list(rendered) == ours, row["query_type"]
        assert ours[-1] == model.token_ids[C.THINK_START]


# --- a short run, then kill-and-resume ---------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _rl_cmd(out: Path, data: Path, init: Path, sets: list[str], resume: bool = False) -> list[str]:
    cmd = [str(BIN / "moon3"), "train", "rl", "--params", str(REPO / "params.yaml"), "--data-dir", str(data),
           "--init-dir", str(init), "--out-dir", str(out), "--report-dir", str(out / "reports")]  # fmt: skip
    for item in FAST + sets:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def reference_run(trace_model, mini_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-reference")
    result = subprocess.run(_rl_cmd(out, mini_dataset, trace_model, []), env=_env(out), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_rl_run_logs_rewards_saves_checkpoints_and_an_honest_model(reference_run, trace_model):
    metrics = json.loads((reference_run / "reports" / "rl_metrics.json").read_text())
    assert metrics["skipped"] is False and metrics["steps"] == 4
    history = metrics["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for h in history:
        for key in ("rewards_r_rank_mean", "rewards_r_format_mean", "rewards_r_len_mean", "kl", "infonce",
                    "completions_mean_length", "completions_clipped_ratio", "closure_rate"):  # fmt: skip
            assert key in h, key
        assert 0.0 <= h["rewards_r_rank_mean"] <= 1.0
    # The reference carries the starting FIRE: at step 1 the policy is the reference, so the KL is 0 exactly.
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # Wall-clock numbers are in rl_run.json, not in the DVC outputs (rl_metrics.json, dvclive/, checkpoints).
    assert "timing" not in metrics and not any(k.endswith("_time") for h in history for k in h)
    timing = json.loads((reference_run / "reports" / "rl_run.json").read_text())["timing"]
    assert set(timing) >= {"generation", "reward", "scoring", "update", "step"}
    assert all(timing[k] >= 0 for k in ("generation", "reward", "update"))
    # Checkpoints are marked complete; the final model says what produced it and still loads under its contract.
    last = latest_complete_checkpoint(reference_run / "checkpoints")
    assert last is not None and last.name == "checkpoint-4" and (last / COMPLETE_MARKER).exists()
    saved = json.loads((reference_run / "final" / "moon3_config.json").read_text())
    assert saved["training"]["stage"] == "rl" and saved["training"]["steps"] == 4
    assert saved["contract"]["trained_with_traces"] is True
    final = Moon3Embedder.from_pretrained(reference_run / "final")
    start = Moon3Embedder.from_pretrained(trace_model)
    assert "moon3_heads" not in dict(final.backbone.named_children())
    assert final.processor.chat_template == C.CHAT_TEMPLATE
    changed = [k for k, v in final.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("proj.") for k in changed)


def test_rl_skips_a_model_never_trained_with_traces(mini_dataset, tmp_path):
    cfg = load_config(None)
    torch.manual_seed(0)
    start = Moon3Embedder.from_config(cfg.model, catalog_texts(mini_dataset)).save_pretrained(tmp_path / "start")
    result = subprocess.run(_rl_cmd(tmp_path / "out", mini_dataset, start, []), env=_env(tmp_path),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "reports" / "rl_metrics.json").read_text())
    assert metrics["skipped"] is True and "never trained to write traces" in metrics["reason"]
    # The DVC stage declares reports/rl/dvclive: it exists, holding only the skip.
    assert [p.name for p in (tmp_path / "out" / "reports" / "dvclive").iterdir()] == ["skipped.json"]
    assert (tmp_path / "out" / "final" / "moon3_heads.safetensors").read_bytes() == (
        start / "moon3_heads.safetensors"
    ).read_bytes()


def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, trace_model, mini_dataset, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_rl_cmd(killed, mini_dataset, trace_model, []), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while latest_complete_checkpoint(killed / "checkpoints") is None and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = latest_complete_checkpoint(killed / "checkpoints")
    assert proc.returncode == -signal.SIGKILL and interrupted is not None
    assert interrupted.name == "checkpoint-2" and not (killed / "final").exists()

    resumed = subprocess.run(_rl_cmd(killed, mini_dataset, trace_model, [], resume=True), env=_env(tmp_path),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    metrics = json.loads((killed / "reports" / "rl_metrics.json").read_text())
    assert metrics["steps"] == 4
    a = Moon3Embedder.from_pretrained(reference_run / "final").state_dict()
    b = Moon3Embedder.from_pretrained(killed / "final").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_lora_run_merges_adapters_into_a_plain_model(trace_model, mini_dataset, tmp_path):
    out = tmp_path / "lora"
    result = subprocess.run(_rl_cmd(out, mini_dataset, trace_model, ["rl.steps=2", "rl.lora=true"]),
                            env=_env(tmp_path), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()
    final = Moon3Embedder.from_pretrained(out / "final").state_dict()
    start = Moon3Embedder.from_pretrained(trace_model).state_dict()
    assert final.keys() == start.keys() and not any("lora" in k for k in final)
    changed = {k for k in final if not torch.equal(final[k], start[k])}
    # Adapters on the decoder's linear layers (merged back), the heads trained in full, the vision tower frozen.
    assert any(".language_model.layers." in k for k in changed) and any(k.startswith("proj.") for k in changed)
    assert not any(".visual." in k for k in changed)


@pytest.mark.slow
def test_deepspeed_zero2_one_cpu_process(trace_model, mini_dataset, tmp_path):
    """TRL's DeepSpeed path with the moon3 heads inside the engine: trains, checkpoints, saves a loadable model.
    (ZeRO-3 partitions the weights the reward's embedding pass reads outside the engine: not supported yet.)"""
    env = _env(tmp_path)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.update(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29563", TORCH_EXTENSIONS_DIR=extensions)  # fmt: skip
    out = tmp_path / "ds"
    sets = ["rl.steps=2", f"rl.deepspeed_config={REPO / 'infra/deepspeed/zero2.json'}"]
    result = subprocess.run(_rl_cmd(out, mini_dataset, trace_model, sets), env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).exists()
    saved = json.loads((out / "final" / "moon3_config.json").read_text())
    assert saved["training"]["stage"] == "rl" and saved["training"]["steps"] == 2
    Moon3Embedder.from_pretrained(out / "final")
