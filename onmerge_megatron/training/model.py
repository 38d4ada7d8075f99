"""megatron-core GPTModel from a Hugging Face config, with weights through mbridge.

mbridge (the HF <-> Megatron mapping library) builds the TransformerConfig from the HF config
and converts weights (QKV interleaved per query group, gate/up fused into fc1, TP splits). Two
layer specs are built here:

- Transformer Engine's (`get_gpt_layer_with_transformer_engine_spec`): fused attention, the norms
  fused into the following linear layers, the usual fusions on; what mbridge maps natively.
  Needs TE and a GPU.
- megatron-core's local spec (plain PyTorch layers; runs anywhere, CPU with gloo included), whose
  separate norm weights (`input_layernorm`, `pre_mlp_layernorm`) get name mappings derived from
  `LOCAL_TO_TE_NAMES`, the one table of Transformer Engine parameter names in this package.

Checkpoint keys (and so the merge's coordinates and tau) are the same for both: the local spec saves
its norms under the TE names (its `sharded_state_dict_keys_map`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

LOCAL_TO_TE_NAMES: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
"""Per-layer parameter names that differ between the two layer specs (the rest are equal):
local-spec name -> Transformer Engine name. TE fuses each norm into the linear layer after it;
the local spec's checkpoint keys already use the TE names."""


def on_gpu() -> bool:
    return torch.cuda.is_available()


@functools.cache
def transformer_engine_available() -> bool:
    """Transformer Engine's PyTorch module imports (any error counts as absent: a broken TE
    install must fall back, not fail a run that asked for 'auto')."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def use_transformer_engine(cfg: Any) -> bool:
    """Whether the run builds the Transformer Engine layer spec: `model.transformer_impl`
    'transformer_engine' (validation refuses it without TE and a GPU), 'local', or 'auto' (TE
    when it imports and a GPU is present). `cfg` is a TrainConfig."""
    return transformer_engine_for(cfg.model.transformer_impl)


def transformer_engine_for(impl: str) -> bool:
    """`model.transformer_impl` `impl` resolved on this machine (see use_transformer_engine)."""
    if impl == "auto":
        return on_gpu() and transformer_engine_available()
    return impl == "transformer_engine"


def use_sequence_parallel(cfg: Any, transformer_engine: bool | None = None) -> bool:
    """`parallel.sequence_parallel` resolved: 'auto' is on with TP > 1 where it runs, i.e. with
    the Transformer Engine spec (megatron-core's local norms refuse sequence parallelism).
    `transformer_engine`: whether the layers are TE's, by default use_transformer_engine(cfg) on
    this machine (the memory planner passes the layers it assumes)."""
    sp = cfg.parallel.sequence_parallel
    if sp == "auto":
        if cfg.parallel.tensor_parallel <= 1:
            return False
        return use_transformer_engine(cfg) if transformer_engine is None else transformer_engine
    return bool(sp)


@dataclass(frozen=True)
class LayerSettings:
    """How the layers are built and run (from the model and parallel sections of a TrainConfig)."""

    transformer_engine: bool = False
    sequence_parallel: bool = False
    recompute: str = "none"
    """'none', 'selective' (the attention core) or 'full' (whole layers)."""
    recompute_layers: int = 0
    """With 'full': layers per pipeline stage recomputed, from the first (0: every layer)."""

    @classmethod
    def from_config(cls, cfg: Any) -> "LayerSettings":
        return cls(use_transformer_engine(cfg), use_sequence_parallel(cfg), cfg.model.recompute, cfg.model.recompute_layers)

    def transformer_config_args(self) -> dict[str, Any]:
        """TransformerConfig fields for these settings."""
        te = self.transformer_engine
        args: dict[str, Any] = {
            "sequence_parallel": self.sequence_parallel,
            # Fusions: TE's kernels (or megatron's jit-fused ones) on GPUs; the local spec runs
            # them unfused (masked_softmax_fusion and rope fusion need CUDA extensions / TE).
            "masked_softmax_fusion": te,
            "bias_activation_fusion": te,
            "bias_dropout_fusion": te,
            "apply_rope_fusion": te,
            # Needs apex's CUDA extension for the output layer (ColumnParallelLinear refuses without it).
            "gradient_accumulation_fusion": te and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
            "persist_layer_norm": False,
            "recompute_granularity": None,
            "recompute_method": None,
            "recompute_num_layers": None,
        }
        if self.recompute == "selective":
            args.update(recompute_granularity="selective", recompute_modules=["core_attn"])
        elif self.recompute == "full":
            # 'uniform' with units of one layer recomputes every layer; 'block' the first N of a stage.
            method, layers = ("block", self.recompute_layers) if self.recompute_layers else ("uniform", 1)
            args.update(recompute_granularity="full", recompute_method=method, recompute_num_layers=layers)
        return args


LOCAL = LayerSettings()
"""The local spec, no sequence parallelism, no recomputation: runs anywhere."""


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


def make_bridge(hf_path: str, dtype: torch.dtype, layers: LayerSettings = LOCAL) -> Any:
    """An mbridge Bridge for `hf_path` whose TransformerConfig has `layers`' settings (by default
    the local spec's, which work without Transformer Engine)."""
    from mbridge import AutoBridge
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(hf_path)
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{hf_path}: model_type {hf_config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    bridge = AutoBridge.from_config(hf_config, dtype=dtype)
    cpu = not on_gpu()
    bridge.set_extra_args(
        # Replacing mbridge's own choices (sequence parallelism on for TP > 1, masked-softmax fusion on).
        **layers.transformer_config_args(),
        use_cpu_initialization=cpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fixed-shape p2p between pipeline stages: batches are padded to max_length under PP.
        variable_seq_lengths=False,
    )
    if not layers.transformer_engine:
        add_local_spec_names(bridge)
    return bridge


def add_local_spec_names(bridge: Any) -> None:
    """Give the bridge HF names for the local spec's parameters that TE names otherwise: each takes
    the HF names mbridge maps its TE name to (`LOCAL_TO_TE_NAMES`)."""
    for local, te in LOCAL_TO_TE_NAMES.items():
        table_name = next(t for t in ("_ATTENTION_MAPPING", "_MLP_MAPPING") if te in getattr(bridge, t))
        hf_names = getattr(bridge, table_name)[te]
        # mbridge matches a name against its tables by substring, in order, sorted by where the
        # name lands: '.self_attention.' -> attention, 'mlp' -> MLP, else 'other'; and the first
        # match wins, so the local name goes first in its table.
        if ".self_attention." in f".{local}":
            bridge._ATTENTION_MAPPING = {local: hf_names, **bridge._ATTENTION_MAPPING}
        elif "mlp" in local:
            bridge._MLP_MAPPING = {local: hf_names, **bridge._MLP_MAPPING}
        else:
            bridge._OTHER_MAPPING = {local: hf_names, **bridge._OTHER_MAPPING}


def layer_spec(config: Any, transformer_engine: bool) -> Any:
    """megatron-core's layer spec: Transformer Engine's or the local one."""
    from megatron.core.models.gpt import gpt_layer_specs

    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    if transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)


def build_model(bridge: Any, seq_length: int, transformer_engine: bool = False) -> list[torch.nn.Module]:
    """One GPTModel chunk for this pipeline stage (no virtual pipeline), not yet DDP-wrapped, with
    the Transformer Engine layer spec or the local one (the bridge must have been made with the
    same `LayerSettings.transformer_engine`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = bridge.config
    config.variable_seq_lengths = parallel_state.get_pipeline_model_parallel_world_size() == 1
    hf = bridge.hf_config
    spec = layer_spec(config, transformer_engine)
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
