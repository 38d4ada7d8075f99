"""The distributed optimizer with online merging gives the parameters of the single-process
OnlineMergingAdamW on the same model, at DP=2, TP=2, TP=2 x DP=2 and PP=2.

The reference run never touches the adapter: it steps the TP=1 model with names and coordinates
written out by hand (mcore_harness.checkpoint_name_and_coords) and takes the reference delta from the
two checkpoints read whole. Parameters are compared after reading both runs' dist checkpoints
with megatron's own reader, so no layout code of this project is involved in the comparison.

Tolerance: fp32, 4 Adam steps with lr 1e-2; other layouts sum gradients in another order (DP
reduce-scatter, TP-split matmuls), which Adam's normalisation turns into update differences of a
few 1e-6 (plain AdamW shows the same). The bound is 2e-5 absolute, while a merge with wrong
masks or a wrong reference delta moves parameters by more than 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mcore_harness as h
import mcore_jobs as jobs

TOLERANCE = 2e-5
MERGE_EFFECT = 1e-3  # a merged run must differ from the plain one by more than this


@pytest.fixture
def workdir(megatron_workdir: Path) -> Path:
    return megatron_workdir


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# The single-process run each config is compared with (TP=1: per-tensor and per-shard TIES coincide).
REFERENCE = {"ties_tensor": "ties"}


def check(workdir: Path, tag: str, names: list[str], reference_suffix: dict[str, str] | None = None) -> dict[str, float]:
    diffs = {}
    plain = h.plain_tensors(workdir / "ref_none")
    for name in names:
        ref = h.plain_tensors(workdir / f"ref_{REFERENCE.get(name, name)}{(reference_suffix or {}).get(name, '')}")
        run = h.plain_tensors(workdir / f"{tag}_{name}")
        diffs[name] = max_diff(ref, run)
        assert diffs[name] <= TOLERANCE, f"{tag} {name}: parameters differ by {diffs[name]:.3g} from the single-process run"
        if name != "none":
            assert max_diff(ref, plain) > MERGE_EFFECT, f"{name}: the merge had no visible effect, the comparison proves nothing"
    print(f"{tag}: max |difference| to single process per config: {diffs}")
    return diffs


def collective_counts(workdir: Path, tag: str, world: int) -> list[dict[str, list[int]]]:
    return [torch.load(workdir / f"counts_{tag}_rank{rank}.pt") for rank in range(world)]


def test_dp2_matches_and_adds_no_collective(workdir: Path) -> None:
    names = ["plain", "none", "dare", "stepk", "ties", "ties_tensor"]
    h.spawn(jobs.megatron_run, 2, workdir, names=names, tag="dp2", count_collectives=True, record_ranges=True)
    # ties_tensor: exact per-tensor OnTIES although DP ranges cut tensors (and give ranks different ones).
    check(workdir, "dp2", ["none", "dare", "stepk", "ties_tensor"])

    # OnTIES with the default ties_scope='shard' takes top-p over each rank's DP piece: compare
    # with the single-process optimizer given the same pieces (ranges read from megatron's own
    # distributed optimizer in the run).
    pieces: dict[str, list[tuple[int, int]]] = {}
    for rank in range(2):
        for name, span in torch.load(workdir / f"ranges_dp2_rank{rank}.pt").items():
            pieces.setdefault(name, []).append(span)
    assert any(len(spans) > 1 for spans in pieces.values()), "no parameter is split across DP ranks"
    h.spawn(jobs.reference_run, 1, workdir, names=["ties"], segments=pieces, suffix="_dp2pieces")
    check(workdir, "dp2", ["ties"], reference_suffix={"ties": "_dp2pieces"})

    for rank, counts in enumerate(collective_counts(workdir, "dp2", 2)):
        assert counts["plain"] and min(counts["plain"]) > 0, "the counter saw no collective at all"
        for name in ("none", "dare", "stepk", "ties"):
            assert counts[name] == counts["plain"], f"rank {rank}: {name} issues {counts[name]} collectives per step, plain AdamW {counts['plain']}"
        check_select_collectives(counts)


def check_select_collectives(counts: dict[str, list[int]]) -> None:
    """Per-tensor OnTIES adds one batched select per step for all tensors: 4 magnitude rounds, then
    one max-reduction (no ties) or the index rounds (ties), whatever the number of tensors."""
    extra = [t - p for t, p in zip(counts["ties_tensor"], counts["plain"])]
    index_rounds = 2  # the test model's tensors have fewer than 2**16 elements
    assert all(5 <= e <= 4 + index_rounds for e in extra), f"collectives added per step by the select: {extra}"
    print(f"per-tensor OnTIES: collectives added per step {extra}")


def test_tp2_matches(workdir: Path) -> None:
    # ties_tensor: exact per-tensor OnTIES across TP ranks (TP-replicated norms counted on TP rank 0).
    h.spawn(jobs.megatron_run, 2, workdir, tp=2, names=["none", "dare", "stepk", "ties_tensor"], tag="tp2")
    check(workdir, "tp2", ["none", "dare", "stepk", "ties_tensor"])


@pytest.mark.slow
def test_tp2_dp2_matches_and_adds_no_collective(workdir: Path) -> None:
    h.spawn(jobs.megatron_run, 4, workdir, tp=2, names=["plain", "dare", "stepk", "ties_tensor"], tag="tp2dp2", count_collectives=True)
    check(workdir, "tp2dp2", ["dare", "stepk", "ties_tensor"])
    for rank, counts in enumerate(collective_counts(workdir, "tp2dp2", 4)):
        assert counts["dare"] == counts["plain"] == counts["stepk"], f"rank {rank}: {counts}"
        check_select_collectives(counts)


@pytest.mark.slow
def test_pp2_matches(workdir: Path) -> None:
    h.spawn(jobs.megatron_run, 2, workdir, pp=2, names=["dare", "stepk"], tag="pp2")
    check(workdir, "pp2", ["dare", "stepk"])


def test_fp32_optimizer_matches(workdir: Path) -> None:
    """Without the distributed optimizer, get_megatron_optimizer returns an FP32Optimizer (whole
    params on every DP rank)."""
    h.spawn(jobs.megatron_run, 2, workdir, names=["dare", "stepk"], tag="fp32opt", distributed=False)
    assert torch.load(workdir / "kinds_fp32opt.pt") == ["FP32Optimizer"]
    check(workdir, "fp32opt", ["dare", "stepk"])


@pytest.mark.slow
def test_bf16_float16_optimizer_equals_bf16_distributed_optimizer(workdir: Path) -> None:
    """bf16 params: Float16OptimizerWithFloat16Params (fp32 copies of whole params) and the
    distributed optimizer (fp32 copies of DP shards) merge the same elements the same way: the
    same bf16 forward/backward gives bit-identical parameters. Both stay within bf16 rounding of
    the fp32 single-process run, far closer than the merge's own effect."""
    h.spawn(jobs.megatron_run, 2, workdir, names=["dare"], tag="f16opt", distributed=False, bf16=True)
    h.spawn(jobs.megatron_run, 2, workdir, names=["dare"], tag="distbf16", distributed=True, bf16=True)
    assert torch.load(workdir / "kinds_f16opt.pt") == ["Float16OptimizerWithFloat16Params"]
    assert torch.load(workdir / "kinds_distbf16.pt") == ["DistributedOptimizer"]
    f16, dist = h.plain_tensors(workdir / "f16opt_dare"), h.plain_tensors(workdir / "distbf16_dare")
    assert max_diff(f16, dist) == 0.0
    ref, plain = h.plain_tensors(workdir / "ref_dare"), h.plain_tensors(workdir / "ref_none")
    bf16_error, merge_effect = max_diff(ref, dist), max_diff(ref, plain)
    print(f"bf16 vs fp32 single process: {bf16_error:.3g}; merged vs plain: {merge_effect:.3g}")
    assert bf16_error < 0.1 * merge_effect


@pytest.mark.slow
def test_pp2_tied_embeddings_match(tmp_path: Path) -> None:
    """Tied embeddings at PP=2: the last stage's copy of the embedding carries the embedding's
    checkpoint key, so both copies draw the same masks and stay tied; the single-process run has
    one tensor."""
    h.spawn(jobs.make_checkpoints, 1, tmp_path, tied=True)
    h.spawn(jobs.reference_run, 1, tmp_path, names=["none", "dare"], tied=True)
    h.spawn(jobs.megatron_run, 2, tmp_path, pp=2, names=["dare"], tag="pp2tied", tied=True)
    check(tmp_path, "pp2tied", ["dare"])
