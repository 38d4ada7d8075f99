"""The fused Triton optimizer (``FusedOnlineMergingAdamW``) given to ``install_online_merging``
trains the distributed optimizer's DP shards bit for bit like the engine (``OnlineMergingAdamW``).

The kernels run on CPU through Triton's interpreter: TRITON_INTERPRET=1 is set for the spawned
ranks only. Both runs use correctly rounded sqrt, as the kernel computes it (and as torch does on
CUDA); see tests/kernels/interpreted_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mcore_harness as h
import mcore_jobs as jobs

NAMES = ["dare", "stepk", "ties"]


@pytest.mark.slow
def test_fused_kernel_through_megatron_matches_engine_bitwise(megatron_workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onmerge_megatron.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    workdir = megatron_workdir
    h.spawn(jobs.fused_run, 2, workdir, names=NAMES, tag="engine_dp2", fused=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h.spawn(jobs.fused_run, 2, workdir, names=NAMES, tag="fused_dp2", fused=True)
    for rank in range(2):
        runs = torch.load(workdir / f"fused_fused_dp2_rank{rank}.pt")
        for name in NAMES:
            assert runs[name]["inner"] == ["FusedOnlineMergingAdamW"], runs[name]
            for counts in runs[name]["kernel_counts"]:
                assert counts["engine"] == 0 and counts["fused"] > 0, f"rank {rank} {name}: the kernel did not run: {counts}"
                if name == "dare":  # OnDARE's keep-mask drawn in the sparse kernel (one block per tensor)
                    assert counts["dare_kernel"] > 0, f"rank {rank}: {counts}"
    plain = h.plain_tensors(workdir / "ref_none")
    for name in NAMES:
        engine, fused = h.plain_tensors(workdir / f"engine_dp2_{name}"), h.plain_tensors(workdir / f"fused_dp2_{name}")
        assert sorted(engine) == sorted(fused)
        differing = [k for k in engine if not torch.equal(engine[k], fused[k])]
        assert differing == [], f"{name}: the fused kernel's parameters differ from the engine's in {differing}"
        moved = max(float((engine[k] - plain[k]).abs().max()) for k in engine)
        assert moved > 1e-3, f"{name}: the merge had no visible effect, the comparison proves nothing"
