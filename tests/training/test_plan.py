"""The memory planner (training/plan.py) against what the trainer really allocates.

The slow tests build the trainer's real model, DDP buffers and distributed optimizer (megatron-core,
2 gloo processes, the tiny Llama of the test fixtures), run one training step (Adam's moments and
the merge state exist after the first step), and compare the planner's bytes per component with
the storage of the real tensors on each rank.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from distributed import run_distributed
from train_jobs import ROOT, dpo_config

from onmerge_megatron.training.config import config_from_dict, load_config
from onmerge_megatron.training.plan import PRESETS, ModelDims, layer_activation_bytes, load_dims, plan_memory

COMPONENTS = ("weights", "gradients", "main params", "adam moments", "merge state")


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _measure(rank: int, world: int, cfg_dict: dict) -> dict:
    """Build the trainer, take one step, and measure each component's real storage on this rank."""
    from megatron.core import parallel_state as ps

    from onmerge_megatron.merging.state import ADAM_KEYS, MERGE_KEYS
    from onmerge_megatron.training.loop import Trainer
    from onmerge_megatron.training.parallel import quiet_library_warnings

    quiet_library_warnings()
    trainer = Trainer(config_from_dict(cfg_dict))
    trainer.train_step()
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    weight_ptrs = {p.untyped_storage().data_ptr() for p in params}
    inner = trainer.optimizer.inner_optimizers
    main = [p for opt in inner for group in opt.param_groups for p in group["params"]]
    adam = merge = 0
    for opt in inner:
        for state in opt.state.values():
            for key, value in state.items():
                nbytes = value.numel() * value.element_size()
                if key in ADAM_KEYS and key != "step":
                    adam += nbytes
                elif key in MERGE_KEYS:
                    merge += nbytes
    return {
        "dp_rank": ps.get_data_parallel_rank(),
        "stage": ps.get_pipeline_model_parallel_rank(),
        "weights": _storage_bytes(params),
        "gradients": _storage_bytes([p.main_grad for p in params]),
        # fp32 main params are views of the weights' buffer (0 bytes); bf16 ones are fp32 copies.
        "main params": _storage_bytes([p for p in main if p.untyped_storage().data_ptr() not in weight_ptrs]),
        "adam moments": adam,
        "merge state": merge,
        "shard_numel": sum(p.numel() for p in main),
    }


def _planned(cfg_dict: dict, world: int, measured: dict):
    cfg = config_from_dict(cfg_dict)
    return plan_memory(cfg, world, load_dims(cfg), stage=measured["stage"], dp_rank=measured["dp_rank"], fused=False)


@pytest.mark.slow
def test_plan_matches_measured_storage_dp2_onties(tmp_path, tiny_base, tiny_other_base):
    """DP 2 x TP 1, fp32, OnTIES with step-K (K = 2) and the weight EMA: every component the planner
    counts equals the real storage on each rank, byte for byte (the DDP buffer's padding included)."""
    cfg = dpo_config(tiny_base, str(tmp_path / "run"), steps=4, micro=2, global_batch=4,
                     merge={"online": {"method": "ties", "keep_rate": 0.05, "alpha": 1e-3, "merge_every": 2,
                                       "weight_ema": 0.01}, "base_hf_path": tiny_other_base})
    measured = run_distributed(_measure, 2, cfg, description="planner vs measured (DP 2, OnTIES)")
    assert sorted(m["dp_rank"] for m in measured) == [0, 1]
    for m in measured:
        plan = _planned(cfg, 2, m)
        for component in COMPONENTS:
            assert plan.bytes_of(component) == m[component], (m["dp_rank"], component, plan.bytes_of(component), m[component])
        assert m["main params"] == 0 and m["merge state"] > 0 and m["adam moments"] > 0
    # The two shards split the buffer: together they hold every parameter once.
    dims = load_dims(config_from_dict(cfg))
    assert sum(m["shard_numel"] for m in measured) == dims.num_params


@pytest.mark.slow
def test_plan_matches_measured_storage_tp2_ondare(tmp_path, tiny_base, tiny_other_base):
    """TP 2 x DP 1, OnDARE (fixed mask): weights, gradients, main params and Adam's moments exactly;
    the reference delta keeps a Bernoulli(p) draw of each shard, so its size is p·n within 5 standard
    deviations of the binomial count (the planner gives the expectation)."""
    p = 0.3
    cfg = dpo_config(tiny_base, str(tmp_path / "run"), steps=4, tp=2, micro=2, global_batch=4,
                     merge={"online": {"method": "dare", "keep_rate": p, "alpha": 1e-3}, "base_hf_path": tiny_other_base})
    measured = run_distributed(_measure, 2, cfg, description="planner vs measured (TP 2, OnDARE)")
    for m in measured:
        plan = _planned(cfg, 2, m)
        for component in ("weights", "gradients", "main params", "adam moments"):
            assert plan.bytes_of(component) == m[component], (component, plan.bytes_of(component), m[component])
        n = m["shard_numel"]
        sd_bytes = 4 * math.sqrt(p * (1 - p) * n)
        assert abs(plan.bytes_of("merge state") - m["merge state"]) <= 5 * sd_bytes
        assert plan.bytes_of("merge state") == pytest.approx(4 * p * n)


def test_presets_have_the_published_parameter_counts():
    """Independent reference: the parameter counts the model cards state."""
    assert ModelDims.from_hf_dict(PRESETS["llama3-8b"], "").num_params == 8_030_261_248
    assert ModelDims.from_hf_dict(PRESETS["qwen1.5-7b"], "").num_params == 7_721_324_544


def test_activation_terms_follow_korthikanti():
    """Full recomputation keeps the layer input alone: 2·s·b·h bytes in 16-bit, divided by t with
    sequence parallelism (Korthikanti et al. 2022, section 4.2); sequence parallelism divides every
    kept term by t; fused attention drops the s² term, which grows with s²."""
    dims = ModelDims.from_hf_dict(PRESETS["llama3-8b"], "")
    s, b, h = 1024, 2, dims.hidden
    assert layer_activation_bytes(dims, s, b, 4, True, "fused", "full", 2)["kept"] == 2 * s * b * h / 4
    assert layer_activation_bytes(dims, s, b, 1, False, "fused", "full", 2)["kept"] == 2 * s * b * h
    no_sp = layer_activation_bytes(dims, s, b, 1, False, "local", "none", 2)["kept"]
    sp = layer_activation_bytes(dims, s, b, 4, True, "local", "none", 2)["kept"]
    assert sp == pytest.approx(no_sp / 4)
    local = layer_activation_bytes(dims, s, b, 1, False, "local", "none", 2)["kept"]
    fused = layer_activation_bytes(dims, s, b, 1, False, "fused", "none", 2)["kept"]
    scores = dims.heads * s * s * b * 6  # fp32 softmax output + its bf16 copy
    assert local - fused > scores  # the s² term is what separates them (plus GQA's expanded K, V)
    selective = layer_activation_bytes(dims, s, b, 1, False, "local", "selective", 2)["kept"]
    assert selective < local - scores


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onmerge_megatron.training.cli", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    """`onmerge plan` in this process (the command's own function, on its own argument parser)."""
    import argparse

    from onmerge_megatron.training.plan import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args(list(args)))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.startswith(("llama3_8b_", "qwen15_7b_"))))
def test_shipped_configs_fit_80gib_at_16_gpus(name):
    """The 7-8B configs fit an 80 GiB GPU at the 2 nodes x 8 GPUs docs/cluster.md states."""
    cfg = load_config(os.path.join(ROOT, "configs", name), world_size=16, check_paths=False)
    preset = "llama3-8b" if name.startswith("llama3") else "qwen1.5-7b"
    plan = plan_memory(cfg, 16, load_dims(cfg, preset), gpu_memory_gib=80.0)
    assert plan.fits, (name, plan.total / 2**30)


def test_cli_table_json_and_errors(capsys):
    config = os.path.join(ROOT, "configs", "llama3_8b_dpo_ondare.yaml")
    llama = ("--config", config, "--model-config", "llama3-8b", "--gpu-memory", "80")
    # The installed command, once: a table with the verdict and the time estimate.
    proc = _plan_cli(*llama, "--world-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "adam moments" in proc.stdout and "fits in 80 GiB" in proc.stdout and "tokens/s/GPU" in proc.stdout
    code, out, _ = _plan(capsys, *llama, "--world-size", "16", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["tp"] == 4 and plan["dp"] == 4
    assert plan["total"] == pytest.approx(sum(r["bytes"] for r in plan["rows"]))
    # 8B on one 24 GiB GPU does not fit: exit status 1 and the verdict.
    code, out, _ = _plan(capsys, *llama[:4], "--gpu-memory", "24", "--world-size", "1",
                         "--set", "parallel.tensor_parallel=1", "--set", "parallel.global_batch_size=8")
    assert code == 1 and "DOES NOT FIT in 24 GiB" in out
    # The placeholder model path has no config.json: the key is named, with the way out.
    code, _, err = _plan(capsys, "--config", config, "--world-size", "16")
    assert code == 2 and "model.hf_path" in err and "--model-config" in err
    code, _, err = _plan(capsys, *llama, "--world-size", "12")
    assert code == 2 and "global_batch_size" in err
    # The launch's own world-size check (config.validate), with its wording.
    code, _, err = _plan(capsys, *llama, "--world-size", "6")
    assert code == 2 and err.startswith("config error: ") and "does not divide the world size 6" in err
