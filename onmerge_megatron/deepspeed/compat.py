"""Every use of a DeepSpeed internal by this adapter, one named function each.

The adapter needs three kinds of things DeepSpeed does not publish: its bookkeeping of which
elements of which weight each flat fp32 partition holds (ZeRO-1/2, BF16_Optimizer, ZeRO-3), a few
engine and optimizer settings that decide whether the merge can run at all, and the layout of its
checkpoint files (per-rank ZeRO files and universal checkpoints). None of these is a public API,
so a DeepSpeed release may move any of them. Each read lives here, named for what it reads, and
the whole module is gated by the releases it was run against (`TESTED_VERSIONS`):
`install_online_merging` and the universal-checkpoint converter call `check_deepspeed_version`
and refuse any other version unless told to try it, with the same rule and switches as the Megatron
adapter (`onmerge_megatron.megatron.compat.check_megatron_version`).

Importing this module does not import DeepSpeed.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TESTED_VERSIONS: tuple[str, ...] = ("0.19.8",)
"""DeepSpeed releases the adapter was run against (CPU, gloo, torch 2.13)."""

ALLOW_UNTESTED_ENV = "ONMERGE_ALLOW_UNTESTED_DEEPSPEED"


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is not one this adapter was tested on."""


def deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def check_deepspeed_version(allow_untested: bool = False) -> str:
    """Return the installed DeepSpeed version, refusing one that was not tested."""
    version = deepspeed_version()
    if version in TESTED_VERSIONS or allow_untested or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return version
    raise DeepSpeedVersionError(
        f"onmerge_megatron's use of DeepSpeed internals was tested on {list(TESTED_VERSIONS)}, but deepspeed "
        f"{version} is installed. The names and file layouts it relies on (ZeRO partition bookkeeping, "
        f"checkpoint files; see onmerge_megatron/deepspeed/compat.py) may have moved; install a tested "
        f"version, or set {ALLOW_UNTESTED_ENV}=1 (or pass allow_untested_version=True to "
        f"install_online_merging / to_universal) to try anyway."
    )


def skip_shm_comm_op_build() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op, which gloo does not use.

    DeepSpeed's torch comm backend calls ``deepspeed.comm.torch.build_shm_op`` when it starts,
    which on a CPU compiles a C++ op with g++ (minutes); it returns None where the op is
    unavailable, which is what this makes it return. Call before ``deepspeed.init_distributed`` or
    the first ``deepspeed.initialize`` (CPU runs with gloo only)."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *args, **kwargs: None


# --- The engine ------------------------------------------------------------------------------


def client_optimizer(engine: Any) -> Any:
    """The optimizer given to ``deepspeed.initialize`` (or built from the config's "optimizer"
    section), before ZeRO / BF16_Optimizer wrap it: the one that must be OnlineMergingAdamW."""
    return getattr(engine, "basic_optimizer", None)


def config_optimizer_name(engine: Any) -> str | None:
    """The type named by the DeepSpeed config's "optimizer" section, None without one.

    ``engine.optimizer_name()`` reports the client's class instead when one was passed, so the
    section's presence is read from the parsed config."""
    return getattr(engine._config, "optimizer_name", None) or None


def module_param_names(engine: Any) -> dict[torch.Tensor, str]:
    """{parameter: name} of the module as given to ``deepspeed.initialize``: the names masks are
    keyed by (the engine records them before wrapping anything)."""
    if hasattr(engine, "param_names"):
        return engine.param_names
    return {p: n for n, p in engine.module.named_parameters()}


def runs_pipeline_parallel(engine: Any) -> bool:
    """Whether the engine is a PipelineEngine (the model is a PipelineModule)."""
    return bool(getattr(engine, "pipeline_parallelism", False))


def mpu_tensor_parallel_size(engine: Any) -> int:
    """Tensor-parallel size of the model-parallel unit passed to ``initialize`` (1 without one)."""
    mpu = getattr(engine, "mpu", None)
    if mpu is None or not hasattr(mpu, "get_tensor_model_parallel_world_size"):
        return 1
    return int(mpu.get_tensor_model_parallel_world_size())


def autotp_size(engine: Any) -> int:
    """AutoTP's tensor-parallel size from the config (0 or 1 when off)."""
    return int(getattr(engine, "autotp_size", lambda: 0)())


def loads_universal_checkpoint(engine: Any) -> bool:
    """Whether the config says ``"checkpoint": {"load_universal": true}``: then
    ``engine.load_checkpoint`` reads a universal checkpoint, without the merge state on ZeRO-3."""
    return bool(engine.load_universal_checkpoint())


# --- The ZeRO optimizer's partitions ---------------------------------------------------------


def is_zero3(zero_optimizer: Any) -> bool:
    """DeepSpeedZeroOptimizer_Stage3 (its flat fp32 tensors are per sub-group)."""
    return hasattr(zero_optimizer, "fp32_partitioned_groups_flat")


def is_fp16_stage0_wrapper(zero_optimizer: Any) -> bool:
    """ZeRO stage 0 with fp16/bf16 (FP16_Optimizer / FP16_UnfusedOptimizer), which runs one
    zero-gradient step while DeepSpeed initialises."""
    return type(zero_optimizer).__name__ in ("FP16_UnfusedOptimizer", "FP16_Optimizer")


def optimizer_param_names(zero_optimizer: Any) -> dict[torch.Tensor, str]:
    """{parameter: name} as the ZeRO optimizer / BF16_Optimizer received them from the engine."""
    return zero_optimizer.param_names


def hp_partition_groups(zero_optimizer: Any) -> list[tuple[list[torch.Tensor], torch.Tensor]] | None:
    """ZeRO-1/2 and BF16_Optimizer: per param group, the 16-bit (or fp32) weights and the flat
    fp32 partition of this rank the client optimizer steps; None for other optimizers."""
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (ZeRO-1/2)
        return list(zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups))
    if hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        return list(zip(zero_optimizer.bf16_groups, zero_optimizer.fp32_groups_flat_partition))
    return None


def hp_fragment(weight: torch.Tensor) -> tuple[int, int, int] | None:
    """ZeRO-1/2 and BF16_Optimizer: ``(start, end, offset)`` when elements [start, end) of the
    flattened weight sit at ``offset`` in this rank's flat fp32 partition, None when none do.

    Read from ``weight._hp_mapping`` (a ``tensor_fragment``), which DeepSpeed attaches to every
    weight with a piece on this rank; its own ``safe_get_full_*`` helpers read the same fields."""
    mapping = getattr(weight, "_hp_mapping", None)
    if mapping is None:
        return None
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    return lp.start, lp.start + lp.numel, hp.start


def zero3_sub_groups(zero_optimizer: Any) -> list[tuple[torch.Tensor, int, list[Any]]]:
    """ZeRO-3: per sub-group, its flat fp32 tensor, the client param group it is stepped in, and
    its weights in the order their partitions are laid end to end in that tensor."""
    return [
        (zero_optimizer.fp32_partitioned_groups_flat[index], zero_optimizer.sub_group_to_group_id[index], list(params))
        for index, params in enumerate(zero_optimizer.fp16_groups)
    ]


def zero3_partition(zero_optimizer: Any, weight: Any) -> tuple[tuple[int, ...], int, int, int]:
    """ZeRO-3: ``(shape, start, end, size)`` of a weight's partition on this rank.

    The partition takes ``size`` (``partition_numel()``) elements of the flat tensor; rank r holds
    elements [r * size, r * size + size) of the flattened weight, cut at the weight's end (the rest
    is padding, uninitialised)."""
    size = weight.partition_numel()
    rank = zero_optimizer._get_param_partition_rank(weight)
    total = weight.ds_numel
    start = min(rank * size, total)
    return tuple(weight.ds_shape), start, min(start + size, total), size


def is_zero3_partitioned(weight: torch.Tensor) -> bool:
    """A parameter ZeRO-3 has partitioned (built under ``zero.Init`` or by the engine): its
    ``data`` is empty, the full weight is gathered on demand only."""
    return hasattr(weight, "ds_id")


def zero3_partial_offload(zero_optimizer: Any) -> bool:
    """ZeRO-3 with ``offload_optimizer.ratio`` < 1: the sub-groups kept on the accelerator are
    stepped by DeepSpeed's own AdamW, not by the client optimizer."""
    return is_zero3(zero_optimizer) and bool(getattr(zero_optimizer, "offload_optimizer", False)) and getattr(
        zero_optimizer, "partial_offload", 1.0
    ) != 1.0


def zero3_offloads_to_nvme(zero_optimizer: Any) -> bool:
    """ZeRO-3 optimizer offload to NVMe: the fp32 partitions are swapped out between steps."""
    return is_zero3(zero_optimizer) and bool(getattr(zero_optimizer, "swap_optimizer", False))


def elastic_checkpoint(zero_optimizer: Any) -> bool:
    """``zero_optimization.elastic_checkpoint``: checkpoints keep one Adam step per group."""
    return bool(getattr(zero_optimizer, "elastic_checkpoint", False))


def uses_autocast_grad_scaler(zero_optimizer: Any) -> bool:
    """DeepSpeed's torch_autocast mode with a GradScaler, which steps the optimizer itself."""
    return getattr(zero_optimizer, "torch_autocast_gradscaler", None) is not None


def uses_zenflow(zero_optimizer: Any) -> bool:
    """ZenFlow, which replaces the optimizer step."""
    return bool(getattr(zero_optimizer, "zenflow", False))


# --- ZeRO checkpoint files (one tag folder) -------------------------------------------------

_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def optimizer_state_files(checkpoint_dir: Path) -> list[Path]:
    """The per-rank optimizer files of a ZeRO checkpoint tag folder, in rank order."""
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


@dataclass(frozen=True)
class SavedPiece:
    """Elements [offset, offset + numel) of a saved flat partition are the next piece of ``name``
    (pieces of a weight, in rank order, make up the whole flattened weight)."""

    name: str
    offset: int
    numel: int
    weight_numel: int | None
    """The whole weight's element count where the files say it (ZeRO-3), else None."""


@dataclass
class SavedPartition:
    """One flat partition of one rank's optimizer file: the client optimizer's state for it and
    the weight pieces it holds."""

    state: dict[str, Any]
    numel: int
    """Length of the flat tensor the client optimizer stepped (padding included)."""
    pieces: list[SavedPiece]


def saved_partitions(path: Path, rank: int, world: int) -> list[SavedPartition]:
    """The flat partitions in rank ``rank``'s optimizer file ``path`` (of ``world`` files).

    ZeRO-3 files keep the client state under optimizer_state_dict/optimizer_state_dict/state and
    the flat fp32 tensors under fp32_flat_groups; the weights' names and shapes per sub-group are
    in the rank's model_states file, and each weight's partition is ceil(n / world) long.
    ZeRO-1/2 and BF16_Optimizer files keep it under base_optimizer_state/state, with
    param_slice_mappings giving each weight's [start, start + numel) in the partition; their fp32
    copy drops the padding, so the stepped length is that of Adam's moments (a group never
    stepped holds no state and is left out)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    partitions = []
    if "fp32_flat_groups" in saved:  # ZeRO-3
        states = saved["optimizer_state_dict"]["state"]
        model_file = path.with_name(path.name.replace("optim_states", "model_states"))
        shapes = torch.load(model_file, map_location="cpu", weights_only=False)["param_shapes"]
        for index, sub_group in enumerate(shapes):
            pieces, offset = [], 0
            for name, shape in sub_group.items():
                numel = math.prod(shape)
                size = math.ceil(numel / world)
                pieces.append(SavedPiece(name, offset, max(0, min(size, numel - rank * size)), numel))
                offset += size
            partitions.append(SavedPartition(states.get(index, {}), saved["fp32_flat_groups"][index].numel(), pieces))
    else:  # ZeRO-1/2, BF16_Optimizer
        states = saved["base_optimizer_state"]["state"]
        for index, mapping in enumerate(saved["param_slice_mappings"]):
            state = states.get(index, {})
            if "exp_avg" not in state:
                continue
            pieces = [SavedPiece(name, address.start, address.numel, None) for name, address in mapping.items()]
            partitions.append(SavedPartition(state, state["exp_avg"].numel(), pieces))
    return partitions


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


# --- Universal checkpoints ------------------------------------------------------------------

UNIVERSAL_KEYS = ("fp32", "exp_avg", "exp_avg_sq", "step")
"""The per-weight files DeepSpeed's converter writes (``zero/<weight>/<key>.pt``); it drops any
other optimizer state."""


def universal_weights_dir(universal_dir: str | Path) -> Path:
    """The folder of per-weight folders in a universal checkpoint tag folder."""
    return Path(universal_dir) / "zero"


def run_ds_to_universal(checkpoint_dir: str | Path, universal_dir: str | Path, num_workers: int) -> None:
    """DeepSpeed's converter, ``python -m deepspeed.checkpoint.ds_to_universal`` (a script, not an
    API), with --inject_missing_state so that the tag folder's files are complete."""
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


def universal_weight_file(universal_dir: str | Path, name: str, key: str) -> Path:
    """The file of one optimizer-state key of one weight: ``zero/<weight>/<key>.pt``."""
    return universal_weights_dir(universal_dir) / name / f"{key}.pt"


def universal_extra_keys(universal_dir: str | Path, name: str) -> list[str]:
    """The keys of a weight's files beyond those DeepSpeed's converter writes (the merge state)."""
    folder = universal_weights_dir(universal_dir) / name
    return sorted(p.stem for p in folder.glob("*.pt") if p.stem not in UNIVERSAL_KEYS)


def read_universal_tensor(universal_dir: str | Path, name: str, key: str) -> torch.Tensor:
    """A full per-weight tensor of a universal checkpoint, flattened. ZeRO-1/2 conversions store
    ``{"param": shaped}``, ZeRO-3 conversions the tensor itself."""
    saved = torch.load(universal_weight_file(universal_dir, name, key), map_location="cpu", weights_only=False)
    return (saved["param"] if isinstance(saved, dict) else saved).reshape(-1)


def write_universal_tensor(universal_dir: str | Path, name: str, key: str, full: torch.Tensor) -> Path:
    """Write a weight's ``<key>.pt`` in the format of the converter's ``fp32.pt`` beside it, which
    DeepSpeed's ZeRO-1/2 universal loader then restores into the optimizer state by itself."""
    fp32 = torch.load(universal_weight_file(universal_dir, name, "fp32"), map_location="cpu", weights_only=False)
    out = universal_weight_file(universal_dir, name, key)
    torch.save({"param": full.reshape(fp32["param"].shape)} if isinstance(fp32, dict) else full.reshape(fp32.shape), out)
    return out


def repair_zero3_universal_load(engine: Any, optimizer: torch.optim.Optimizer, flats: list[torch.Tensor], universal_dir: str | Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (seen in 0.19.8) that change the run.

    It gives every sub-group the *same* ``step`` tensor, which Adam increments in place once per
    sub-group, so with several sub-groups the step runs ahead; and it copies param group 0's
    hyper-parameters (weight decay included) onto every group. ``flats`` are the tensors the client
    optimizer steps. The ZeRO-1/2 loader restores each group's own settings."""
    for flat in flats:
        state = optimizer.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if not is_zero3(engine.optimizer):
        return
    saved = torch.load(universal_weights_dir(universal_dir) / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
    if not groups or len(groups) != len(optimizer.param_groups):
        return
    for group, saved_group in zip(optimizer.param_groups, groups):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
