"""Jobs run on every rank by ``mcore_harness.spawn`` (a module of its own so spawned processes import it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import mcore_harness as h

LR, WEIGHT_DECAY, BETAS, EPS = 1e-2, 0.01, (0.9, 0.95), 1e-8
STEPS = 4

# Large alpha and keep rates so that both the reference delta and the masks visibly matter.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(method="none"),  # megatron's own optimizer, nothing installed
    "none": dict(method="none"),
    "dare": dict(method="dare", keep_rate=0.5, alpha=0.3, seed=7),
    "ties": dict(method="ties", keep_rate=0.3, alpha=0.3, seed=7),
    # Exact per-tensor top-p; on the TP=1 reference it is the same run as "ties".
    "ties_tensor": dict(method="ties", keep_rate=0.3, alpha=0.3, seed=7, ties_scope="tensor"),
    "stepk": dict(method="dare", keep_rate=0.5, alpha=0.3, merge_every=2, seed=7),
    # K = 3 for checkpoint tests: a save after 2 steps holds two accumulated plain updates.
    "stepk3": dict(method="dare", keep_rate=0.5, alpha=0.3, merge_every=3, seed=7),
}


# Adam's eps per config. On Adam's first steps |update| = lr |g| / (|g| + eps) is nearly the same
# for every element, so a TIES top-p is decided by rounding-level differences in g that differ
# between layouts (another TP split sums matmuls in another order). A larger eps spreads the
# magnitudes far above fp32 noise, so the comparison tests the plumbing, not rounding.
ADAM_EPS = {"ties": 1e-3, "ties_tensor": 1e-3}


def adam_eps(name: str) -> float:
    return ADAM_EPS.get(name, EPS)


def merge_config(name: str, **overrides: Any) -> Any:
    from onmerge_megatron import OnlineMergeConfig

    return OnlineMergeConfig(**{**CONFIGS[name], **overrides})


def make_checkpoints(rank: int, world: int, tp: int, pp: int, tmp: str, tied: bool = False) -> None:
    """The policy's initial (SFT) weights and a base model 0.05-noise away, as dist checkpoints."""
    model = h.build_model(tp, pp, tied=tied)
    h.save_model(model, Path(tmp, "init"))
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    h.save_model(model, Path(tmp, "base"))


def _decays(name: str, param: torch.Tensor) -> bool:
    # megatron's default: no weight decay for biases and 1-D params.
    return not (name.endswith(".bias") or param.dim() == 1)


def reference_run(
    rank: int, world: int, tp: int, pp: int, tmp: str, names: list[str], steps: int = STEPS, ties_scope: str = "shard",
    segments: dict | None = None, suffix: str = "", tied: bool = False,
) -> None:
    """Single process, no Megatron optimizer: OnlineMergingAdamW on the TP=1 model with checkpoint
    names and global coordinates written out by hand (mcore_harness.checkpoint_name_and_coords)."""
    from onmerge_megatron import OnlineMergingAdamW, Segment, ShardCoords

    init, base = h.plain_tensors(Path(tmp, "init")), h.plain_tensors(Path(tmp, "base"))

    def delta_fn(name: str, coords: Any) -> torch.Tensor:
        key, _, layer = name.rstrip("]").partition("[")
        full = init[key].float() - base[key].float()
        return coords.gather(full[int(layer)] if layer else full)

    for config_name in names:
        config = merge_config(config_name, ties_scope=ties_scope) if config_name == "ties" else merge_config(config_name)
        out = Path(tmp, f"ref_{config_name}{suffix}")
        if out.exists():
            continue
        model = h.build_model(tied=tied)
        h.load_model(model, Path(tmp, "init"))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if _decays(n, p)], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in named if not _decays(n, p)], "weight_decay": 0.0},
        ]
        opt = OnlineMergingAdamW(groups, lr=LR, betas=BETAS, eps=adam_eps(config_name), weight_decay=WEIGHT_DECAY, merge=config)
        for name, param in named:
            key, coords = h.checkpoint_name_and_coords(name, param)
            if segments:
                # Emulate a DP-sharded run's pieces (TIES top-p per shard): [start, end) ranges.
                pieces = [
                    Segment(key, ShardCoords(coords.global_shape, coords.blocks, start, end), start)
                    for start, end in sorted(segments[name]) if end > start
                ]
                opt.set_segments(param, pieces)
            else:
                opt.set_segments(param, [Segment(key, coords)])
        if config.needs_reference:
            opt.set_reference_delta(delta_fn=delta_fn)
        for step in range(steps):
            opt.zero_grad()
            h.forward_backward(model, step, 0, 1)
            opt.step()
        h.save_model(model, out)


def megatron_run(
    rank: int, world: int, tp: int, pp: int, tmp: str, names: list[str], tag: str, steps: int = STEPS,
    ties_scope: str = "shard", count_collectives: bool = False, record_ranges: bool = False,
    distributed: bool = True, bf16: bool = False, tied: bool = False,
) -> None:
    """The same training through get_megatron_optimizer (distributed optimizer) + install_online_merging."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from onmerge_megatron.megatron import MegatronCheckpointBase, install_online_merging

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    counts: dict[str, list[int]] = {}
    for config_name in names:
        config = merge_config(config_name, ties_scope=ties_scope) if config_name == "ties" else merge_config(config_name)
        model = h.build_model(tp, pp, bf16, tied)
        h.load_model(model, Path(tmp, "init"))
        ddp = h.wrap_ddp(model, tp, pp, distributed, bf16)
        opt = h.megatron_optimizer([ddp], lr=LR, weight_decay=WEIGHT_DECAY, eps=adam_eps(config_name), distributed=distributed, bf16=bf16)
        kinds = sorted({type(sub).__name__ for sub in getattr(opt, "chained_optimizers", [opt])})
        source = MegatronCheckpointBase(str(Path(tmp, "base"))) if config.needs_reference else None
        if config_name != "plain":
            opt = install_online_merging(opt, [ddp], config, source, progress=False)
        if record_ranges:
            # The DP ranges megatron's distributed optimizer gave this rank, by parameter name.
            ranges = {}
            for sub in getattr(opt, "chained_optimizers", [opt]):
                for name, param in model.named_parameters():
                    if param in sub.model_param_gbuf_map:
                        r = sub._get_model_param_range_map(param)["param"]
                        ranges[name] = (r.start, r.end)
            torch.save(ranges, Path(tmp, f"ranges_{tag}_rank{rank}.pt"))
            record_ranges = False
        per_step = []
        for step in range(steps):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            h.forward_backward(ddp, step, dp_rank, dp_size)
            finalize_model_grads([ddp])
            if count_collectives:
                with CollectiveCounter() as counter:
                    opt.step()
                per_step.append(counter.count)
            else:
                opt.step()
        counts[config_name] = per_step
        h.save_model(model, Path(tmp, f"{tag}_{config_name}"))
        if rank == 0:
            torch.save(kinds, Path(tmp, f"kinds_{tag}.pt"))
    if count_collectives:
        torch.save(counts, Path(tmp, f"counts_{tag}_rank{rank}.pt"))


class CollectiveCounter:
    """Counts torch.distributed collective and point-to-point calls made while active."""

    NAMES = (
        "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
        "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
        "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
        "all_gather_object", "broadcast_object_list", "gather", "scatter",
    )

    def __init__(self) -> None:
        self.count = 0
        self.calls: list[str] = []
        self._saved: dict[tuple[Any, str], Any] = {}

    def __enter__(self) -> "CollectiveCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        # Both the public module and c10d's own globals (functions calling one another inside c10d).
        for module in (dist, c10d):
            for name in self.NAMES:
                fn = getattr(module, name, None)
                if fn is None:
                    continue
                self._saved[(module, name)] = fn

                def counted(*args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
                    self.count += 1
                    self.calls.append(_name)
                    return _fn(*args, **kwargs)

                setattr(module, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for (module, name), fn in self._saved.items():
            setattr(module, name, fn)


# mem_efficient: gather over the gloo DP group (the default path moves tensors with .cuda()).
CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}


def _train(ddp: Any, opt: Any, steps: range) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        h.forward_backward(ddp, step, dp_rank, dp_size)
        finalize_model_grads([ddp])
        opt.step()


def checkpoint_run(
    rank: int, world: int, tp: int, pp: int, tmp: str, names: list[str], tag: str, save_at: int,
    resume_from: str | None = None, overrides: dict | None = None, metadata: dict | None = None,
) -> None:
    """Train ``STEPS`` steps; either save model + optimizer (Megatron-LM's layout of a checkpoint)
    after ``save_at`` steps and go on, or resume from such a checkpoint (any layout) and go on."""
    from megatron.core import dist_checkpointing

    from onmerge_megatron.megatron import FROM_CHECKPOINT, MegatronCheckpointBase, install_online_merging

    for config_name in names:
        config = merge_config(config_name, **(overrides or {}))
        model = h.build_model(tp, pp)
        h.load_model(model, Path(tmp, "init"))
        ddp = h.wrap_ddp(model, tp, pp)
        opt = h.megatron_optimizer([ddp], lr=LR, weight_decay=WEIGHT_DECAY, eps=adam_eps(config_name))
        ckpt = Path(tmp, f"ckpt_{resume_from or tag}_{config_name}")
        if resume_from is None:
            opt = install_online_merging(opt, [ddp], config, MegatronCheckpointBase(str(Path(tmp, "base"))), progress=False)
            _train(ddp, opt, range(save_at))
            state = {"model": model.sharded_state_dict()}
            state["optimizer"] = opt.sharded_state_dict(state["model"], metadata=metadata or CHECKPOINT_METADATA)
            ckpt.mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(state, str(ckpt))
        else:
            # No base weights: the reference delta comes back from the checkpoint.
            opt = install_online_merging(opt, [ddp], config, FROM_CHECKPOINT, progress=False)
            state = {"model": model.sharded_state_dict()}
            state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=True, metadata=metadata or CHECKPOINT_METADATA)
            loaded = dist_checkpointing.load(state, str(ckpt))
            model.load_state_dict(loaded["model"], strict=False)
            opt.load_state_dict(loaded["optimizer"])
        _train(ddp, opt, range(save_at, STEPS))
        h.save_model(model, Path(tmp, f"{tag}_{config_name}"))


def coords_dump(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    """For each local parameter: its tensor name, the global indices of its elements (adapter's
    coordinates) and its values after megatron loaded the TP=1 checkpoint into this layout."""
    from onmerge_megatron.megatron.coords import param_coords

    model = h.build_model(tp, pp)
    h.load_model(model, Path(tmp, "init"))
    found = param_coords([model])
    out = {}
    for name, param in model.named_parameters():
        where = found[param]
        out[name] = (where.key, where.global_shape, where.shard().global_index(torch.arange(param.numel())), param.detach().reshape(-1).clone())
    torch.save(out, Path(tmp, f"coords_tp{tp}_pp{pp}_rank{rank}.pt"))


def refusals(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    """Settings the merge cannot support, each with its error message (written by rank 0)."""
    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import install_online_merging

    def attempt(label: str, make: Any, config: Any = None) -> None:
        model = h.build_model(tp, pp)
        ddp = h.wrap_ddp(model, tp, pp)
        try:
            opt = make([ddp])
            install_online_merging(opt, [ddp], config or OnlineMergeConfig(method="dare", alpha=0.0), progress=False)
            messages[label] = None
        except Exception as exc:  # the test checks type and message
            messages[label] = f"{type(exc).__name__}: {exc}"

    def with_config(**changes: Any) -> Any:
        def make(chunks: list) -> Any:
            opt = h.megatron_optimizer(chunks)
            for key, value in changes.items():
                setattr(opt.config, key, value)  # e.g. a field of a newer release (0.19's optimizer_cuda_graph)
            return opt

        return make

    def megatron_with(distributed: bool = True, **fields: Any) -> Any:
        def make(chunks: list) -> Any:
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            return get_megatron_optimizer(OptimizerConfig(use_distributed_optimizer=distributed, lr=1e-3, **fields), chunks)

        return make

    def installed_twice(chunks: list) -> Any:
        opt = h.megatron_optimizer(chunks)
        install_online_merging(opt, chunks, OnlineMergeConfig(method="dare", alpha=0.0), progress=False)
        return opt

    messages: dict[str, str | None] = {}
    attempt("precision_aware", with_config(use_precision_aware_optimizer=True))
    attempt("optimizer_cuda_graph", with_config(optimizer_cuda_graph=True))
    attempt("cpu_offload", with_config(optimizer_cpu_offload=True))
    attempt("sgd", megatron_with(distributed=False, optimizer="sgd"))  # (megatron refuses SGD + DistOpt itself)
    attempt("coupled_weight_decay", megatron_with(decoupled_weight_decay=False, weight_decay=0.1))
    attempt("twice", installed_twice)
    attempt("no_reference", h.megatron_optimizer, OnlineMergeConfig(method="dare", alpha=0.1))
    attempt("accepted", h.megatron_optimizer)

    # Resuming without base weights, but no checkpoint with merge state was loaded: the first step says so.
    from onmerge_megatron.megatron import FROM_CHECKPOINT

    model = h.build_model(tp, pp)
    ddp = h.wrap_ddp(model, tp, pp)
    opt = h.megatron_optimizer([ddp])
    opt = install_online_merging(opt, [ddp], OnlineMergeConfig(method="dare", alpha=0.1), FROM_CHECKPOINT, progress=False)
    try:
        _train(ddp, opt, range(1))
        messages["resume_without_state"] = None
    except Exception as exc:
        messages["resume_without_state"] = f"{type(exc).__name__}: {exc}"
    if rank == 0:
        torch.save(messages, Path(tmp, "refusals.pt"))


def wrapped_factory(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    """Megatron-LM style: flags -> settings -> wrapped get_megatron_optimizer; the reference delta
    is built at the first step from the main params as they are then (SFT loaded after creation)."""
    import argparse

    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from onmerge_megatron.megatron.args import OnlineMergeSettings, add_online_merge_args, wrap_optimizer_factory

    parser = add_online_merge_args(argparse.ArgumentParser())
    args = parser.parse_args([
        "--online-merge", "dare", "--online-merge-keep-rate", "0.5", "--online-merge-alpha", "0.3",
        "--online-merge-seed", "7", "--online-merge-base", str(Path(tmp, "base")),
    ])
    factory = wrap_optimizer_factory(get_megatron_optimizer, lambda: OnlineMergeSettings.from_args(args))
    model = h.build_model(tp, pp)  # random init: the SFT weights come later, as in pretrain()
    ddp = h.wrap_ddp(model, tp, pp)
    opt = factory(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                                  adam_eps=EPS, use_distributed_optimizer=True, clip_grad=0.0), [ddp])
    for group in opt.param_groups:
        group["weight_decay"] = WEIGHT_DECAY * group.get("wd_mult", 1.0)
    # Now "load the SFT checkpoint": into the model, then into the main params, as Megatron-LM does.
    h.load_model(model, Path(tmp, "init"))
    opt.reload_model_params()
    _train(ddp, opt, range(STEPS))
    h.save_model(model, Path(tmp, "factory_dare"))
    if rank == 0:
        torch.save({"inner": type(opt.chained_optimizers[0].optimizer).__name__}, Path(tmp, "factory.pt"))


def hf_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=h.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, rms_norm_eps=1e-5,
        torch_dtype="float32",
    )


def make_hf_checkpoints(tmp: str) -> None:
    """A tiny random Llama (GQA) as the HF base, and base + noise as the HF SFT model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM(hf_llama_config()).float()
    model.save_pretrained(Path(tmp, "hf_base"), safe_serialization=True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(Path(tmp, "hf_sft"), safe_serialization=True)


def _llama_megatron_model(tp: int) -> Any:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=24,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, tensor_model_parallel_size=tp, params_dtype=torch.float32,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False,
    )
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=h.VOCAB, max_sequence_length=32, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def _bridge(path: Path) -> Any:
    from mbridge import AutoBridge

    bridge = AutoBridge.from_pretrained(str(path), dtype=torch.float32)
    bridge.make_vocab_size_divisible_by = None
    # mbridge knows Transformer Engine's fused norm names only; the local spec's separate norms:
    bridge._OTHER_MAPPING = {**bridge._OTHER_MAPPING, "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]}
    bridge._MLP_MAPPING = {**bridge._MLP_MAPPING, "pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"]}
    return bridge


def hf_reference_delta(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    """The reference delta streamed by HuggingFaceBase equals SFT minus base as loaded by mbridge's
    public ``load_weights`` (its own TP split), element for element, for this rank's shards."""
    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import install_online_merging
    from onmerge_megatron.megatron.hf import HuggingFaceBase

    model, base_model = _llama_megatron_model(tp), _llama_megatron_model(tp)
    _bridge(Path(tmp, "hf_sft")).load_weights([model], str(Path(tmp, "hf_sft")))
    _bridge(Path(tmp, "hf_base")).load_weights([base_model], str(Path(tmp, "hf_base")))
    base_by_name = dict(base_model.named_parameters())
    name_of = {param: name for name, param in model.named_parameters()}
    ddp = h.wrap_ddp(model, tp, pp)
    opt = h.megatron_optimizer([ddp])
    # keep_rate 1, no clamp: the engine keeps the whole delta, unchanged.
    config = OnlineMergeConfig(method="dare", keep_rate=1.0, alpha=0.5, reference_clamp=None)
    progress: list[tuple[int, int]] = []
    handle = install_online_merging(opt, [ddp], config, HuggingFaceBase(str(Path(tmp, "hf_base"))),
                                    progress=lambda done, total, key, nbytes: progress.append((done, total)))
    worst, count = 0.0, 0
    for inner, shard in ((inner, shard) for inner, shards in zip(handle.inner_optimizers, handle.shards) for shard in shards):
        expected = shard.main_param.detach().reshape(-1) - base_by_name[name_of[shard.model_param]].detach().reshape(-1)[shard.start : shard.end]
        got = inner.state[shard.main_param]["reference_values"]
        worst = max(worst, float((got - expected).abs().max()))
        count += 1
    torch.save({"worst": worst, "count": count, "progress": progress}, Path(tmp, f"hf_rank{rank}.pt"))


# ------------------------------------------------------------------ faulty inputs (tests/faults)
def _inner_snapshot(opt: Any) -> list[tuple[Any, list[dict], dict]]:
    """Per sub-optimizer: its inner optimizer, copies of its param groups and of its state."""
    out = []
    for sub in getattr(opt, "chained_optimizers", [opt]):
        inner = sub.optimizer
        groups = [{k: list(v) if k == "params" else v for k, v in group.items()} for group in inner.param_groups]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in inner.state.items()}
        out.append((inner, groups, state))
    return out


def _changes(opt: Any, snapshot: list[tuple[Any, list[dict], dict]]) -> list[str]:
    """How the optimizer differs from ``snapshot`` (empty: it is as it was)."""
    changes = []
    for sub, (inner, groups, state) in zip(getattr(opt, "chained_optimizers", [opt]), snapshot):
        if sub.optimizer is not inner:
            changes.append(f"inner optimizer is now a {type(sub.optimizer).__name__}")
            continue
        for group, saved in zip(inner.param_groups, groups):
            if group.keys() != saved.keys():
                changes.append(f"param group keys {sorted(group.keys() ^ saved.keys())}")
            elif any(group[k] is not saved[k] and group[k] != saved[k] for k in group if k != "params"):
                changes.append("param group values")
            elif [id(p) for p in group["params"]] != [id(p) for p in saved["params"]]:
                changes.append("param group params")
        if inner.state.keys() != state.keys():
            changes.append("state holds other params")
        for param, saved in state.items():
            now = inner.state.get(param, {})
            if now.keys() != saved.keys() or any(not torch.equal(torch.as_tensor(now[k]), torch.as_tensor(v)) for k, v in saved.items()):
                changes.append(f"state of a param of shape {tuple(param.shape)}")
                break
    return changes


def refused_install(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    """Refused installs (no reference source for a merge that needs one, base checkpoints of another
    shape) leave the optimizer as it was; the corrected install then works. Results written by rank 0."""
    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import MegatronCheckpointBase, install_online_merging

    for name, changes in (("base", {}), ("base_deeper", {"num_layers": h.NUM_LAYERS + 1}), ("base_wider_ffn", {"ffn_hidden_size": 32})):
        h.save_model(h.build_model(tp, pp, **changes), Path(tmp, name))
    model = h.build_model(tp, pp)
    ddp = h.wrap_ddp(model, tp, pp)
    opt = h.megatron_optimizer([ddp])
    _train(ddp, opt, range(1))  # Adam moments exist
    snapshot = _inner_snapshot(opt)
    dare = merge_config("dare")
    attempts = {
        "no_reference": (OnlineMergeConfig(method="ties", keep_rate=0.3, alpha=0.3, ties_scope="tensor"), None),
        "deeper_base": (dare, "base_deeper"),
        "wider_ffn_base": (dare, "base_wider_ffn"),
    }
    results: dict[str, Any] = {}
    for label, (config, base) in attempts.items():
        try:
            source = MegatronCheckpointBase(str(Path(tmp, base))) if base else None
            install_online_merging(opt, [ddp], config, source, progress=False)
            message = None
        except Exception as exc:  # the test checks type and message
            message = f"{type(exc).__name__}: {exc}"
        results[label] = (message, _changes(opt, snapshot))
    handle = install_online_merging(opt, [ddp], dare, MegatronCheckpointBase(str(Path(tmp, "base"))), progress=False)
    carried = all(
        torch.equal(inner.state[p]["exp_avg"], saved[p]["exp_avg"])
        for inner, (_, _, saved) in zip(handle.inner_optimizers, snapshot) for p in saved
    )
    _train(ddp, handle, range(1, 2))
    results["retry"] = {
        "inner": sorted({type(inner).__name__ for inner in handle.inner_optimizers}),
        "moments_carried_over": carried,
        "with_reference": all("reference_values" in inner.state[s.main_param] for inner, s in _pairs(handle)),
    }
    if rank == 0:
        torch.save(results, Path(tmp, "refused_install.pt"))


def _pairs(handle: Any) -> list[tuple[Any, Any]]:
    return [(inner, shard) for inner, shards in zip(handle.inner_optimizers, handle.shards) for shard in shards]


def megatron_base_delta(rank: int, world: int, tp: int, pp: int, tmp: str) -> None:
    """The reference delta read by MegatronCheckpointBase from a base saved at TP=1, against
    init - base as megatron's own reader gives the whole tensors, element for element."""
    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import MegatronCheckpointBase, install_online_merging

    make_checkpoints(rank, world, 1, 1, tmp)
    init, base = h.plain_tensors(Path(tmp, "init")), h.plain_tensors(Path(tmp, "base"))
    model = h.build_model(tp, pp)
    h.load_model(model, Path(tmp, "init"))
    name_of = {param: name for name, param in model.named_parameters()}
    ddp = h.wrap_ddp(model, tp, pp)
    opt = h.megatron_optimizer([ddp])
    # keep_rate 1, no clamp: the engine keeps the whole delta, unchanged.
    config = OnlineMergeConfig(method="dare", keep_rate=1.0, alpha=0.5, reference_clamp=None)
    handle = install_online_merging(opt, [ddp], config, MegatronCheckpointBase(str(Path(tmp, "base"))), progress=False)
    worst, count = 0.0, 0
    for inner, shard in _pairs(handle):
        key, coords = h.checkpoint_name_and_coords(name_of[shard.model_param], shard.model_param)
        checkpoint_key, _, layer = key.rstrip("]").partition("[")
        full = init[checkpoint_key].float() - base[checkpoint_key].float()
        expected = (full[int(layer)] if layer else full).reshape(-1)[shard.start : shard.end]
        worst = max(worst, float((inner.state[shard.main_param]["reference_values"] - expected).abs().max()))
        count += 1
    torch.save({"worst": worst, "count": count}, Path(tmp, f"megatron_base_rank{rank}.pt"))


def _trainer_model(hf_path: str) -> Any:
    """The trainer's megatron model of an HF checkpoint, weights loaded by mbridge."""
    from onmerge_megatron.training.model import build_model, load_hf_weights, make_bridge

    bridge = make_bridge(hf_path, torch.float32)
    model = build_model(bridge, 64)[0]
    load_hf_weights(bridge, [model], hf_path)
    return model


# The trainer's model tensors that are HF tensors unchanged (no fusion, no TP split at TP 1).
_HF_NAMES = {"embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight",
             "decoder.final_layernorm.weight": "model.norm.weight"}


def converted_base_delta(rank: int, world: int, tp: int, pp: int, tmp: str, policy: str, base_hf: str, bases: list[str]) -> None:
    """For each Megatron checkpoint in ``bases`` (``base_hf`` converted by ``onmerge convert-hf``):
    the largest difference between the reference delta MegatronCheckpointBase reads into the
    trainer's model of ``policy`` and (a) the policy minus ``base_hf`` loaded by mbridge into the
    same model, (b) the difference of the HF tensors themselves where they are unchanged."""
    from safetensors.torch import load_file

    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import MegatronCheckpointBase, install_online_merging

    base_by_name = dict(_trainer_model(base_hf).named_parameters())
    hf_delta = {name: load_file(Path(policy, "model.safetensors"))[hf] - load_file(Path(base_hf, "model.safetensors"))[hf]
                for name, hf in _HF_NAMES.items()}
    config = OnlineMergeConfig(method="dare", keep_rate=1.0, alpha=0.5, reference_clamp=None)
    results = {}
    for base in bases:
        model = _trainer_model(policy)
        name_of = {param: name for name, param in model.named_parameters()}
        ddp = h.wrap_ddp(model, tp, pp)
        opt = h.megatron_optimizer([ddp])
        handle = install_online_merging(opt, [ddp], config, MegatronCheckpointBase(base), progress=False)
        worst, worst_hf, count = 0.0, 0.0, 0
        for inner, shard in _pairs(handle):
            got = inner.state[shard.main_param]["reference_values"]
            name = name_of[shard.model_param]
            expected = shard.main_param.detach().reshape(-1) - base_by_name[name].detach().reshape(-1)[shard.start : shard.end]
            worst = max(worst, float((got - expected).abs().max()))
            if name in hf_delta:
                worst_hf = max(worst_hf, float((got - hf_delta[name].reshape(-1)[shard.start : shard.end]).abs().max()))
            count += 1
        results[base] = {"worst": worst, "worst_hf": worst_hf, "count": count}
    torch.save(results, Path(tmp, f"converted_rank{rank}.pt"))


def hf_base_refusals(rank: int, world: int, tp: int, pp: int, tmp: str, policy: str, good: str, bad: dict[str, str]) -> None:
    """Installs with Hugging Face bases of another shape (``bad``: label -> path): the message,
    how many tensors were read (progress calls), how the optimizer changed; then ``good`` works."""
    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import install_online_merging
    from onmerge_megatron.megatron.hf import HuggingFaceBase
    from onmerge_megatron.training.model import make_bridge

    model = _trainer_model(policy)
    ddp = h.wrap_ddp(model, tp, pp)
    opt = h.megatron_optimizer([ddp])
    _train(ddp, opt, range(1))
    snapshot = _inner_snapshot(opt)
    config = OnlineMergeConfig(method="dare", keep_rate=0.5, alpha=0.3, seed=7)
    results: dict[str, Any] = {}
    for label, path in {**bad, "good": good}.items():
        read: list[str] = []
        source = HuggingFaceBase(path, bridge=make_bridge(path, torch.float32))
        try:
            install_online_merging(opt, [ddp], config, source, progress=lambda done, total, key, nbytes: read.append(key))
            message = None
        except Exception as exc:  # the test checks type and message
            message = f"{type(exc).__name__}: {exc}"
        results[label] = {"message": message, "read": len(read), "changes": _changes(opt, snapshot)}
    _train(ddp, opt, range(1, 2))
    torch.save(results, Path(tmp, f"hf_refusals_rank{rank}.pt"))


# ------------------------------------------------------------------ the fused kernel through Megatron
def fused_run(rank: int, world: int, tp: int, pp: int, tmp: str, names: list[str], tag: str, fused: bool) -> None:
    """``megatron_run``'s training with the inner optimizer given to ``install_online_merging``:
    ``FusedOnlineMergingAdamW`` on its Triton kernels (``fused``; CPU tensors need
    TRITON_INTERPRET=1, set by the test), else the engine. Both run with torch's ``Tensor.sqrt``
    correctly rounded, as the kernel's sqrt is (torch's CPU sqrt is not, see
    tests/kernels/interpreted_checks.py); the fused optimizer takes the engine's path for what its
    kernels do not cover (e.g. OnDARE's update on gated fc1's two blocks). Writes the parameters,
    and how the fused optimizer took its steps."""
    import functools
    import sys

    from onmerge_megatron.kernels import FusedOnlineMergingAdamW
    from onmerge_megatron.megatron import MegatronCheckpointBase, install_online_merging

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
    from interpreted_checks import _ieee_sqrt

    counts = {}
    for config_name in names:
        config = merge_config(config_name)
        model = h.build_model(tp, pp)
        h.load_model(model, Path(tmp, "init"))
        ddp = h.wrap_ddp(model, tp, pp)
        opt = h.megatron_optimizer([ddp], lr=LR, weight_decay=WEIGHT_DECAY, eps=adam_eps(config_name))
        inner_class = functools.partial(FusedOnlineMergingAdamW, backend="triton") if fused else None
        opt = install_online_merging(opt, [ddp], config, MegatronCheckpointBase(str(Path(tmp, "base"))), progress=False,
                                     **({"optimizer_class": inner_class} if fused else {}))
        torch_sqrt = torch.Tensor.sqrt
        torch.Tensor.sqrt = _ieee_sqrt
        try:
            _train(ddp, opt, range(STEPS))
        finally:
            torch.Tensor.sqrt = torch_sqrt
        h.save_model(model, Path(tmp, f"{tag}_{config_name}"))
        counts[config_name] = {
            "inner": sorted({type(inner).__name__ for inner in opt.inner_optimizers}),
            "kernel_counts": [dict(getattr(inner, "kernel_counts", {})) for inner in opt.inner_optimizers],
        }
    torch.save(counts, Path(tmp, f"fused_{tag}_rank{rank}.pt"))
