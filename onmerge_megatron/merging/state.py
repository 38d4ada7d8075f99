"""The merge state of a parameter: what the optimizer keeps, and its form in global coordinates.

An optimizer keeps per parameter Adam's keys (``step``, ``exp_avg``, ``exp_avg_sq``, as torch's
AdamW names them, so that frameworks save and restore them as they do for AdamW) and the merge
state below, in the parameter's local layout. A parameter holds one or more segments (a Megatron
shard, the pieces of many weights in a ZeRO partition), and the reference delta of all its
segments is stored together.

Frameworks save and reshard state by global coordinates. So every merge key is exported per
segment as a dense float32 vector of the segment's elements (`export_reference`, and the dense
keys as they are), and imported back into whatever segments the loading rank holds
(`import_reference`). Adapters move these vectors; they never name a stored key.
"""

from __future__ import annotations

from typing import Container, Mapping, Sequence

import torch

from .config import MergeCheckpointError, OnlineMergeConfig
from .coords import ShardCoords
from .reference import ReferenceDelta, reference_positions

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")

ACCUMULATOR = "merge_accumulator"
"""Step-K: the plain updates applied since the last merge (fp32, like the parameter)."""
WEIGHT_EMA = "weight_ema"
"""The EMA baseline's weights (like the parameter)."""
REFERENCE_VALUES = "reference_values"
"""The kept, rescaled and clamped reference delta values of all segments, in segment order."""
REFERENCE_POSITIONS = "reference_positions"
"""OnTIES: their positions in the parameter's flat view (DARE redraws them)."""
REFERENCE_DENSE = "reference_delta"
"""A resampled mask: the whole delta, in the parameter's flat layout."""
REFERENCE_KEYS = (REFERENCE_VALUES, REFERENCE_POSITIONS, REFERENCE_DENSE)
MERGE_KEYS = (ACCUMULATOR, WEIGHT_EMA) + REFERENCE_KEYS
"""Every key the engine adds to a parameter's optimizer state."""

# Exported (per segment, dense, fp32) names of the reference delta.
EXPORTED_REFERENCE = "reference"
"""The reference delta as the engine keeps it: kept values (rescaled, clamped), 0 elsewhere."""
EXPORTED_REFERENCE_MASK = "reference_mask"
"""1.0 where the reference delta is kept, else 0.0."""


def used_keys(config: OnlineMergeConfig) -> set[str]:
    """The stored merge keys a config reads."""
    used = set(REFERENCE_KEYS) if config.needs_reference else set()
    if config.merges and config.merge_every > 1:
        used.add(ACCUMULATOR)
    if config.weight_ema > 0:
        used.add(WEIGHT_EMA)
    return used


def exported_keys(config: OnlineMergeConfig) -> list[str]:
    """The per-segment dense vectors a config's merge state exports to, in a fixed order."""
    keys = []
    if config.merges and config.merge_every > 1:
        keys.append(ACCUMULATOR)
    if config.needs_reference:
        keys += [REFERENCE_DENSE] if config.reference_mask == "resampled" else [EXPORTED_REFERENCE, EXPORTED_REFERENCE_MASK]
    if config.weight_ema > 0:
        keys.append(WEIGHT_EMA)
    return keys


def dense_keys(config: OnlineMergeConfig) -> list[str]:
    """The per-element (parameter-shaped) merge keys a config uses."""
    return [key for key in (ACCUMULATOR, WEIGHT_EMA) if key in used_keys(config)]


def new_dense(key: str, data: torch.Tensor) -> torch.Tensor:
    """A dense merge key as it is before the first step: no plain update accumulated (fp32), the
    EMA at the weights."""
    return torch.zeros_like(data, dtype=torch.float32) if key == ACCUMULATOR else data.detach().clone()


def new_dense_state(config: OnlineMergeConfig, data: torch.Tensor, skip: Container[str] = ()) -> dict[str, torch.Tensor]:
    """The dense merge state a config asks for, as it is before the first step; keys in ``skip``
    (those a state already has) are not built."""
    return {key: new_dense(key, data) for key in dense_keys(config) if key not in skip}


# ---------------------------------------------------------------- the stored reference delta
def store_references(
    references: Sequence[ReferenceDelta], offsets: Sequence[int], config: OnlineMergeConfig, like: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The state keys holding the reference deltas of a parameter's segments (at flat ``offsets``).

    ``like`` is the parameter's local tensor: the state lives on its device. A parameter may hold
    no segment at all (a ZeRO-3 sub-group that is padding on this rank)."""
    empty = like.new_zeros(0, dtype=torch.float32)
    state = {REFERENCE_VALUES: torch.cat([empty] + [r.values.to(like.device) for r in references])}
    if config.method == "ties":
        # Positions in the parameter's flat view; int32 unless a (ZeRO flat) tensor is that large.
        dtype = torch.int32 if like.numel() < 2**31 else torch.int64
        state[REFERENCE_POSITIONS] = torch.cat(
            [empty.to(dtype)] + [r.positions.to(device=like.device, dtype=dtype) + offset for r, offset in zip(references, offsets)]
        )
    if config.reference_mask == "resampled":
        state[REFERENCE_DENSE] = torch.cat([empty] + [r.dense.to(like.device) for r in references])
    return state


def reference_views(
    state: Mapping[str, torch.Tensor], segments: Sequence[tuple[str, ShardCoords, int]], config: OnlineMergeConfig
) -> list[ReferenceDelta] | None:
    """Per-segment views into a parameter's stored reference delta; segments as (name, coords,
    flat offset). None when the parameter has none."""
    if REFERENCE_VALUES not in state:
        return None
    views, cursor = [], 0
    for name, coords, offset in segments:
        if REFERENCE_DENSE in state:
            views.append(ReferenceDelta(values=state[REFERENCE_VALUES][:0], dense=state[REFERENCE_DENSE][offset : offset + coords.numel]))
            continue
        if REFERENCE_POSITIONS in state:
            positions = state[REFERENCE_POSITIONS]
            count = int(((positions >= offset) & (positions < offset + coords.numel)).sum())
            views.append(
                ReferenceDelta(values=state[REFERENCE_VALUES][cursor : cursor + count], positions=positions[cursor : cursor + count] - offset)
            )
        else:
            count = reference_positions(config, name, coords, 0).numel()
            views.append(ReferenceDelta(values=state[REFERENCE_VALUES][cursor : cursor + count]))
        cursor += count
    return views


# ---------------------------------------------------------------- global form of the reference delta
def export_reference(reference: ReferenceDelta, config: OnlineMergeConfig, name: str, coords: ShardCoords) -> dict[str, torch.Tensor]:
    """A segment's reference delta as dense fp32 vectors of its elements (on the CPU)."""
    if config.reference_mask == "resampled":
        if reference.dense is None:
            raise MergeCheckpointError(f"online merge: {name!r} holds a fixed-mask reference delta; a resampled mask needs the whole delta")
        return {REFERENCE_DENSE: reference.dense.detach().float().cpu()}
    positions, values = reference.kept(config, name, coords, 0)
    positions = positions.cpu()
    dense, mask = torch.zeros(coords.numel), torch.zeros(coords.numel)
    dense[positions] = values.detach().float().cpu()
    mask[positions] = 1.0
    return {EXPORTED_REFERENCE: dense, EXPORTED_REFERENCE_MASK: mask}


def import_reference(piece: Mapping[str, torch.Tensor], config: OnlineMergeConfig, name: str, coords: ShardCoords) -> ReferenceDelta:
    """A segment's reference delta from its exported vectors, in whatever layout this run has."""
    if config.reference_mask == "resampled":
        if REFERENCE_DENSE not in piece:
            raise MergeCheckpointError("online merge: the checkpoint holds a fixed-mask reference delta; resampling needs the whole delta")
        return ReferenceDelta(values=torch.zeros(0), dense=piece[REFERENCE_DENSE].float().clone())
    if EXPORTED_REFERENCE not in piece:
        raise MergeCheckpointError("online merge: the checkpoint has no reference delta for a fixed mask")
    mask = piece[EXPORTED_REFERENCE_MASK] > 0.5
    values = piece[EXPORTED_REFERENCE].float()
    if config.method == "dare":
        # Positions are a function of (seed, name, global index): redraw them in this layout and
        # check that the checkpoint kept exactly those elements.
        positions = reference_positions(config, name, coords, 0)
        if int(mask.sum()) != positions.numel() or not bool(mask[positions].all()):
            raise MergeCheckpointError(
                f"online merge: the checkpoint's reference mask for {name!r} is not the one this run draws "
                "(tensor names or coordinates changed?)"
            )
        return ReferenceDelta(values=values[positions].clone())
    # OnTIES: the kept set was chosen once, at the first layout; keep exactly those elements.
    positions = torch.nonzero(mask).squeeze(1)
    return ReferenceDelta(values=values[positions].clone(), positions=positions.to(torch.int32 if coords.numel < 2**31 else torch.int64))
