"""Multi-process megatron-core runs on CPU (gloo) shared by the Megatron tests.

Each test spawns 1-4 processes with ``spawn(job, world_size, **kwargs)``; a job is a function of
this module run on every rank after gloo and megatron's model parallel state are set up. Jobs
exchange results through files in a temporary directory: dist checkpoints (read back with
megatron's own ``load_plain_tensors``) and ``torch.save`` files.

The model is a small GPT with the pieces whose sharding is not trivial: GQA fused QKV (interleaved
per query group), gated (SwiGLU) fc1, row-parallel biases replicated over TP, layer norms, a
vocab-parallel embedding and output layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from distributed import TIMEOUT, init_single_process_group, run_distributed

VOCAB = 64
SEQ = 8
GLOBAL_BATCH = 4
NUM_LAYERS = 3  # odd: the DP split of the single bucket then falls inside a parameter (gated fc1)


def _run_job(rank: int, world: int, tp: int, pp: int, job: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    from onmerge_megatron.megatron import cpu

    cpu.enable_cpu_megatron()
    cpu.initialize_cpu_model_parallel(tp, pp, seed=1234)
    job(rank=rank, world=world, tp=tp, pp=pp, **kwargs)


def spawn(job: Callable[..., Any], world: int, tmp: Path, tp: int = 1, pp: int = 1, timeout: float = TIMEOUT, **kwargs: Any) -> None:
    """Run ``job(tmp=..., **kwargs)`` on ``world`` gloo processes (TP x PP x DP layout) through the
    tests' multi-process harness, which re-raises a rank's failure with its traceback."""
    run_distributed(_run_job, world, tp, pp, job, {"tmp": str(tmp), **kwargs}, timeout=timeout,
                    description=f"{job.__name__} at world={world} tp={tp} pp={pp}")


# ---------------------------------------------------------------------------------------- model
def transformer_config(tp: int, pp: int, bf16: bool = False, **changes: Any) -> Any:
    """The test model's config; ``changes`` (e.g. num_layers, ffn_hidden_size) make another shape."""
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=NUM_LAYERS,
        hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=24,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Uneven pipeline stages (1 + 2 layers) when PP=2.
        num_layers_in_first_pipeline_stage=1 if pp == 2 else None,
        num_layers_in_last_pipeline_stage=2 if pp == 2 else None,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    return TransformerConfig(**{**fields, **changes})


def build_model(tp: int = 1, pp: int = 1, bf16: bool = False, tied: bool = False, **changes: Any) -> Any:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=transformer_config(tp, pp, bf16, **changes),
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def wrap_ddp(model: Any, tp: int, pp: int, distributed: bool = True, bf16: bool = False) -> Any:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = transformer_config(tp, pp, bf16)
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True)
    return DistributedDataParallel(config, ddp_config, model)


def megatron_optimizer(
    chunks: list, lr: float = 1e-2, weight_decay: float = 0.01, eps: float = 1e-8, distributed: bool = True, bf16: bool = False
) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.95, adam_eps=eps,
        use_distributed_optimizer=distributed, bf16=bf16, fp16=False, clip_grad=0.0,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    # What megatron's OptimizerParamScheduler does each step (no weight decay for biases and 1-D
    # params through wd_mult); without a scheduler every group would get config.weight_decay.
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step: (tokens, position ids, causal mask: True = masked)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ)[None].expand(GLOBAL_BATCH, SEQ)
    mask = ~torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))[None, None]
    return tokens, position_ids, mask


def forward_backward(chunk: Any, step: int, dp_rank: int, dp_size: int) -> None:
    """One step's forward/backward of this DP rank's rows through megatron's schedule (handles PP)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, position_ids, mask = batch(step)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    inputs, labels = tokens[rows, :-1], tokens[rows, 1:]
    position_ids = position_ids[rows]

    def forward_step(data_iterator: Any, model: Any) -> Any:
        output = model(inputs, position_ids, mask, labels=labels)

        def loss_func(output_tensor: torch.Tensor) -> Any:
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[chunk],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=inputs.shape[0],
        forward_only=False,
    )


# ------------------------------------------------------------------ names as the checkpoint has them
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# The local layer spec saves its separate norms under Transformer Engine's fused names.
_LOCAL_SPEC_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def checkpoint_name_and_coords(name: str, param: torch.Tensor) -> tuple[str, Any]:
    """For a TP=1, PP=1 model: (tensor name, coords) of a parameter, written out independently of
    the adapter: the checkpoint key, with ``[i]`` for layer ``i`` of a layer-stacked key."""
    from onmerge_megatron.merging.coords import ShardCoords

    match = _LAYER.match(name)
    if match is None:
        return name, ShardCoords.full(tuple(param.shape))
    layer, rest = int(match.group(1)), match.group(2)
    rest = _LOCAL_SPEC_KEYS.get(rest, rest)
    return f"decoder.layers.{rest}[{layer}]", ShardCoords.full(tuple(param.shape))


def save_model(model: Any, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(path))


def load_model(model: Any, path: Path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state, strict=False)


def plain_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint, whole (megatron's own reader; no layout knowledge here)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if not dist.is_initialized():  # the reader wants a process group; a private one-rank group
        init_single_process_group()
    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(path)).items() if isinstance(v, torch.Tensor)}
