"""Every config error is reported before any work, naming the key."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from onmerge_megatron import OnlineMergeConfig
from onmerge_megatron.training.config import ConfigError, load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def model_dir(make_model_dir):
    return make_model_dir(num_hidden_layers=2)


@pytest.fixture()
def good_yaml(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model:\n  hf_path: {model_dir}\n"
        f"data:\n  train_files: [{data}]\n"
        "loss:\n  type: dpo\n  beta: 0.1\n"
        "optim:\n  lr: 5e-7\n"  # YAML 1.1 reads this as a string; it must still be a float
        "parallel:\n  tensor_parallel: 2\n  micro_batch_size: 2\n  global_batch_size: 8\n"
        "run:\n  output_dir: out\n  train_steps: 3\n"
    )
    return str(path)


def test_good_config_loads_with_types(good_yaml):
    cfg = load_config(good_yaml, ["optim.lr=1e-6", "loss.beta=0.2", "run.train_steps=7"], world_size=4)
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.beta == 0.2 and cfg.run.train_steps == 7
    assert load_config(good_yaml, world_size=4).optim.lr == 5e-7


def test_unknown_key_is_named(good_yaml):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        load_config(good_yaml, ["optim.learning_rate=1e-6"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer'"):
        load_config(good_yaml, ["trainer.steps=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'merge\.online\.keep'"):
        load_config(good_yaml, ["merge.online.keep=0.1"])


@pytest.mark.parametrize("override,key", [
    ("run.train_steps=abc", "run.train_steps"),
    ("run.train_steps=2.5", "run.train_steps"),
    ("optim.lr=fast", "optim.lr"),
    ("run.resume=3", "run.resume"),
    ("loss.type=ppo", "loss.type"),
    ("data.train_files=x.jsonl", "data.train_files"),
])
def test_wrong_type_is_named(good_yaml, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(good_yaml, [override])


def test_yaml_errors_name_file_and_line(good_yaml):
    """A wrong value in the file names the file and the line of its key; one given with --set does not."""
    with open(good_yaml) as f:
        text = f.read()
    with open(good_yaml, "w") as f:
        f.write(text.replace("  beta: 0.1\n", "  beta: high\n").replace("  lr: 5e-7\n", "  lr: 5e-7\n  learning_rate: 1\n"))
    lines = open(good_yaml).read().splitlines()
    beta_line, lr_line = lines.index("  beta: high") + 1, lines.index("  learning_rate: 1") + 1
    with pytest.raises(ConfigError, match=re.escape(f"{good_yaml}:{lr_line}: unknown config key 'optim.learning_rate'; valid keys here: [")):
        load_config(good_yaml)
    with pytest.raises(ConfigError, match=re.escape(f"{good_yaml}:{beta_line}: config key 'loss.beta': expected float, got 'high' (str)")):
        load_config(good_yaml, ["optim={lr: 5e-7}"])
    with pytest.raises(ConfigError, match=r"^config key 'loss\.beta': expected float, got 'low' \(str\)$"):
        load_config(good_yaml, ["optim={lr: 5e-7}", "loss.beta=low"])


def _yaml_online(tmp_path, online):
    """merge.online of a YAML config with the given `merge.online` section (None: no merge section)."""
    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  hf_path: m\ndata:\n  train_files: [a.jsonl]\n"
                    + (f"merge:\n  base_hf_path: base\n  online: {json.dumps(online)}\n" if online is not None else ""))
    return load_config(str(path), check_paths=False).merge.online


def _megatron_online(tmp_path, method):
    from onmerge_megatron.megatron.args import OnlineMergeSettings, add_online_merge_args

    argv = ["--online-merge", method] if method else []
    return OnlineMergeSettings.from_args(add_online_merge_args(argparse.ArgumentParser()).parse_args(argv)).merge_config()


def _hf_online(tmp_path, method):
    from transformers import HfArgumentParser

    from onmerge_megatron.deepspeed.hf import OnlineMergeArguments

    argv = ["--merge_method", method] if method else []
    (args,) = HfArgumentParser(OnlineMergeArguments).parse_args_into_dataclasses(args=argv)
    return args.to_config()


@pytest.mark.parametrize("front_end", ["yaml", "megatron", "hf"])
def test_front_end_defaults_are_the_engines(tmp_path, front_end):
    """Every front-end leaves each setting at the engine's default when it is not given; the method
    alone defaults to 'none' everywhere (adding a front-end changes nothing until a method is set)."""
    if front_end == "yaml":
        unset = [_yaml_online(tmp_path, None), _yaml_online(tmp_path, {})]
        dare = _yaml_online(tmp_path, {"method": "dare"})
    else:
        read = _megatron_online if front_end == "megatron" else _hf_online
        unset, dare = [read(tmp_path, None)], read(tmp_path, "dare")
    engine = dataclasses.asdict(OnlineMergeConfig())
    for config in unset:
        assert dataclasses.asdict(config) == {**engine, "method": "none"}
    assert dataclasses.asdict(dare) == engine


def test_engine_validation_is_reported_with_section(good_yaml):
    with pytest.raises(ConfigError, match=r"merge\.online.*keep_rate"):
        load_config(good_yaml, ["merge.online.method=dare", "merge.online.keep_rate=1.5"])


def test_missing_files_are_named(good_yaml, tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.train_files'.*nope\.jsonl"):
        load_config(good_yaml, [f"data.train_files=[{tmp_path}/nope.jsonl]"])
    with pytest.raises(ConfigError, match=r"'model\.hf_path'"):
        load_config(good_yaml, [f"model.hf_path={tmp_path}/no_model"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"'merge\.base_hf_path'"):
        load_config(good_yaml, ["merge.online.method=dare", "merge.online.alpha=1e-6"])


def test_parallel_sizes_against_world_size(good_yaml):
    with pytest.raises(ConfigError, match=r"'parallel\.tensor_parallel'.*world size 3"):
        load_config(good_yaml, world_size=3)
    with pytest.raises(ConfigError, match=r"'parallel\.global_batch_size'"):
        load_config(good_yaml, ["parallel.global_batch_size=6"], world_size=4)
    with pytest.raises(ConfigError, match=r"'parallel\.tensor_parallel'.*num_key_value_heads"):
        load_config(good_yaml, ["parallel.tensor_parallel=4"], world_size=4)
    with pytest.raises(ConfigError, match=r"'parallel\.pipeline_parallel'.*num_hidden_layers"):
        load_config(good_yaml, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=4"], world_size=4)


def test_cross_field_checks(good_yaml):
    with pytest.raises(ConfigError, match=r"'data\.format'"):
        load_config(good_yaml, ["loss.type=kto"])
    with pytest.raises(ConfigError, match=r"'loss\.label_smoothing'"):
        load_config(good_yaml, ["loss.label_smoothing=0.6"])
    with pytest.raises(ConfigError, match=r"'data\.max_prompt_length'"):
        load_config(good_yaml, ["data.max_length=64", "data.max_prompt_length=64"])


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1e-6", "c=true", "d=[x, y]", "e=null", "f=hello"]) == [
        ("a.b", 1e-6), ("c", True), ("d", ["x", "y"]), ("e", None), ("f", "hello")]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_cli_reports_error_before_any_work(good_yaml):
    env = dict(os.environ, WORLD_SIZE="3")
    proc = subprocess.run([sys.executable, "-m", "onmerge_megatron.training.cli", "train", "--config", good_yaml],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "parallel.tensor_parallel" in proc.stderr
    # Nothing was started: no output directory was created.
    assert not os.path.exists(os.path.join(os.path.dirname(good_yaml), "out"))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")))
def test_shipped_configs_are_valid(name):
    """Every shipped config parses and type-checks (input paths are placeholders, not checked)."""
    world = 2 if name.startswith("tiny") else 16
    cfg = load_config(os.path.join(ROOT, "configs", name), world_size=world, check_paths=False)
    if not name.startswith("tiny"):  # the paper's settings
        assert cfg.loss.beta == 0.1 and cfg.parallel.global_batch_size == 128
        assert cfg.merge.online.keep_rate == 0.01 and cfg.merge.online.alpha == 5e-7
        assert cfg.merge.online.method == ("dare" if "ondare" in name else "ties")
        assert cfg.loss.type in name


def test_docs_config_reference_is_current():
    from onmerge_megatron.training.config import config_reference_markdown

    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        text = f.read()
    start = text.index("-->\n", text.index("<!-- generated")) + 4
    end = text.index("<!-- end generated -->")
    assert text[start:end].strip() == config_reference_markdown().strip(), \
        "docs/config.md is stale: regenerate with python -m onmerge_megatron.training.config"
