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
into this rank's partitions (for every stage, to keep one path).

The reference delta is not carried: its stored form is tied to the shard layout (and with
ties_scope="shard" its top-p depends on the cut). `install_online_merging` rebuilds it at the new
world size from the base and SFT weights, which must therefore be given again (or, with the
default reference=None, the model must be built from the SFT weights, installed, then loaded).

    python -m onmerge_megatron.deepspeed.checkpoint --input_folder CKPT/TAG --output_folder UNIV/TAG
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .zero import ZeroOnlineMerge

DEEPSPEED_KEYS = ("fp32", "exp_avg", "exp_avg_sq", "step")
# Stored per segment in a layout-dependent form; rebuilt by install_online_merging instead.
REFERENCE_KEYS = ("reference_values", "reference_positions", "reference_delta")
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _merge_keys(state: dict[str, Any], numel: int) -> list[str]:
    """Per-element merge state of a flat partition: its tensors as long as the partition."""
    return [
        k
        for k, v in state.items()
        if k not in DEEPSPEED_KEYS and k not in REFERENCE_KEYS and torch.is_tensor(v) and v.dim() == 1 and v.numel() == numel
    ]


def _optim_files(checkpoint_dir: Path) -> list[Path]:
    found = []
    for path in checkpoint_dir.iterdir():
        match = _OPTIM_FILE.search(path.name)
        if match:
            if int(match.group(2)) != 0:
                raise ValueError(f"{path}: tensor/model parallel checkpoints are not supported by the online merge adapter")
            found.append((int(match.group(1)), path))
    if not found:
        raise FileNotFoundError(f"no ZeRO optimizer state files (*zero_pp_rank_*_optim_states.pt) in {checkpoint_dir}")
    found.sort()
    if [r for r, _ in found] != list(range(len(found))):
        raise ValueError(f"{checkpoint_dir}: optimizer files of ranks {[r for r, _ in found]} are not 0..N-1")
    return [p for _, p in found]


def collect_merge_state(checkpoint_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full, flattened per-element merge state of every weight, from a ZeRO checkpoint folder (one tag)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = _optim_files(checkpoint_dir)
    world = len(files)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    sizes: dict[str, int] = {}
    for rank, path in enumerate(files):
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if "fp32_flat_groups" in saved:  # ZeRO-3
            states = saved["optimizer_state_dict"]["state"]
            model_file = checkpoint_dir / path.name.replace("optim_states", "model_states")
            shapes = torch.load(model_file, map_location="cpu", weights_only=False)["param_shapes"]
            for index, sub_group in enumerate(shapes):
                state = states.get(index, {})
                flat = saved["fp32_flat_groups"][index]
                offset = 0
                for name, shape in sub_group.items():
                    numel = math.prod(shape)
                    size = math.ceil(numel / world)
                    real = max(0, min(size, numel - rank * size))
                    for key in _merge_keys(state, flat.numel()):
                        pieces[name][key].append(state[key][offset : offset + real])
                    sizes[name] = numel
                    offset += size
        else:  # ZeRO-1/2, BF16_Optimizer
            states = saved["base_optimizer_state"]["state"]
            for index, mapping in enumerate(saved["param_slice_mappings"]):
                state = states.get(index, {})
                if "exp_avg" not in state:
                    continue
                for name, address in mapping.items():
                    for key in _merge_keys(state, state["exp_avg"].numel()):
                        pieces[name][key].append(state[key][address.start : address.start + address.numel])
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for name, by_key in pieces.items():
        merged[name] = {key: torch.cat(parts).clone() for key, parts in by_key.items()}
        for key, full in merged[name].items():
            if name in sizes and full.numel() != sizes[name]:
                raise RuntimeError(f"{name}/{key}: assembled {full.numel()} elements, expected {sizes[name]}")
    return merged


def add_merge_state_to_universal(checkpoint_dir: str | Path, universal_dir: str | Path) -> list[str]:
    """Write the per-element merge state of a ZeRO checkpoint into a universal checkpoint made from it.

    Returns the files written (``zero/<weight>/<key>.pt``, in the format of DeepSpeed's own files).
    """
    zero_dir = Path(universal_dir) / "zero"
    if not zero_dir.is_dir():
        raise FileNotFoundError(f"{zero_dir} does not exist: run deepspeed.checkpoint.ds_to_universal first (or use to_universal)")
    written = []
    for name, by_key in collect_merge_state(checkpoint_dir).items():
        fp32_file = zero_dir / name / "fp32.pt"
        if not fp32_file.is_file():
            raise FileNotFoundError(f"{fp32_file} missing: the universal checkpoint does not match {checkpoint_dir}")
        # Same format as DeepSpeed's fp32.pt beside it: {"param": shaped} (ZeRO-1/2) or a flat tensor (ZeRO-3).
        fp32 = torch.load(fp32_file, map_location="cpu", weights_only=False)
        for key, full in by_key.items():
            out = zero_dir / name / f"{key}.pt"
            torch.save({"param": full.reshape(fp32["param"].shape)} if isinstance(fp32, dict) else full.reshape(fp32.shape), out)
            written.append(str(out))
    return written


def to_universal(checkpoint_dir: str | Path, universal_dir: str | Path, num_workers: int = 1) -> list[str]:
    """DeepSpeed's ds_to_universal (with --inject_missing_state), then the merge state."""
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint_dir),
        "--output_folder",
        str(universal_dir),
        "--inject_missing_state",
        "--num_extract_workers",
        str(num_workers),
        "--num_merge_workers",
        str(num_workers),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return add_merge_state_to_universal(checkpoint_dir, universal_dir)


def resolve_tag(load_dir: Path, tag: str | None) -> Path:
    """The checkpoint folder DeepSpeed loads: load_dir/tag, the tag read from latest_universal / latest."""
    if tag is None:
        for latest in ("latest_universal", "latest"):
            if (load_dir / latest).is_file():
                tag = (load_dir / latest).read_text().strip()
                break
        else:
            raise FileNotFoundError(f"no tag given and no 'latest_universal' / 'latest' file in {load_dir}")
    return load_dir / tag


def load_universal_merge_state(handle: ZeroOnlineMerge, universal_dir: str | Path) -> list[str]:
    """Slice the full merge-state tensors of a universal checkpoint into this rank's partitions.

    Call after ``engine.load_checkpoint`` with ``"checkpoint": {"load_universal": true}``.
    Returns the keys restored.
    """
    zero_dir = Path(universal_dir) / "zero"
    optimizer, config = handle.optimizer, handle.optimizer.merge_config
    _repair_zero3_universal_load(handle, zero_dir)
    restored: set[str] = set()
    for part, frag in handle.fragments():
        folder = zero_dir / frag.name
        keys = sorted(p.stem for p in folder.glob("*.pt") if p.stem not in DEEPSPEED_KEYS)
        state = optimizer.state[part.tensor]
        for key in keys:
            saved = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)
            full = (saved["param"] if isinstance(saved, dict) else saved).reshape(-1)
            if key not in state:
                state[key] = torch.zeros_like(part.tensor, dtype=torch.float32)
            state[key][frag.offset : frag.offset + frag.numel].copy_(full[frag.start : frag.end])
            restored.add(key)
    if config.merges and config.merge_every > 1 and "merge_accumulator" not in restored and any(
        "step" in optimizer.state[p.tensor] for p in handle.partitions
    ):
        raise RuntimeError(
            f"online merge: merge_every={config.merge_every} but {zero_dir} holds no merge_accumulator; convert the "
            "checkpoint with `python -m onmerge_megatron.deepspeed.checkpoint` (not ds_to_universal alone)"
        )
    return sorted(restored)


def _repair_zero3_universal_load(handle: ZeroOnlineMerge, zero_dir: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (0.19.8) that change the run.

    It gives every sub-group the *same* ``step`` tensor, which Adam increments in place once per
    sub-group, so with several sub-groups the step runs ahead; and it copies param group 0's
    hyper-parameters (weight decay included) onto every group.
    """
    optimizer = handle.optimizer
    for part in handle.partitions:
        state = optimizer.state.get(part.tensor, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if not hasattr(handle.engine.optimizer, "fp32_partitioned_groups_flat"):
        return  # the ZeRO-1/2 loader restores each group's own settings
    saved = torch.load(zero_dir / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
    if not groups or len(groups) != len(optimizer.param_groups):
        return
    for group, saved_group in zip(optimizer.param_groups, groups):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value


def load_checkpoint(handle: ZeroOnlineMerge, load_dir: str | Path, tag: str | None = None, **kwargs: Any) -> Any:
    """``engine.load_checkpoint`` plus, for universal checkpoints, the merge state."""
    result = handle.engine.load_checkpoint(str(load_dir), tag, **kwargs)
    if handle.engine.load_universal_checkpoint():
        load_universal_merge_state(handle, resolve_tag(Path(load_dir), tag))
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
