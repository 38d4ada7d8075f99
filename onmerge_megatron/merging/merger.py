"""One merged step on one segment: what happens to the elements a rank owns of one tensor.

    OnDARE:  theta <- theta + (1 - alpha) F(update);  theta <- theta + alpha F(reference_delta)
    OnTIES:  theta <- theta + sign_consensus((1 - alpha) F(update), alpha F(reference_delta))

with the step-K rule of the paper's Algorithm 2: on K - 1 of every K steps the plain update is
applied and accumulated; on the K-th the accumulated updates are rolled back and merged together
with this step's. Decoupled weight decay is the optimizer's business and happens before.

The update is asked for only where it is needed: OnDARE needs it at the kept positions alone
(about p of the elements), so a merged step costs no more than the moment updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from . import consensus, rng
from .config import OnlineMergeConfig
from .coords import ShardCoords
from .reference import ReferenceDelta
from .sparsify import Exchange, dare_rescale, l1_rescale, ties_positions


class Update(Protocol):
    """The inner optimizer's update of one segment, excluding weight decay."""

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The update at some positions; must equal dense()[positions] bit for bit."""
        ...

    def dense(self) -> torch.Tensor: ...

    def magnitude(self) -> torch.Tensor:
        """|dense()|, possibly computed without materialising dense()."""
        ...


@dataclass
class DenseUpdate:
    """An update already materialised (generic optimizers: theta_new - theta_old)."""

    values: torch.Tensor

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.values[positions]

    def dense(self) -> torch.Tensor:
        return self.values

    def magnitude(self) -> torch.Tensor:
        return self.values.abs()


@dataclass
class _WithAccumulator:
    """This step's update plus the plain updates accumulated since the last merge."""

    update: Update
    accumulator: torch.Tensor

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.update.at(positions) + self.accumulator[positions]

    def dense(self) -> torch.Tensor:
        return self.update.dense() + self.accumulator

    def magnitude(self) -> torch.Tensor:
        return self.dense().abs_()


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
        for name in ("numel", "kept", "reference_kept", "merges", "sign_conflicts", "merged_sq", "update_sq"):
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


def sparsified_update(
    update: Update,
    config: OnlineMergeConfig,
    name: str,
    coords: ShardCoords,
    step: int,
    exchange: Exchange | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, values) of F(update): DARE's random mask or TIES's top-p."""
    if config.method == "dare":
        positions = rng.keep_positions(config.seed, name, step, rng.STREAM_UPDATE, coords, config.keep_rate, device)
        values = update.at(positions)
        if config.dare_rescale:
            values = dare_rescale(values, config.keep_rate)
    else:
        positions = ties_positions(update.magnitude(), config.keep_rate, config.ties_scope, coords, exchange, name)
        values = update.at(positions)
    if config.l1_rescale:
        values = l1_rescale(values, update.dense())
    return positions, values


def apply_merge(
    param: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor,
    config: OnlineMergeConfig,
    name: str,
    coords: ShardCoords,
    step: int,
    reference: ReferenceDelta | None,
) -> MergeStats:
    """Add the consensus of F(update) (``values`` at ``positions``) and alpha F(reference_delta) to param."""
    stats = MergeStats(numel=param.numel(), kept=positions.numel(), merges=1)
    if config.alpha > 0.0:
        if reference is None:
            raise ValueError(f"{name!r}: alpha={config.alpha} needs a reference delta; call set_reference_delta first")
        reference_positions, reference_values = reference.kept(config, name, coords, step)
        stats.reference_kept = reference_positions.numel()
    else:
        reference_positions, reference_values = positions[:0], values[:0]

    if config.method == "dare":
        # Linear consensus needs no alignment of the two kept sets: theta += (1 - a) F(u), then += a F(r).
        step_update = values * (1.0 - config.alpha)
        param[positions] += step_update
        step_reference = reference_values * config.alpha
        param[reference_positions] += step_reference
        stats.merged_sq = step_update.double().square().sum() + step_reference.double().square().sum()
        return stats
    # Sign consensus in fp32 whatever the parameter dtype, on the union of the two kept sets (a
    # term not kept is 0). Both position lists are sorted, so they are aligned by a binary search.
    values, reference_values = values.float(), reference_values.float()
    elect = consensus.sign_weighted if config.sign_election == "weighted" else consensus.sign_unweighted
    reference_at = torch.zeros_like(values)
    reference_only = torch.ones_like(reference_positions, dtype=torch.bool)
    if reference_positions.numel():
        slot = torch.searchsorted(reference_positions, positions).clamp_(max=reference_positions.numel() - 1)
        both = reference_positions[slot] == positions
        reference_at[both] = reference_values[slot[both]]
        reference_only[slot[both]] = False
    step_update = elect(values, reference_at, config.alpha)
    step_reference = elect(torch.zeros_like(reference_values[reference_only]), reference_values[reference_only], config.alpha)
    param[positions] += step_update.to(param.dtype)
    param[reference_positions[reference_only]] += step_reference.to(param.dtype)
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
    exchange: Exchange | None = None,
    track_update_norm: bool = False,
) -> MergeStats:
    """Apply step ``step`` (1-based) of the online merge to ``param`` (1-D view of the segment), in place.

    ``accumulator`` is the step-K state (same shape as param; needed when merge_every > 1).
    ``exchange`` gathers top-k candidates across ranks for ties_scope='tensor' on a shard.
    """
    if not config.merges:
        param.add_(update.dense())
        return MergeStats(numel=param.numel())
    if config.merge_every > 1:
        if accumulator is None:
            raise ValueError(f"{name!r}: merge_every={config.merge_every} needs an accumulator")
        if step % config.merge_every != 0:
            plain = update.dense()
            param.add_(plain)
            accumulator.add_(plain)
            return MergeStats(numel=param.numel())
        param.sub_(accumulator)  # roll back the plain updates; they are merged with this one
        update = _WithAccumulator(update, accumulator)

    positions, values = sparsified_update(update, config, name, coords, step, exchange, param.device)
    stats = apply_merge(param, positions, values, config, name, coords, step, reference)
    if track_update_norm:
        stats.update_sq = update.magnitude().double().square().sum()
    if config.merge_every > 1:
        accumulator.zero_()
    return stats
