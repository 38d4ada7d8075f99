"""Where the weights behind the reference delta come from: the one protocol every adapter uses.

The reference delta of a segment is ``reference - base`` at the segment's elements. Every
framework asks for it the same way, by a tensor's name and the segment's global coordinates
(`ShardCoords`), so a rank reads only what it owns: a safetensors checkpoint is read block by
block, never as a full copy of the model. A `WeightSource` answers such reads; this module has the
in-memory one (state dicts, modules) and the Hugging Face safetensors one. A framework's own
checkpoint format is one more implementation of the same protocol, kept in its adapter
(`megatron.reference.MegatronCheckpointBase`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from .coords import ShardCoords

NameMap = Callable[[str], str]
"""Maps a parameter's name in the trained module to its key in a weight source."""

DeltaFn = Callable[[str, ShardCoords], torch.Tensor]
"""Returns a segment's reference delta (1-D float32, coords.numel elements) given its name and coordinates."""

# Module wrappers rename parameters (DDP, torch.compile, DeepSpeed's engine); sources hold the bare names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


class WeightSource(Protocol):
    """Reads the elements of one full weight at some global coordinates."""

    where: str
    """Says what the source is, in error messages ("the base weights at /ckpt/base")."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of weight ``name``; MissingWeightError when the source lacks it."""
        ...

    def read(self, name: str, coords: ShardCoords) -> torch.Tensor:
        """Weight ``name``'s elements at ``coords`` (1-D, coords.numel, the stored dtype; on the CPU,
        or where the weights live for sources of weights in memory).
        MissingWeightError when the source lacks it, ValueError when its shape is not
        ``coords.global_shape``."""
        ...


def prepare(source: Any, requests: list[tuple[str, ShardCoords]]) -> None:
    """Let a source read everything it will be asked for in one pass, if it wants to.

    A source may define ``prepare(requests)``: one whose reads are collective (every rank of a
    Megatron job must take part in each read of a dist checkpoint) reads all of a rank's segments
    there, in lockstep with the other ranks, and answers `read` from what it read. Every rank
    calls it, with its own requests (possibly none)."""
    if hasattr(source, "prepare"):
        source.prepare(requests)


class MissingWeightError(KeyError, ValueError):
    """A source has no weight of that name. A KeyError (a failed lookup) that is also a ValueError
    (the caller's model and source do not match), so callers may catch either."""

    def __str__(self) -> str:
        return str(self.args[0])


def candidate_names(name: str) -> list[str]:
    """``name``, then ``name`` without each wrapper prefix it starts with."""
    names = [name]
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            names.append(name[len(prefix) :])
    return names


def _check_shape(name: str, found: tuple[int, ...], shape: tuple[int, ...], where: str) -> None:
    if tuple(found) != tuple(shape):
        raise ValueError(f"online merge: {name!r} has shape {tuple(found)} in {where}, but the trained model has {tuple(shape)}")


def _missing(key: str, keys: Any, where: str) -> MissingWeightError:
    sample = ", ".join(sorted(keys)[:4])
    return MissingWeightError(f"online merge: {key!r} has no entry in {where} ({len(keys)} keys, e.g. {sample}); pass name_map= to translate names")


class StateDictSource:
    """A mapping of full tensors (a state dict, or a module's state dict)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str = "the state dict", name_map: NameMap | None = None):
        self.tensors, self.where, self.name_map = tensors, where, name_map

    def full(self, name: str) -> torch.Tensor:
        """The whole weight ``name``."""
        key = self.name_map(name) if self.name_map else name
        for candidate in candidate_names(key):
            if candidate in self.tensors:
                return self.tensors[candidate]
        raise _missing(key, self.tensors, self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.full(name).shape)

    def read(self, name: str, coords: ShardCoords) -> torch.Tensor:
        tensor = self.full(name).detach()
        _check_shape(name, tuple(tensor.shape), coords.global_shape, self.where)
        return coords.gather(tensor.cpu())


class SafetensorsSource:
    """One or more .safetensors files (a Hugging Face model folder, sharded or not), read by blocks."""

    def __init__(self, files: list[Path], where: str, name_map: NameMap | None = None):
        from safetensors import safe_open

        self.where, self.name_map = where, name_map
        self._owner: dict[str, Any] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            for key in handle.keys():
                self._owner[key] = handle

    def _key(self, name: str) -> str:
        key = self.name_map(name) if self.name_map else name
        found = next((c for c in candidate_names(key) if c in self._owner), None)
        if found is None:
            raise _missing(key, self._owner, self.where)
        return found

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._key(name)
        return tuple(self._owner[key].get_slice(key).get_shape())

    def read(self, name: str, coords: ShardCoords) -> torch.Tensor:
        key = self._key(name)
        piece = self._owner[key].get_slice(key)
        _check_shape(name, tuple(piece.get_shape()), coords.global_shape, self.where)
        if not coords.global_shape:  # a 0-d tensor
            return self._owner[key].get_tensor(key).reshape(-1)[coords.start : coords.end]
        parts = []
        for block in coords.blocks:
            # Only the rows of the block that hold elements [start, end) of the local tensor.
            first = max(coords.start, block.local_start) - block.local_start
            last = min(coords.end, block.local_start + block.numel) - block.local_start
            if first >= last:
                continue
            row = block.numel // block.shape[0] if block.shape[0] else 1
            row_lo, row_hi = first // row, (last - 1) // row + 1
            index = (slice(block.offset[0] + row_lo, block.offset[0] + row_hi),) + tuple(
                slice(o, o + s) for o, s in zip(block.offset[1:], block.shape[1:])
            )
            rows = piece[index].reshape(-1)
            parts.append(rows[first - row_lo * row : last - row_lo * row])
        return torch.cat(parts) if parts else torch.empty(0)


def _files_in(folder: Path) -> tuple[str, list[Path]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return "safetensors", [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return "safetensors", [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return "safetensors", found
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return "torch", bins
    raise FileNotFoundError(f"online merge: no *.safetensors or pytorch_model*.bin weights in {folder}")


def weight_source(source: Any, what: str, name_map: NameMap | None = None) -> WeightSource:
    """A state dict, a module, a file, a model folder or a WeightSource, as a WeightSource.

    A module whose parameters are partitioned (ZeRO-3, FSDP) has no full weights to read: pass a path.
    """
    if hasattr(source, "read") and callable(source.read):
        return source
    if isinstance(source, torch.nn.Module):
        return StateDictSource(source.state_dict(), f"the {what} module", name_map)
    if isinstance(source, Mapping):
        return StateDictSource(source, f"the {what}", name_map)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            kind, files = _files_in(path)
        elif path.is_file():
            kind, files = ("safetensors" if path.suffix == ".safetensors" else "torch"), [path]
        else:
            raise FileNotFoundError(
                f"online merge: {what} weights {str(source)!r} is not a local file or folder "
                "(download hub models first, e.g. with huggingface_hub.snapshot_download)"
            )
        if kind == "safetensors":
            return SafetensorsSource(files, f"the {what} weights at {path}", name_map)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            tensors.update(loaded.get("module", loaded) if isinstance(loaded, dict) and "module" in loaded else loaded)
        return StateDictSource(tensors, f"the {what} weights at {path}", name_map)
    raise TypeError(f"online merge: {what} must be a state dict, a module, a path or a WeightSource; got {type(source).__name__}")


def delta_between(reference: WeightSource, base: WeightSource) -> DeltaFn:
    """reference - base at a segment's elements, in float32, checked weight by weight."""

    def delta_fn(name: str, coords: ShardCoords) -> torch.Tensor:
        ref_shape, base_shape = reference.shape(name), base.shape(name)
        if ref_shape != base_shape:
            raise ValueError(f"online merge: {name!r} has shape {ref_shape} in {reference.where} but {base_shape} in {base.where}")
        ref, base_values = reference.read(name, coords), base.read(name, coords)
        # Two in-memory models of different dtypes are a mistake in the caller's setup; files (an
        # SFT checkpoint saved in fp32 beside a bf16 base, the fp32 main params of a bf16 model) may
        # legitimately differ, and the difference is taken in fp32 either way.
        if isinstance(reference, StateDictSource) and isinstance(base, StateDictSource) and ref.dtype != base_values.dtype:
            raise ValueError(f"online merge: {name!r} has dtype {ref.dtype} in {reference.where} but {base_values.dtype} in {base.where}")
        return ref.float() - base_values.to(ref.device).float()

    return delta_fn


def delta_from(delta: WeightSource) -> DeltaFn:
    """Precomputed reference deltas, read at a segment's elements in float32."""
    return lambda name, coords: delta.read(name, coords).float()
