"""Storage of one segment's reference delta (SFT minus base) in the form the merge consumes.

With a fixed mask only the kept elements are ever used, so only they are stored:
- DARE: the values alone (about p of a dense copy); positions are redrawn from the counter-based
  generator whenever they are needed.
- TIES: values and int32 positions (top-p of a fixed tensor is fixed, so positions are found once).
A resampled DARE mask needs the whole delta, which is then stored dense.
Kept values are stored already rescaled (DARE) and clamped (as configured), but not weighted by alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng
from .config import OnlineMergeConfig
from .coords import ShardCoords
from .indexing import gather
from .sparsify import TensorTopK, dare_rescale, ties_positions


def _finish(values: torch.Tensor, config: OnlineMergeConfig) -> torch.Tensor:
    if config.method == "dare" and config.dare_rescale:
        values = dare_rescale(values, config.keep_rate)
    clamp = config.resolved_reference_clamp
    if clamp is not None:
        values = values.clamp(-clamp, clamp)
    return values.to(torch.float32).contiguous()


def reference_draw(config: OnlineMergeConfig, name: str, coords: ShardCoords, step: int) -> rng.MaskDraw:
    """The DARE reference mask at a merge: drawn once (step 0) or at every merge."""
    mask_step = step if config.reference_mask == "resampled" else 0
    return rng.MaskDraw(config.seed, name, mask_step, rng.STREAM_REFERENCE, coords)


def reference_positions(
    config: OnlineMergeConfig, name: str, coords: ShardCoords, step: int, device: torch.device | None = None
) -> torch.Tensor:
    """Positions of the DARE reference mask (`reference_draw`)."""
    draw = reference_draw(config, name, coords, step)
    return rng.keep_positions(draw.seed, draw.name, draw.step, draw.stream, coords, config.keep_rate, device)


@dataclass
class ReferenceDelta:
    """A segment's reference delta: ``values`` at ``positions`` (None: redrawn), or ``dense``."""

    values: torch.Tensor
    positions: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        delta: torch.Tensor,
        config: OnlineMergeConfig,
        name: str,
        coords: ShardCoords,
        tensor_top_k: TensorTopK | None = None,
    ) -> "ReferenceDelta":
        """Sparsify a segment's delta (1-D, coords.numel elements) once, at setup; ``tensor_top_k``:
        OnTIES per tensor on a piece of it (see `sparsify.ties_positions`)."""
        delta = delta.detach().reshape(-1).to(torch.float32)
        if delta.numel() != coords.numel:
            raise ValueError(f"reference delta for {name!r}: expected {coords.numel} elements for this shard, got {delta.numel()}")
        if not torch.isfinite(delta).all():
            bad = int((~torch.isfinite(delta)).sum())
            raise ValueError(f"reference delta for {name!r} has {bad} NaN/Inf element(s); check the reference and base weights")
        if config.method == "dare":
            if config.reference_mask == "resampled":
                return cls(values=delta.new_empty(0), dense=delta.clone())
            positions = reference_positions(config, name, coords, 0, delta.device)
            return cls(values=_finish(delta[positions], config))
        positions = ties_positions(delta.abs(), config.keep_rate, config.ties_scope, coords, name, tensor_top_k)
        return cls(values=_finish(delta[positions], config), positions=positions.to(torch.int32 if coords.numel < 2**31 else torch.int64))

    def kept(
        self, config: OnlineMergeConfig, name: str, coords: ShardCoords, step: int, drawn: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions int64, values) of the sparsified reference delta for this merge; ``drawn``: the
        positions of `reference_draw` when drawn ahead."""
        if self.positions is not None:
            return self.positions.to(torch.int64), self.values
        positions = drawn if drawn is not None else reference_positions(config, name, coords, step, self.values.device)
        if self.dense is not None:
            return positions, _finish(gather(self.dense, positions), config)
        return positions, self.values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.positions, self.dense) if t is not None)

    def to(self, device: torch.device) -> "ReferenceDelta":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ReferenceDelta(move(self.values), move(self.positions), move(self.dense))
