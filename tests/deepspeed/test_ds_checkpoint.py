"""Resuming at another world size through universal checkpoints, and the adapter's refusals.

2 ranks train 2 of 4 steps of a step-K run (K=3: the accumulator then holds 2 plain updates,
which the merge at step 3 must roll back) and save; the checkpoint is converted with
`python -m onmerge_megatron.deepspeed.checkpoint`; 1 rank loads it and finishes. The result must
equal the uninterrupted single-process run exactly (same-data setup, see test_ds_zero.py).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from ds_harness import fp16_unsupported
from ds_reference import STEP_K, max_abs_diff, reference_run, run_harness

pytestmark = pytest.mark.slow

STAGES = (2, 3)


@pytest.fixture(scope="module")
def universal_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("universal")
    # Two param groups: DeepSpeed's ZeRO-3 universal loader mishandles several (see checkpoint.py).
    saves = [{"id": f"save{s}", "stage": s, "two_groups": True, "save_at": 2, "save_dir": str(tmp / f"ckpt{s}"), "merge": STEP_K} for s in STAGES]
    (tmp / "a").mkdir()
    saved = run_harness(tmp / "a", saves)
    for s in STAGES:
        assert "error" not in saved[f"save{s}"], saved[f"save{s}"].get("error")
        done = subprocess.run(
            [sys.executable, "-m", "onmerge_megatron.deepspeed.checkpoint", "--input_folder", str(tmp / f"ckpt{s}" / "mid"), "--output_folder", str(tmp / f"univ{s}" / "mid")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:]
    # DeepSpeed's converter alone drops the accumulator: loading it must fail loudly, not resume wrong.
    plain = tmp / "plain3" / "mid"
    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tmp / "ckpt3" / "mid"), "--output_folder", str(plain), "--inject_missing_state"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    loads = [{"id": f"load{s}", "stage": s, "two_groups": True, "load_universal": str(tmp / f"univ{s}"), "resume_from": 2, "merge": STEP_K} for s in STAGES]
    loads.append({"id": "load-without-merge-state", "stage": 3, "load_universal": str(tmp / "plain3"), "resume_from": 2, "merge": STEP_K})
    loads += ERROR_SCENARIOS
    # The weights loaded are trained ones: taking them as the SFT weights would be wrong.
    loads.append({"id": "install-after-load", "stage": 2, "expect_error": True, "install_after_universal_load": str(tmp / "univ2"), "merge": STEP_K})
    (tmp / "b").mkdir()
    return run_harness(tmp / "b", loads, world=1)


@pytest.mark.parametrize("stage", STAGES)
def test_universal_checkpoint_resumes_at_another_world_size(universal_runs: dict[str, Any], stage: int) -> None:
    got = universal_runs[f"load{stage}"]
    assert "error" not in got, got.get("error")
    assert all(s == 4 for s in got["steps"])
    assert max_abs_diff(got["weights"], reference_run({"stage": stage, "two_groups": True, "merge": STEP_K})) == 0.0


def test_universal_checkpoint_without_merge_state_is_refused(universal_runs: dict[str, Any]) -> None:
    error = universal_runs["load-without-merge-state"].get("error", "")
    assert "merge_accumulator" in error and "onmerge_megatron.deepspeed.checkpoint" in error


# A torch optimizer: DeepSpeed's own AdamW is a C++ extension compiled on first use (minutes on a
# busy CPU), and any section is refused the same way.
OPTIMIZER_SECTION = {"optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
ERROR_SCENARIOS = [
    {"id": "optimizer-section-only", "stage": 2, "expect_error": True, "client": "none", "extra_config": OPTIMIZER_SECTION, "merge": STEP_K},
    {"id": "optimizer-section-and-client", "stage": 2, "expect_error": True, "extra_config": OPTIMIZER_SECTION, "merge": STEP_K},
    {"id": "plain-adamw-client", "stage": 1, "expect_error": True, "client": "adamw", "merge": STEP_K},
    {"id": "elastic-checkpoint", "stage": 2, "expect_error": True, "extra_config": {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "merge": STEP_K},
    {"id": "no-base", "stage": 3, "expect_error": True, "no_base": True, "merge": STEP_K},
    # Each rank steps its own partition one group at a time: a skip would drop part of a step.
    {"id": "nonfinite-skip", "stage": 2, "expect_error": True, "nonfinite": "skip", "merge": STEP_K},
    # bf16 at stage 0 with bf16 gradient accumulation gets the same wrapper as fp16, on any CPU.
    {"id": "stage0-bf16", "stage": 0, "bf16": True, "extra_config": {"data_types": {"grad_accum_dtype": "bf16"}}, "expect_error": True, "merge": {**STEP_K, "alpha": 0.0}},
]
FP16_UNSUPPORTED = fp16_unsupported()
if not FP16_UNSUPPORTED:
    ERROR_SCENARIOS.append({"id": "stage0-fp16", "stage": 0, "fp16": 8, "expect_error": True, "merge": {**STEP_K, "alpha": 0.0}})


@pytest.mark.parametrize(
    "sid,words",
    [
        ("optimizer-section-only", ['"optimizer" section', "remove"]),
        ("optimizer-section-and-client", ['"optimizer" section', "ignored"]),
        ("plain-adamw-client", ["AdamW", "not OnlineMergingAdamW"]),
        ("elastic-checkpoint", ["elastic_checkpoint"]),
        ("no-base", ["base"]),
        ("nonfinite-skip", ["nonfinite='skip') under ZeRO", "nonfinite='raise' (default) or 'off'"]),
        pytest.param("stage0-fp16", ["FP16_UnfusedOptimizer", "ZeRO stage 1"], marks=pytest.mark.skipif(bool(FP16_UNSUPPORTED), reason=FP16_UNSUPPORTED)),
        ("stage0-bf16", ["FP16_UnfusedOptimizer", "ZeRO stage 1"]),
        ("install-after-load", ["before the first step", "reference="]),
    ],
)
def test_unsupported_setups_are_refused_by_name(universal_runs: dict[str, Any], sid: str, words: list[str]) -> None:
    raised = universal_runs[sid]["raised"]
    assert raised is not None, f"{sid} was accepted"
    for word in words:
        assert word in raised, raised
