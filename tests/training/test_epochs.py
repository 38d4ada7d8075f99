"""run.epochs: train_steps = ceil(epochs x training records / global batch), computed at start from
the records left after the held-out split, used by the LR schedule, saved, and the same on resume."""

import math
import os

import pytest
import yaml

from onmerge_megatron.training.config import ConfigError, config_from_dict, steps_from_epochs, validate
from train_jobs import DATA, dpo_config, metrics, train


def config(**run) -> dict:
    return {"model": {"hf_path": "model"}, "data": {"train_files": ["train.jsonl"]},
            "optim": {"warmup_steps": 0}, "parallel": {"global_batch_size": 10}, "run": run}


def test_steps_are_epochs_times_records_over_global_batch_rounded_up():
    cfg = config_from_dict(config(epochs=1.5))
    assert steps_from_epochs(cfg, 80).run.train_steps == 12  # 1.5 x 80 / 10 = 12 exactly
    assert steps_from_epochs(cfg, 81).run.train_steps == 13  # 12.15 -> 13
    assert steps_from_epochs(cfg, 3).run.train_steps == 1  # 0.45 -> 1
    # 1.1 x 100 / 10 is 11.000000000000002 in floats; the 1.1 written in the config means 11 steps.
    assert steps_from_epochs(config_from_dict(config(epochs=1.1)), 100).run.train_steps == 11
    assert cfg.run.train_steps == 100  # the given config is left as it was


def test_epochs_over_no_training_records_are_refused():
    with pytest.raises(ConfigError, match=r"'run\.epochs' \(1\.0\) gives no training step: run\.train_steps = 0, "
                                          r"computed from run\.epochs \(1\.0\) x 0 training records.*hold 0 training records"):
        steps_from_epochs(config_from_dict(config(epochs=1.0)), 0)


def test_epochs_are_checked():
    with pytest.raises(ConfigError, match=r"'run\.epochs' must be >= 0.*got -1\.0"):
        validate(config_from_dict(config(epochs=-1.0)), check_paths=False)
    # With epochs, stop_at_step and warmup_steps are compared with the computed step count, not
    # with run.train_steps (100 by default) ...
    validate(config_from_dict(config(epochs=3.0, stop_at_step=200)), check_paths=False)
    with pytest.raises(ConfigError, match=r"'run\.stop_at_step' must be in \[0, run\.train_steps\]"):
        validate(config_from_dict(config(stop_at_step=200)), check_paths=False)
    # ... once the records are known: 1.5 x 80 / 10 = 12 steps.
    with pytest.raises(ConfigError, match=r"'run\.stop_at_step' \(13\) is past the end of the run: run\.train_steps = 12, "
                                          r"computed from run\.epochs \(1\.5\) x 80 training records"):
        steps_from_epochs(config_from_dict(config(epochs=1.5, stop_at_step=13)), 80)
    assert steps_from_epochs(config_from_dict(config(epochs=1.5, stop_at_step=12)), 80).run.stop_at_step == 12
    warm = config(epochs=1.5)
    warm["optim"]["warmup_steps"] = 12
    with pytest.raises(ConfigError, match=r"'optim\.warmup_steps' \(12\) must be below run\.train_steps = 12.*"
                                          r"--set optim\.warmup_steps=1\b"):
        steps_from_epochs(config_from_dict(warm), 80)


@pytest.mark.slow
def test_trainer_runs_the_computed_steps_and_resumes_with_them(tmp_path, tiny_base):
    """100 records, 20 held out (eval_fraction 0.2): 1.5 epochs of the 80 left at 16 pairs a step is
    ceil(7.5) = 8 steps (ceil(9.375) = 10 if the held-out records were counted). Stopped at step 3
    and resumed, the run still ends at step 8, with the LR decayed over 8 steps."""
    with open(os.path.join(DATA, "train.jsonl")) as f:
        lines = f.readlines()[:100]
    data = tmp_path / "train100.jsonl"
    data.write_text("".join(lines))
    out = str(tmp_path / "run")
    cfg = dpo_config(tiny_base, out, steps=1, micro=4, global_batch=16)  # train_steps 1 is replaced
    cfg["data"].update({"train_files": [str(data)], "eval_files": [], "eval_fraction": 0.2})
    cfg["run"].update({"epochs": 1.5, "log_every": 1})
    expected = math.ceil(1.5 * 80 / 16)
    assert expected == 8

    first = train(1, cfg, tmp_path, overrides=["run.stop_at_step=3"])
    line = "run.train_steps = 8: run.epochs 1.5 x 80 training records / global batch 16, rounded up"
    assert line in first.stdout
    assert "step 3/8" in first.stdout
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["run"]["train_steps"] == 8 and saved["run"]["epochs"] == 1.5

    second = train(1, cfg, tmp_path)
    assert "at step 3" in second.stdout and line in second.stdout
    assert "resume: run.train_steps" not in second.stdout  # the checkpoint's schedule has the same length
    rows = [r for r in metrics(out) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Step k's LR is the schedule's value at k: linear warmup over 2 steps to 1e-3, then cosine
    # decay to 1e-4 at step 8: lr(k) = 1e-4 + 0.5 (1 + cos(pi (k - 2) / 6)) x 9e-4.
    lr = {r["step"]: r["lr"] for r in rows}
    assert lr[1] == pytest.approx(5e-4, rel=1e-9)
    assert lr[5] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-9)
    assert lr[8] == pytest.approx(1e-4, rel=1e-9)
