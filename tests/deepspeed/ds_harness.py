"""Runs DeepSpeed training scenarios in 2 gloo processes (``run_scenarios`` through the tests'
multi-process harness, see ds_reference.run_harness); the tests compare their results with
single-process OnlineMergingAdamW runs computed independently (see test_ds_zero.py).

Every scenario trains the same tiny network on deterministic data and reports, from rank 0, the
full fp32 master weights as DeepSpeed assembles them (safe_get_full_fp32_param, DeepSpeed's own
gather, not the adapter's fragment map) and the Adam step count of every flat partition.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORLD = 2
LR = 2e-2
WEIGHT_DECAY = 0.01
MICRO_BATCH = 4


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((1,), 1.5))


class TinyNet(torch.nn.Module):
    """Weights with odd element counts, so ZeRO cuts them mid-tensor and ZeRO-3 pads them; the
    one-element weight comes last, so ZeRO-3 gives rank 1 nothing of it but padding (and, with
    sub_group_size=48, a sub-group of padding only)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(7))
        self.inp = torch.nn.Linear(13, 11)
        self.out = torch.nn.Linear(11, 7)
        self.post = Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))) * self.gain * self.post.scale


def fp16_unsupported() -> str:
    """Why DeepSpeed cannot run the fp16 scenarios here ("" if it can): its CPU accelerator accepts
    fp16 only where oneDNN has fp16 kernels, and refuses the config otherwise."""
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return ""
    return (
        "fp16 needs a CPU with avx512_fp16 (torch.ops.mkldnn._is_mkldnn_fp16_supported() is False): "
        "DeepSpeed's CPU accelerator refuses fp16 on this one"
    )


def build_model(dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(1234)
    return TinyNet().to(dtype)


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 'pre-trained' weights: the SFT (initial) weights minus a random task vector."""
    gen = torch.Generator().manual_seed(99)
    return {n: (p.detach().float() - 0.05 * torch.randn(p.shape, generator=gen)).to(p.dtype) for n, p in model.named_parameters()}


def param_groups(model: torch.nn.Module, scenario: dict[str, Any]) -> Any:
    """Named parameters, or with "two_groups" the Trainer's split: no weight decay on biases/gains."""
    if not scenario.get("two_groups"):
        return list(model.named_parameters())
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if n.endswith("weight")]
    rest = [(n, p) for n, p in named if not n.endswith("weight")]
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay]},
        {"params": [p for _, p in rest], "param_names": [n for n, _ in rest], "weight_decay": 0.0},
    ]


def batch(step: int, rank: int, same_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch of a rank at a step. With same_data both ranks see the same batch, so the
    data-parallel mean gradient equals the single-process gradient bit for bit ((g+g)/2 == g)."""
    gen = torch.Generator().manual_seed(1000 * step + (0 if same_data else rank))
    return torch.randn(MICRO_BATCH, 13, generator=gen), torch.randn(MICRO_BATCH, 7, generator=gen)


def full_batch(step: int, same_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if same_data:
        return batch(step, 0, True)
    xs, ys = zip(*(batch(step, r, False) for r in range(WORLD)))
    return torch.cat(xs), torch.cat(ys)


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target)


def ds_config(scenario: dict[str, Any]) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": scenario["stage"]}
    if scenario.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if scenario["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if scenario.get("bf16"):
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if scenario.get("fp16"):
        config["fp16"] = {"enabled": True, "initial_scale_power": scenario["fp16"], "loss_scale_window": 1000, "hysteresis": 1}
    config.update(scenario.get("extra_config", {}))
    return config


def _dtype(scenario: dict[str, Any]) -> torch.dtype:
    return torch.bfloat16 if scenario.get("bf16") else torch.float16 if scenario.get("fp16") else torch.float32


def _engine(scenario: dict[str, Any], install: bool = True):
    import deepspeed

    from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
    from onmerge_megatron.deepspeed import install_online_merging

    model = build_model(_dtype(scenario))
    base = base_weights(model)
    merge = OnlineMergeConfig(**scenario["merge"])
    client = scenario.get("client", "merging")
    if client == "merging":
        optimizer = OnlineMergingAdamW(param_groups(model, scenario), lr=LR, weight_decay=scenario.get("weight_decay", WEIGHT_DECAY), merge=merge,
                                       nonfinite=scenario.get("nonfinite", "raise"))
    elif client == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    else:  # none: DeepSpeed builds the optimizer from its config
        optimizer = None
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model.parameters() if optimizer is None else None, config=ds_config(scenario)
    )
    if not install:
        return engine, None
    handle = install_online_merging(engine, base=None if scenario.get("no_base") else base)
    _count_collectives_in_step(handle.optimizer)
    return engine, handle


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "reduce_scatter", "reduce_scatter_tensor", "barrier")


def _count_collectives_in_step(optimizer) -> None:
    """Count torch.distributed collectives issued inside the client optimizer's step (the real
    functions still run; they are only counted)."""
    import torch.distributed as dist

    optimizer.collectives_in_step = 0
    inner_step = optimizer.step

    def counted_step(*args, **kwargs):
        saved = {name: getattr(dist, name) for name in COLLECTIVES}

        def counting(fn):
            def call(*a, **k):
                optimizer.collectives_in_step += 1
                return fn(*a, **k)

            return call

        for name, fn in saved.items():
            setattr(dist, name, counting(fn))
        try:
            return inner_step(*args, **kwargs)
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)

    optimizer.step = counted_step


def _train(engine, scenario: dict[str, Any], steps: range, rank: int, trace: list | None = None) -> None:
    for step in steps:
        x, y = batch(step, rank, scenario.get("same_data", True))
        if step in scenario.get("overflow_at", ()):
            x = torch.full_like(x, float("nan"))  # non-finite gradients: DeepSpeed skips this step
        loss = loss_fn(engine(x.to(_dtype(scenario))), y)
        engine.backward(loss)
        engine.step()
        if trace is not None:
            trace.append(_full_weights(engine))


def _full_weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        weights[name] = full.detach().clone().cpu() if full is not None else p.detach().float().clone()
    return weights


def _report(engine, handle, **extra: Any) -> dict[str, Any]:
    steps = [int(handle.optimizer.state[part.tensor]["step"]) for part in handle.partitions if "step" in handle.optimizer.state[part.tensor]]
    return {
        "weights": _full_weights(engine),
        "steps": steps,
        "skipped": int(getattr(engine, "skipped_steps", 0)),
        "global_steps": int(engine.global_steps),
        "optimizer_kind": type(engine.optimizer).__name__,
        "collectives_in_step": handle.optimizer.collectives_in_step,
        **extra,
    }


def run_scenario(scenario: dict[str, Any], rank: int, workdir: Path) -> dict[str, Any]:
    steps = scenario.get("steps", 4)
    if "save_at" in scenario:  # first half of a run resumed elsewhere (another world size)
        engine, handle = _engine(scenario)
        _train(engine, scenario, range(1, scenario["save_at"] + 1), rank)
        engine.save_checkpoint(scenario["save_dir"], tag="mid")
        return _report(engine, handle)
    if "load_universal" in scenario:  # second half, from a universal checkpoint
        from onmerge_megatron.deepspeed.checkpoint import load_checkpoint

        scenario = dict(scenario, extra_config={"checkpoint": {"load_universal": True}})
        engine, handle = _engine(scenario)
        load_checkpoint(handle, scenario["load_universal"], tag="mid")
        _train(engine, scenario, range(scenario["resume_from"] + 1, steps + 1), rank)
        return _report(engine, handle)
    if scenario.get("expect_error"):
        try:
            if scenario.get("install_after_universal_load"):
                from onmerge_megatron.deepspeed import install_online_merging

                scenario = dict(scenario, extra_config={"checkpoint": {"load_universal": True}})
                engine, _ = _engine(scenario, install=False)
                engine.load_checkpoint(scenario["install_after_universal_load"], tag="mid")
                install_online_merging(engine, base=base_weights(build_model(_dtype(scenario))))
            else:
                _engine(scenario)
        except Exception as exc:
            return {"raised": f"{type(exc).__name__}: {exc}"}
        return {"raised": None}
    if "resume_at" not in scenario:
        engine, handle = _engine(scenario)
        trace: list | None = [_full_weights(engine)] if scenario.get("trace") else None
        _train(engine, scenario, range(1, steps + 1), rank, trace)
        return _report(engine, handle, trace=trace)
    # Save after resume_at steps, build everything afresh, load, and finish the run.
    engine, handle = _engine(scenario)
    _train(engine, scenario, range(1, scenario["resume_at"] + 1), rank)
    save_dir = workdir / f"ckpt_{scenario['id']}"
    engine.save_checkpoint(str(save_dir), tag="mid")
    del engine, handle
    if scenario.get("install_after_load"):  # the Trainer's order: load first, install at the first step
        from onmerge_megatron.deepspeed import install_online_merging

        engine, _ = _engine(scenario, install=False)
        engine.load_checkpoint(str(save_dir), tag="mid")
        handle = install_online_merging(engine, base=base_weights(build_model(_dtype(scenario))))
        _count_collectives_in_step(handle.optimizer)
    else:
        engine, handle = _engine(scenario)
        engine.load_checkpoint(str(save_dir), tag="mid")
    _train(engine, scenario, range(scenario["resume_at"] + 1, steps + 1), rank)
    return _report(engine, handle)


def run_scenarios(rank: int, world: int, scenarios: list[dict[str, Any]], workdir: str) -> dict[str, Any] | None:
    """Every scenario on this rank; rank 0 returns the results by scenario id."""
    import deepspeed

    # The shared-memory comm op is JIT-built with g++ on first use (minutes); gloo needs none.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *args, **kwargs: None
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the harness's process group
    results = {}
    for scenario in scenarios:
        try:
            results[scenario["id"]] = run_scenario(scenario, rank, Path(workdir))
        except Exception as exc:  # reported per scenario so that one failure does not hide the rest
            import traceback

            results[scenario["id"]] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    return results if rank == 0 else None
