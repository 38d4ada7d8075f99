"""The models of a run on megatron's parallel state: the policy built and loaded (Hugging Face
weights or a dist checkpoint) and wrapped for training (bf16, DDP), and the frozen reference
model of `loss.reference: online`. How one GPTModel is built from a Hugging Face config is
model.py's."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig
from .dist_checkpoint import loading_errors_named, open_checkpoint
from .model import build_model, load_hf_weights, use_transformer_engine


def build_and_load(bridge: Any, seq_length: int, fmt: str, hf_path: str, megatron_load: str | None,
                   transformer_engine: bool = False) -> list[torch.nn.Module]:
    """Model chunks of this rank with the weights of `hf_path` (fmt "hf") or of the dist
    checkpoint `megatron_load` (fmt "megatron", verified before it is read), built with the
    Transformer Engine layer spec or the local one."""
    chunks = build_model(bridge, seq_length, transformer_engine)
    if fmt == "hf":
        load_hf_weights(bridge, chunks, hf_path)
    else:
        directory = open_checkpoint(megatron_load, "model weights")
        with loading_errors_named(directory):
            from megatron.core import dist_checkpointing

            state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, directory)
            chunks[0].load_state_dict(state["model"], strict=True)
    return chunks


def wrap_ddp(chunks: list[torch.nn.Module], bf16: bool, overlap_grad_reduce: bool = False,
             overlap_param_gather: bool = False) -> list[torch.nn.Module]:
    """megatron's DDP around each chunk (gradients reduce-scattered for the distributed
    optimizer), after Float16Module for bf16; the model config learns how to finalize grads.
    `overlap_grad_reduce`: the reduce-scatter of each gradient bucket starts during the last
    micro-batch's backward. `overlap_param_gather` (needs it): the parameter all-gather after a step
    is left to the next forward, whose pre-hooks wait for each bucket (see `sync_params`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
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


def sync_params(chunks: list[torch.nn.Module]) -> None:
    """With `overlap_param_gather` the weights of the last step reach the model parameters only in
    the next forward: gather them now (collective; a no-op otherwise), before they are read
    directly (checkpoint, export, the finite check)."""
    for chunk in chunks:
        if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
            chunk.start_param_sync(force_sync=True)


def frozen_reference_model(cfg: TrainConfig, bridge: Any) -> list[torch.nn.Module]:
    """The reference model of `loss.reference: online`, in eval mode without gradients."""
    fmt = "megatron" if cfg.loss.reference_megatron_load else "hf"
    chunks = build_and_load(bridge, cfg.data.max_length, fmt, cfg.loss.reference_hf_path or cfg.model.hf_path,
                            cfg.loss.reference_megatron_load, use_transformer_engine(cfg))
    if cfg.model.dtype == "bf16":
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(c.config, c) for c in chunks]
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks
