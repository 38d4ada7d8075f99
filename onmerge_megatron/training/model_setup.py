"""The models of a run on megatron's parallel state: the policy built and loaded (Hugging Face
weights or a dist checkpoint) and wrapped for training (bf16, DDP), and the frozen reference
model of `loss.reference: online`. How one GPTModel is built from a Hugging Face config is
model.py's."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig
from .dist_checkpoint import loading_errors_named, open_checkpoint
from .model import build_model, load_hf_weights


def build_and_load(bridge: Any, seq_length: int, fmt: str, hf_path: str, megatron_load: str | None) -> list[torch.nn.Module]:
    """Model chunks of this rank with the weights of `hf_path` (fmt "hf") or of the dist
    checkpoint `megatron_load` (fmt "megatron", verified before it is read)."""
    chunks = build_model(bridge, seq_length)
    if fmt == "hf":
        load_hf_weights(bridge, chunks, hf_path)
    else:
        directory = open_checkpoint(megatron_load, "model weights")
        with loading_errors_named(directory):
            from megatron.core import dist_checkpointing

            state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, directory)
            chunks[0].load_state_dict(state["model"], strict=True)
    return chunks


def wrap_ddp(chunks: list[torch.nn.Module], bf16: bool) -> list[torch.nn.Module]:
    """megatron's DDP around each chunk (gradients reduce-scattered for the distributed
    optimizer), after Float16Module for bf16; the model config learns how to finalize grads."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=True,
        # Non-finite gradients are caught by the optimizer's found-inf check, which can skip a
        # step; DDP's own check can only abort.
        check_for_nan_in_grad=False,
    )
    if bf16:
        from megatron.core.transformer.module import Float16Module

        # As Megatron-LM: every parameter (norms included) in bf16, inputs cast, fp32 loss out.
        chunks = [Float16Module(c.config, c) for c in chunks]
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads  # DP reduce-scatter + tied-embedding sync
    config.no_sync_func = wrapped[0].no_sync
    return wrapped


def frozen_reference_model(cfg: TrainConfig, bridge: Any) -> list[torch.nn.Module]:
    """The reference model of `loss.reference: online`, in eval mode without gradients."""
    fmt = "megatron" if cfg.loss.reference_megatron_load else "hf"
    chunks = build_and_load(bridge, cfg.data.max_length, fmt, cfg.loss.reference_hf_path or cfg.model.hf_path,
                            cfg.loss.reference_megatron_load)
    if cfg.model.dtype == "bf16":
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(c.config, c) for c in chunks]
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks
