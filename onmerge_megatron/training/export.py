"""Weights out of and into a run: the trained model exported in Hugging Face format, and a
Hugging Face model converted to a model-only megatron dist checkpoint (`onmerge convert-hf`)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from .config import config_from_dict
from .dist_checkpoint import refuse_nonfinite_weights, save_dist_checkpoint
from .model import build_model, export_hf, load_hf_weights, make_bridge, unwrap
from .parallel import init_distributed, is_rank0, log0


def export_hf_weights(model: list[torch.nn.Module], bridge: Any, tokenizer: Any, out_dir: str, step: int) -> None:
    """Write the weights of `model` in HF format to `out_dir`, replacing it only once the export
    is whole (all ranks call it)."""
    refuse_nonfinite_weights(model, step, f"the export {out_dir}")
    staging = out_dir + ckpt.PARTIAL_SUFFIX
    if is_rank0() and os.path.exists(staging):
        shutil.rmtree(staging)
    dist.barrier()
    export_hf(bridge, [unwrap(c) for c in model], staging, tokenizer)
    dist.barrier()
    if is_rank0():
        ckpt.atomic_replace_dir(staging, out_dir)
    dist.barrier()
    log0(f"exported HF weights to {out_dir}")


def convert_hf_to_megatron(hf_path: str, out_dir: str, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> str:
    """Save an HF model as a model-only dist checkpoint that `model.megatron_load`,
    `merge.base_megatron_load` and `loss.reference_megatron_load` read (all ranks call it)."""
    cfg = config_from_dict({"model": {"hf_path": hf_path}, "data": {"train_files": ["unused.jsonl"]},
                            "parallel": {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel,
                                         "global_batch_size": int(os.environ.get("WORLD_SIZE", "1"))}})
    init_distributed(cfg)
    bridge = make_bridge(hf_path, torch.float32)
    chunks = build_model(bridge, 1)
    load_hf_weights(bridge, chunks, hf_path)
    save_dist_checkpoint({"model": chunks[0].sharded_state_dict()}, out_dir, f"converting {hf_path}")
    log0(f"saved {hf_path} as a megatron dist checkpoint in {out_dir}")
    return out_dir
