"""Merge state in megatron-core dist checkpoints, reshardable across TP, PP and DP.

What is saved (under ``online_merge`` in the optimizer's sharded state dict): the engine's merge
state in global form (``OnlineMergingAdamW.export_merge_state``: per segment, one dense fp32
vector per ``merge_state_keys()`` name: the step-K accumulator, the reference delta as the engine
keeps it and its keep-mask, or the whole delta when its mask is redrawn, the EMA weights), so a
resume needs neither the base nor the SFT weights; and as common values the step counter and the
merge settings (checked at load). Each main param is one segment of the engine.

Each tensor is saved like the model parameter it belongs to: the parameter's own ShardedTensor
(or ShardedTensorFactory, e.g. gated fc1) from ``model.sharded_state_dict()`` with the key
prefixed and the data replaced by the state, assembled to the full TP-local shape from the DP
pieces. dist_checkpointing then reshards it for any TP/PP layout, and each DP rank slices its own
range at load. The assembly is a sum over the DP group at save time only (never on the step path).

megatron's own optimizer (de)serialization knows only Adam's keys (``fully_reshardable`` even
raises on others), so while it runs the inner optimizers present Adam's keys only
(``OnlineMergingAdamW.adam_state_only``).

``OnlineMergingOptimizer`` (optimizer.py) calls these from its ``sharded_state_dict``,
``load_state_dict`` and ``state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Protocol

import torch

from ..merging.config import MergeCheckpointError, OnlineMergeConfig, check_compatible
from ..merging.state import exported_keys
from . import compat
from .coords import MainShard, sharded_entries, unwrap_model_chunk

PREFIX = "online_merge"


class MergeTargets(Protocol):
    """What the merge state is read from and written to (``OnlineMergingOptimizer`` is one)."""

    merge_config: OnlineMergeConfig
    model_chunks: list[Any]
    megatron_optimizers: list[Any]
    """The sub-optimizers that merge (DistributedOptimizer, Float16/FP32 optimizers)."""
    inner_optimizers: list[Any]
    """Their inner (online-merging) optimizers, same order."""
    shards: list[list[MainShard]]
    """Main shards per sub-optimizer."""


@contextlib.contextmanager
def hidden_merge_state(targets: MergeTargets, keep_adam_state: bool = False) -> Iterator[None]:
    """Present Adam's keys only in the inner optimizers' state while megatron (de)serializes it.
    ``keep_adam_state``: leave the fresh Adam state presented for params that have not stepped in
    place (loading: megatron fills it from the checkpoint)."""
    with contextlib.ExitStack() as stack:
        for inner in targets.inner_optimizers:
            stack.enter_context(inner.adam_state_only(keep_placeholders=keep_adam_state))
        yield


def _params_in_order(targets: MergeTargets) -> list[tuple[torch.Tensor, Any, Any]]:
    """(model param, its sharded entry, owning megatron sub-optimizer) for every trained param of
    the local model chunks, in the same order on every rank of a DP group."""
    entries = sharded_entries(targets.model_chunks)
    out = []
    for chunk in targets.model_chunks:
        for param in unwrap_model_chunk(chunk).parameters():
            if not param.requires_grad or param not in entries:
                continue
            owner = next((opt for opt, shards in zip(targets.megatron_optimizers, targets.shards) if trained_by(opt, param, shards)), None)
            if owner is not None:
                out.append((param, entries[param], owner))
    return out


def trained_by(opt: Any, param: torch.Tensor, shards: list[MainShard]) -> bool:
    """Whether ``param`` is trained by ``opt`` on any DP rank (a distributed optimizer's DP rank may
    own none of it; other optimizers hold their params whole on every rank: this rank's ``shards``)."""
    on_some_rank = compat.trains_on_some_rank(opt, param)
    if on_some_rank is not None:
        return on_some_rank
    return any(param is shard.model_param for shard in shards)


def _shard_index(targets: MergeTargets) -> dict[torch.Tensor, tuple[Any, MainShard]]:
    index = {}
    for inner, shards in zip(targets.inner_optimizers, targets.shards):
        for shard in shards:
            index[shard.model_param] = (inner, shard)
    return index


def merge_sharded_state_dict(targets: MergeTargets, is_loading: bool = False) -> dict[str, Any]:
    """The merge state as a sharded state dict (tensors are allocated, not filled, when loading)."""
    import torch.distributed as dist

    config = targets.merge_config
    keys = exported_keys(config)
    index = _shard_index(targets)
    tensors: dict[str, Any] = {}
    for order, (param, entry, owner) in enumerate(_params_in_order(targets)):
        full = torch.zeros(len(keys), param.numel(), device=param.device)
        if not is_loading:
            found = index.get(param)
            if found is not None:
                inner, shard = found
                (piece,) = inner.export_merge_state(shard.main_param)  # one segment per main param
                for row, key in enumerate(keys):
                    full[row, shard.start : shard.end] = piece[key]
            group = compat.data_parallel_group(owner)
            if group is not None and dist.get_world_size(group) > 1:
                # DP ranges are disjoint: the sum assembles the TP-local tensor (save time only).
                dist.all_reduce(full, group=group)
        for row, key in enumerate(keys):
            data = full[row].view(param.shape)
            fields: dict[str, Any] = {"key": f"{PREFIX}.{key}.{entry.key}", "data": data}
            if hasattr(entry, "dtype") and not hasattr(entry, "build_fn"):
                fields["dtype"] = torch.float32
            tensors[f"{key}|{order}"] = dataclasses.replace(entry, **fields)
    common = {"config": config.to_dict(), "step": _current_step(targets), "keys": keys}
    return {"tensors": tensors, "common": common}


def _current_step(targets: MergeTargets) -> int:
    steps = {inner.steps_taken() for inner in targets.inner_optimizers}
    if len(steps) > 1:
        raise MergeCheckpointError(f"online merge: the inner optimizers disagree on the step counter ({sorted(steps)})")
    return steps.pop() if steps else 0


def load_merge_state(targets: MergeTargets, loaded: dict[str, Any]) -> None:
    """Put loaded merge state (``merge_sharded_state_dict(is_loading=True)`` after
    ``dist_checkpointing.load``) into the inner optimizers, for this rank's shards."""
    common = loaded["common"]
    saved = OnlineMergeConfig.from_dict(common["config"], where="checkpoint's online merge config")
    check_compatible(saved, targets.merge_config)
    keys = list(common["keys"])
    index = _shard_index(targets)
    step = int(common["step"])
    for order, (param, _, _) in enumerate(_params_in_order(targets)):
        found = index.get(param)
        if found is None:
            continue
        inner, shard = found
        piece = {k: loaded["tensors"][f"{k}|{order}"].reshape(-1)[shard.start : shard.end].float() for k in keys}
        inner.import_merge_state(shard.main_param, [piece], step)


def complete_engine_state(targets: MergeTargets) -> None:
    """After megatron restored Adam's state, add what the engine would have created at its first
    step (the step-K accumulator, the EMA weights) where the checkpoint did not provide it."""
    for inner in targets.inner_optimizers:
        inner.complete_merge_state()
