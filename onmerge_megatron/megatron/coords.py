"""Global coordinates of Megatron parameters, read from their checkpoint (ShardedTensor) metadata.

A megatron-core parameter on one rank is a tensor-parallel block of a checkpoint tensor, possibly
one layer of a layer-stacked tensor, and possibly made of several blocks (gated-MLP ``linear_fc1``
holds ``[gate_r; up_r]``, two blocks of the global ``[gate; up]``). Fused QKV is already stored in
the checkpoint's own (interleaved per query group) order, so its TP split is one block. The model's
``sharded_state_dict()`` describes exactly this: every ShardedTensor names a checkpoint key and
places its data (a view of the parameter) at ``global_offset`` in ``global_shape``, with
``prepend_axis_num`` leading singleton axes for the layer (and expert) index. Those indices are
folded into the tensor name (``key[layer]``), the rest gives global coordinates.

Masks are keyed on (key, global index), so the same element gets the same mask for every TP/PP/DP
layout and for a single-process run of the same model: nothing here depends on local indices.

Nothing is special-cased by layer type: ShardedTensorFactories (gated fc1 and any other) are
built and their pieces are matched to the parameter by storage offset. This is what keeps the
code working across megatron-core releases that change how a layer is sharded.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..merging.coords import Block, ShardCoords


@dataclass(frozen=True)
class ParamCoords:
    """Where a (TP-local, full) model parameter sits in its checkpoint tensor."""

    key: str
    """Tensor name: checkpoint key, with ``[layer]`` for layer-stacked keys (see ``tensor_name``)."""
    global_shape: tuple[int, ...]
    """Shape of the whole (unsharded) tensor of one layer."""
    blocks: tuple[Block, ...]
    """Row-major blocks of the global tensor tiling the local parameter, in storage order."""

    def shard(self, start: int = 0, end: int | None = None) -> ShardCoords:
        """Coordinates of elements ``[start, end)`` of the flattened local parameter."""
        numel = sum(block.numel for block in self.blocks)
        return ShardCoords(self.global_shape, self.blocks, start, numel if end is None else end)


@dataclass
class MainShard:
    """One fp32 main param of an inner optimizer and where its elements live."""

    main_param: torch.Tensor
    """The tensor the inner optimizer steps (flat for the distributed optimizer)."""
    model_param: torch.Tensor
    """The TP-local model parameter it belongs to."""
    start: int
    end: int
    """Range of ``model_param.view(-1)`` held by ``main_param``."""
    param_coords: ParamCoords

    @property
    def name(self) -> str:
        return self.param_coords.key

    @property
    def coords(self) -> ShardCoords:
        return self.param_coords.shard(self.start, self.end)


_WRAPPERS = ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel", "TorchFullyShardedDataParallel")


def unwrap_model_chunk(chunk: Any) -> Any:
    """The MegatronModule under DDP / Float16Module wrappers (looked up by class name)."""
    while type(chunk).__name__ in _WRAPPERS and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def iter_sharded_tensors(tree: Any) -> Iterator[Any]:
    """Every ShardedTensor of a (nested) sharded state dict, factories built."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(tree, dict):
        for value in tree.values():
            yield from iter_sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from iter_sharded_tensors(value)
    elif isinstance(tree, ShardedTensorFactory):
        yield from iter_sharded_tensors(tree.build())
    elif isinstance(tree, ShardedTensor):
        yield tree


def tensor_name(sh: Any) -> str:
    """The name masks are keyed on: the checkpoint key, plus ``[i]`` (``[i,j]``) for the layer
    (and expert) index of layer-stacked keys.

    The prepended axes are folded into the name rather than the shape so that a "tensor" is one
    layer's weight, as in the reference implementation (OnTIES top-p per parameter tensor), while
    staying independent of the pipeline layout (the index is the global layer number).
    """
    if not sh.prepend_axis_num:
        return sh.key
    index = ",".join(str(int(o)) for o in sh.global_offset[: sh.prepend_axis_num])
    return f"{sh.key}[{index}]"


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def param_coords(model_chunks: Iterable[Any], params: Iterable[torch.Tensor] | None = None) -> dict[torch.Tensor, ParamCoords]:
    """Map each parameter (by identity) of the given model chunks to its checkpoint coordinates.

    Raises if a trainable parameter is not covered by the chunks' ``sharded_state_dict()``: a
    merge without global coordinates would draw layout-dependent masks, silently.
    """
    by_storage: dict[int, list[tuple[int, int, Any]]] = {}
    wanted: list[torch.Tensor] = []
    for chunk in model_chunks:
        model = unwrap_model_chunk(chunk)
        state = model.sharded_state_dict()
        for sh in iter_sharded_tensors(state):
            if sh.data is None or getattr(sh, "flattened_range", None) is not None:
                continue
            lo, hi = _storage_span(sh.data)
            by_storage.setdefault(sh.data.untyped_storage().data_ptr(), []).append((lo, hi, sh))
        if params is None:
            wanted.extend(p for p in model.parameters() if p.requires_grad)
    if params is not None:
        wanted = list(params)

    for spans in by_storage.values():
        spans.sort(key=lambda x: (x[0], x[1]))
    starts = {ptr: [lo for lo, _, _ in spans] for ptr, spans in by_storage.items()}

    result: dict[torch.Tensor, ParamCoords] = {}
    for param in wanted:
        if param in result:
            continue
        p_lo, p_hi = _storage_span(param)
        ptr = param.untyped_storage().data_ptr()
        spans = by_storage.get(ptr, [])
        pieces = []
        # DDP puts every parameter in one buffer: find the pieces inside this one by bisection.
        for lo, hi, sh in spans[bisect.bisect_left(starts.get(ptr, []), p_lo) :]:
            if lo >= p_hi:
                break
            if hi <= p_hi and sh.data.dtype == param.dtype and sh.data.is_contiguous():
                pieces.append(((lo - p_lo) // param.element_size(), sh))
        # A piece may appear twice (the same tensor listed under two keys, e.g. tied weights on
        # the last pipeline stage); keep one per storage offset, preferring the first.
        unique: dict[int, Any] = {}
        for local_start, sh in sorted(pieces, key=lambda x: x[0]):
            unique.setdefault(local_start, sh)
        pieces = sorted(unique.items())
        covered = sum(sh.data.numel() for _, sh in pieces)
        if not pieces or covered != param.numel():
            raise ValueError(
                f"online merge: no checkpoint (ShardedTensor) coordinates cover parameter of shape "
                f"{tuple(param.shape)} (found {covered} of {param.numel()} elements); every trained "
                f"parameter must appear in the model's sharded_state_dict() so that masks use global "
                f"coordinates"
            )
        names = {tensor_name(sh) for _, sh in pieces}
        shapes = {tuple(sh.global_shape[sh.prepend_axis_num :]) for _, sh in pieces}
        if len(names) != 1 or len(shapes) != 1:
            raise ValueError(f"online merge: parameter of shape {tuple(param.shape)} maps to several checkpoint tensors {sorted(names)}")
        blocks = []
        for local_start, sh in pieces:
            if math.prod(sh.local_shape) != sh.data.numel():
                raise ValueError(
                    f"online merge: checkpoint entry {sh.key!r} describes {tuple(sh.local_shape)} but holds "
                    f"{tuple(sh.data.shape)}; its global coordinates cannot be trusted"
                )
            offset = tuple(int(o) for o in sh.global_offset[sh.prepend_axis_num :])
            blocks.append(Block(local_start, tuple(sh.local_shape), offset))
        result[param] = ParamCoords(names.pop(), shapes.pop(), tuple(blocks))
    return result


def sharded_entries(model_chunks: Iterable[Any]) -> dict[torch.Tensor, Any]:
    """Each parameter's top-level entry (ShardedTensor or ShardedTensorFactory) in the model's
    ``sharded_state_dict()``: what ``dist_checkpointing.load`` needs to read that parameter, in
    this layout, from any checkpoint of the same model (after ``dataclasses.replace(entry, data=...)``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: dict[torch.Tensor, Any] = {}
    for chunk in model_chunks:
        model = unwrap_model_chunk(chunk)
        by_span: dict[tuple[int, int, tuple[int, ...]], Any] = {}

        def visit(tree: Any) -> None:
            if isinstance(tree, dict):
                for value in tree.values():
                    visit(value)
            elif isinstance(tree, (list, tuple)):
                for value in tree:
                    visit(value)
            elif isinstance(tree, (ShardedTensor, ShardedTensorFactory)) and tree.data is not None:
                by_span.setdefault((tree.data.data_ptr(), tree.data.numel(), tuple(tree.data.shape)), tree)

        visit(model.sharded_state_dict())
        for param in model.parameters():
            entry = by_span.get((param.data_ptr(), param.numel(), tuple(param.shape)))
            if entry is not None:
                out.setdefault(param, entry)
    return out
