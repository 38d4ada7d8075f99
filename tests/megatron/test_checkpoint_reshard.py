"""Merge state saved with the optimizer (dist_checkpointing, fully_reshardable) at one layout,
loaded at another, continues exactly like the uninterrupted run.

Run A trains 2 steps, saves model + optimizer the way Megatron-LM does (one dist checkpoint holding
``model`` and ``optimizer`` sharded state dicts), and trains on to step 4. Run B, at another TP/DP
layout and without access to the base weights, loads that checkpoint and trains steps 3-4. With
step-K at K = 3 (config ``stepk3``) the accumulator holds two plain updates at the save, which step 3 rolls back and
merges: losing it moves parameters by ~3e-2 (checked by hand when writing this test), so the
accumulator, the reference delta (B never sees the base) and the step counter must all be restored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mcore_harness as h
import mcore_jobs as jobs

TOLERANCE = 2e-5


@pytest.fixture
def workdir(megatron_workdir: Path) -> Path:
    return megatron_workdir


def compare(workdir: Path, a: str, b: str, names: list[str]) -> dict[str, float]:
    init = h.plain_tensors(workdir / "init")
    diffs = {}
    for name in names:
        left, right = h.plain_tensors(workdir / f"{a}_{name}"), h.plain_tensors(workdir / f"{b}_{name}")
        diffs[name] = max(float((left[k] - right[k]).abs().max()) for k in left)
        moved = max(float((left[k] - init[k]).abs().max()) for k in left)
        assert moved > 1e-2, f"{name}: training did not move the parameters"
        assert diffs[name] <= TOLERANCE, f"{name}: resumed run differs by {diffs[name]:.3g} from the uninterrupted one"
    print(f"{a} -> {b}: max |difference| after resuming: {diffs}")
    return diffs


def test_dp2_checkpoint_resumes_at_tp2(workdir: Path) -> None:
    names = ["stepk3", "dare"]
    h.spawn(jobs.checkpoint_run, 2, workdir, names=names, tag="ck_dp2", save_at=2)
    h.spawn(jobs.checkpoint_run, 2, workdir, tp=2, names=names, tag="ck_tp2", save_at=2, resume_from="ck_dp2")
    compare(workdir, "ck_dp2", "ck_tp2", names)


def test_ties_tensor_scope_checkpoint_resumes_at_tp1(workdir: Path) -> None:
    h.spawn(jobs.checkpoint_run, 2, workdir, tp=2, names=["ties_tensor"], tag="ck_tp2t", save_at=2)
    h.spawn(jobs.checkpoint_run, 1, workdir, names=["ties_tensor"], tag="ck_tp1t", save_at=2, resume_from="ck_tp2t")
    compare(workdir, "ck_tp2t", "ck_tp1t", ["ties_tensor"])


@pytest.mark.slow
def test_tp2_dp2_checkpoint_resumes_at_pp2(workdir: Path) -> None:
    h.spawn(jobs.checkpoint_run, 4, workdir, tp=2, names=["stepk3"], tag="ck_tp2dp2", save_at=2)
    h.spawn(jobs.checkpoint_run, 2, workdir, pp=2, names=["stepk3"], tag="ck_pp2", save_at=2, resume_from="ck_tp2dp2")
    compare(workdir, "ck_tp2dp2", "ck_pp2", ["stepk3"])


def test_dp_reshardable_checkpoint_resumes(workdir: Path) -> None:
    """megatron's dp_reshardable format saves every key of the inner optimizer's state and asserts
    each has the shard's length; the merge keys are kept out of it and travel under online_merge."""
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    h.spawn(jobs.checkpoint_run, 2, workdir, names=["stepk3"], tag="ck_dpr_a", save_at=2, metadata=metadata)
    h.spawn(jobs.checkpoint_run, 2, workdir, names=["stepk3"], tag="ck_dpr_b", save_at=2, resume_from="ck_dpr_a", metadata=metadata)
    compare(workdir, "ck_dpr_a", "ck_dpr_b", ["stepk3"])
