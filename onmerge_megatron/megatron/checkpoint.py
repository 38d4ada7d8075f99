"""Merge state in megatron-core dist checkpoints, reshardable across TP, PP and DP.

What is saved (under ``online_merge`` in the optimizer's sharded state dict):
- ``merge_accumulator``: the step-K accumulator (merge_every > 1);
- ``reference``/``reference_mask``: the reference delta as the engine keeps it (the kept,
  rescaled and clamped values, zero elsewhere) and its keep-mask, so a resume needs neither the
  base nor the SFT weights (the policy has moved on from the SFT weights by then);
- ``reference_delta``: the whole delta instead, when its mask is redrawn every merge;
- ``weight_ema``: the EMA baseline's weights, if enabled;
- common values: the step counter and the merge settings (checked at load).

Each tensor is saved like the model parameter it belongs to: the parameter's own ShardedTensor
(or ShardedTensorFactory, e.g. gated fc1) from ``model.sharded_state_dict()`` with the key
prefixed and the data replaced by the state, assembled to the full TP-local shape from the DP
pieces. dist_checkpointing then reshards it for any TP/PP layout, and each DP rank slices its own
range at load. The assembly is a sum over the DP group at save time only (never on the step path).

megatron's own optimizer (de)serialization knows only Adam's keys (``fully_reshardable`` even
raises on others), so while it runs the merge keys are hidden from the inner optimizer's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..merging.config import MergeCheckpointError, OnlineMergeConfig, check_compatible

if TYPE_CHECKING:
    from .optimizer import MainShard, OnlineMergingHandle

logger = logging.getLogger(__name__)

PREFIX = "online_merge"
ADAM_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})


def _state_keys(config: OnlineMergeConfig) -> list[str]:
    keys = []
    if config.merges and config.merge_every > 1:
        keys.append("merge_accumulator")
    if config.needs_reference:
        keys += ["reference_delta"] if config.reference_mask == "resampled" else ["reference", "reference_mask"]
    if config.weight_ema > 0:
        keys.append("weight_ema")
    return keys


@contextlib.contextmanager
def hidden_merge_state(handle: "OnlineMergingHandle", keep_adam_state: bool = False) -> Iterator[None]:
    """Take every non-Adam key out of the inner optimizers' state while megatron (de)serializes it.

    Keys are put back afterwards into whatever state dict then belongs to the param (megatron's
    load replaces the inner optimizer's state dicts). ``keep_adam_state``: leave the fresh Adam
    state presented to megatron in place (loading: megatron fills it from the checkpoint).
    """
    stash: list[tuple[Any, torch.Tensor, dict[str, Any]]] = []
    placeholders: list[tuple[Any, torch.Tensor, str, torch.Tensor]] = []
    for inner in handle.inner_optimizers:
        for param, state in list(inner.state.items()):
            extra = {k: state.pop(k) for k in list(state) if k not in ADAM_KEYS}
            if extra:
                stash.append((inner, param, extra))
        # Before the first step torch's AdamW has no state, and megatron's state_dict() (torch
        # path) reads a per-param 'step' from every entry and needs at least one. Present a
        # fresh Adam state while megatron runs; the engine creates its own at the first step.
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" in state:
                    continue
                for key, value in (("step", torch.tensor(0.0)), ("exp_avg", torch.zeros_like(param)), ("exp_avg_sq", torch.zeros_like(param))):
                    if key not in state:
                        state[key] = value
                        placeholders.append((inner, param, key, value))
    try:
        yield
    finally:
        for inner, param, key, value in [] if keep_adam_state else placeholders:
            state = inner.state[param]
            if state.get(key) is value:  # untouched: take it back out
                del state[key]
        for inner, param, extra in stash:
            state = inner.state[param]
            for key, value in extra.items():
                state.setdefault(key, value)
            _forget_reference_views(inner, param)


@contextlib.contextmanager
def without_step_state(inner: Any) -> Iterator[None]:
    """Hide the per-param ``step`` of a torch-style Adam while megatron's ``fully_reshardable`` load
    runs: it copies every state key from the checkpoint's tensors, which hold no ``step`` (that
    comes from the param groups), and would raise KeyError('step'). TE/apex FusedAdam keep
    ``step`` in the param group, which is why megatron does not hit this on GPUs."""
    steps = {}
    for param, state in inner.state.items():
        if "step" in state:
            steps[param] = state.pop("step")
    try:
        yield
    finally:
        for param, step in steps.items():
            inner.state[param].setdefault("step", step)


def patch_fully_reshardable_load(opt: Any) -> None:
    """Apply ``without_step_state`` around a DistributedOptimizer's fully_reshardable load (instance)."""
    fn = getattr(opt, "load_parameter_state_from_fully_reshardable", None)
    if fn is None or getattr(fn, "__onmerge_step__", False):
        return

    def load(state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        with without_step_state(opt.optimizer):
            return fn(state_dict, *args, **kwargs)

    load.__onmerge_step__ = True  # type: ignore[attr-defined]
    opt.load_parameter_state_from_fully_reshardable = load


def _forget_reference_views(inner: Any, param: torch.Tensor) -> None:
    # The engine caches per-segment views of the reference state; they are rebuilt after the
    # state tensors are replaced.
    if hasattr(inner, "reference_state_changed"):
        inner.reference_state_changed(param)


def _dp_group_of(opt: Any) -> Any:
    if hasattr(opt, "_get_model_param_range_map"):
        return getattr(opt, "data_parallel_group", None)
    return None  # Float16/FP32 optimizers: every DP rank holds whole params


def _params_in_order(handle: "OnlineMergingHandle") -> list[tuple[torch.Tensor, Any, Any]]:
    """(model param, its sharded entry, owning megatron sub-optimizer) for every trained param of
    the local model chunks, in the same order on every rank of a DP group."""
    from .coords import sharded_entries, unwrap_model_chunk

    entries = sharded_entries(handle.model_chunks)
    out = []
    for chunk in handle.model_chunks:
        for param in unwrap_model_chunk(chunk).parameters():
            if not param.requires_grad or param not in entries:
                continue
            owner = None
            for opt in handle.megatron_optimizers:
                if _optimizer_holds(handle, opt, param):
                    owner = opt
                    break
            if owner is not None:
                out.append((param, entries[param], owner))
    return out


def _optimizer_holds(handle: "OnlineMergingHandle", opt: Any, param: torch.Tensor) -> bool:
    """Whether ``param`` is trained by ``opt`` on any DP rank (a DP rank may own none of it)."""
    buffers = getattr(opt, "buffers", None)
    if buffers is not None and hasattr(opt, "_get_model_param_range_map"):
        return any(param in buffer.param_index_map for buffer in buffers)
    return any(param is s.model_param for s in _shards_of(handle, opt))


def _shards_of(handle: "OnlineMergingHandle", opt: Any) -> list["MainShard"]:
    return handle.shards[handle.megatron_optimizers.index(opt)]


def _shard_index(handle: "OnlineMergingHandle") -> dict[torch.Tensor, tuple[Any, "MainShard"]]:
    index = {}
    for inner, shards in zip(handle.inner_optimizers, handle.shards):
        for shard in shards:
            index[shard.model_param] = (inner, shard)
    return index


def _shard_state(inner: Any, shard: "MainShard", key: str, config: OnlineMergeConfig) -> torch.Tensor:
    """This shard's piece of a saved state tensor (dense, fp32, shard.end - shard.start elements)."""
    numel = shard.end - shard.start
    state = inner.state.get(shard.main_param, {})
    if key in ("merge_accumulator", "weight_ema", "reference_delta"):
        value = state.get(key)
        if value is None:
            if key == "reference_delta":
                raise MergeCheckpointError(f"online merge: no reference delta set for {shard.name!r}; nothing to save")
            # Before the first step the engine has not created it yet: zeros / current weights.
            return torch.zeros(numel) if key == "merge_accumulator" else shard.main_param.detach().reshape(-1).float().clone()
        return value.detach().reshape(-1).float()
    positions = _reference_positions(inner, shard, config)
    if key == "reference_mask":
        out = torch.zeros(numel)
        out[positions] = 1.0
        return out
    values = state["reference_values"].detach().float()
    out = torch.zeros(numel)
    out[positions] = values
    return out


def _reference_positions(inner: Any, shard: "MainShard", config: OnlineMergeConfig) -> torch.Tensor:
    state = inner.state.get(shard.main_param, {})
    if "reference_values" not in state:
        raise MergeCheckpointError(f"online merge: no reference delta set for {shard.name!r}; nothing to save")
    if "reference_positions" in state:
        return state["reference_positions"].to(torch.int64)
    from ..merging.reference import reference_positions

    return reference_positions(config, shard.name, shard.coords, 0)


def merge_sharded_state_dict(handle: "OnlineMergingHandle", is_loading: bool = False) -> dict[str, Any]:
    """The merge state as a sharded state dict (tensors are allocated, not filled, when loading)."""
    import torch.distributed as dist

    config = handle.config
    keys = _state_keys(config)
    index = _shard_index(handle)
    tensors: dict[str, Any] = {}
    for order, (param, entry, owner) in enumerate(_params_in_order(handle)):
        numel = param.numel()
        full = torch.zeros(len(keys), numel)
        if not is_loading:
            found = index.get(param)
            if found is not None:
                inner, shard = found
                for row, key in enumerate(keys):
                    full[row, shard.start : shard.end] = _shard_state(inner, shard, key, config)
            group = _dp_group_of(owner)
            if group is not None and dist.get_world_size(group) > 1:
                # DP ranges are disjoint: the sum assembles the TP-local tensor (save time only).
                dist.all_reduce(full, group=group)
        for row, key in enumerate(keys):
            data = full[row].view(param.shape)
            fields: dict[str, Any] = {"key": f"{PREFIX}.{key}.{entry.key}", "data": data}
            if hasattr(entry, "dtype") and not hasattr(entry, "build_fn"):
                fields["dtype"] = torch.float32
            tensors[f"{key}|{order}"] = dataclasses.replace(entry, **fields)
    common = {"config": config.to_dict(), "step": _current_step(handle), "keys": keys}
    return {"tensors": tensors, "common": common}


def _current_step(handle: "OnlineMergingHandle") -> int:
    steps = {int(s["step"]) for inner in handle.inner_optimizers for s in inner.state.values() if "step" in s}
    if len(steps) > 1:
        raise MergeCheckpointError(f"online merge: params disagree on the step counter ({sorted(steps)})")
    return steps.pop() if steps else 0


def load_merge_state(handle: "OnlineMergingHandle", loaded: dict[str, Any]) -> None:
    """Put loaded merge state (``merge_sharded_state_dict(is_loading=True)`` after
    ``dist_checkpointing.load``) into the inner optimizers, for this rank's shards."""
    config = handle.config
    common = loaded["common"]
    saved = OnlineMergeConfig.from_dict(common["config"], where="checkpoint's online merge config")
    check_compatible(saved, config)
    keys = list(common["keys"])
    index = _shard_index(handle)
    step = int(common["step"])
    for order, (param, _, _) in enumerate(_params_in_order(handle)):
        found = index.get(param)
        if found is None:
            continue
        inner, shard = found
        state = inner.state[shard.main_param]
        piece = {k: loaded["tensors"][f"{k}|{order}"].reshape(-1)[shard.start : shard.end].float() for k in keys}
        if "merge_accumulator" in piece and config.merges and config.merge_every > 1:
            state["merge_accumulator"] = piece["merge_accumulator"].clone().view_as(shard.main_param)
        if "weight_ema" in piece and config.weight_ema > 0:
            state["weight_ema"] = piece["weight_ema"].clone().view_as(shard.main_param)
        if config.needs_reference:
            _load_reference(state, shard, piece, config, saved)
            handle.pending_reference = None  # the checkpoint's delta replaces a deferred build
        if step:
            state["step"] = torch.tensor(float(step))
        _forget_reference_views(inner, shard.main_param)


def _load_reference(state: dict, shard: "MainShard", piece: dict[str, torch.Tensor], config: OnlineMergeConfig, saved: OnlineMergeConfig) -> None:
    for stale in ("reference_values", "reference_positions", "reference_delta"):
        state.pop(stale, None)
    if config.reference_mask == "resampled":
        if "reference_delta" not in piece:
            raise MergeCheckpointError("online merge: the checkpoint holds a fixed-mask reference delta; resampling needs the whole delta")
        state["reference_values"] = torch.zeros(0)
        state["reference_delta"] = piece["reference_delta"].clone()
        return
    if "reference" not in piece:
        raise MergeCheckpointError("online merge: the checkpoint has no reference delta for a fixed mask")
    mask = piece["reference_mask"] > 0.5
    if config.method == "dare":
        # Positions are a function of (seed, name, global index): redraw them in this layout and
        # check that the checkpoint kept exactly those elements.
        from ..merging.reference import reference_positions

        positions = reference_positions(config, shard.name, shard.coords, 0)
        if int(mask.sum()) != positions.numel() or not bool(mask[positions].all()):
            raise MergeCheckpointError(
                f"online merge: the checkpoint's reference mask for {shard.name!r} is not the one this run draws "
                f"(tensor names or coordinates changed?)"
            )
        state["reference_values"] = piece["reference"][positions].clone()
    else:
        # OnTIES: the kept set was chosen once, at the first layout; keep exactly those elements.
        positions = torch.nonzero(mask).squeeze(1)
        state["reference_values"] = piece["reference"][positions].clone()
        state["reference_positions"] = positions.to(torch.int32)


def _complete_engine_state(handle: "OnlineMergingHandle") -> None:
    """After megatron restored Adam's state, add what the engine would have created at its first
    step (it does so only for params without a 'step'): the step-K accumulator (zeros) and the
    EMA weights, when the checkpoint did not provide them."""
    config = handle.config
    for inner, shards in zip(handle.inner_optimizers, handle.shards):
        for shard in shards:
            state = inner.state[shard.main_param]
            if "step" not in state:
                continue
            if config.merges and config.merge_every > 1 and "merge_accumulator" not in state:
                state["merge_accumulator"] = torch.zeros_like(shard.main_param, dtype=torch.float32)
            if config.weight_ema > 0 and "weight_ema" not in state:
                state["weight_ema"] = shard.main_param.detach().clone()


def attach_checkpointing(handle: "OnlineMergingHandle", megatron_optimizer: Any) -> None:
    """Make the megatron optimizer's ``sharded_state_dict``/``load_state_dict`` (and ``state_dict``)
    carry the merge state under ``online_merge``, so Megatron-LM's checkpoint code saves and
    restores it without changes."""

    original_sharded = megatron_optimizer.sharded_state_dict
    original_load = megatron_optimizer.load_state_dict
    original_state_dict = megatron_optimizer.state_dict

    def sharded_state_dict(model_sharded_state_dict: Any = None, is_loading: bool = False, *args: Any, **kwargs: Any) -> Any:
        with hidden_merge_state(handle, keep_adam_state=is_loading):
            if model_sharded_state_dict is None:
                state = original_sharded({}, is_loading, *args, **kwargs)
            else:
                state = original_sharded(model_sharded_state_dict, is_loading, *args, **kwargs)
        if state is None:
            state = {}
        state[PREFIX] = merge_sharded_state_dict(handle, is_loading=is_loading)
        if is_loading:
            _complete_engine_state(handle)
        return state

    def load_state_dict(state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        merge_state = state_dict.pop(PREFIX, None) if isinstance(state_dict, dict) else None
        # no_grad: megatron's dp_reshardable load copies into the main params in place, which for
        # fp32 models are views of parameters that require grad (its fully_reshardable load is
        # already decorated with no_grad).
        with hidden_merge_state(handle, keep_adam_state=True), torch.no_grad():
            result = original_load(state_dict, *args, **kwargs)
        if merge_state is not None:
            load_merge_state(handle, merge_state)
        elif handle.pending_reference is not None:
            logger.warning(
                "online merge: the checkpoint holds no online-merge state, so the reference delta will be built at the "
                "first step from the weights then, i.e. this checkpoint's, not the SFT model's"
            )
        else:
            logger.warning("online merge: the checkpoint holds no online-merge state; keeping the current one")
        _complete_engine_state(handle)
        return result

    def state_dict(*args: Any, **kwargs: Any) -> Any:
        with hidden_merge_state(handle):
            return original_state_dict(*args, **kwargs)

    for opt in handle.megatron_optimizers:
        patch_fully_reshardable_load(opt)
    megatron_optimizer.sharded_state_dict = sharded_state_dict
    megatron_optimizer.load_state_dict = load_state_dict
    megatron_optimizer.state_dict = state_dict
    megatron_optimizer._online_merge_handle = handle


