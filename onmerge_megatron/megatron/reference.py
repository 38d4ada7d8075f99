"""The reference delta (SFT minus base) for each rank's main shards, streamed tensor by tensor.

The policy starts from the SFT weights, so ``tau = theta_policy(0) - theta_base`` needs only the
base weights, read in this rank's layout one TP-local tensor at a time: never a full model copy
on one rank. The only dense copy is transient and shard-sized (this rank's part of tau, what the
engine sparsifies and then keeps only ~p of).

Sources:
- ``MegatronCheckpointBase(path)``: a base checkpoint in Megatron dist-checkpoint format (any
  TP/PP layout; megatron's ``dist_checkpointing.load`` reshards). Reads use the model's own
  ShardedTensor entries, so fused QKV and gated fc1 come out in this rank's layout.
- ``HuggingFaceBase(path)``: a Hugging Face base checkpoint, converted to Megatron layout by
  mbridge (see ``hf.py`` for why mbridge).
- a callable ``(name, coords) -> 1-D tensor`` of tau at those global elements.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..merging.coords import ShardCoords

if TYPE_CHECKING:
    from .optimizer import MainShard, OnlineMergingHandle

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str, int], None]
"""progress(done, total, key, nbytes_so_far)."""


def log_progress(source: str) -> Progress:
    started = time.monotonic()
    last = [0.0]

    def report(done: int, total: int, key: str, nbytes: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 5.0 or done == 1:
            last[0] = now
            logger.info(
                "online merge: reference delta %d/%d tensors (%.1f MB) from %s, %.0fs, last %s",
                done, total, nbytes / 2**20, source, now - started, key,
            )

    return report


class BaseWeightsSource:
    """Base weights in this rank's layout, one TP-local model parameter at a time."""

    description = "base weights"

    def iter_base(self, handle: "OnlineMergingHandle", params: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (model_param, base tensor of the same TP-local shape) for each of ``params``."""
        raise NotImplementedError


class MegatronCheckpointBase(BaseWeightsSource):
    """Base weights from a Megatron dist checkpoint (e.g. the pre-trained model the SFT started from).

    ``key_prefix`` is prepended to the model's checkpoint keys (Megatron-LM's training checkpoints
    hold the model under no prefix; a checkpoint written with model chunks under ``model0.`` etc.
    needs it). Reading is collective: every rank takes part in the same number of
    ``dist_checkpointing.load`` calls, each reading one tensor (or nothing). The checkpoint's
    tensor shapes are checked against the model's (from its metadata) before anything is read.
    """

    def __init__(self, path: str, key_prefix: str = "") -> None:
        self.path = str(path)
        self.key_prefix = key_prefix
        self.description = f"Megatron checkpoint {self.path}"

    def iter_base(self, handle: "OnlineMergingHandle", params: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace

        from .coords import sharded_entries

        entries = sharded_entries(handle.model_chunks)
        missing = [tuple(p.shape) for p in params if p not in entries]
        if missing:
            raise ValueError(f"online merge: {len(missing)} parameter(s) have no sharded_state_dict entry to read from {self.path}: shapes {missing[:5]}")
        # The whole local model, not only the params this rank steps: data-parallel ranks then agree.
        self._check_shapes(list(entries.values()))
        rounds = torch.tensor([len(params)], dtype=torch.int64)
        if dist.is_initialized():
            # Setup only (not the step path): ranks hold different numbers of params.
            dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        for i in range(int(rounds)):
            request: dict[str, Any] = {}
            if i < len(params):
                param = params[i]
                entry = entries[param]
                # fp32 whatever the model's dtype: tau is taken against the fp32 main params, and a
                # bf16 model should not round an fp32 base.
                target = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                fields: dict[str, Any] = {"data": target}
                if hasattr(entry, "dtype") and not hasattr(entry, "build_fn"):
                    fields["dtype"] = torch.float32
                if self.key_prefix:
                    fields["key"] = self.key_prefix + entry.key
                entry = dataclasses.replace(entry, **fields)
                # Factories are built here rather than by `load`, so that their pieces can be requested
                # without layer axes too; `merge_fn` is what `load` would apply afterwards.
                built = entry.build() if hasattr(entry, "build_fn") else entry
                request["base"] = dict_list_map_outplace(_layer_axes_as_dims, built)
            loaded = dist_checkpointing.load(request, self.path, validate_access_integrity=False)
            if i < len(params):
                pieces = _with_local_shapes(loaded["base"], built)
                yield params[i], entry.merge_fn(pieces) if hasattr(entry, "build_fn") else pieces

    def _check_shapes(self, entries: list[Any]) -> None:
        """Refuse, before any weight is read, a checkpoint whose tensors are not the model's."""
        from megatron.core import dist_checkpointing

        from .coords import iter_sharded_tensors

        saved = dist_checkpointing.load_tensors_metadata(self.path)
        for entry in entries:
            for sh in iter_sharded_tensors(entry):
                key = self.key_prefix + sh.key
                if key not in saved:
                    near = sorted(k for k in saved if k.endswith(sh.key) or sh.key.endswith(k))
                    raise ValueError(
                        f"online merge: the base checkpoint {self.path} has no tensor {key!r}"
                        + (f" (it has {near[:3]}: a key_prefix?)" if near else "")
                    )
                have, want = tuple(saved[key].global_shape), tuple(sh.global_shape)
                if have != want:
                    layers = sh.prepend_axis_num and have[: sh.prepend_axis_num] != want[: sh.prepend_axis_num]
                    raise ValueError(
                        f"online merge: tensor {key!r} is {have} in the base checkpoint {self.path} but {want} in "
                        f"the model ("
                        + (f"{have[0]} layers in the base, {want[0]} in the model" if layers else differing_dims(have, want))
                        + "); the base must be a checkpoint of the same architecture"
                    )


def differing_dims(have: tuple[int, ...], want: tuple[int, ...]) -> str:
    if len(have) != len(want):
        return f"{len(have)} dimensions in the base, {len(want)} in the model"
    return ", ".join(f"dimension {d}: {a} in the base, {b} in the model" for d, (a, b) in enumerate(zip(have, want)) if a != b)


def _layer_axes_as_dims(sh: Any) -> Any:
    """The same request with a layer-stacked key's layer (and expert) axes as ordinary axes of length 1.

    megatron-core hands a ShardedTensor with prepended axes to torch as a ShardedTensor whose
    fragments missing from the request are placed on rank ``(rank + 1) % world_size``: on this
    rank itself in a 1-process run, which then has fewer local shards than its metadata says.
    One layer of a stacked key is such a request. Without prepended axes, dist_checkpointing
    reads the request as an arbitrary chunk of the saved tensor, at any world size.
    """
    if not sh.prepend_axis_num:
        return sh
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return dataclasses.replace(sh, data=sh.data.view(shape), local_shape=shape, prepend_axis_num=0)


def _with_local_shapes(loaded: Any, request: Any) -> Any:
    """``loaded`` (a tree like ``request``) with every tensor in its request's local shape."""
    if isinstance(request, dict):
        return {k: _with_local_shapes(loaded[k], v) for k, v in request.items()}
    if isinstance(request, (list, tuple)):
        return [_with_local_shapes(got, want) for got, want in zip(loaded, request)]
    return loaded.reshape(request.local_shape)


def _policy_minus_base(handle: "OnlineMergingHandle", source: BaseWeightsSource, progress: Progress | None) -> list[dict]:
    """Per inner optimizer: {(name, coords): tau of that shard} with tau = main param (SFT) - base."""
    shards_by_model: dict[torch.Tensor, list[tuple[int, "MainShard"]]] = {}
    for index, shards in enumerate(handle.shards):
        for shard in shards:
            shards_by_model.setdefault(shard.model_param, []).append((index, shard))
    params = list(shards_by_model)
    tables: list[dict] = [{} for _ in handle.shards]
    nbytes = 0
    for done, (model_param, base) in enumerate(source.iter_base(handle, params), start=1):
        if tuple(base.shape) != tuple(model_param.shape):
            raise ValueError(
                f"online merge: base tensor for {shards_by_model[model_param][0][1].name!r} has shape "
                f"{tuple(base.shape)}, the model's is {tuple(model_param.shape)}"
            )
        flat = base.reshape(-1)
        for index, shard in shards_by_model[model_param]:
            policy = shard.main_param.detach().reshape(-1).to(torch.float32)
            delta = policy - flat[shard.start : shard.end].to(torch.float32)
            tables[index][(shard.name, shard.coords)] = delta
        nbytes += base.numel() * base.element_size()
        del base, flat
        if progress is not None:
            progress(done, len(params), shards_by_model[model_param][0][1].name, nbytes)
    return tables


def reference_delta_fns(handle: "OnlineMergingHandle", source: Any, progress: bool | Progress = True) -> list[Callable[[str, ShardCoords], torch.Tensor]]:
    """Per sub-optimizer of ``handle``, the ``delta_fn`` of its shards. Base weights are read (and
    checked) now, from ``handle.shards`` alone, so this can run before any optimizer is changed."""
    report: Progress | None
    if callable(progress):
        report = progress
    else:
        report = log_progress(getattr(source, "description", type(source).__name__)) if progress else None
    if isinstance(source, BaseWeightsSource):
        fns = []
        for table in _policy_minus_base(handle, source, report):

            def lookup(name: str, coords: ShardCoords, table: dict = table) -> torch.Tensor:
                try:
                    return table[(name, coords)]
                except KeyError:
                    raise KeyError(f"online merge: no reference delta computed for {name!r} {coords}") from None

            fns.append(lookup)
        return fns
    if callable(source):
        return [source] * len(handle.shards)
    raise TypeError(
        f"online merge: reference_delta_source must be a MegatronCheckpointBase, HuggingFaceBase or a "
        f"callable (name, coords) -> tensor, got {type(source).__name__}"
    )


def build_reference_deltas(handle: "OnlineMergingHandle", source: Any, progress: bool | Progress = True) -> None:
    """Give every inner optimizer its shards' reference delta."""
    for inner, delta_fn in zip(handle.inner_optimizers, reference_delta_fns(handle, source, progress)):
        inner.set_reference_delta(delta_fn=delta_fn)
