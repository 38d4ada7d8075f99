"""Helpers that run the trainer in fresh processes (torchrun), as users do."""

from __future__ import annotations

import json
import os
import subprocess

import yaml

from distributed import torchrun_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "tiny")


def torchrun(nproc: int, args: list[str], timeout: int = 400, check: bool = True) -> subprocess.CompletedProcess:
    """Run under torchrun; with `check`, a non-zero exit fails the test with the output's tail."""
    cmd, env = torchrun_command(nproc, args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def train_args(config: dict, tmp_path, overrides: list[str] = ()) -> list[str]:
    path = os.path.join(str(tmp_path), f"config_{abs(hash(json.dumps(config, sort_keys=True)))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    args = ["-m", "onmerge_megatron.training.cli", "train", "--config", path]
    for item in overrides:
        args += ["--set", item]
    return args


def train(nproc: int, config: dict, tmp_path, overrides: list[str] = (), timeout: int = 400,
          check: bool = True) -> subprocess.CompletedProcess:
    return torchrun(nproc, train_args(config, tmp_path, overrides), timeout, check)


def metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def dpo_config(hf_path: str, out: str, steps: int, tp: int = 1, micro: int = 4, global_batch: int = 16, **sections) -> dict:
    cfg = {
        "model": {"hf_path": hf_path},
        "data": {"train_files": [f"{DATA}/train.jsonl"], "eval_files": [f"{DATA}/eval.jsonl"], "format": "pairs",
                 "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "parallel": {"tensor_parallel": tp, "micro_batch_size": micro, "global_batch_size": global_batch},
        "run": {"output_dir": out, "train_steps": steps, "eval_every": 0, "save_final": False, "log_every": 5,
                "tensorboard": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg
