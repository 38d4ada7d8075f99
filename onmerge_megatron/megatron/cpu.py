"""Run megatron-core on CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places even when the model is built with
``use_cpu_initialization=True`` and the local (non Transformer Engine) layer spec. The stand-ins
for those spots live in ``compat.py`` (with every other use of megatron-core internals, gated by
the versions they were tested on); this module is the public entry point, so that tests and the
CPU training job exercise the real megatron-core code paths (DDP buffers, distributed optimizer,
dist_checkpointing) rather than re-implementations of them.
"""

from __future__ import annotations

from typing import Any

import torch

from . import compat


def enable_cpu_megatron(allow_untested_version: bool = False) -> None:
    """Patch megatron-core (in this process) to run on CPU with gloo. Idempotent.

    Call it before building models or optimizers. Models must be built with
    ``use_cpu_initialization=True`` and the local layer spec (no Transformer Engine); keep
    sequence parallelism off (the local norms refuse it). ``overlap_grad_reduce`` and
    ``overlap_param_gather`` run on gloo.
    ``allow_untested_version``: accept a megatron-core version not in ``compat.TESTED_VERSIONS``.
    """
    if allow_untested_version:
        compat.allow_untested_megatron()
    compat.enable_cpu_shims()


def is_cpu_megatron_enabled() -> bool:
    return compat.cpu_shims_enabled()


def enable_cpu_megatron_lm(script_modules: tuple[str, ...] = (), allow_untested_version: bool = False) -> None:
    """Also run Megatron-LM's ``pretrain()`` (``megatron.training``, from a Megatron-LM checkout) on
    CPU with gloo, against the installed megatron-core. Idempotent.

    Call it after importing the training script's module (e.g. ``pretrain_gpt``; name it in
    ``script_modules`` so that its ``torch.cuda`` calls get the CPU stand-ins too) and before
    ``pretrain``. Run with ``--distributed-backend gloo --use-cpu-initialization --transformer-impl
    local`` and the fusions off (``--no-masked-softmax-fusion --no-bias-gelu-fusion
    --no-bias-dropout-fusion --no-gradient-accumulation-fusion --no-persist-layer-norm
    --no-rope-fusion``); see docs/megatron.md.
    """
    if allow_untested_version:
        compat.allow_untested_megatron()
    compat.enable_cpu_megatron_lm_shims(script_modules)
    compat.use_prebuilt_dataset_helpers()


def init_cpu_process_group(rank: int, world_size: int, init_method: str) -> None:
    """Start a gloo process group (the CPU stand-in for NCCL) if none is running."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)


def initialize_cpu_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    **kwargs: Any,
) -> None:
    """``parallel_state.initialize_model_parallel`` plus the seeds megatron expects, on CPU.

    Needs a running gloo process group (see ``init_cpu_process_group``).
    """
    enable_cpu_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
