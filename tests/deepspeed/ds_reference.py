"""Single-process references for the DeepSpeed tests: plain OnlineMergingAdamW on whole tensors.

Independent of the DeepSpeed adapter: ZeRO's cut points are recomputed here from DeepSpeed's
documented partitioning rules, only to express what "per-shard TIES" means on one process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW, Segment, ShardCoords

from distributed import THREADS, run_distributed, torch_threads
from ds_harness import LR, WEIGHT_DECAY, WORLD, base_weights, build_model, full_batch, loss_fn, param_groups, run_scenarios


def zero_pieces(stage: int, model: torch.nn.Module, world: int = WORLD) -> dict[str, list[tuple[int, int]]]:
    """Flat ranges [a, b) of each weight that each rank owns, in rank order (empty ones dropped).

    ZeRO-1/2: one param group's weights laid end to end, padded to a multiple of 2 * world, cut
    into world equal partitions. ZeRO-3: each weight cut into world pieces of ceil(n / world).
    """
    params = list(model.named_parameters())
    pieces: dict[str, list[tuple[int, int]]] = {}
    if stage in (1, 2):
        total = sum(p.numel() for _, p in params)
        align = 2 * world
        size = math.ceil(total / align) * align // world
        start = 0
        for name, p in params:
            end = start + p.numel()
            cuts = [(max(start, r * size), min(end, (r + 1) * size)) for r in range(world)]
            pieces[name] = [(a - start, b - start) for a, b in cuts if a < b]
            start = end
    else:
        for name, p in params:
            n = p.numel()
            size = math.ceil(n / world)
            cuts = [(min(r * size, n), min((r + 1) * size, n)) for r in range(world)]
            pieces[name] = [(a, b) for a, b in cuts if a < b]
    return pieces


def reference_run(scenario: dict[str, Any], steps: int | None = None) -> dict[str, torch.Tensor]:
    """Final fp32 weights of the scenario trained on one process.

    bf16 scenarios train a bf16 model whose gradients step fp32 master copies, which are copied
    back after each step (mixed precision as DeepSpeed does it).
    """
    with torch_threads(THREADS):
        if scenario.get("bf16"):
            return _bf16_reference_run(scenario, steps)
        return _fp32_reference_run(scenario, steps)


def _fp32_reference_run(scenario: dict[str, Any], steps: int | None) -> dict[str, torch.Tensor]:
    model = build_model()
    base = base_weights(model)
    merge = OnlineMergeConfig(**scenario["merge"])
    optimizer = OnlineMergingAdamW(param_groups(model, scenario), lr=LR, weight_decay=scenario.get("weight_decay", WEIGHT_DECAY), merge=merge)
    _shard_segments(optimizer, scenario, model.named_parameters())
    if merge.needs_reference:
        optimizer.set_reference_delta(reference=model, base=base)
    for step in applied_steps(scenario, steps):
        x, y = full_batch(step, scenario.get("same_data", True))
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def applied_steps(scenario: dict[str, Any], steps: int | None = None) -> list[int]:
    """The steps DeepSpeed applies: those whose batch the harness poisons ("overflow_at") are
    skipped, so the single process never sees them and numbers the rest 1, 2, ... as it steps."""
    last = scenario.get("steps", 4) if steps is None else steps
    return [s for s in range(1, last + 1) if s not in scenario.get("overflow_at", ())]


def _shard_segments(optimizer: OnlineMergingAdamW, scenario: dict[str, Any], named: Any) -> None:
    """Per-shard TIES takes top-p over each piece a rank owns: the same pieces, on one process."""
    merge = optimizer.merge_config
    if merge.method == "ties" and merge.ties_scope == "shard" and scenario["stage"] > 0:
        pieces = zero_pieces(scenario["stage"], build_model())
        for name, p in named:
            cuts = pieces[name]
            optimizer.set_segments(p, [Segment(name, ShardCoords.flat_range(tuple(p.shape), a, b), a) for a, b in cuts])


def _bf16_reference_run(scenario: dict[str, Any], steps: int | None) -> dict[str, torch.Tensor]:
    model = build_model(torch.bfloat16)
    base = base_weights(model)
    master = {n: torch.nn.Parameter(p.detach().float().clone()) for n, p in model.named_parameters()}
    merge = OnlineMergeConfig(**scenario["merge"])
    optimizer = OnlineMergingAdamW(list(master.items()), lr=LR, weight_decay=scenario.get("weight_decay", WEIGHT_DECAY), merge=merge)
    _shard_segments(optimizer, scenario, master.items())
    if merge.needs_reference:
        optimizer.set_reference_delta(reference=model, base=base)
    params = dict(model.named_parameters())
    for step in applied_steps(scenario, steps):
        x, y = full_batch(step, scenario.get("same_data", True))
        model.zero_grad()
        loss_fn(model(x.to(torch.bfloat16)), y).backward()
        with torch.no_grad():
            for n, m in master.items():
                m.grad = params[n].grad.float()
            optimizer.step()
            for n, m in master.items():
                params[n].copy_(m)
    return {n: m.detach().clone() for n, m in master.items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


DARE = {"method": "dare", "keep_rate": 0.3, "alpha": 0.2}
TIES_SHARD = {"method": "ties", "keep_rate": 0.3, "alpha": 0.2, "ties_scope": "shard"}
TIES_TENSOR = {"method": "ties", "keep_rate": 0.3, "alpha": 0.2, "ties_scope": "tensor"}
STEP_K = {"method": "dare", "keep_rate": 0.3, "alpha": 0.2, "merge_every": 3}
METHODS = {"dare": DARE, "ties_shard": TIES_SHARD, "ties_tensor": TIES_TENSOR, "stepk": STEP_K}


def run_harness(tmp: Path, scenarios: list[dict[str, Any]], world: int = 2, timeout: int = 300) -> dict[str, Any]:
    """Every scenario in one launch of ``world`` DeepSpeed ranks; rank 0's results by scenario id."""
    return run_distributed(run_scenarios, world, scenarios, str(tmp), timeout=timeout)[0]


