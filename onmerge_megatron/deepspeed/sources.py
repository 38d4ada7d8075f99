"""Where the weights behind the reference delta come from: state dicts, modules, checkpoint files.

The adapter asks for one flat range of one weight at a time (the part a rank owns), so a
safetensors checkpoint is read slice by slice: a rank never holds a full copy of the base model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

NameMap = Callable[[str], str]
"""Maps a parameter's name in the trained module to its key in a weight source."""

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


class WeightSource(Protocol):
    """Reads elements [start, end) of a weight, flattened, as float32."""

    def read(self, name: str, shape: tuple[int, ...], start: int, end: int) -> torch.Tensor: ...


def _candidates(name: str) -> list[str]:
    names = [name]
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            names.append(name[len(prefix) :])
    return names


def _check_shape(name: str, found: tuple[int, ...], shape: tuple[int, ...], where: str) -> None:
    if tuple(found) != tuple(shape):
        raise ValueError(f"online merge: {name!r} has shape {tuple(found)} in {where}, but the trained model has {tuple(shape)}")


class StateDictSource:
    """A mapping of full tensors (a state dict, or a module's state dict)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str = "the state dict", name_map: NameMap | None = None):
        self.tensors, self.where, self.name_map = tensors, where, name_map

    def _lookup(self, name: str) -> torch.Tensor:
        key = self.name_map(name) if self.name_map else name
        for candidate in _candidates(key):
            if candidate in self.tensors:
                return self.tensors[candidate]
        sample = ", ".join(sorted(self.tensors)[:4])
        raise KeyError(f"online merge: no weight {key!r} in {self.where} ({len(self.tensors)} keys, e.g. {sample}); pass name_map= to translate names")

    def read(self, name: str, shape: tuple[int, ...], start: int, end: int) -> torch.Tensor:
        tensor = self._lookup(name)
        _check_shape(name, tuple(tensor.shape), shape, self.where)
        return tensor.detach().reshape(-1)[start:end].to(device="cpu", dtype=torch.float32)


class SafetensorsSource:
    """One or more .safetensors files (a Hugging Face model folder, sharded or not), read by slices."""

    def __init__(self, files: list[Path], where: str, name_map: NameMap | None = None):
        from safetensors import safe_open

        self.where, self.name_map = where, name_map
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._owner: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():
                self._owner[key] = handle

    def read(self, name: str, shape: tuple[int, ...], start: int, end: int) -> torch.Tensor:
        key = self.name_map(name) if self.name_map else name
        handle = next((self._owner[c] for c in _candidates(key) if c in self._owner), None)
        if handle is None:
            sample = ", ".join(sorted(self._owner)[:4])
            raise KeyError(f"online merge: no weight {key!r} in {self.where} ({len(self._owner)} keys, e.g. {sample}); pass name_map= to translate names")
        key = next(c for c in _candidates(key) if c in self._owner)
        piece = handle.get_slice(key)
        _check_shape(name, tuple(piece.get_shape()), shape, self.where)
        if start >= end:
            return torch.empty(0, dtype=torch.float32)
        # Read only the rows that hold [start, end): a flat range of a row-major tensor.
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // row, (end - 1) // row + 1
        rows = piece[first:last] if len(shape) >= 1 else handle.get_tensor(key)
        flat = rows.reshape(-1).to(torch.float32)
        return flat[start - first * row : end - first * row].clone()


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
    """Turn a state dict, a module, a file or a model folder into a WeightSource.

    A module whose parameters are partitioned by ZeRO-3 has no full weights to read: pass a path.
    """
    if hasattr(source, "read") and callable(source.read):
        return source
    if isinstance(source, torch.nn.Module):
        if any(hasattr(p, "ds_id") for p in source.parameters()):
            raise ValueError(f"online merge: the {what} module is partitioned by ZeRO-3; pass its checkpoint path instead")
        return StateDictSource(source.state_dict(), f"the {what} module", name_map)
    if isinstance(source, Mapping):
        return StateDictSource(source, f"the {what} state dict", name_map)
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
            return SafetensorsSource(files, f"{what} weights at {path}", name_map)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            tensors.update(loaded.get("module", loaded) if isinstance(loaded, dict) and "module" in loaded else loaded)
        return StateDictSource(tensors, f"{what} weights at {path}", name_map)
    raise TypeError(f"online merge: {what} must be a state dict, a module, or a path; got {type(source).__name__}")
