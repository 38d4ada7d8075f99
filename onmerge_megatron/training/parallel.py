"""This process's place in a run: the process group and megatron's parallel groups, its device,
rank-0 logging, and quiet library warnings (every rank would print them)."""

from __future__ import annotations

import datetime
import logging
import os
import warnings

import torch
import torch.distributed as dist

from ..processes import forked_children_die_with_parent
from .config import TrainConfig, validate
from .model import on_gpu


def init_distributed(cfg: TrainConfig) -> None:
    """Process group from torchrun's environment (or a single local process), then megatron's
    model-parallel groups. Checks the parallel sizes against the world size first."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world_size, check_paths=False, check_devices=True)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if on_gpu() else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:
            # One process: an in-memory store, so no port is picked (a free port found first can
            # be taken by another process before the store binds it).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # Checkpoint writers die with this rank (see dist_checkpoint.save_dist_checkpoint).
    forked_children_die_with_parent()
    from megatron.core import parallel_state

    tp, pp, seed = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.run.seed
    if on_gpu():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 context_parallel_size=cfg.parallel.context_parallel)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        from onmerge_megatron.megatron.cpu import enable_cpu_megatron, initialize_cpu_model_parallel

        enable_cpu_megatron()
        initialize_cpu_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def is_rank0() -> bool:
    return dist.get_rank() == 0


def log0(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def quiet_library_warnings() -> None:
    """Deprecation chatter from torch.distributed.checkpoint, megatron-core and mbridge on every rank."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in ("megatron", "mbridge", "torch.distributed", "transformer_engine"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # "common state dict differs" between ranks is expected with the memory-efficient optimizer save.
    logging.getLogger("megatron.core.dist_checkpointing").setLevel(logging.ERROR)
    # Megatron-LM initialises its rerun state machine explicitly; as a library we take the default.
    logging.getLogger("megatron.core.rerun_state_machine").setLevel(logging.ERROR)
