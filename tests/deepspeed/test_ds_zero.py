"""OnlineMergingAdamW under real DeepSpeed ZeRO-1/2/3 and BF16_Optimizer, 2 gloo processes on CPU,
against single-process OnlineMergingAdamW runs (tests/deepspeed/ds_reference.py).

Tolerances. With the same micro-batch on both ranks, DeepSpeed's data-parallel mean gradient is
(g + g) / 2 = g exactly, and Adam and the merge are element-wise in fp32, so a ZeRO run must
equal the single-process run exactly: those comparisons use tolerance 0. With different data per
rank, the mean gradient is reduced in another order (about 1 ulp); OnDARE is continuous in the
gradient, and 4 steps stay within 1e-6 (measured 3e-8). OnTIES is not: its top-p can swap
elements whose magnitudes differ by 1 ulp, so TIES is compared on identical data only.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from onmerge_megatron.merging import rng
from onmerge_megatron.merging.coords import ShardCoords

from ds_harness import fp16_unsupported
from ds_reference import DARE, METHODS, STEP_K, TIES_SHARD, TIES_TENSOR, max_abs_diff, reference_run, run_harness

FP16_UNSUPPORTED = fp16_unsupported()

pytestmark = pytest.mark.slow  # 2 DeepSpeed processes (about 35 s for the whole module)

def _scenarios() -> list[dict[str, Any]]:
    out = []
    for stage in (1, 2, 3):
        for method, merge in METHODS.items():
            out.append({"id": f"z{stage}-{method}", "stage": stage, "merge": merge})
        # Save after 2 of 4 steps (step-K: the accumulator holds 2 plain steps), reload, finish.
        out.append({"id": f"z{stage}-resume", "stage": stage, "resume_at": 2, "merge": STEP_K})
    out += [
        {"id": "z0-fp32", "stage": 0, "merge": TIES_TENSOR},
        # Two param groups: ZeRO-1/2 call the client's step once per group, param_groups swapped.
        {"id": "z1-two-groups", "stage": 1, "two_groups": True, "merge": STEP_K},
        {"id": "z2-two-groups", "stage": 2, "two_groups": True, "merge": TIES_TENSOR},
        {"id": "z3-two-groups", "stage": 3, "two_groups": True, "merge": TIES_SHARD},
        # OnTIES keeps the reference delta's kept positions in the state: they must survive a reload.
        {"id": "z3-resume-ties", "stage": 3, "resume_at": 2, "merge": TIES_SHARD},
        {"id": "z2-resume-install-after-load", "stage": 2, "resume_at": 2, "install_after_load": True, "merge": TIES_TENSOR},
        # Small sub-groups: ZeRO-3 steps one sub-group at a time, the others' params emptied.
        {"id": "z3-subgroups", "stage": 3, "extra_config": {"zero_optimization": {"stage": 3, "sub_group_size": 48, "stage3_param_persistence_threshold": 0}}, "merge": TIES_TENSOR},
        {"id": "z2-offload", "stage": 2, "offload": True, "merge": DARE},
        {"id": "z3-offload", "stage": 3, "offload": True, "merge": TIES_TENSOR},
        {"id": "bf16-optimizer", "stage": 1, "bf16": True, "merge": DARE},
        {"id": "z1-bf16-offload", "stage": 1, "bf16": True, "offload": True, "merge": TIES_SHARD},
        {"id": "z3-bf16-offload", "stage": 3, "bf16": True, "offload": True, "merge": STEP_K},
        {"id": "z2-bf16", "stage": 2, "bf16": True, "merge": TIES_TENSOR},
        {"id": "z3-bf16", "stage": 3, "bf16": True, "merge": {**STEP_K, "merge_every": 2}},
        {"id": "z2-dare-different-data", "stage": 2, "same_data": False, "merge": DARE},
        {"id": "z3-dare-different-data", "stage": 3, "same_data": False, "merge": DARE},
        # Non-finite gradients at the listed steps: DeepSpeed skips them, as it skips fp16 overflows
        # (bf16 checks gradients too, by default), so this path runs on any CPU.
        {"id": "z2-bf16-overflow", "stage": 2, "bf16": True, "steps": 8, "overflow_at": [2, 3, 6], "trace": True, "weight_decay": 0.0, "merge": {**DARE, "alpha": 0.0}},
        {"id": "z3-bf16-overflow", "stage": 3, "bf16": True, "steps": 8, "overflow_at": [1, 5], "merge": STEP_K},
        {"id": "bf16-optimizer-overflow", "stage": 1, "bf16": True, "steps": 8, "overflow_at": [3, 4], "merge": STEP_K},
    ]
    if not FP16_UNSUPPORTED:
        # fp16 with a loss scale that overflows at first: DeepSpeed skips those steps.
        out.append({"id": "z2-fp16-overflow", "stage": 2, "fp16": 20, "steps": 8, "trace": True, "weight_decay": 0.0, "merge": {**DARE, "alpha": 0.0}})
    return out


SCENARIOS = {s["id"]: s for s in _scenarios()}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All 2-rank scenarios in one launch (DeepSpeed start-up dominates a scenario's cost)."""
    return run_harness(tmp_path_factory.mktemp("zero"), list(SCENARIOS.values()))


def result(runs: dict[str, Any], sid: str) -> dict[str, Any]:
    got = runs[sid]
    assert "error" not in got, got.get("error")
    return got


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_matches_single_process(zero_runs: dict[str, Any], stage: int, method: str) -> None:
    got = result(zero_runs, f"z{stage}-{method}")
    expected = reference_run(SCENARIOS[f"z{stage}-{method}"])
    assert got["optimizer_kind"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    assert got["steps"] and all(s == 4 for s in got["steps"])
    assert max_abs_diff(got["weights"], expected) == 0.0
    # No collective in the step, except the per-tensor top-p exchange that ties_scope="tensor" asks for.
    if method == "ties_tensor":
        assert got["collectives_in_step"] > 0
    else:
        assert got["collectives_in_step"] == 0


def test_ties_scopes_differ_so_the_comparison_can_fail() -> None:
    """Per-shard and per-tensor TIES give different weights here: matching one proves the mode."""
    shard = reference_run(SCENARIOS["z2-ties_shard"])
    tensor = reference_run(SCENARIOS["z2-ties_tensor"])
    assert max_abs_diff(shard, tensor) > 1e-5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_same_world_size_resume_continues_identically(zero_runs: dict[str, Any], stage: int) -> None:
    resumed = result(zero_runs, f"z{stage}-resume")
    uninterrupted = result(zero_runs, f"z{stage}-stepk")
    assert max_abs_diff(resumed["weights"], uninterrupted["weights"]) == 0.0
    assert max_abs_diff(resumed["weights"], reference_run(SCENARIOS[f"z{stage}-resume"])) == 0.0


@pytest.mark.parametrize("sid", ["z3-resume-ties", "z2-resume-install-after-load"])
def test_same_world_size_resume_keeps_ties_reference(zero_runs: dict[str, Any], sid: str) -> None:
    """OnTIES reference positions survive the reload, also when installing after it (Trainer order)."""
    got = result(zero_runs, sid)
    assert max_abs_diff(got["weights"], reference_run(SCENARIOS[sid])) == 0.0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_several_param_groups(zero_runs: dict[str, Any], stage: int) -> None:
    got = result(zero_runs, f"z{stage}-two-groups")
    assert len(got["steps"]) == 2
    assert max_abs_diff(got["weights"], reference_run(SCENARIOS[f"z{stage}-two-groups"])) == 0.0


def test_zero_disabled_fp32(zero_runs: dict[str, Any]) -> None:
    got = result(zero_runs, "z0-fp32")
    assert max_abs_diff(got["weights"], reference_run(SCENARIOS["z0-fp32"])) == 0.0


def test_zero3_sub_groups(zero_runs: dict[str, Any]) -> None:
    got = result(zero_runs, "z3-subgroups")
    assert len(got["steps"]) > 1, "the scenario must make several ZeRO-3 sub-groups"
    assert max_abs_diff(got["weights"], reference_run(SCENARIOS["z3-subgroups"])) == 0.0


@pytest.mark.parametrize("sid", ["z2-offload", "z3-offload", "z1-bf16-offload", "z3-bf16-offload"])
def test_optimizer_offload(zero_runs: dict[str, Any], sid: str) -> None:
    got = result(zero_runs, sid)
    assert max_abs_diff(got["weights"], reference_run(SCENARIOS[sid])) == 0.0


@pytest.mark.parametrize("sid,kind", [("bf16-optimizer", "BF16_Optimizer"), ("z2-bf16", "DeepSpeedZeroOptimizer"), ("z3-bf16", "DeepSpeedZeroOptimizer_Stage3")])
def test_bf16_paths(zero_runs: dict[str, Any], sid: str, kind: str) -> None:
    got = result(zero_runs, sid)
    assert got["optimizer_kind"] == kind
    assert max_abs_diff(got["weights"], reference_run(SCENARIOS[sid])) == 0.0


@pytest.mark.parametrize("sid", ["z2-dare-different-data", "z3-dare-different-data"])
def test_different_data_per_rank_within_reduction_tolerance(zero_runs: dict[str, Any], sid: str) -> None:
    got = result(zero_runs, sid)
    expected = reference_run(SCENARIOS[sid])
    assert max_abs_diff(got["weights"], expected) <= 1e-6
    initial = reference_run(SCENARIOS[sid], steps=0)
    assert max_abs_diff(expected, initial) > 0.1  # the runs moved far more than the tolerance


def _assert_moves_follow_applied_masks(got: dict[str, Any], merge: dict[str, Any], steps: int) -> None:
    """Masks are keyed by the applied-update count: after k applied updates (whatever number of
    skipped ones came between), only elements of step k's keep-mask may move (alpha=0, no decay).
    A skipped step moves nothing; at least one move must also fall outside the mask of the step's
    own number, so that counting skipped steps would have been caught."""
    trace, applied, told_apart = got["trace"], 0, False
    for step, (before, after) in enumerate(zip(trace, trace[1:]), start=1):
        moved = {n: torch.nonzero((after[n] != before[n]).reshape(-1)).squeeze(1) for n in after}
        if not any(m.numel() for m in moved.values()):
            continue  # a skipped step
        applied += 1
        for name, positions in moved.items():
            coords = ShardCoords.full(tuple(after[name].shape))
            kept = rng.keep_positions(0, name, applied, rng.STREAM_UPDATE, coords, merge["keep_rate"])
            assert torch.isin(positions, kept).all(), f"{name}: elements outside step {applied}'s mask moved"
            if applied != step:
                told_apart |= not torch.isin(positions, rng.keep_positions(0, name, step, rng.STREAM_UPDATE, coords, merge["keep_rate"])).all()
    assert applied == steps - got["skipped"]
    assert told_apart, "no applied step could tell the applied count from the step number"


@pytest.mark.skipif(bool(FP16_UNSUPPORTED), reason=FP16_UNSUPPORTED)
def test_fp16_overflow_skips_do_not_count_as_merge_steps(zero_runs: dict[str, Any]) -> None:
    got = result(zero_runs, "z2-fp16-overflow")
    assert got["skipped"] > 0, "the scenario must overflow at least once"
    assert got["global_steps"] == 8
    assert all(s == 8 - got["skipped"] for s in got["steps"])
    _assert_moves_follow_applied_masks(got, SCENARIOS["z2-fp16-overflow"]["merge"], 8)


@pytest.mark.parametrize(
    "sid,kind",
    [("z2-bf16-overflow", "DeepSpeedZeroOptimizer"), ("z3-bf16-overflow", "DeepSpeedZeroOptimizer_Stage3"), ("bf16-optimizer-overflow", "BF16_Optimizer")],
)
def test_skipped_steps_do_not_count_as_merge_steps(zero_runs: dict[str, Any], sid: str, kind: str) -> None:
    """DeepSpeed skips the step when a gradient is not finite. The merge's step count, step-K
    schedule and masks follow the applied steps only: the run equals the single process trained
    on the applied steps' batches alone."""
    scenario = SCENARIOS[sid]
    got = result(zero_runs, sid)
    applied = scenario["steps"] - len(scenario["overflow_at"])
    assert got["optimizer_kind"] == kind
    assert (got["skipped"], got["global_steps"]) == (len(scenario["overflow_at"]), scenario["steps"])
    assert got["steps"] and all(s == applied for s in got["steps"])
    assert max_abs_diff(got["weights"], reference_run(scenario)) == 0.0
    if scenario.get("trace"):
        for step in scenario["overflow_at"]:
            assert max_abs_diff(got["trace"][step], got["trace"][step - 1]) == 0.0, f"skipped step {step} moved weights"
        _assert_moves_follow_applied_masks(got, scenario["merge"], scenario["steps"])
