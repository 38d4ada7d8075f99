"""Weights out of and into a run: a model exported in Hugging Face format (at the end of a run, or
from any checkpoint a run saved: `onmerge export-hf`), and a Hugging Face model converted to a
model-only megatron dist checkpoint (`onmerge convert-hf`).

An export directory holds the safetensors weights (sharded like the source model's when it has an
index), config.json with `architectures` and the weights' dtype (`dtype`, and `torch_dtype` for
readers before transformers 4.56), the tokenizer, and the source model's generation_config.json
when it has one (Llama-3-Instruct lists its end-of-turn tokens there). It is written under
`<out>.partial` and renamed into place only once whole.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from .config import config_from_dict
from .dist_checkpoint import loading_errors_named, refuse_nonfinite_weights, save_dist_checkpoint
from .model import (LayerSettings, build_model, export_hf, load_hf_weights, make_bridge, on_gpu,
                    transformer_engine_available, transformer_engine_for, unwrap)
from .parallel import init_distributed, is_rank0, log0

GENERATION_CONFIG = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors header dtype -> the name config.json uses.
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class ExportError(RuntimeError):
    """An export that cannot be made; nothing was written. The message says why."""


# --------------------------------------------------------------------------- the exporter


def export_hf_weights(model: list[torch.nn.Module], bridge: Any, tokenizer: Any, out_dir: str, step: int,
                      source_hf_path: str) -> None:
    """Write `model` in HF format to `out_dir` (all ranks call it), replacing it only once the
    export is whole. `source_hf_path`: the HF model the run was built from (its shard layout and
    generation config are carried over)."""
    refuse_nonfinite_weights(model, step, f"the export {out_dir}")
    staging = out_dir + ckpt.PARTIAL_SUFFIX
    if is_rank0() and os.path.exists(staging):
        shutil.rmtree(staging)
    dist.barrier()
    if bridge.safetensor_io is None:  # weights from a megatron checkpoint: shard as the source model is
        from mbridge.core.safetensor_io import SafeTensorIO

        bridge.safetensor_io = SafeTensorIO(source_hf_path)
    export_hf(bridge, [unwrap(c) for c in model], staging, tokenizer)
    error = None
    if is_rank0():
        try:
            complete_hf_export(staging, source_hf_path)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            error = str(exc) if isinstance(exc, ExportError) else f"completing the export {staging} failed ({ckpt.brief(exc)})"
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ExportError(verdict[0])
    if is_rank0():
        ckpt.atomic_replace_dir(staging, out_dir)
    dist.barrier()
    log0(f"exported HF weights to {out_dir}")


def complete_hf_export(directory: str, source_hf_path: str) -> None:
    """Finish a staged export (one process): check the weight files, state the architecture and
    dtype in config.json, copy the source's generation config."""
    dtype = _weights_dtype(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    if not config.get("architectures"):
        config["architectures"] = [causal_lm_architecture(config.get("model_type"))]
    config["dtype"] = config["torch_dtype"] = dtype
    ckpt.atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = os.path.join(source_hf_path, GENERATION_CONFIG)
    if os.path.isfile(generation):
        shutil.copyfile(generation, os.path.join(directory, GENERATION_CONFIG))


def causal_lm_architecture(model_type: str | None) -> str:
    """transformers' causal-LM class name for `model_type` (what `architectures` lists)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"config.json: model_type {model_type!r} has no causal-LM class in transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def _weights_dtype(directory: str) -> str:
    """The one floating dtype of the exported tensors (from the safetensors headers), after checking
    that every file the index names was written (mbridge only warns about weights it did not save)."""
    from safetensors import safe_open

    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            missing = sorted(set(json.load(f)["weight_map"].values()) - set(files))
        if missing:
            raise ExportError(f"the export {directory} lacks {missing[:3]}, named by {SAFETENSORS_INDEX}: weights were not saved")
    if not files:
        raise ExportError(f"the export {directory} holds no .safetensors file")
    dtypes = set()
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            dtypes.update(f.get_slice(key).get_dtype() for key in f.keys())
    floating = dtypes & set(_DTYPE_NAMES)
    if len(floating) != 1:
        raise ExportError(f"the export {directory} holds tensors of dtypes {sorted(dtypes)}; expected one floating dtype")
    return _DTYPE_NAMES[floating.pop()]


# --------------------------------------------------------------------------- any checkpoint of a run


def checkpoint_to_export(path: str) -> str:
    """The checkpoint `path` names, verified against its manifest (one process, before any process
    group): a checkpoint directory (`checkpoints/step_N`), or a run's output_dir (or its
    checkpoints/) meaning its newest intact checkpoint. Raises CheckpointError otherwise."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise ckpt.CheckpointError(f"export: {path} is not a directory")
    for root in (os.path.join(path, "checkpoints"), path):
        if ckpt.read_latest(root) is not None or ckpt.published_steps(root):
            return newest_intact_checkpoint(root)
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise ckpt.CheckpointError(
            f"export: {path} is neither a megatron dist checkpoint (it has no metadata.json) nor a run's output "
            f"directory (it has no checkpoints/latest nor checkpoints/step_*)")
    ckpt.require_intact(path, "export", print)
    return path


def newest_intact_checkpoint(root: str) -> str:
    """The checkpoint `latest` names under `root`, or, when it is damaged, the newest intact one
    (named on stdout; nothing is moved or removed)."""
    latest = ckpt.read_latest(root)
    candidates = [d for _, d in ckpt.published_steps(root)]
    if latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    damaged = []
    for directory in candidates:
        problems = ckpt.verify_checkpoint(directory)
        if problems:
            damaged.append(f"{directory} ({problems[0]})")
            continue
        if problems is None:
            print(f"export: {directory} has no {ckpt.MANIFEST}; its files cannot be verified", flush=True)
        if damaged:
            print(f"WARNING: export: exporting {directory}, the newest intact checkpoint; damaged: {'; '.join(damaged)}", flush=True)
        return directory
    if damaged:
        raise ckpt.CheckpointError(f"export: no intact checkpoint under {root}; damaged: {'; '.join(damaged)}")
    raise ckpt.CheckpointError(f"export: no checkpoint under {root} ({ckpt.LATEST} names {latest}, which does not exist)")


def saved_trainer_state(directory: str) -> dict[str, Any]:
    """The trainer's record in a checkpoint (step, the run's config), {} when it has none (e.g. a
    model-only checkpoint from `onmerge convert-hf`)."""
    from megatron.core import dist_checkpointing

    with loading_errors_named(directory):
        common = dist_checkpointing.load_common_state_dict(directory)
    trainer = common.get("trainer") if isinstance(common, dict) else None
    return trainer if isinstance(trainer, dict) else {}


def _check_out_dir(out_dir: str, checkpoint: str, overwrite: bool) -> None:
    out, inside = os.path.abspath(out_dir), os.path.abspath(checkpoint)
    if out == inside or out.startswith(inside + os.sep):
        raise ExportError(f"--out {out_dir} is inside the checkpoint {checkpoint}, which must stay as it was saved")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir} exists and is not a directory")
    if os.listdir(out_dir):
        if not overwrite:
            raise ExportError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace an earlier export")
        if not os.path.isfile(os.path.join(out_dir, "config.json")):
            raise ExportError(f"--out {out_dir} is not an earlier export (it has no config.json); not replaced")


def export_layer_spec(model_cfg: dict[str, Any], directory: str) -> bool:
    """Whether the export builds the Transformer Engine layer spec: the `model.transformer_impl`
    saved in the checkpoint's config, resolved here as a run resolves it ('auto': TE when it
    imports and a GPU is present; absent, e.g. a model-only checkpoint: 'local'). A checkpoint
    whose config says 'transformer_engine' is refused where TE or a GPU is missing."""
    impl = model_cfg.get("transformer_impl", "local")
    if impl == "transformer_engine":
        if not transformer_engine_available():
            raise ExportError(f"checkpoint {directory} was trained with model.transformer_impl 'transformer_engine', "
                              f"whose layer spec needs Transformer Engine, which does not import here; export it "
                              f"where transformer_engine is installed")
        if not on_gpu():
            raise ExportError(f"checkpoint {directory} was trained with model.transformer_impl 'transformer_engine', "
                              f"whose layer spec needs a GPU, and none is available here")
    return transformer_engine_for(impl)


def export_checkpoint(checkpoint: str, out_dir: str, hf_path: str | None = None, overwrite: bool = False) -> str:
    """Export the checkpoint `checkpoint` names (see checkpoint_to_export) in HF format to
    `out_dir`, whatever tensor/pipeline-parallel sizes it was saved with (dist_checkpointing
    reshards on load). Meant for one process; under torchrun every rank loads the whole model.
    The source model (architecture, tokenizer, generation config) is `hf_path`, by default the
    run's model.hf_path saved in the checkpoint; the layer spec is the one the saved
    `model.transformer_impl` selects (export_layer_spec). Everything is checked before anything
    is written."""
    directory = checkpoint_to_export(checkpoint)
    trainer = saved_trainer_state(directory)
    model_cfg = trainer.get("config", {}).get("model", {})
    source = hf_path or model_cfg.get("hf_path")
    if not source:
        raise ExportError(f"checkpoint {directory} holds no training config (it was not written by `onmerge train`); "
                          f"pass --hf DIR, the Hugging Face model whose architecture it has")
    if not os.path.isfile(os.path.join(source, "config.json")):
        where = "--hf" if hf_path else f"model.hf_path in checkpoint {directory}"
        raise ExportError(f"{source} ({where}) has no config.json; pass --hf DIR, the Hugging Face model the run started from")
    _check_out_dir(out_dir, directory, overwrite)
    transformer_engine = export_layer_spec(model_cfg, directory)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    init_distributed(config_from_dict({"model": {"hf_path": source}, "data": {"train_files": ["unused.jsonl"]},
                                       "parallel": {"global_batch_size": world_size}}))
    from megatron.core import dist_checkpointing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_path or model_cfg.get("tokenizer_path") or source)
    bridge = make_bridge(source, torch.bfloat16 if model_cfg.get("dtype") == "bf16" else torch.float32,
                         LayerSettings(transformer_engine=transformer_engine))
    chunks = build_model(bridge, 1, transformer_engine)
    log0(f"export: loading {directory} (step {trainer.get('step', '?')}) on {world_size} process(es), "
         f"{'Transformer Engine' if transformer_engine else 'local'} layer spec")
    with loading_errors_named(directory):
        state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, directory)
        chunks[0].load_state_dict(state["model"], strict=True)
    export_hf_weights(chunks, bridge, tokenizer, out_dir, int(trainer.get("step", 0)), source)
    return out_dir


def run_export_command(checkpoint: str, out_dir: str, hf_path: str | None, overwrite: bool) -> int:
    """`onmerge export-hf`: 0 when exported, 2 (with the reason on stderr) when refused."""
    try:
        export_checkpoint(checkpoint, out_dir, hf_path, overwrite)
        return 0
    except (ckpt.CheckpointError, ExportError, FloatingPointError) as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- HF -> megatron


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
