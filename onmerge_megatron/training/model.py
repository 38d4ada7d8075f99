"""megatron-core GPTModel from a Hugging Face config, with weights through mbridge.

mbridge (the HF <-> Megatron mapping library) builds the TransformerConfig from the HF config
and converts weights (QKV interleaved per query group, gate/up fused into fc1, TP splits). It
assumes Transformer Engine; to run anywhere (CPU with gloo included) the model is built here
with megatron-core's local layer spec instead, whose separate norm weights
(`input_layernorm`, `pre_mlp_layernorm`) get their own name mappings below.
"""

from __future__ import annotations

import os
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _rope_args(hf_config: Any) -> dict[str, Any]:
    """Map HF rope_scaling to GPTModel arguments (mbridge maps every kind to linear, which is
    wrong for Llama-3.1-style scaling)."""
    scaling = getattr(hf_config, "rope_scaling", None)
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    if kind == "llama3":
        # megatron-core hard-codes low=1, high=4, original context 8192 (Llama 3.1 / 3.2 values).
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(scaling.get(key, value)) != value:
                raise ValueError(f"rope_scaling.{key}={scaling[key]} is not supported (megatron-core fixes it to {value})")
        return {"rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}
    if kind == "default":
        return {}
    raise ValueError(f"rope_scaling type {kind!r} is not supported by this trainer")


def make_bridge(hf_path: str, dtype: torch.dtype) -> Any:
    """An mbridge Bridge for `hf_path` with settings that work without Transformer Engine."""
    from mbridge import AutoBridge
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(hf_path)
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{hf_path}: model_type {hf_config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    bridge = AutoBridge.from_config(hf_config, dtype=dtype)
    cpu = not on_gpu()
    bridge.set_extra_args(
        sequence_parallel=False,  # needs TE's LayerNorm; mbridge turns it on for TP > 1
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        use_cpu_initialization=cpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fixed-shape p2p between pipeline stages: batches are padded to max_length under PP.
        variable_seq_lengths=False,
    )
    # Local-spec names of the norms, which TE fuses into the linear layers.
    bridge._OTHER_MAPPING = dict(bridge._OTHER_MAPPING, **{"input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]})
    bridge._MLP_MAPPING = {"pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"], **bridge._MLP_MAPPING}
    return bridge


def build_model(bridge: Any, seq_length: int) -> list[torch.nn.Module]:
    """One GPTModel chunk for this pipeline stage (no virtual pipeline), not yet DDP-wrapped."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = bridge.config
    config.variable_seq_lengths = parallel_state.get_pipeline_model_parallel_world_size() == 1
    hf = bridge.hf_config
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=bool(getattr(config, "qk_layernorm", False)))
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hf.vocab_size,
        max_sequence_length=max(seq_length, getattr(hf, "max_position_embeddings", seq_length)),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(getattr(hf, "rope_theta", 10000)),
        **_rope_args(hf),
    )
    if on_gpu():
        model.cuda(torch.cuda.current_device())
    for param in model.parameters():
        # megatron's optimizer and DDP expect these attributes on every parameter.
        from megatron.core import tensor_parallel

        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return [model]


def load_hf_weights(bridge: Any, models: list[torch.nn.Module], hf_path: str) -> None:
    bridge.load_weights(models, hf_path)


def _mbridge_on_cpu() -> None:
    """mbridge's pipeline-parallel broadcast allocates on torch.cuda.current_device(); on CPU give
    that module the CPU layer's torch stand-in (as megatron-core's modules have)."""
    if on_gpu():
        return
    import mbridge.core.util as util

    from onmerge_megatron.megatron.compat import CPU_TORCH

    if util.torch is torch:
        util.torch = CPU_TORCH


def export_hf(bridge: Any, models: list[torch.nn.Module], out_dir: str, tokenizer: Any | None = None) -> None:
    """Write HF safetensors + config (and the tokenizer) on rank 0; every rank must call it."""
    _mbridge_on_cpu()
    if bridge.safetensor_io is None:  # weights came from a megatron checkpoint, not through mbridge
        from mbridge.core.safetensor_io import SafeTensorIO

        bridge.safetensor_io = SafeTensorIO(out_dir)
    bridge.save_weights(models, out_dir)
    if tokenizer is not None and torch.distributed.get_rank() == 0:
        tokenizer.save_pretrained(out_dir)
    torch.distributed.barrier()


def causal_attention_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is masked. Right padding needs no extra mask:
    a causal model never lets a real token see the padding after it, and padded positions
    carry no loss."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model
