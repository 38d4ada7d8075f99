"""A run's megatron dist checkpoints: the output directory locked by one run at a time, checkpoints
written whole or not at all (and never with non-finite weights), opened only when verified, read
with errors that name the checkpoint, and, on a resume, the settings that the checkpoint imposes
against the ones the new config asks for. The files themselves (atomic writes, manifests,
`latest`, the lock file) are checkpoints.py's."""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..megatron.compat import checkpoint_results_queue_dies_with_process
from . import checkpoints as ckpt
from .config import TrainConfig
from .model import unwrap
from .parallel import device, is_rank0, log0

# Optimizer state saved per parameter in model coordinates (reshardable across TP and DP), gathered
# without the non-gloo path that would move tensors to the GPU.
CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}


def lock_output_dir(output_dir: str) -> ckpt.RunLock:
    """Rank 0 locks output_dir before anything is written there; every rank learns the
    outcome, so a second launch on the same directory fails as a whole, naming the holder."""
    lock = ckpt.RunLock(output_dir)
    error = None
    if is_rank0():
        try:
            lock.acquire()
        except ckpt.RunLockedError as exc:
            error = str(exc)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ckpt.RunLockedError(verdict[0])
    return lock


def save_dist_checkpoint(state: dict[str, Any], final: str, what: str) -> None:
    """dist_checkpointing.save of `state`, published at `final` whole or not at all (all ranks
    call it, from the main thread). Its writer processes are watched (one that dies fails the
    save) and, like their results server, die with the rank."""
    from megatron.core import dist_checkpointing

    checkpoint_results_queue_dies_with_process()  # before the first save, from this (main) thread
    ckpt.publish_checkpoint(final, partial(dist_checkpointing.save, state), what)


def refuse_nonfinite_weights(model: list[torch.nn.Module], step: int, what: str) -> None:
    """Refuse to write weights holding inf/NaN (collective; one host sync, at save time only)."""
    from onmerge_megatron.optim import nonfinite_flags

    named = [(name, p) for chunk in model for name, p in unwrap(chunk).named_parameters() if p.numel()]
    flags = nonfinite_flags([p.detach() for _, p in named])
    found = flags.any().to(device(), torch.float32).reshape(1)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if found.item() > 0:
        bad = [name for (name, _), flag in zip(named, flags.tolist()) if flag]
        mine = f" (on this rank: {', '.join(bad[:3])})" if bad else ""
        raise FloatingPointError(f"step {step}: the weights hold inf/NaN{mine}; refusing to write {what}")


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory, or a run/checkpoints directory whose `latest` file names one."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        latest = ckpt.read_latest(candidate)
        if latest is not None:
            return latest
    return path


def open_checkpoint(path: str, what: str) -> str:
    """Resolve `path` (see resolve_checkpoint_dir) and verify it against its manifest (collective)."""
    directory = resolve_checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise ckpt.CheckpointError(f"{what}: checkpoint directory {directory} does not exist")
    ckpt.require_intact(directory, what, log0)
    return directory


@contextlib.contextmanager
def loading_errors_named(directory: str) -> Iterator[None]:
    """Any error while reading a checkpoint names the checkpoint and calls it damaged or
    incompatible (torch and dist_checkpointing raise bare EOFError, unpickling errors, ...)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if type(exc).__module__.startswith("onmerge_megatron"):
            raise  # our own errors already say what is wrong
        raise ckpt.CheckpointError(
            f"checkpoint {directory} could not be loaded: it is damaged, or it was written for another model or "
            f"layout ({ckpt.brief(exc)})"
        ) from exc


# Keys whose new value a resumed run does not use, and why (besides the restored state below).
_FROM_CHECKPOINT = {
    "model.": "the weights come from the checkpoint",
    "merge.base_": "the reference delta comes from the checkpoint",
}
# Keys that only steer this session.
_SESSION_KEYS = ("run.stop_at_step", "run.resume", "run.override_scheduler")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def restored_settings(scheduler_state: dict[str, Any], adam_group: dict[str, Any]) -> dict[str, Any]:
    """The config values a checkpoint imposes on a resume, as its state holds them: the LR schedule
    (megatron's scheduler state) and Adam's hyper-parameters (the optimizer's param groups)."""
    return {
        "optim.lr": scheduler_state["max_lr"], "optim.min_lr": scheduler_state["min_lr"],
        "optim.warmup_steps": scheduler_state["lr_warmup_steps"], "optim.lr_decay_style": scheduler_state["lr_decay_style"],
        "optim.weight_decay": scheduler_state["start_wd"], "run.train_steps": scheduler_state["lr_decay_steps"],
        "optim.adam_beta1": adam_group["betas"][0], "optim.adam_beta2": adam_group["betas"][1], "optim.adam_eps": adam_group["eps"],
    }


def resume_config_changes(saved: dict[str, Any], cfg: TrainConfig, restored: dict[str, Any]) -> list[str]:
    """One line per setting that differs from what the checkpoint holds, saying whether it takes
    effect. `restored`: what the checkpoint's state imposes (restored_settings); other keys are
    compared with the config saved in the checkpoint."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    lines = []
    for key in sorted(set(old) | set(restored)):
        was = restored.get(key, old.get(key))
        now = new.get(key)
        if key in _SESSION_KEYS or key not in new or was == now:
            continue
        change = f"{key}: {was!r} in the checkpoint, {now!r} now"
        if key == "run.train_steps":
            note = ("the run goes on to the new step count; the learning-rate decay "
                    + ("is rebuilt to end there (run.override_scheduler=true)" if cfg.run.override_scheduler else
                       "keeps the checkpoint's length: set run.override_scheduler=true to rebuild it"))
        elif key.startswith("optim.adam_"):
            note = "IGNORED: Adam's hyper-parameters are restored with its state"
        elif key in restored:
            note = ("applied (run.override_scheduler=true: the learning-rate schedule is rebuilt from the new values)"
                    if cfg.run.override_scheduler else
                    "IGNORED: the learning-rate schedule is restored from the checkpoint; set run.override_scheduler=true "
                    "to apply the new value")
        else:
            reason = next((why for prefix, why in _FROM_CHECKPOINT.items() if key.startswith(prefix)), None)
            note = f"IGNORED: {reason}" if reason else "applies from this step on"
        lines.append(f"resume: {change} -> {note}")
    return lines
