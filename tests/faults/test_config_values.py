"""`onmerge check-config` refuses values that would put a non-finite number into the weights, naming
the key and the value, before any work starts."""

from __future__ import annotations

import re

import pytest
import yaml

from onmerge_megatron.training.cli import main
from onmerge_megatron.training.config import ConfigError, load_config
from train_jobs import dpo_config


@pytest.fixture
def config_file(tmp_path):
    cfg = dpo_config(str(tmp_path / "model"), str(tmp_path / "out"), steps=4)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=.nan", "config key 'optim.lr': expected a finite number, got nan"),
        ("optim.lr=.inf", "config key 'optim.lr': expected a finite number, got inf"),
        ("loss.beta=.inf", "config key 'loss.beta': expected a finite number, got inf"),
        ("merge.online.alpha=.nan", "config key 'merge.online.alpha': expected a finite number, got nan"),
        ("optim.adam_eps=0", "config key 'optim.adam_eps' must be > 0, got 0.0"),
        ("optim.adam_eps=-1e-8", "config key 'optim.adam_eps' must be > 0, got -1e-08"),
        ("optim.adam_beta2=-0.1", "config key 'optim.adam_beta2' must be in [0, 1), got -0.1"),
        ("optim.adam_beta1=1.0", "config key 'optim.adam_beta1' must be in [0, 1), got 1.0"),
        ("optim.clip_grad=-1", "config key 'optim.clip_grad' must be >= 0, got -1.0"),
        ("optim.weight_decay=-0.1", "config key 'optim.weight_decay' must be >= 0, got -0.1"),
        ("run.eval_batches=-1", "config key 'run.eval_batches' must be >= 0, got -1"),
        ("run.keep_last=-2", "config key 'run.keep_last' must be >= 0, got -2"),
        ("optim.max_consecutive_skips=0", "config key 'optim.max_consecutive_skips' must be >= 1, got 0"),
    ],
)
def test_check_config_refuses(config_file, capsys, override, message):
    assert main(["check-config", "--config", config_file, "--no-paths", "--set", override]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(config_file, [override], check_paths=False)


def test_non_finite_in_the_yaml_file_is_named(tmp_path):
    cfg = dpo_config(str(tmp_path / "model"), str(tmp_path / "out"), steps=4)
    cfg["optim"]["lr"] = float("inf")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))  # written as .inf
    with pytest.raises(ConfigError, match="'optim.lr': expected a finite number, got inf"):
        load_config(str(path), check_paths=False)
    line = path.read_text().splitlines().index("  lr: .inf") + 1
    with pytest.raises(ConfigError, match=re.escape(f"{path}:{line}: config key 'optim.lr': expected a finite number, got inf")):
        load_config(str(path), check_paths=False)


def test_valid_values_still_pass(config_file):
    cfg = load_config(config_file, ["optim.adam_eps=1e-12", "optim.clip_grad=0", "run.keep_last=3"], check_paths=False)
    assert (cfg.optim.adam_eps, cfg.optim.clip_grad, cfg.run.keep_last) == (1e-12, 0.0, 3)
