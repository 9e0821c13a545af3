"""Run settings: presets, config files, and CLI flags derived from the config dataclasses."""
import argparse
import dataclasses
import json

import pytest

from dsmr import DSMRConfig
from dsmr.commands.common import add_config_flags, config_overrides
from dsmr.config import PRESETS, TrainConfig, load_settings


def test_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"model": {"d_model": 64, "n_heads": 2, "schedule": "uniform:m=32"},
                             "train": {"lr": 1e-3, "max_steps": 9}, "data": {"source": "x"}}))
    s = load_settings(f, preset="small", model={"n_heads": 4, "dropout": None}, train={"lr": 2e-3})
    assert s.model["n_layers"] == PRESETS["small"]["n_layers"]  # from the preset
    assert s.model["d_model"] == 64 and s.schedule == "uniform:m=32"  # the file over the preset
    assert s.model["n_heads"] == 4 and "dropout" not in s.model  # overrides over the file; None = not given
    assert s.train == {"lr": 2e-3, "max_steps": 9} and s.data == {"source": "x"}
    cfg = s.model_config(vocab_size=50)
    assert cfg.horizons == [32] * cfg.n_layers and cfg.vocab_size == 50
    assert s.train_config() == TrainConfig(lr=2e-3, max_steps=9)
    assert load_settings(preset="tiny").train_config().epochs == 1  # no length given: one epoch


def test_settings_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        load_settings(preset="huge")
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "none.toml")
    bad = tmp_path / "bad.json"
    bad.write_text('{"optim": {}}')
    with pytest.raises(ValueError, match=r"unknown tables \['optim'\]"):
        load_settings(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_settings(bad)


def test_every_config_field_is_a_flag_with_its_type():
    p = argparse.ArgumentParser()
    add_config_flags(p, DSMRConfig, skip=("vocab_size", "horizons"))
    add_config_flags(p, TrainConfig, skip=("out_dir",))
    flags = {a.dest for a in p._actions}
    want = {f.name for f in dataclasses.fields(DSMRConfig)} - {"vocab_size", "horizons"}
    want |= {f.name for f in dataclasses.fields(TrainConfig)} - {"out_dir"}
    assert want <= flags
    args = p.parse_args(["--lr", "0.5", "--no-shuffle", "--autocast", "--val-split", "none", "--window", "64",
                         "--n-kv-heads", "none", "--max-steps", "3"])
    assert config_overrides(args, TrainConfig) == {"lr": 0.5, "shuffle": False, "autocast": True,
                                                   "val_split": None, "max_steps": 3}
    assert config_overrides(args, DSMRConfig) == {"window": 64, "n_kv_heads": None}
    with pytest.raises(SystemExit):
        p.parse_args(["--batch-lanes", "two"])
