"""One merged step on one segment: what happens to the elements a rank owns of one tensor.

    OnDARE:  theta <- theta + (1 - alpha) F(update);  theta <- theta + alpha F(reference_delta)
    OnTIES:  theta <- theta + sign_consensus((1 - alpha) F(update), alpha F(reference_delta))

with the step-K rule of the paper's Algorithm 2: on K - 1 of every K steps the plain update is
applied and accumulated; on the K-th the accumulated updates are rolled back and merged together
with this step's. Decoupled weight decay is the optimizer's business and happens before.

The update is asked for only where it is needed: OnDARE needs it at the kept positions alone
(about p of the elements), so a merged step costs no more than the moment updates.

A fused implementation (kernels/adamw_merge.py) plugs in through `MergeHooks`, never by copying
this file: it may have done the step-K part of a step in its dense pass, may offer top-k
candidates, and may apply OnDARE's sparse terms itself. Everything else stays here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from . import consensus, rng
from .indexing import add_at, gather
from .indexing import positions as index_positions
from .config import OnlineMergeConfig
from .coords import ShardCoords
from .reference import ReferenceDelta
from .sparsify import Candidates, TensorTopK, dare_rescale, l1_rescale, ties_positions, top_k_among, top_k_count


class Update(Protocol):
    """The inner optimizer's update of one segment, excluding weight decay."""

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The update at some positions; must equal dense()[positions] bit for bit."""
        ...

    def dense(self) -> torch.Tensor: ...

    def magnitude(self) -> torch.Tensor:
        """|dense()|, possibly computed without materialising dense()."""
        ...

    def top_k_candidates(self, k: int) -> Candidates | None:
        """Positions provably holding the top k of magnitude(), found without materialising it
        (see `Candidates`); None: select over magnitude()."""
        ...


@dataclass
class DenseUpdate:
    """An update already materialised (generic optimizers: theta_new - theta_old)."""

    values: torch.Tensor

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return gather(self.values, positions)

    def dense(self) -> torch.Tensor:
        return self.values

    def magnitude(self) -> torch.Tensor:
        return self.values.abs()

    def top_k_candidates(self, k: int) -> Candidates | None:
        return None


@dataclass
class _WithAccumulator:
    """This step's update plus the plain updates accumulated since the last merge."""

    update: Update
    accumulator: torch.Tensor

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.update.at(positions) + gather(self.accumulator, positions)

    def dense(self) -> torch.Tensor:
        return self.update.dense() + self.accumulator

    def magnitude(self) -> torch.Tensor:
        return self.dense().abs_()

    def top_k_candidates(self, k: int) -> Candidates | None:
        return None


@dataclass
class MergeStats:
    """Counts and squared norms summed over the segments merged in a step (for logging).

    Norms and conflict counts may be 0-d tensors on the parameters' device, so that logging costs
    no host synchronisation until `as_dict` is called.
    """

    numel: int = 0
    kept: int = 0
    reference_kept: int = 0
    merges: int = 0
    sign_conflicts: float | torch.Tensor = 0
    merged_sq: float | torch.Tensor = 0.0
    update_sq: float | torch.Tensor = 0.0

    def add(self, other: "MergeStats") -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float]:
        """Summary values: kept fraction, norms of the update before and after merging, conflicts."""
        kept = self.kept
        return {
            "kept_fraction": kept / self.numel if self.numel else 0.0,
            "update_norm": float(self.update_sq) ** 0.5,
            "merged_norm": float(self.merged_sq) ** 0.5,
            "sign_conflict_rate": float(self.sign_conflicts) / kept if kept else 0.0,
        }


def is_merge_step(config: OnlineMergeConfig, step: int) -> bool:
    """The step-K schedule: step ``step`` (1-based) merges; on the other K - 1 of every K steps the
    plain update is applied and accumulated."""
    return config.merge_every == 1 or step % config.merge_every == 0


def segment_top_k(config: OnlineMergeConfig, coords: ShardCoords, over_ranks: bool) -> int | None:
    """k when a segment's TIES selection is the top k of its own elements with 1 <= k < numel (the
    case where `MergeHooks.top_k_candidates` is consulted), else None (per-tensor selection
    ``over_ranks``; or k covering nothing or everything)."""
    if config.ties_scope == "tensor" and (over_ranks or coords.numel != coords.global_numel):
        return None
    k = top_k_count(coords.numel, config.keep_rate)
    return k if 1 <= k < coords.numel else None


class MergeHooks:
    """Where a fused implementation takes over parts of one segment's merged step.

    One instance per segment and step, returned by the optimizer's dense pass
    (`OnlineMergingAdamW._dense_pass`) and handed to `merge_segment`, which calls each hook at the
    point documented below. Every default takes nothing over, which is the engine's own path; a
    hook that declines leaves its part to the engine, so the results never depend on it.
    """

    step_k_done: bool = False
    """True when the dense pass already did this step's step-K part: on a non-merge step the plain
    update applied and accumulated, on a merge step the accumulator rolled back."""

    def top_k_candidates(self, k: int) -> Candidates | None:
        """OnTIES, when the segment's own top k is selected (`segment_top_k`): positions claimed
        to hold the top k of |update| (the update plus the accumulator on a step-K merge step).
        The engine checks the claim (`sparsify.top_k_among`) and selects among them, or, when
        None is returned or the check fails, over the whole segment."""
        return None

    def top_k_selected(self, magnitude: torch.Tensor, k: int, from_candidates: bool) -> None:
        """Called after the selection that consulted `top_k_candidates`, with the magnitudes it
        read: of the offered candidates (``from_candidates``) or of the whole segment. A kernel
        predicts its next candidates from them."""

    def add_dare_update(self, param: torch.Tensor, update: Update, weight: float, stats: MergeStats) -> bool:
        """OnDARE: param += weight * F(update) with this step's keep-mask (rescaled and L1-rescaled
        as configured), recording the kept count and squared norm in ``stats`` or in the
        implementation's own counters. False: not done, the engine does it."""
        return False

    def add_dare_reference(self, param: torch.Tensor, reference: ReferenceDelta, weight: float, stats: MergeStats) -> bool:
        """OnDARE: param += weight * F(reference delta) at this step's reference mask, recording
        reference_kept and the squared norm in ``stats``. False: not done, the engine does it."""
        return False


_NO_HOOKS = MergeHooks()


@dataclass(frozen=True)
class DarePositions:
    """OnDARE's keep positions of one segment at one step, drawn ahead for many segments together
    (`rng.keep_positions_many`); the same positions `merge_segment` would draw itself."""

    update: torch.Tensor
    reference: torch.Tensor | None
    """None: the reference delta's positions are stored (or alpha is 0)."""


def _ties_kept(
    update: Update, config: OnlineMergeConfig, name: str, coords: ShardCoords, tensor_top_k: TensorTopK | None, hooks: MergeHooks
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES keep-positions of F(update) and the update there, from candidates where they provably
    suffice."""
    k = segment_top_k(config, coords, tensor_top_k is not None)
    if k is not None:
        offered = hooks.top_k_candidates(k)
        if offered is None and hooks is _NO_HOOKS:  # no fused implementation takes part
            offered = update.top_k_candidates(k)
        if offered is not None:
            # Read off the Update itself (or equal to it bit for bit), so the kept set is the engine's.
            at_offered = offered.values if offered.values is not None else update.at(offered.positions)
            magnitude = at_offered.abs()
            chosen = top_k_among(magnitude, offered, k, coords.global_index)
            if chosen is not None:
                hooks.top_k_selected(magnitude, k, True)
                return gather(offered.positions, chosen), gather(at_offered, chosen)
    magnitude = update.magnitude()
    positions = ties_positions(magnitude, config.keep_rate, config.ties_scope, coords, name, tensor_top_k)
    if k is not None:
        hooks.top_k_selected(magnitude, k, False)
    return positions, update.at(positions)


def _merge_dare(
    param: torch.Tensor,
    update: Update,
    config: OnlineMergeConfig,
    name: str,
    coords: ShardCoords,
    step: int,
    reference: ReferenceDelta | None,
    hooks: MergeHooks,
    drawn: DarePositions | None,
) -> MergeStats:
    """Linear consensus needs no alignment of the two kept sets: theta += (1 - a) F(u), then += a F(r)."""
    if config.alpha > 0.0 and reference is None:
        raise ValueError(f"{name!r}: alpha={config.alpha} needs a reference delta; call set_reference_delta first")
    stats = MergeStats(numel=param.numel(), merges=1)
    weight = 1.0 - config.alpha
    if not hooks.add_dare_update(param, update, weight, stats):
        if drawn is not None:
            positions = drawn.update
        else:
            positions = rng.keep_positions(config.seed, name, step, rng.STREAM_UPDATE, coords, config.keep_rate, param.device)
        values = update.at(positions)
        if config.dare_rescale:
            values = dare_rescale(values, config.keep_rate)
        if config.l1_rescale:
            values = l1_rescale(values, update.dense())
        step_update = values * weight
        add_at(param, positions, step_update)
        stats.kept = positions.numel()
        stats.merged_sq = step_update.double().square().sum()
    if config.alpha > 0.0 and not hooks.add_dare_reference(param, reference, config.alpha, stats):
        reference_positions, reference_values = reference.kept(config, name, coords, step, drawn.reference if drawn else None)
        step_reference = reference_values * config.alpha
        add_at(param, reference_positions, step_reference)
        stats.reference_kept = reference_positions.numel()
        stats.merged_sq = stats.merged_sq + step_reference.double().square().sum()
    return stats


def apply_ties(
    param: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor,
    config: OnlineMergeConfig,
    name: str,
    coords: ShardCoords,
    step: int,
    reference: ReferenceDelta | None,
) -> MergeStats:
    """Add the sign consensus of F(update) (``values`` at ``positions``) and alpha F(reference_delta) to param."""
    stats = MergeStats(numel=param.numel(), kept=positions.numel(), merges=1)
    if config.alpha > 0.0:
        if reference is None:
            raise ValueError(f"{name!r}: alpha={config.alpha} needs a reference delta; call set_reference_delta first")
        reference_positions, reference_values = reference.kept(config, name, coords, step)
        stats.reference_kept = reference_positions.numel()
    else:
        reference_positions, reference_values = positions[:0], values[:0]
    # Sign consensus in fp32 whatever the parameter dtype, on the union of the two kept sets (a
    # term not kept is 0). Both position lists are sorted, so they are aligned by a binary search.
    values, reference_values = values.float(), reference_values.float()
    elect = consensus.sign_weighted if config.sign_election == "weighted" else consensus.sign_unweighted
    if reference_positions.numel():
        slot = torch.searchsorted(reference_positions, positions).clamp_(max=reference_positions.numel() - 1)
        both = gather(reference_positions, slot) == positions
        reference_at = torch.where(both, gather(reference_values, slot), 0.0)
        # Reference entries no update position met (one spare slot takes the unmatched ones).
        met = torch.zeros(reference_positions.numel() + 1, dtype=torch.bool, device=positions.device)
        met.index_fill_(0, torch.where(both, slot, reference_positions.numel()), True)
        reference_only = index_positions(met[:-1], "==", False)
    else:
        reference_at = torch.zeros_like(values)
        reference_only = reference_positions[:0]
    only_values = gather(reference_values, reference_only)
    step_update = elect(values, reference_at, config.alpha)
    step_reference = consensus.reference_alone(only_values, config.alpha)
    add_at(param, positions, step_update.to(param.dtype))
    add_at(param, gather(reference_positions, reference_only), step_reference.to(param.dtype))
    stats.sign_conflicts = consensus.sign_conflicts(values, reference_at)
    stats.merged_sq = step_update.double().square().sum() + step_reference.double().square().sum()
    return stats


def merge_segment(
    param: torch.Tensor,
    update: Update,
    config: OnlineMergeConfig,
    name: str,
    coords: ShardCoords,
    step: int,
    reference: ReferenceDelta | None = None,
    accumulator: torch.Tensor | None = None,
    tensor_top_k: TensorTopK | None = None,
    track_update_norm: bool = False,
    hooks: MergeHooks | None = None,
    dare_positions: DarePositions | None = None,
) -> MergeStats:
    """Apply step ``step`` (1-based) of the online merge to ``param`` (1-D view of the segment), in place.

    ``accumulator`` is the step-K state (same shape as param; needed when merge_every > 1).
    ``tensor_top_k``: OnTIES per tensor on a piece of it, the tensor's threshold over all its
    pieces (`merging.select.tensor_thresholds`, run by the optimizer for all tensors at once).
    ``hooks``: the parts a fused implementation takes over (`MergeHooks`); None: none.
    ``dare_positions``: OnDARE's keep positions for this step when drawn ahead; None: drawn here.
    """
    hooks = hooks if hooks is not None else _NO_HOOKS
    if not config.merges:
        param.add_(update.dense())
        return MergeStats(numel=param.numel())
    if config.merge_every > 1:
        if accumulator is None:
            raise ValueError(f"{name!r}: merge_every={config.merge_every} needs an accumulator")
        if not is_merge_step(config, step):
            if not hooks.step_k_done:
                plain = update.dense()
                param.add_(plain)
                accumulator.add_(plain)
            return MergeStats(numel=param.numel())
        if not hooks.step_k_done:
            param.sub_(accumulator)  # roll back the plain updates; they are merged with this one
        update = _WithAccumulator(update, accumulator)

    if config.method == "dare":
        stats = _merge_dare(param, update, config, name, coords, step, reference, hooks, dare_positions)
    else:
        positions, values = _ties_kept(update, config, name, coords, tensor_top_k, hooks)
        if config.l1_rescale:
            values = l1_rescale(values, update.dense())
        stats = apply_ties(param, positions, values, config, name, coords, step, reference)
    if track_update_norm:
        stats.update_sq = update.magnitude().double().square().sum()
    if config.merge_every > 1:
        accumulator.zero_()
    return stats
