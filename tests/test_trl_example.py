"""launch/trl_dpo.py on the CPU demo's own artifacts, as a user tries them after `make demo`.

The demo's first stages are rebuilt small (the tiny base and tokenizer, then SFT with DP=2 exported
in HF format by the trainer), and the example runs TRL's DPOTrainer with OnDARE on one CPU process
without a launcher, on the demo's preference file in the Megatron trainer's layout. The merge is
checked from the saved weights: with no weight decay an element can move only where OnDARE kept
it at some step, or where the reference delta's fixed mask holds it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed import THREADS, torchrun_command
from reference_impl import moves_outside_dare_masks

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "tiny"
EXAMPLE = ROOT / "launch" / "trl_dpo.py"
STEPS = 3
KEEP = 0.2


def _example_module():
    spec = importlib.util.spec_from_file_location("trl_dpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """runs/tiny as `make demo` writes it, small: base/ (model and tokenizer) and sft/hf/."""
    from onmerge_megatron.training.tiny_pipeline import make_base, stage_configs

    out = tmp_path_factory.mktemp("tiny")
    base = make_base(str(out), str(DATA))
    sft, _ = stage_configs(str(out), str(DATA), base, steps_sft=6, steps_dpo=2)
    sft["run"].update({"eval_every": 0, "tensorboard": False})
    config = out / "sft.yaml"
    config.write_text(yaml.safe_dump(sft))
    cmd, env = torchrun_command(2, ["-m", "onmerge_megatron.training.cli", "train", "--config", str(config)])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return {"base": Path(base), "sft": out / "sft" / "hf", "out": out}


def _logged(stdout: str) -> list[dict]:
    """The Trainer's per-step log lines (printed as dicts)."""
    rows = []
    for line in stdout.replace("\r", "\n").splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            rows.append(ast.literal_eval(line[start:line.rindex("}") + 1]))
    return rows


@pytest.mark.slow
def test_trl_dpo_example_runs_on_the_demo_artifacts_with_ondare(demo):
    from safetensors.torch import load_file

    out = demo["out"] / "trl_dpo"
    cmd = [
        sys.executable, str(EXAMPLE), "--cpu_gloo", "--model_name_or_path", str(demo["sft"]),
        "--dataset", str(DATA / "train.jsonl"), "--merge_base_model", str(demo["base"]),
        "--merge_method", "dare", "--merge_keep_rate", str(KEEP), "--merge_alpha", "1e-2",
        "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--weight_decay", "0.0", "--max_length", "64", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
    ]
    # A user's shell: no launcher variables.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=demo["out"], env=env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-8000:]}"

    rows = _logged(done.stdout + "\n" + done.stderr)
    assert len(rows) == STEPS
    for row in rows:
        assert abs(row["online_merge/kept_fraction"] - KEEP) < 0.01
        assert math.isfinite(row["online_merge/merged_norm"]) and row["online_merge/merged_norm"] > 0
        assert math.isfinite(row["loss"])
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step

    before, after = load_file(demo["sft"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    outside, moved_total = moves_outside_dare_masks(before, after, KEEP, STEPS)
    assert not outside, f"elements outside the merge masks moved in {outside}"
    assert moved_total > 0.1 * sum(t.numel() for t in before.values())


def test_records_convert_to_trl_layout_with_the_trainers_tokens(tmp_path):
    """Every layout the Megatron trainer reads becomes TRL's conversational layout, and TRL's own
    rendering of it (trl.data_utils.apply_chat_template) gives the token sequences the trainer scores."""
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    from onmerge_megatron.training.data import DataError, PromptCompletionTokenizer, normalize_record
    from onmerge_megatron.training.tiny_pipeline import make_base

    tiny_tokenizer = AutoTokenizer.from_pretrained(make_base(str(tmp_path), str(DATA)))  # the demo's tokenizer

    to_trl = _example_module().to_trl_record
    user = {"role": "user", "content": "What is three plus four?"}
    good, bad = {"role": "assistant", "content": "seven."}, {"role": "assistant", "content": "five."}
    expected = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    trainer_layout = {"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]}
    strings = {"prompt": user["content"], "chosen": good["content"], "rejected": bad["content"]}
    assert to_trl(trainer_layout, "pairs", chat=True) == expected
    assert to_trl(strings, "pairs", chat=True) == expected
    assert to_trl(expected, "pairs", chat=True) == expected  # TRL's own layout passes through
    assert to_trl(strings, "pairs", chat=False) == strings
    unpaired = {"prompt": user["content"], "completion": good["content"], "label": True}
    assert to_trl(unpaired, "unpaired", chat=True) == {"prompt": [user], "completion": [good], "label": True}
    with pytest.raises(DataError, match="different prompt turns"):
        to_trl({**trainer_layout, "rejected": [{"role": "user", "content": "other"}, bad]}, "pairs", chat=True)
    with pytest.raises(DataError, match="chat template"):
        to_trl(trainer_layout, "pairs", chat=False)

    encode = PromptCompletionTokenizer(tiny_tokenizer)
    with open(DATA / "train.jsonl") as f:
        records = [json.loads(next(f)) for _ in range(8)]
    for record in records:
        prompt, answers, _ = normalize_record(record, "pairs", "train.jsonl")
        text = apply_chat_template(to_trl(record, "pairs", chat=True), tiny_tokenizer)
        ids = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        for side, answer in zip(("chosen", "rejected"), answers):
            prompt_ids, completion_ids = encode(prompt, answer, "train.jsonl")
            assert ids(text["prompt"]) == prompt_ids
            assert ids(text["prompt"] + text[side]) == prompt_ids + completion_ids
