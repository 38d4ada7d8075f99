"""Memory planner: what one GPU of a training run holds, from its config, before anything is launched.

    onmerge plan --config configs/llama3_8b_dpo_ondare.yaml --world-size 16 [--gpu-memory 80] [--json]

Sizes come from the model's config.json (no weights are read). Per GPU, the planner counts:

- **weights**: the model's parameters on this rank (its TP slice and PP stage), in model.dtype, laid
  out as megatron-core's DDP lays out its contiguous parameter buffer for the distributed optimizer
  (each parameter's start padded to 64 elements, each bucket's end to lcm(DP, 128)): the exact
  buffer size, padding included;
- **gradients**: the same layout in fp32 (DDP's `main_grad` buffer, `grad_reduce_in_fp32`);
- **fp32 main params**: this DP rank's shard of the buffer, copied to fp32 when the model is bf16
  (for an fp32 model the distributed optimizer's main params are views of the weights: 0 bytes);
- **Adam moments**: exp_avg and exp_avg_sq, fp32, on the same shard;
- **merge state** (merging/state.py, merging/reference.py) on the same shard: the reference delta τ
  (OnDARE with a fixed mask: the kept values alone, fp32, about p of the shard; OnTIES: values and
  int32 positions, floor(p·n) of each main-param segment; a resampled mask: the whole delta, dense
  fp32), the step-K accumulator (dense fp32, when merge_every > 1) and the weight EMA (dense fp32);
  the fused kernel's cached α·F(τ) term (int64 positions + fp32 values per kept element, OnDARE
  with a fixed mask) when the fused step is used;
- **reference model**: the frozen reference of `loss.reference: online` (weights only, model.dtype);
  `cached` keeps its log-probs on the host;
- **activations** of the micro-batches in flight (see `layer_activation_bytes`);
- **logits**: the last stage's [s, b, vocab/TP] output in model.dtype plus the fp32 copy
  megatron's vocab-parallel cross entropy keeps for the backward.

The activation model follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv 2205.05198), whose GPT layer stores s·b·h·(34 + 5·a·s/h) bytes in 16-bit
without sequence parallelism or recomputation: 34·s·b·h for the linear and norm inputs, GeLU and
dropout, and 5·a·s²·b for the attention scores, softmax and its dropout. That count is adapted
term by term to the layers this trainer builds (Llama/Qwen2: RMSNorm, SwiGLU MLP, grouped-query
attention, no dropout); the terms and what each stands for are in `layer_activation_bytes`. As in
the paper, sequence parallelism divides every term by TP, without it the norm and linear inputs
stay whole; a fused (flash) attention keeps no s² term; selective recomputation drops the
attention core's internals; full recomputation keeps each recomputed layer's input alone, plus one
layer's working set while it is recomputed; unfused attention also holds the s² tensors of the
one layer whose attention is running. The model is an estimate (allocator caching and
library workspaces are not in it): the reserve covers them, and `bench/gpu_check.py` compares the
prediction with a measured peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, TrainConfig, effective_pack_length, validate
from .model import use_sequence_parallel

GiB = 2**30

# Dense bf16 peak (no sparsity) in TFLOP/s, vendor datasheets; matched against the device name.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0)]

# Architectures of the shipped configs, for planning on a machine that has no copy of the model
# (`--model-config llama3-8b`). Values are those of the models' Hugging Face config.json.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      attention_bias=False),
    "qwen1.5-7b": dict(model_type="qwen2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=151936, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Llama/Qwen2 decoder that memory depends on."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    source: str = ""

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str) -> "ModelDims":
        try:
            heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            return cls(
                hidden=hidden, ffn=hf["intermediate_size"], layers=hf["num_hidden_layers"], heads=heads,
                kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hidden // heads,
                vocab=hf["vocab_size"], tied=bool(hf.get("tie_word_embeddings", False)),
                # Qwen2 always has a QKV bias; Llama has one when attention_bias is set.
                qkv_bias=hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)), source=source)
        except KeyError as exc:
            raise ConfigError(f"{source}: config.json has no {exc.args[0]!r} (needed for the memory plan)") from None

    @property
    def num_params(self) -> int:
        return sum(numel for _, numel, _ in param_numels(self, tp=1, pp=1, stage=0))


def load_dims(cfg: TrainConfig, model_config: str | None = None) -> ModelDims:
    """Model sizes from `model_config` (a preset name, a config.json or a directory holding one), else
    from model.hf_path's config.json. Names what is missing when neither is there."""
    where = model_config or cfg.model.hf_path
    if model_config in PRESETS:
        return ModelDims.from_hf_dict(PRESETS[model_config], f"preset {model_config!r}")
    if where is None:
        raise ConfigError("config key 'model.hf_path' is required (its config.json gives the model's sizes)")
    path = where if where.endswith(".json") else os.path.join(where, "config.json")
    if not os.path.isfile(path):
        key = "--model-config" if model_config else "config key 'model.hf_path'"
        raise ConfigError(f"{key}: no config.json at {path}; pass --model-config with a model directory, a "
                          f"config.json or one of the presets {sorted(PRESETS)}")
    with open(path) as f:
        return ModelDims.from_hf_dict(json.load(f), path)


# --------------------------------------------------------------------------- parameters and buffers


def param_numels(dims: ModelDims, tp: int, pp: int, stage: int) -> list[tuple[str, int, bool]]:
    """(name, elements on this TP rank, shared embedding) of a pipeline stage's parameters, in the
    order megatron-core's GPTModel (local layer spec) registers them. Norm weights are replicated
    over TP; embedding, output layer, QKV, projection and MLP weights are split by TP."""
    h, d = dims.hidden, dims.head_dim
    first, last = stage == 0, stage == pp - 1
    per_stage = dims.layers // pp
    qkv_out = (dims.heads + 2 * dims.kv_heads) * d
    out: list[tuple[str, int, bool]] = []
    if first:
        # With tied embeddings under PP, the first and last stage each hold a copy, kept equal by an all-reduce.
        out.append(("embedding.word_embeddings.weight", dims.vocab * h // tp, dims.tied and pp > 1))
    for i in range(stage * per_stage, (stage + 1) * per_stage):
        p = f"decoder.layers.{i}."
        out += [(p + "input_layernorm.weight", h, False),
                (p + "self_attention.linear_proj.weight", h * dims.heads * d // tp, False),
                (p + "self_attention.linear_qkv.weight", qkv_out * h // tp, False)]
        if dims.qkv_bias:
            out.append((p + "self_attention.linear_qkv.bias", qkv_out // tp, False))
        out += [(p + "pre_mlp_layernorm.weight", h, False),
                (p + "mlp.linear_fc1.weight", 2 * dims.ffn * h // tp, False),
                (p + "mlp.linear_fc2.weight", dims.ffn * h // tp, False)]
    if last:
        out.append(("decoder.final_layernorm.weight", h, False))
        if not dims.tied or pp > 1:
            out.append(("output_layer.weight", dims.vocab * h // tp, dims.tied))
    return out


@dataclass
class BufferLayout:
    """megatron-core's contiguous parameter/gradient buffer of one model chunk (one dtype)."""

    numel: int
    """Elements of the buffer, padding included."""
    params: list[tuple[str, int, int]]
    """(name, start, end) of each parameter in the buffer."""
    buckets: list[tuple[int, int]]
    """(start, end) of each bucket; each is split evenly over the data-parallel ranks."""

    def shard_segments(self, dp: int, rank: int) -> list[tuple[str, int]]:
        """(name, elements) of each parameter's piece in data-parallel rank `rank`'s shard: the
        distributed optimizer's main params on that rank (padding belongs to no parameter)."""
        out = []
        for b_start, b_end in self.buckets:
            size = (b_end - b_start) // dp
            lo, hi = b_start + rank * size, b_start + (rank + 1) * size
            for name, start, end in self.params:
                overlap = min(end, hi) - max(start, lo)
                if overlap > 0:
                    out.append((name, overlap))
        return out


def buffer_layout(params: list[tuple[str, int, bool]], dp: int, bucket_size: int | None) -> BufferLayout:
    """The buffer layout megatron-core 0.16's `_ParamAndGradBuffer` computes with the distributed
    optimizer (distributed/param_and_grad_buffer.py): parameters in reverse order, each start padded to
    64 elements, a shared embedding in a bucket of its own, buckets closed at `bucket_size` elements
    (None: one bucket) and their ends padded to lcm(dp, 128)."""
    def pad(n: int, k: int) -> int:
        return -(-n // k) * k

    divisor = math.lcm(dp, 128)
    placed, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    for name, numel, shared in reversed(params):
        start = pad(start, 64)
        if shared and in_bucket:
            bucket_end = pad(start, divisor)
            buckets.append((bucket_start, bucket_end))
            start = bucket_start = bucket_end
            in_bucket = 0
        end = start + numel
        placed.append((name, start, end))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or shared:
            bucket_end = pad(end, divisor)
            buckets.append((bucket_start, bucket_end))
            start = bucket_start = bucket_end
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        buckets.append((bucket_start, pad(end, divisor)))
    return BufferLayout(numel=buckets[-1][1] if buckets else 0, params=placed, buckets=buckets)


def ddp_bucket_size(cfg: TrainConfig, dp_cp: int) -> int | None:
    """DDP's bucket size: megatron's default max(4e7, 1e6·DP) with overlapped gradient reduction, else one bucket."""
    return max(40_000_000, 1_000_000 * dp_cp) if cfg.parallel.overlap_grad_reduce else None


# --------------------------------------------------------------------------- activations


def attention_kind(cfg: TrainConfig) -> str:
    """'fused' (Transformer Engine's flash/fused attention: no s² tensor kept) or 'local' (megatron's
    unfused DotProductAttention). 'auto' plans for Transformer Engine, which GPU clusters' megatron
    containers have; set model.transformer_impl: local to plan without it."""
    return "local" if cfg.model.transformer_impl == "local" else "fused"


def sequence_parallel(cfg: TrainConfig) -> bool:
    """As the trainer resolves it (model.use_sequence_parallel), with the layers this plan assumes
    (attention_kind: Transformer Engine's unless model.transformer_impl is 'local')."""
    return use_sequence_parallel(cfg, transformer_engine=attention_kind(cfg) == "fused")


def sequences_per_microbatch(cfg: TrainConfig) -> int:
    """Sequences one forward pass holds: a pair is its chosen and rejected sequence (KTO with its KL
    term: each example and a mismatched one), SFT one per example."""
    m = cfg.parallel.micro_batch_size
    if cfg.loss.type == "sft" or (cfg.loss.type == "kto" and not cfg.loss.kto_kl):
        return m
    return 2 * m


def microbatch_shape(cfg: TrainConfig) -> tuple[int, int]:
    """(tokens per row s, rows b) of a micro-batch, at the longest the config allows. Unpacked: one
    row per sequence, padded to data.max_length (the trainer pads to the longest in the batch, and to
    max_length under PP). Packed (data.pack_sequences): the same sequences in rows of data.pack_length
    tokens (0: twice data.max_length); at worst they fill max_length each, so the tokens are the same
    and only the row width (the s of the attention term) changes. Packing saves padding, which the
    worst case does not have."""
    d = cfg.data
    seqs = sequences_per_microbatch(cfg)
    if d.pack_sequences:
        width = effective_pack_length(d)
        return width, -(-seqs * d.max_length // width)
    return d.max_length, seqs


def layer_activation_bytes(dims: ModelDims, s: int, b: int, tp: int, sp: bool, attention: str, recompute: str,
                           elem: int) -> dict[str, float]:
    """Bytes one transformer layer keeps for its backward, for one micro-batch of b rows of s tokens.

    Korthikanti et al. 2022 (arXiv 2205.05198, section 4.1) count, per GPT layer in 16-bit,
    s·b·h·(34 + 5·a·s/h): attention 11·sbh + 5·a·s²·b, MLP 19·sbh, two LayerNorms 4·sbh; with TP t
    the parts inside the parallel regions divide by t and, without sequence parallelism, the 10·sbh
    of norm inputs and dropout masks stay whole (sbh·(10 + 24/t + 5as/(ht))); with sequence
    parallelism everything divides by t. The same accounting for this trainer's layers, per token,
    in elements of `elem` bytes:

    - norms (RMSNorm, x2): its input and the normalised output that feeds the next linear; megatron's
      local spec runs torch's RMSNorm, which also keeps the normalised input before the weight (3·h
      per norm); Transformer Engine's fused norm+linear keeps input and output (2·h per norm). Not
      divided by TP without sequence parallelism.
    - attention: local (unfused): Q, K and V expanded to every query head (GQA's repeat_interleave
      output is what the matmuls keep), the context (linear_proj's input): 4·a·d; plus the s² term,
      a·s per token: the softmax output in fp32 (attention_softmax_in_fp32) and its bf16 copy the
      value matmul keeps (6 bytes; 4 in fp32), the paper's 5·a·s²·b without dropout.
      Fused: Q, K, V as projected ((a + 2g)·d) and the output (a·d, linear_proj's input); the softmax
      statistics (a fp32 per token) are counted; no s² term.
    - MLP (SwiGLU): fc1's input (h, in the norm term), fc1's output 2·f (gate and up, kept for the
      activation's backward), silu(gate) f (unfused only: the product keeps it) and fc2's input f.
    - dropout: none (the trainer sets hidden and attention dropout to 0, so no masks).
    - selective recomputation: the attention core is recomputed, only its inputs Q, K, V ((a + 2g)·d)
      and its output stay. Full: the layer's input (h) alone; `full_working_set` is one layer's
      whole set, alive while that layer is recomputed in the backward.
    Divided by TP (t): everything with sequence parallelism; without it, all but the norm terms.
    """
    h, f, a, g, d = dims.hidden, dims.ffn, dims.heads, dims.kv_heads, dims.head_dim
    t = tp
    seq_div = t if sp else 1
    tokens = s * b
    local = attention == "local"
    norm = (3 if local else 2) * 2 * h
    if local:
        attn = 4 * a * d
        scores_bytes = a * s * (6 if elem == 2 else 4)  # per token
    else:
        attn = (2 * a + 2 * g) * d + a * 4 / elem  # + softmax statistics (fp32)
        scores_bytes = 0
    mlp = (4 if local else 3) * f
    full = tokens * (norm * elem / seq_div + attn * elem / t + scores_bytes / t + mlp * elem / t)
    if recompute == "none":
        kept = full
    elif recompute == "selective":
        core = (2 * a + 2 * g) * d
        kept = tokens * (norm * elem / seq_div + core * elem / t + mlp * elem / t)
    else:  # full: the layer's input (sequence-split with sequence parallelism)
        kept = tokens * h * elem / seq_div
    return {"kept": kept, "full_working_set": full}


# --------------------------------------------------------------------------- the plan


@dataclass
class Row:
    component: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    cp: int
    stage: int
    dp_rank: int
    rows: list[Row] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    gpu_memory: float = 0.0
    reserve: float = 0.0
    estimate: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total + self.reserve <= self.gpu_memory

    def bytes_of(self, component: str) -> float:
        return sum(r.bytes for r in self.rows if r.component == component)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(total=self.total, fits=self.fits)
        return out


def _merge_state_bytes(cfg: TrainConfig, segments: list[tuple[str, int]], fused: bool) -> tuple[float, str]:
    """Bytes of the merge state on one rank's main-param segments, and what it holds."""
    m = cfg.merge.online
    n = sum(numel for _, numel in segments)
    total, parts = 0.0, []
    if m.needs_reference:
        if m.method == "dare" and m.reference_mask == "resampled":
            total += 4 * n
            parts.append("tau dense fp32 (resampled mask)")
        elif m.method == "dare":
            kept = m.keep_rate * n  # Bernoulli(p) mask: p·n expected
            total += 4 * kept
            parts.append(f"tau values fp32 at ~p={m.keep_rate} of the shard (positions redrawn)")
            if fused:
                total += 12 * kept  # the fused step's cached alpha·F(tau): int64 positions + fp32 values
                parts.append("fused alpha*F(tau) cache (int64 positions + fp32)")
        else:
            kept = sum(int(numel * m.keep_rate) for _, numel in segments)  # floor(p·n) per segment
            total += 8 * kept
            parts.append(f"tau top-p values fp32 + int32 positions, p={m.keep_rate}")
    if m.merges and m.merge_every > 1:
        total += 4 * n
        parts.append(f"step-K accumulator fp32 (K={m.merge_every})")
    if m.weight_ema > 0:
        total += 4 * n
        parts.append("weight EMA fp32")
    return total, "; ".join(parts) if parts else "none (method 'none' or alpha 0 without step-K/EMA)"


def plan_memory(cfg: TrainConfig, world_size: int, dims: ModelDims, gpu_memory_gib: float = 80.0,
                stage: int | None = None, dp_rank: int | None = None, fused: bool | None = None) -> Plan:
    """The per-GPU memory of `cfg` at `world_size` GPUs. `stage`/`dp_rank`: the pipeline stage and
    data-parallel rank to plan (default: the one holding the most). `fused`: whether the fused
    optimizer step runs (default: optim.fused, 'auto' meaning yes on a GPU)."""
    p = cfg.parallel
    tp, pp, cp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    # The world-size and global-batch checks of a launch (no paths: the model may be a placeholder
    # whose sizes --model-config gives).
    validate(cfg, world_size=world_size, check_paths=False)
    dp = world_size // (tp * pp * cp)
    if dims.layers % pp:
        raise ConfigError(f"config key 'parallel.pipeline_parallel' ({pp}) must divide the model's {dims.layers} layers")
    for name, value in (("num_attention_heads", dims.heads), ("num_key_value_heads", dims.kv_heads),
                        ("vocab_size", dims.vocab)):
        if value % tp:
            raise ConfigError(f"config key 'parallel.tensor_parallel' ({tp}) must divide {name} ({value})")
    if fused is None:
        fused = cfg.optim.fused is not False
    bf16 = cfg.model.dtype == "bf16"
    elem = 2 if bf16 else 4
    sp = sequence_parallel(cfg) and tp > 1
    attention = attention_kind(cfg)
    s, b = microbatch_shape(cfg)
    s_local = s // cp  # context parallelism splits each sequence
    num_micro = p.global_batch_size // (p.micro_batch_size * dp)

    candidates = []
    stages = range(pp) if stage is None else [stage]
    for st in stages:
        params = param_numels(dims, tp, pp, st)
        layout = buffer_layout(params, dp * cp, ddp_bucket_size(cfg, dp * cp))
        ranks = range(dp * cp) if dp_rank is None else [dp_rank]
        for r in ranks:
            plan = Plan(world_size, tp, pp, dp, cp, st, r, gpu_memory=gpu_memory_gib * GiB)
            segments = layout.shard_segments(dp * cp, r)
            shard = sum(n for _, n in segments)
            unpadded = sum(n for _, n, _ in params)
            plan.rows.append(Row("weights", layout.numel * elem,
                                 f"{unpadded / 1e9:.3f}B params on this rank in {cfg.model.dtype}, DDP buffer "
                                 f"({layout.numel - unpadded} padding)"))
            plan.rows.append(Row("gradients", layout.numel * 4, "fp32 main_grad buffer (grad_reduce_in_fp32)"))
            plan.rows.append(Row("main params", shard * 4 if bf16 else 0,
                                 f"fp32 copy of this rank's 1/{dp * cp} shard" if bf16 else "views of the fp32 weights"))
            plan.rows.append(Row("adam moments", shard * 8, "exp_avg + exp_avg_sq, fp32, on the shard"))
            merge_bytes, merge_note = _merge_state_bytes(cfg, segments, fused)
            plan.rows.append(Row("merge state", merge_bytes, merge_note))
            if cfg.loss.type != "sft" and cfg.loss.reference == "online":
                ref = sum(n for _, n, _ in params) * elem
                plan.rows.append(Row("reference model", ref, f"frozen, {cfg.model.dtype}, weights only"))
            else:
                plan.rows.append(Row("reference model", 0, "none: reference log-probs cached on the host"
                                     if cfg.loss.type != "sft" else "none (sft)"))
            layers = dims.layers // pp
            per_layer = layer_activation_bytes(dims, s_local, b, tp, sp, attention, cfg.model.recompute, elem)
            in_flight = min(pp - st, num_micro)
            if cfg.model.recompute == "full":
                recomputed = layers if cfg.model.recompute_layers == 0 else min(cfg.model.recompute_layers, layers)
                kept = recomputed * per_layer["kept"] + (layers - recomputed) * per_layer["full_working_set"]
                acts = in_flight * kept + per_layer["full_working_set"]  # + one layer being recomputed
                how = f"full recompute of {recomputed}/{layers} layers"
            else:
                acts = in_flight * layers * per_layer["kept"]
                how = f"recompute {cfg.model.recompute}"
            # Embedding output and the final norm's input/output: a few h-wide tensors per token.
            edge = in_flight * s_local * b * dims.hidden * elem * 3 / (tp if sp else 1)
            # Unfused attention: while one layer's attention core runs (forward, or its recomputation
            # and backward) its s² tensors are alive whatever is kept: the scores, their fp32 copy,
            # the fp32 softmax output and the probabilities in model.dtype.
            if attention == "local":
                edge += dims.heads * s_local**2 * b / tp * (2 * elem + 8 if bf16 else 8)
            plan.rows.append(Row("activations", acts + edge,
                                 f"{in_flight} micro-batch(es) x {layers} layers, {b} rows x {s_local} tokens, "
                                 f"{attention} attention, SP {'on' if sp else 'off'}, {how}"))
            logits = 0.0
            if st == pp - 1:
                logits = s_local * b * dims.vocab / tp * (elem + 4 if bf16 else 4)
            plan.rows.append(Row("logits", logits, f"[{s_local}, {b}, {dims.vocab}/{tp}] {cfg.model.dtype} + fp32 copy for the loss"
                                 if logits else "not on this stage"))
            candidates.append(plan)
    plan = max(candidates, key=lambda c: c.total)
    plan.reserve = max(3 * GiB, 0.08 * plan.gpu_memory)
    plan.settings = {
        "model": dims.source, "params": dims.num_params, "dtype": cfg.model.dtype, "tokens_per_row": s,
        "rows_per_microbatch": b, "microbatches_per_step": num_micro, "sequence_parallel": sp,
        "attention": attention, "recompute": cfg.model.recompute, "method": cfg.merge.online.method,
        "fused_step": fused, "reference": cfg.loss.reference,
    }
    return plan


def estimate_time(cfg: TrainConfig, plan: Plan, dims: ModelDims, tokens_per_sequence: float, mfu: float,
                  peak_tflops: float) -> dict[str, float]:
    """Step time from FLOPs: 6·N per trained token (forward + backward; N the parameter count without
    the input embedding, whose lookup is no matmul), plus 2·N for the recomputed forward of full
    recomputation, plus the reference model's forward: 2·N per token every step when it runs online;
    once over the data (counted as a fraction of an epoch's 6·N) when cached. Attention's own
    FLOPs are added: 4·L·h·s per token forward (QK^T and the weighted sum of V), halved for the
    causal mask; 3 times that for forward + backward (PaLM's 12·L·h·s). At `mfu` of `peak_tflops` per GPU."""
    n = dims.num_params - dims.vocab * dims.hidden
    attn = 4 * dims.layers * dims.hidden * tokens_per_sequence / 2  # forward, causal: half the s² work
    per_token = 6 * n + 3 * attn
    if cfg.model.recompute == "full":
        per_token += 2 * n + attn
    elif cfg.model.recompute == "selective":
        per_token += attn
    if cfg.loss.type != "sft":
        per_token += 2 * n + attn  # reference forward: every step (online) or once per sequence (cached)
    seqs_per_step = cfg.parallel.global_batch_size * (sequences_per_microbatch(cfg) // cfg.parallel.micro_batch_size)
    tokens_per_step = seqs_per_step * tokens_per_sequence
    flops_per_step = tokens_per_step * per_token
    seconds = flops_per_step / (plan.world_size * peak_tflops * 1e12 * mfu)
    return {"tokens_per_step": tokens_per_step, "flops_per_token": per_token, "step_seconds": seconds,
            "tokens_per_second_per_gpu": tokens_per_step / seconds / plan.world_size,
            "run_hours": seconds * cfg.run.train_steps / 3600, "mfu": mfu, "peak_tflops": peak_tflops,
            "tokens_per_sequence": tokens_per_sequence}


def format_plan(plan: Plan) -> str:
    def gib(x: float) -> str:
        return f"{x / GiB:8.2f}"

    s = plan.settings
    head = (f"world {plan.world_size} = TP {plan.tp} x PP {plan.pp} x CP {plan.cp} x DP {plan.dp}; "
            f"planned: PP stage {plan.stage}, DP rank {plan.dp_rank} (the fullest)\n"
            f"model {s['model']}: {s['params'] / 1e9:.2f}B params, {s['dtype']}; micro-batch {s['rows_per_microbatch']} "
            f"rows x {s['tokens_per_row']} tokens, {s['microbatches_per_step']} micro-batches/step; merge "
            f"{s['method']}, fused step {'yes' if s['fused_step'] else 'no'}")
    width = max(len(r.component) for r in plan.rows)
    lines = [head, "", f"{'component':<{width}}  {'GiB':>8}  note", "-" * (width + 60)]
    for r in plan.rows:
        lines.append(f"{r.component:<{width}}  {gib(r.bytes)}  {r.note}")
    lines.append("-" * (width + 60))
    lines.append(f"{'total':<{width}}  {gib(plan.total)}")
    lines.append(f"{'reserve':<{width}}  {gib(plan.reserve)}  CUDA context, NCCL, allocator caching/fragmentation")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict} in {plan.gpu_memory / GiB:.0f} GiB (total + reserve = {(plan.total + plan.reserve) / GiB:.1f} GiB)")
    if plan.estimate:
        e = plan.estimate
        lines.append(
            f"time: {e['tokens_per_step']:.0f} tokens/step ({e['tokens_per_sequence']:.0f} per sequence), "
            f"{e['flops_per_token'] / 1e9:.1f} GFLOP/token, at {e['mfu']:.0%} MFU of {e['peak_tflops']:.0f} TFLOP/s: "
            f"{e['step_seconds']:.1f} s/step, {e['tokens_per_second_per_gpu']:.0f} tokens/s/GPU, "
            f"{e['run_hours']:.1f} h for the run")
    return "\n".join(lines)


def default_gpu_memory_gib() -> float:
    """The current GPU's memory, else 80 GiB (an 80 GB A100/H100)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    except Exception:  # noqa: BLE001 - no usable CUDA: plan for the default
        pass
    return 80.0


def default_peak_tflops() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for key, value in PEAK_BF16_TFLOPS:
                if key in name:
                    return value
    except Exception:  # noqa: BLE001
        pass
    return 989.0  # H100/H200 SXM dense bf16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file (see docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--world-size", type=int, required=True, help="GPUs of the run")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: this GPU's, else 80)")
    parser.add_argument("--model-config", default=None,
                        help=f"model sizes from this directory/config.json or preset {sorted(PRESETS)} instead of model.hf_path")
    parser.add_argument("--tokens-per-sequence", type=float, default=None,
                        help="mean tokens per sequence for the time estimate (default: data.max_length / 2)")
    parser.add_argument("--mfu", type=float, default=0.3, help="model FLOPs utilisation assumed for the time estimate")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU (default: this GPU's, else 989)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from .config import load_config

    try:
        if args.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
        cfg = load_config(args.config, args.overrides, world_size=None, check_paths=False)
        dims = load_dims(cfg, args.model_config)
        gpu = args.gpu_memory if args.gpu_memory is not None else default_gpu_memory_gib()
        plan = plan_memory(cfg, args.world_size, dims, gpu)
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        tokens = args.tokens_per_sequence or cfg.data.max_length / 2
        plan.estimate = estimate_time(cfg, plan, dims, tokens, args.mfu, args.peak_tflops or default_peak_tflops())
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1
