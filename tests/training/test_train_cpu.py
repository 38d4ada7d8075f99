"""End-to-end runs of the trainer on CPU with gloo (several processes, megatron-core schedules)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from train_jobs import DATA, dpo_config, metrics, train

pytestmark = pytest.mark.slow


def test_tp2_dp2_dpo_with_ondare_learns(tmp_path, tiny_base, tiny_other_base):
    """TP=2 x DP=2 (4 processes): held-out DPO loss falls and reward accuracy rises above chance."""
    out = str(tmp_path / "run")
    cfg = dpo_config(tiny_base, out, steps=24, tp=2, micro=4, global_batch=32,
                     merge={"online": {"method": "dare", "keep_rate": 0.5, "alpha": 1e-3}, "base_hf_path": tiny_other_base})
    cfg["run"]["eval_every"] = 12
    proc = train(4, cfg, tmp_path)
    assert "step 24/24" in proc.stdout and "eta" in proc.stdout  # progress lines
    records = metrics(out)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12, 24]
    first, mid, last = evals
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert last["loss"] < mid["loss"] < first["loss"] - 0.1
    # Held-out reward accuracy: ties count as wrong (TRL), so 0 at step 0; chance is 0.5.
    assert last["rewards/accuracy"] >= mid["rewards/accuracy"] > 0.58
    assert last["rewards/margins"] > mid["rewards/margins"] > 0.1
    train_rows = [r for r in records if r["split"] == "train"]
    assert len(train_rows) == 24
    kept = [r["merge/kept_fraction"] for r in train_rows]
    assert all(0.45 < k < 0.55 for k in kept)  # OnDARE keeps about p of each update
    assert all(r["merge/update_norm"] > 0 and r["merge/merged_norm"] > 0 for r in train_rows)
    # Every data-parallel rank contributed: 32 pairs per step.
    assert not os.path.exists(os.path.join(out, "checkpoints"))


@pytest.mark.parametrize("merge", ["dare"])
def test_resume_is_bit_identical(tmp_path, tiny_base, tiny_other_base, merge):
    """6 steps in one go == 3 steps, stop, resume from the checkpoint, 3 more (TP=1, DP=2); with
    online merging (step-K = 2, so the accumulator is mid-way at the checkpoint) too."""
    sections = {"run": {"export_hf": True, "save_final": True}}
    if merge != "none":
        sections["merge"] = {"online": {"method": merge, "keep_rate": 0.3, "alpha": 1e-3, "merge_every": 2},
                             "base_hf_path": tiny_other_base}
    straight = str(tmp_path / "straight")
    pieces = str(tmp_path / "pieces")
    train(2, dpo_config(tiny_base, straight, steps=6, **sections), tmp_path)
    cfg = dpo_config(tiny_base, pieces, steps=6, **sections)
    train(2, cfg, tmp_path, overrides=["run.stop_at_step=3"])
    assert not os.path.exists(os.path.join(pieces, "hf"))  # not finished yet
    proc = train(2, cfg, tmp_path)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert "reference log-probs (train): cached" in proc.stdout  # the cache is reused, not recomputed

    a = load_file(os.path.join(straight, "hf", "model.safetensors"))
    b = load_file(os.path.join(pieces, "hf", "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    base = load_file(os.path.join(tiny_base, "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training did change the weights
    rows_a = {r["step"]: r for r in metrics(straight) if r["split"] == "train"}
    rows_b = {r["step"]: r for r in metrics(pieces) if r["split"] == "train"}
    for step in range(1, 7):
        for key in ("loss", "rewards/margins", "grad_norm", "lr"):
            assert rows_a[step][key] == rows_b[step][key], (step, key)


def test_online_reference_matches_cached(tmp_path, tiny_base):
    """IPO with a frozen reference model run every step == IPO with reference log-probs cached
    from the same weights (TP=2): the two reference paths agree on every logged number."""
    base_cfg = dpo_config(tiny_base, str(tmp_path / "cached"), steps=4, tp=2, micro=4, global_batch=8,
                          loss={"type": "ipo", "beta": 0.1})
    train(2, base_cfg, tmp_path)
    online_cfg = dpo_config(tiny_base, str(tmp_path / "online"), steps=4, tp=2, micro=4, global_batch=8,
                            loss={"type": "ipo", "beta": 0.1, "reference": "online", "reference_hf_path": tiny_base})
    proc = train(2, online_cfg, tmp_path)
    assert "reference log-probs" not in proc.stdout
    assert not os.path.exists(tmp_path / "online" / "reference_logps")
    a = [r for r in metrics(str(tmp_path / "cached")) if r["split"] == "train"]
    b = [r for r in metrics(str(tmp_path / "online")) if r["split"] == "train"]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert a[0]["loss"] == pytest.approx((0 - 1 / (2 * 0.1)) ** 2, rel=1e-4)  # IPO at policy == reference: 25


def test_kto_unpaired_learns(tmp_path, tiny_base):
    """KTO on the unpaired file with DP=2 (KL estimate reduced over ranks): held-out loss falls and
    desirable completions end with higher rewards than undesirable ones."""
    out = str(tmp_path / "kto")
    cfg = dpo_config(tiny_base, out, steps=16, micro=8, global_batch=32, loss={"type": "kto", "beta": 0.1})
    cfg["data"].update({"train_files": [f"{DATA}/kto_train.jsonl"], "eval_files": [f"{DATA}/kto_eval.jsonl"],
                        "format": "unpaired"})
    train(2, cfg, tmp_path)
    evals = [r for r in metrics(out) if r["split"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - sigmoid(0) at policy == reference
    assert last["loss"] < first["loss"] - 0.02
    assert last["rewards/desirable"] > last["rewards/undesirable"]
    assert all(r["kl"] >= 0 for r in metrics(out) if r["split"] == "train")


def test_resume_with_other_parallel_sizes(tmp_path, tiny_base, tiny_other_base):
    """Steps 1-2 at DP=2, steps 3-4 resumed at TP=2, steps 5-6 resumed at PP=2 (megatron's pipeline
    schedule), with OnDARE and step-K = 2: the result matches the uninterrupted DP=2 run up to float
    summation order."""
    sections = {"run": {"export_hf": True, "save_final": True},
                "merge": {"online": {"method": "dare", "keep_rate": 0.3, "alpha": 1e-3, "merge_every": 2},
                          "base_hf_path": tiny_other_base}}
    straight, pieces = str(tmp_path / "straight"), str(tmp_path / "pieces")
    train(2, dpo_config(tiny_base, straight, steps=6, **sections), tmp_path)
    cfg = dpo_config(tiny_base, pieces, steps=6, **sections)
    train(2, cfg, tmp_path, overrides=["run.stop_at_step=2"])
    proc = train(2, cfg, tmp_path, overrides=["parallel.tensor_parallel=2", "run.stop_at_step=4"])
    assert "at step 2" in proc.stdout
    proc = train(2, cfg, tmp_path, overrides=["parallel.pipeline_parallel=2"])
    assert "at step 4" in proc.stdout
    a = load_file(os.path.join(straight, "hf", "model.safetensors"))
    b = load_file(os.path.join(pieces, "hf", "model.safetensors"))
    start = load_file(os.path.join(tiny_base, "model.safetensors"))
    for key in a:
        moved = (a[key] - start[key]).abs().max().item()
        assert moved > 0, key
        assert (a[key] - b[key]).abs().max().item() <= 1e-6 + 1e-4 * moved, key
    rows_a = [r for r in metrics(straight) if r["split"] == "train"]
    rows_b = [r for r in metrics(pieces) if r["split"] == "train"]
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_megatron_checkpoints_as_start_and_base(tmp_path, tiny_base, tiny_other_base):
    """Starting weights and merge base read from megatron dist checkpoints (converted at TP=1,
    trained at TP=2) give bit-identical training to reading both from HF through mbridge."""
    from train_jobs import torchrun

    for name, src in (("start", tiny_base), ("base", tiny_other_base)):
        torchrun(2, ["-m", "onmerge_megatron.training.cli", "convert-hf", "--hf", src, "--out", str(tmp_path / name)])
    merge = {"online": {"method": "dare", "keep_rate": 0.3, "alpha": 1e-3}}
    hf_run, mg_run = str(tmp_path / "hf_run"), str(tmp_path / "mg_run")
    train(2, dpo_config(tiny_base, hf_run, steps=3, tp=2, merge={**merge, "base_hf_path": tiny_other_base},
                        run={"export_hf": True}), tmp_path)
    train(2, dpo_config(tiny_base, mg_run, steps=3, tp=2, merge={**merge, "base_megatron_load": str(tmp_path / "base")},
                        model={"load_format": "megatron", "megatron_load": str(tmp_path / "start")},
                        run={"export_hf": True}), tmp_path)
    a = load_file(os.path.join(hf_run, "hf", "model.safetensors"))
    b = load_file(os.path.join(mg_run, "hf", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(hf_run)] == [r["loss"] for r in metrics(mg_run)]


def test_tiny_pipeline_end_to_end(tmp_path):
    """The README's main job, shortened: base -> SFT -> DPO+OnDARE, summary table and plot."""
    from train_jobs import torchrun

    out = str(tmp_path / "tiny")
    proc = torchrun(2, ["-m", "onmerge_megatron.training.cli", "tiny-pipeline", "--out", out,
                        "--sft-steps", "12", "--dpo-steps", "6", "--no-baseline"])
    assert "held-out metric" in proc.stdout and "reward accuracy" in proc.stdout
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    sft = json.load(open(os.path.join(out, "sft", "summary.json")))
    assert sft["eval_last"]["loss"] < sft["eval_first"]["loss"] - 1.0  # SFT learns from the random base
    dpo = json.load(open(os.path.join(out, "dpo", "summary.json")))
    assert dpo["eval_last"]["loss"] < dpo["eval_first"]["loss"]
    assert os.path.isfile(os.path.join(out, "dpo", "hf", "model.safetensors"))
