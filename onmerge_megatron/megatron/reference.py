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
from typing import Any, Callable, Iterator, Sequence

import torch

from ..merging.coords import ShardCoords
from .coords import MainShard, iter_sharded_tensors, sharded_entries

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

    def iter_base(self, model_chunks: Sequence[Any], params: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (model_param, base tensor of the same TP-local shape) for each of ``params``, which
        are parameters of ``model_chunks``."""
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

    def iter_base(self, model_chunks: Sequence[Any], params: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace

        entries = sharded_entries(model_chunks)
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


class ShardBase:
    """The base weights of this rank's main shards, as the engine's weight source
    (`merging.sources.WeightSource`): the optimizers' reference delta is then their main params
    (the SFT weights, before the first step) minus this.

    A BaseWeightsSource's reads are collective, so everything is read in one pass by `prepare`, in
    lockstep with the other ranks, and kept shard-sized (this rank's part of the base, what today's
    dense tau would be) until `read` hands it over. A source given as a callable
    ``(name, coords) -> tau`` is not a base: see `reference_delta`."""

    def __init__(self, source: BaseWeightsSource, shards: list[MainShard], model_chunks: Sequence[Any], progress: bool | Progress = True) -> None:
        self.where = f"the base weights ({source.description})"
        self._source, self._shards, self._chunks = source, shards, list(model_chunks)
        self._progress = progress if callable(progress) else (log_progress(source.description) if progress else None)
        self._shapes = {shard.name: tuple(shard.param_coords.global_shape) for shard in shards}
        self._pieces: dict[tuple[str, ShardCoords], torch.Tensor] | None = None

    def prepare(self, requests: Any = ()) -> None:
        """Read this rank's shards of the base (once; collective the first time, on every rank)."""
        if self._pieces is not None:
            return
        by_model: dict[torch.Tensor, list[MainShard]] = {}
        for shard in self._shards:
            by_model.setdefault(shard.model_param, []).append(shard)
        params = list(by_model)
        pieces: dict[tuple[str, ShardCoords], torch.Tensor] = {}
        nbytes = 0
        for done, (model_param, base) in enumerate(self._source.iter_base(self._chunks, params), start=1):
            if tuple(base.shape) != tuple(model_param.shape):
                raise ValueError(
                    f"online merge: base tensor for {by_model[model_param][0].name!r} has shape "
                    f"{tuple(base.shape)}, the model's is {tuple(model_param.shape)}"
                )
            flat = base.reshape(-1)
            for shard in by_model[model_param]:
                pieces[(shard.name, shard.coords)] = flat[shard.start : shard.end].to(torch.float32).clone()
            nbytes += base.numel() * base.element_size()
            del base, flat
            if self._progress is not None:
                self._progress(done, len(params), by_model[model_param][0].name, nbytes)
        self._pieces = pieces

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, coords: ShardCoords) -> torch.Tensor:
        self.prepare()
        try:
            return self._pieces.pop((name, coords))  # read once: freed as the engine takes it
        except KeyError:
            raise KeyError(f"online merge: no base weights read for {name!r} {coords}") from None


def reference_source(source: Any, shards: list[MainShard], model_chunks: Sequence[Any], progress: bool | Progress = True) -> dict[str, Any]:
    """The keyword arguments of ``OnlineMergingAdamW.set_reference_delta`` for a reference source
    (``install_online_merging``'s ``reference_delta_source``): a base, read now (so that a bad base
    is refused before anything changes), or a callable giving tau itself."""
    if isinstance(source, BaseWeightsSource):
        base = ShardBase(source, shards, model_chunks, progress)
        base.prepare()
        return {"base": base}
    if callable(source):
        return {"delta_fn": source}
    raise TypeError(
        f"online merge: reference_delta_source must be a MegatronCheckpointBase, HuggingFaceBase or a "
        f"callable (name, coords) -> tensor, got {type(source).__name__}"
    )
