"""Layer implementation, sequence parallelism, recomputation, communication overlap and the fused
optimizer step in the trainer.

What runs on CPU with gloo is run and compared with the same run without the setting: activation
recomputation (selective, full uniform, full block), the overlapped gradient reduce-scatter and
parameter all-gather, and the fused Triton step under Triton's interpreter. The Transformer Engine
spec and sequence parallelism need TE and a GPU: their parameter names are checked against
mbridge's own (TE) mapping, and the validation that refuses them here is checked by key name.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from distributed import run_distributed, torchrun_command
from onmerge_megatron.training.config import ConfigError, config_from_dict, validate
from onmerge_megatron.training.model import (
    LOCAL_TO_TE_NAMES,
    LayerSettings,
    on_gpu,
    transformer_engine_available,
    use_sequence_parallel,
    use_transformer_engine,
)
from train_jobs import DATA, ROOT, dpo_config, metrics

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@pytest.fixture()
def model_dir(make_model_dir):
    return make_model_dir(num_hidden_layers=4)


def _cfg(model_dir, **sections):
    tree = {"model": {"hf_path": model_dir}, "data": {"train_files": ["train.jsonl"]},
            "parallel": {"tensor_parallel": 2, "micro_batch_size": 1, "global_batch_size": 8}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config_from_dict(tree)


def _check(cfg, check_devices=False, pipeline=1):
    validate(cfg, world_size=2 * pipeline, check_paths=False, check_devices=check_devices)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("sections,key,words", [
    ({"parallel": {"sequence_parallel": True, "tensor_parallel": 1}}, "parallel.sequence_parallel", "tensor_parallel is 1"),
    ({"parallel": {"sequence_parallel": True}, "model": {"transformer_impl": "local"}}, "parallel.sequence_parallel",
     "local norm layers"),
    ({"parallel": {"overlap_param_gather": True}}, "parallel.overlap_param_gather", "overlap_grad_reduce is false"),
    ({"model": {"recompute_layers": 1}}, "model.recompute_layers", "'full' only"),
    ({"model": {"recompute": "selective", "recompute_layers": 2}}, "model.recompute_layers", "'full' only"),
    ({"model": {"recompute": "full", "recompute_layers": -1}}, "model.recompute_layers", ">= 0"),
    ({"model": {"recompute": "full", "recompute_layers": 3}, "parallel": {"pipeline_parallel": 2, "tensor_parallel": 1}},
     "model.recompute_layers", "layers per pipeline stage \\(2\\)"),
    ({"optim": {"fused": True}}, "optim.fused", "method is 'none'"),
])
def test_impossible_combinations_are_refused_by_key(model_dir, sections, key, words):
    cfg = _cfg(model_dir, **sections)
    with pytest.raises(ConfigError, match=rf"config key '{key}'.*{words}"):
        _check(cfg)


def test_possible_combinations_pass(model_dir):
    _check(_cfg(model_dir, model={"recompute": "full", "recompute_layers": 4}))
    _check(_cfg(model_dir, model={"recompute": "selective"}))
    _check(_cfg(model_dir, parallel={"overlap_grad_reduce": True, "overlap_param_gather": True}))
    _check(_cfg(model_dir, parallel={"sequence_parallel": True, "tensor_parallel": 2}, model={"transformer_impl": "transformer_engine"}))
    # 'auto' never refuses: it is on only where it runs.
    _check(_cfg(model_dir, parallel={"sequence_parallel": "auto"}), check_devices=True)
    _check(_cfg(model_dir, optim={"fused": "auto"}), check_devices=True)


@pytest.mark.skipif(transformer_engine_available() and on_gpu(), reason="Transformer Engine and a GPU are present")
def test_what_needs_te_and_a_gpu_is_refused_here(model_dir):
    cfg = _cfg(model_dir, model={"transformer_impl": "transformer_engine"})
    _check(cfg)  # a config for a GPU machine checks out on a login node
    with pytest.raises(ConfigError, match=r"config key 'model\.transformer_impl' is 'transformer_engine' but"):
        _check(cfg, check_devices=True)
    cfg = _cfg(model_dir, parallel={"sequence_parallel": True})  # transformer_impl 'auto' resolves to local here
    _check(cfg)
    with pytest.raises(ConfigError, match=r"config key 'parallel\.sequence_parallel' is true but this machine builds .*local"):
        _check(cfg, check_devices=True)


@pytest.mark.skipif(on_gpu() or INTERPRETED, reason="needs a machine without a GPU, TRITON_INTERPRET unset")
def test_fused_true_is_refused_on_cpu_without_the_interpreter(model_dir):
    cfg = _cfg(model_dir, optim={"fused": True}, merge={"online": {"method": "dare", "alpha": 0.0}})
    _check(cfg)
    with pytest.raises(ConfigError, match=r"config key 'optim\.fused' is true but"):
        _check(cfg, check_devices=True)


def test_resolution_functions(model_dir):
    local = _cfg(model_dir, model={"transformer_impl": "local"})
    te = _cfg(model_dir, model={"transformer_impl": "transformer_engine"})
    auto = _cfg(model_dir)
    assert use_transformer_engine(local) is False and use_transformer_engine(te) is True
    assert use_transformer_engine(auto) == (on_gpu() and transformer_engine_available())
    assert use_sequence_parallel(te) is True  # TP = 2
    assert use_sequence_parallel(local) is False
    assert use_sequence_parallel(_cfg(model_dir, model={"transformer_impl": "transformer_engine"},
                                      parallel={"tensor_parallel": 1})) is False
    assert use_sequence_parallel(_cfg(model_dir, parallel={"sequence_parallel": False}, model={"transformer_impl": "transformer_engine"})) is False


def test_recompute_settings_map_to_megatron_fields(model_dir):
    def fields(**model):
        args = LayerSettings.from_config(_cfg(model_dir, model={"transformer_impl": "local", **model})).transformer_config_args()
        return args["recompute_granularity"], args["recompute_method"], args["recompute_num_layers"]

    assert fields() == (None, None, None)
    assert fields(recompute="selective") == ("selective", None, None)
    assert fields(recompute="full") == ("full", "uniform", 1)  # units of one layer: every layer
    assert fields(recompute="full", recompute_layers=2) == ("full", "block", 2)  # the first 2 of each stage
    te = LayerSettings(transformer_engine=True).transformer_config_args()
    assert all(te[k] for k in ("masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"))
    local = LayerSettings().transformer_config_args()
    assert not any(local[k] for k in ("masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion",
                                      "apply_rope_fusion", "gradient_accumulation_fusion", "sequence_parallel"))


# --------------------------------------------------------------------------- names for both specs


def _names_job(rank: int, world: int, hf_path: str) -> dict:
    """Build the local-spec model (TP=1) and report, per parameter, its checkpoint key, the HF names
    the trainer's bridge maps it to, and the HF names mbridge's own (Transformer Engine) mapping
    gives for the parameter's TE name."""
    from mbridge import AutoBridge
    from transformers import AutoConfig

    from onmerge_megatron.megatron.coords import param_coords
    from onmerge_megatron.megatron.cpu import initialize_cpu_model_parallel
    from onmerge_megatron.megatron.hf import mcore_global_name
    from onmerge_megatron.training.model import build_model, make_bridge

    initialize_cpu_model_parallel(1, 1)
    bridge = make_bridge(hf_path, torch.float32)
    model = build_model(bridge, 16)[0]
    te_bridge = AutoBridge.from_config(AutoConfig.from_pretrained(hf_path), dtype=torch.float32)  # mbridge as shipped
    coords = param_coords([model])
    rows = []
    for name, param in model.named_parameters():
        te_name = name
        for local, te in LOCAL_TO_TE_NAMES.items():
            if name.endswith("." + local):
                te_name = name[: -len(local)] + te
        rows.append({"name": name, "te_name": te_name, "checkpoint": mcore_global_name(coords[param].key),
                     "hf_local": bridge._weight_name_mapping_mcore_to_hf(name),
                     "hf_te": te_bridge._weight_name_mapping_mcore_to_hf(te_name)})
    return {"rows": rows}


@pytest.mark.slow
def test_local_and_te_parameter_names_map_to_the_same_hf_tensors(tiny_base):
    from safetensors import safe_open

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    rows = run_distributed(_names_job, 1, tiny_base)[0]["rows"]
    # The table agrees with megatron-core's own renaming of the local spec's checkpoint keys.
    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert {k + "weight": v + "weight" for k, v in keys_map.items()} == LOCAL_TO_TE_NAMES
    renamed = [r for r in rows if r["name"] != r["te_name"]]
    assert len(renamed) == 2 * 2  # two norms per layer, two layers
    for r in rows:
        # The checkpoint key (the merge's coordinates, tau) is the TE name for the local spec too.
        assert r["checkpoint"] == r["te_name"], r
        # The trainer's bridge maps the local name where mbridge maps the TE name.
        assert r["hf_local"] == r["hf_te"], r
    with safe_open(os.path.join(tiny_base, "model.safetensors"), framework="pt") as f:
        hf_keys = sorted(f.keys())
    mapped = sorted(n for r in rows for n in r["hf_te"])
    assert mapped == hf_keys  # every HF tensor exactly once


# --------------------------------------------------------------------------- training runs on CPU


def _small_data(tmp_path) -> tuple[str, str]:
    """The first records of the tiny data set: the runs compute reference log-probs of all of them."""
    out = []
    for name, n in (("train.jsonl", 64), ("eval.jsonl", 16)):
        with open(os.path.join(DATA, name)) as f:
            lines = [line for line in f if line.strip()][:n]
        path = tmp_path / name
        path.write_text("".join(lines))
        out.append(str(path))
    return out[0], out[1]


def _run_jobs(tmp_path, base: dict, runs: dict, env: dict | None = None, nproc: int = 2, timeout: int = 900) -> str:
    out = str(tmp_path / "runs")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": base, "runs": runs, "out": out}))
    cmd, run_env = torchrun_command(nproc, [os.path.join(ROOT, "tests", "training", "scale_jobs.py"), str(spec)])
    run_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"scale_jobs failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return out


def _base_config(tmp_path, tiny_base, tiny_other_base, steps: int = 3) -> dict:
    train, held_out = _small_data(tmp_path)
    cfg = dpo_config(tiny_base, "unused", steps=steps, micro=2, global_batch=8,
                     merge={"online": {"method": "dare", "keep_rate": 0.3, "alpha": 1e-3}, "base_hf_path": tiny_other_base})
    cfg["data"].update(train_files=[train], eval_files=[held_out])
    return cfg


def _load(out: str, name: str, rank: int) -> dict:
    return torch.load(os.path.join(out, name, f"rank{rank}.pt"), weights_only=False)


def _train_rows(out: str, name: str) -> list[dict]:
    return [r for r in metrics(os.path.join(out, name)) if r["split"] == "train"]


@pytest.mark.slow
def test_recompute_and_overlap_match_the_plain_run_bitwise(tmp_path, tiny_base, tiny_other_base):
    """DP=2 with OnDARE, 3 steps: selective and full (uniform, block) recomputation, the overlapped
    gradient reduce-scatter, and with it the overlapped parameter all-gather (the merged weights of a
    step reach the other rank in the next forward) give the plain run's losses, gradient norms and
    weights bit for bit."""
    runs = {"plain": {}, "selective": {"model.recompute": "selective"}, "full": {"model.recompute": "full"},
            "full_block": {"model.recompute": "full", "model.recompute_layers": 1},
            "overlap_grad": {"parallel.overlap_grad_reduce": True},
            "overlap_both": {"parallel.overlap_grad_reduce": True, "parallel.overlap_param_gather": True}}
    out = _run_jobs(tmp_path, _base_config(tmp_path, tiny_base, tiny_other_base), runs)
    expected_layers = {
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
        "overlap_grad": {"overlap_grad_reduce": True, "overlap_param_gather": False},
        "overlap_both": {"overlap_grad_reduce": True, "overlap_param_gather": True},
    }
    plain_rows = _train_rows(out, "plain")
    assert len(plain_rows) == 3
    for rank in range(2):
        plain = _load(out, "plain", rank)
        # The runs moved the weights: the comparison is not of untouched models.
        assert all(not torch.equal(plain["initial"][k], v) for k, v in plain["params"].items())
        assert plain["layers"]["recompute_granularity"] is None and not plain["layers"]["overlap_param_gather"]
        for name, layers in expected_layers.items():
            run = _load(out, name, rank)
            assert {k: run["layers"][k] for k in layers} == layers, name  # the setting reached megatron
            assert run["params"].keys() == plain["params"].keys()
            differing = [k for k in plain["params"] if not torch.equal(plain["params"][k], run["params"][k])]
            assert differing == [], f"{name}, rank {rank}: weights differ in {differing}"
    for name in expected_layers:
        rows = _train_rows(out, name)
        for a, b in zip(plain_rows, rows, strict=True):
            for key in ("loss", "grad_norm", "rewards/margins", "merge/kept_fraction", "merge/merged_norm"):
                assert a[key] == b[key], (name, a["step"], key)
    # The two data-parallel ranks agree: each updated its own shard, the (overlapped) all-gather
    # brought the other's.
    first, second = _load(out, "overlap_both", 0)["params"], _load(out, "overlap_both", 1)["params"]
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_fused_step_matches_the_engine(tmp_path, tiny_base, tiny_other_base):
    """optim.fused=true with the Triton kernel run by Triton's interpreter on CPU (TRITON_INTERPRET=1
    for the ranks only) against optim.fused=false (the PyTorch engine), DP=2, OnDARE, 3 steps: the
    kernel took the steps and the weights and metrics agree to 1e-6 (the kernel's sqrt is correctly
    rounded, torch's CPU sqrt is not always: docs/kernels.md)."""
    from onmerge_megatron.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    runs = {"engine": {"optim.fused": False}, "fused": {"optim.fused": True}}
    out = _run_jobs(tmp_path, _base_config(tmp_path, tiny_base, tiny_other_base), runs, env={"TRITON_INTERPRET": "1"})
    for rank in range(2):
        engine, fused = _load(out, "engine", rank), _load(out, "fused", rank)
        assert engine["inner"] == ["OnlineMergingAdamW"] and fused["inner"] == ["FusedOnlineMergingAdamW"]
        for counts in fused["kernel_counts"]:
            assert counts["fused"] > 0 and counts["engine"] == 0 and counts["dare_kernel"] > 0, counts
        for key, value in engine["params"].items():
            assert (value - fused["params"][key]).abs().max().item() <= 1e-6, (rank, key)
    for a, b in zip(_train_rows(out, "engine"), _train_rows(out, "fused"), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "merge/kept_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
