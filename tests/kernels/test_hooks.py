"""The engine's hooks for fused implementations (`merging.merger.MergeHooks`), with plain torch
implementations of them: whatever a hook takes over or declines, the merged step is the one the
reference transcription gives. No Triton needed."""

from __future__ import annotations

import pytest
import torch

from onmerge_megatron.merging import DenseUpdate, OnlineMergeConfig, ReferenceDelta, ShardCoords, merge_segment
from onmerge_megatron.merging.merger import MergeHooks
from onmerge_megatron.merging.sparsify import Candidates

from reference_impl import ties_consensus, top_k_mask

SHAPE = (400, 600)  # 240 000 elements: above the sampled-candidates size of the engine's own selection
NAME = "layers.0.mlp.weight"


def tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(SHAPE, generator=gen) * 0.02
    update = torch.randn(SHAPE, generator=gen) * 1e-3
    delta = torch.randn(SHAPE, generator=gen) * 5e-3
    return param.view(-1), update.view(-1), delta.view(-1)


def onties_expected(param: torch.Tensor, update: torch.Tensor, delta: torch.Tensor, keep_rate: float, alpha: float) -> torch.Tensor:
    """Equations 5-7 of the paper on dense tensors (the reference transcription)."""
    u = torch.where(top_k_mask(update, keep_rate), update, 0.0)
    r = torch.where(top_k_mask(delta, keep_rate), delta, 0.0)
    support = torch.nonzero((u != 0) | (r != 0)).squeeze(1)
    expected = param.clone()
    expected[support] += ties_consensus(u[support], r[support], alpha, weighted=False)
    return expected


class CutCandidates(MergeHooks):
    """Offers every position whose magnitude is at least ``cut`` (the bound: every other one is below)."""

    def __init__(self, magnitude: torch.Tensor, cut: float) -> None:
        self.magnitude, self.cut = magnitude, cut
        self.selected: list[tuple[int, int, bool]] = []

    def top_k_candidates(self, k: int) -> Candidates:
        return Candidates(torch.nonzero(self.magnitude >= self.cut).squeeze(1), self.cut)

    def top_k_selected(self, magnitude: torch.Tensor, k: int, from_candidates: bool) -> None:
        self.selected.append((magnitude.numel(), k, from_candidates))


@pytest.mark.parametrize("depth, used", [(3, True), (1, True), (0.5, False)], ids=["3k-deep", "exactly-k", "too-few"])
def test_onties_candidates_are_used_only_when_proven_complete(depth, used):
    """Candidates that hold the top k are selected among (the engine reads only their magnitudes);
    fewer than k make the engine select over the whole segment. The kept set is the same."""
    config = OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.3)
    param, update, delta = tensors()
    k = int(param.numel() * config.keep_rate)
    magnitude = update.abs()
    cut = float(torch.sort(magnitude, descending=True).values[int(depth * k) - 1])
    hooks = CutCandidates(magnitude, cut)
    coords = ShardCoords.full(SHAPE)
    reference = ReferenceDelta.build(delta, config, NAME, coords)
    merged = param.clone()
    merge_segment(merged, DenseUpdate(update), config, NAME, coords, 1, reference, hooks=hooks)
    assert torch.equal(merged, onties_expected(param, update, delta, 0.01, 0.3))
    offered = int((magnitude >= cut).sum())
    assert hooks.selected == [(offered if used else param.numel(), k, used)]


def test_onties_candidates_with_a_loose_bound_are_refused():
    """A bound above the k-th largest offered magnitude proves nothing: the engine selects itself."""
    config = OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.3)
    param, update, delta = tensors(1)
    coords = ShardCoords.full(SHAPE)
    magnitude = update.abs()
    k = int(param.numel() * config.keep_rate)
    kth = float(torch.sort(magnitude, descending=True).values[k - 1])
    hooks = CutCandidates(magnitude, kth)
    hooks.top_k_candidates = lambda k: Candidates(torch.nonzero(magnitude >= kth).squeeze(1), kth * 1.5)  # type: ignore[method-assign]
    merged = param.clone()
    merge_segment(merged, DenseUpdate(update), config, NAME, coords, 1, ReferenceDelta.build(delta, config, NAME, coords), hooks=hooks)
    assert torch.equal(merged, onties_expected(param, update, delta, 0.01, 0.3))
    assert hooks.selected == [(param.numel(), k, False)]


class DenseStepK(MergeHooks):
    """A dense pass that did this step's step-K part itself (as the fused kernel does)."""

    step_k_done = True


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_step_k_done_by_the_dense_pass(method):
    """K = 3: with the plain steps and the roll-back done before merge_segment and step_k_done set,
    every step ends where the engine's own step-K schedule ends."""
    config = OnlineMergeConfig(method=method, keep_rate=0.05, alpha=0.3, merge_every=3)
    param, _, delta = tensors(2)
    coords = ShardCoords.full(SHAPE)
    reference = ReferenceDelta.build(delta, config, NAME, coords)
    engine, engine_acc = param.clone(), torch.zeros_like(param)
    hooked, hooked_acc = param.clone(), torch.zeros_like(param)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 7):
        update = torch.randn(param.numel(), generator=gen) * 1e-3
        merge_segment(engine, DenseUpdate(update), config, NAME, coords, step, reference, accumulator=engine_acc)
        if step % 3:
            hooked += update
            hooked_acc += update
        else:
            hooked -= hooked_acc
        merge_segment(hooked, DenseUpdate(update), config, NAME, coords, step, reference, accumulator=hooked_acc, hooks=DenseStepK())
        assert torch.equal(hooked, engine), step
        assert torch.equal(hooked_acc, engine_acc), step
