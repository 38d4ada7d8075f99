"""Merge state in DeepSpeed checkpoints.

Same world size: nothing to do. DeepSpeed saves the client optimizer's ``state_dict()`` per rank
and loads it back into the same flat partitions, and OnlineMergingAdamW keeps all its state
there (Adam moments and step, the step-K accumulator ``merge_accumulator``, the sparse reference
delta, the optional ``weight_ema``). Call `install_online_merging` before ``engine.load_checkpoint``.

Another world size goes through DeepSpeed's universal checkpoint, whose converter only knows
fp32 / exp_avg / exp_avg_sq / step and drops the rest. `to_universal` runs that converter and
then writes every per-element merge state (``merge_accumulator``, ``weight_ema``) the same way,
as a full tensor ``zero/<weight>/<key>.pt``. On load, DeepSpeed's ZeRO-1/2 loader picks such
files up by itself; the ZeRO-3 loader does not, so `load_universal_merge_state` slices them
into this rank's partitions (for every stage, to keep one path). The layouts of both kinds of
checkpoint files are DeepSpeed's, read through `compat`.

The reference delta is not carried: its stored form is tied to the shard layout (and with
ties_scope="shard" its top-p depends on the cut). `install_online_merging` rebuilds it at the new
world size from the base and SFT weights, which must therefore be given again (or, with the
default reference=None, the model must be built from the SFT weights, installed, then loaded).

    python -m onmerge_megatron.deepspeed.checkpoint --input_folder CKPT/TAG --output_folder UNIV/TAG
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from . import compat
from ..merging import state as merge_state
from .zero import ZeroOnlineMerge



def _merge_keys(state: dict[str, Any], numel: int) -> list[str]:
    """Per-element merge state of a flat partition: its tensors as long as the partition."""
    return [
        k
        for k, v in state.items()
        # The reference delta is stored per segment in a layout-dependent form: install_online_merging
        # rebuilds it instead.
        if k not in compat.UNIVERSAL_KEYS and k not in merge_state.REFERENCE_KEYS and torch.is_tensor(v) and v.dim() == 1 and v.numel() == numel
    ]


def collect_merge_state(checkpoint_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full, flattened per-element merge state of every weight, from a ZeRO checkpoint folder (one tag)."""
    files = compat.optimizer_state_files(Path(checkpoint_dir))
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    sizes: dict[str, int] = {}
    for rank, path in enumerate(files):
        for part in compat.saved_partitions(path, rank, len(files)):
            keys = _merge_keys(part.state, part.numel)
            for piece in part.pieces:
                for key in keys:
                    pieces[piece.name][key].append(part.state[key][piece.offset : piece.offset + piece.numel])
                if piece.weight_numel is not None:
                    sizes[piece.name] = piece.weight_numel
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for name, by_key in pieces.items():
        merged[name] = {key: torch.cat(parts).clone() for key, parts in by_key.items()}
        for key, full in merged[name].items():
            if name in sizes and full.numel() != sizes[name]:
                raise RuntimeError(f"{name}/{key}: assembled {full.numel()} elements, expected {sizes[name]}")
    return merged


def add_merge_state_to_universal(checkpoint_dir: str | Path, universal_dir: str | Path, allow_untested_version: bool = False) -> list[str]:
    """Write the per-element merge state of a ZeRO checkpoint into a universal checkpoint made from it.

    Returns the files written (``zero/<weight>/<key>.pt``, in the format of DeepSpeed's own files).
    ``allow_untested_version``: as in `install_online_merging` (the files' layout is DeepSpeed's).
    """
    compat.check_deepspeed_version(allow_untested_version)
    zero_dir = compat.universal_weights_dir(universal_dir)
    if not zero_dir.is_dir():
        raise FileNotFoundError(f"{zero_dir} does not exist: run deepspeed.checkpoint.ds_to_universal first (or use to_universal)")
    written = []
    for name, by_key in collect_merge_state(checkpoint_dir).items():
        fp32_file = compat.universal_weight_file(universal_dir, name, "fp32")
        if not fp32_file.is_file():
            raise FileNotFoundError(f"{fp32_file} missing: the universal checkpoint does not match {checkpoint_dir}")
        for key, full in by_key.items():
            written.append(str(compat.write_universal_tensor(universal_dir, name, key, full)))
    return written


def to_universal(checkpoint_dir: str | Path, universal_dir: str | Path, num_workers: int = 1, allow_untested_version: bool = False) -> list[str]:
    """DeepSpeed's ds_to_universal (with --inject_missing_state), then the merge state."""
    compat.check_deepspeed_version(allow_untested_version)
    compat.run_ds_to_universal(checkpoint_dir, universal_dir, num_workers)
    return add_merge_state_to_universal(checkpoint_dir, universal_dir, allow_untested_version)


def load_universal_merge_state(handle: ZeroOnlineMerge, universal_dir: str | Path) -> list[str]:
    """Slice the full merge-state tensors of a universal checkpoint into this rank's partitions.

    Call after ``engine.load_checkpoint`` with ``"checkpoint": {"load_universal": true}``.
    Returns the keys restored.
    """
    zero_dir = compat.universal_weights_dir(universal_dir)
    optimizer, config = handle.optimizer, handle.optimizer.merge_config
    compat.repair_zero3_universal_load(handle.engine, optimizer, [part.tensor for part in handle.partitions], universal_dir)
    restored: set[str] = set()
    for part in handle.partitions:
        pieces = []
        for seg in optimizer.segments(part.tensor):
            keys = compat.universal_extra_keys(universal_dir, seg.name)
            pieces.append({key: compat.read_universal_tensor(universal_dir, seg.name, key)[seg.coords.start : seg.coords.end] for key in keys})
            restored.update(keys)
        # The per-element merge state, in this world size's partitions; the reference delta was
        # rebuilt by install_online_merging.
        optimizer.import_merge_state(part.tensor, pieces, reference=False)
    if config.merges and config.merge_every > 1 and merge_state.ACCUMULATOR not in restored and any(
        "step" in optimizer.state[p.tensor] for p in handle.partitions
    ):
        raise RuntimeError(
            f"online merge: merge_every={config.merge_every} but {zero_dir} holds no merge_accumulator; convert the "
            "checkpoint with `python -m onmerge_megatron.deepspeed.checkpoint` (not ds_to_universal alone)"
        )
    return sorted(restored)


def load_checkpoint(handle: ZeroOnlineMerge, load_dir: str | Path, tag: str | None = None, **kwargs: Any) -> Any:
    """``engine.load_checkpoint`` plus, for universal checkpoints, the merge state."""
    result = handle.engine.load_checkpoint(str(load_dir), tag, **kwargs)
    if compat.loads_universal_checkpoint(handle.engine):
        load_universal_merge_state(handle, compat.resolve_tag(Path(load_dir), tag))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ZeRO checkpoint -> universal checkpoint, keeping the online-merge state")
    parser.add_argument("--input_folder", required=True, help="a ZeRO checkpoint tag folder (holding *_optim_states.pt)")
    parser.add_argument("--output_folder", required=True, help="the universal checkpoint folder to write")
    parser.add_argument("--num_workers", type=int, default=1)
    args = parser.parse_args(argv)
    written = to_universal(args.input_folder, args.output_folder, args.num_workers)
    print(f"universal checkpoint in {args.output_folder}; merge state files written: {len(written)}")


if __name__ == "__main__":
    main()
