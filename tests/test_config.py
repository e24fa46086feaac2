"""params.yaml is strict: unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moon3.config import ConfigError, Moon3Config, help_table, load_config

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_cover_every_key():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, Moon3Config)
    # params.yaml is the single source of defaults: it lists every key the config classes know.
    in_file = yaml.safe_load((REPO / "params.yaml").read_text())
    keys_in_file = {f"{s}.{k}" for s, section in in_file.items() for k in section}
    assert keys_in_file == {row[0] for row in help_table()}


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("train:\n  steps: ten\n", r"train\.steps: expected int, got str 'ten'"),
        ("train:\n  steps: 1.5\n", r"train\.steps: expected int, got float"),
        ("train:\n  lr: fast\n", r"train\.lr: expected float, got str 'fast'"),
        ("model:\n  fusion: 'yes'\n", r"model\.fusion: expected bool"),
        ("eval:\n  ks: 10\n", r"eval\.ks: expected a list"),
        ("eval:\n  ks: [1, x]\n", r"eval\.ks\[1\]: expected int"),
        ("data: 3\n", r"data: expected a mapping"),
    ],
)
def test_wrong_type_is_named(tmp_path, yaml_text, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_int_widens_to_float_and_overrides_apply(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1\n")
    cfg = load_config(
        path, ["train.steps=7", "model.fusion=false", "eval.ks=[1, 3]", "data.source_path=", "train.weight_decay=3e-4"]
    )
    assert cfg.train.weight_decay == 3e-4  # YAML 1.1 reads 3e-4 as a string; floats accept it
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.fusion is False
    assert cfg.eval.ks == [1, 3]
    assert cfg.data.source_path == ""


def test_bad_override_is_named():
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.steps"])
