"""Online merging inside the optimizer that megatron-core's ``get_megatron_optimizer`` returns.

Megatron's optimizers wrap an inner torch-style Adam that steps this rank's fp32 main params:
the distributed optimizer's shards (a flat ``[start, end)`` range of each TP-local parameter),
the fp32 copies of a Float16Optimizer, or the model params of an FP32Optimizer. After the inner
step, megatron copies main params to model params and all-gathers them. Replacing the inner Adam
by ``OnlineMergingAdamW`` over the same param groups therefore merges every step on exactly the
elements this rank owns, and the merged values reach every rank through megatron's existing
all-gather: the step path gets no new collective (with the default ``ties_scope='shard'``).

Each main param is described to the engine by its checkpoint key and global coordinates
(``coords.param_coords``) restricted to the DP range, so masks do not depend on the layout.

Usage (after ``get_megatron_optimizer`` and after the SFT weights are in the main params, before
the first step and before loading a checkpoint to resume)::

    optimizer = get_megatron_optimizer(opt_config, model)
    merging = install_online_merging(optimizer, model, OnlineMergeConfig(method="dare"),
                                     reference_delta_source=MegatronCheckpointBase(base_dir))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from ..merging.config import OnlineMergeConfig
from ..merging.coords import ShardCoords
from .coords import ParamCoords, param_coords

logger = logging.getLogger(__name__)

DeltaFn = Callable[[str, ShardCoords], torch.Tensor]

FROM_CHECKPOINT = "from-checkpoint"
"""``reference_delta_source`` for a resume: the reference delta is loaded with the optimizer state."""


class OnlineMergeUnsupportedError(RuntimeError):
    """A megatron-core setting the online merge cannot work with."""


@dataclass
class MainShard:
    """One fp32 main param of the inner optimizer and where its elements live."""

    main_param: torch.Tensor
    """The tensor the inner optimizer steps (flat for the distributed optimizer)."""
    model_param: torch.Tensor
    """The TP-local model parameter it belongs to."""
    start: int
    end: int
    """Range of ``model_param.view(-1)`` held by ``main_param``."""
    param_coords: ParamCoords

    @property
    def name(self) -> str:
        return self.param_coords.key

    @property
    def coords(self) -> ShardCoords:
        return self.param_coords.shard(self.start, self.end)


@dataclass
class OnlineMergingHandle:
    """What ``install_online_merging`` set up; used by checkpointing and logging."""

    config: OnlineMergeConfig
    megatron_optimizers: list[Any]
    """The sub-optimizers (DistributedOptimizer, Float16/FP32 optimizers) now merging."""
    inner_optimizers: list[Any]
    """Their new inner optimizers (OnlineMergingAdamW), same order."""
    model_chunks: list[Any] = field(default_factory=list)
    pending_reference: Any = None
    """A reference source whose delta is built at the first step (``defer_reference=True``)."""
    shards: list[list[MainShard]] = field(default_factory=list)
    """Main shards per sub-optimizer."""

    def all_shards(self) -> list[MainShard]:
        return [shard for shards in self.shards for shard in shards]

    def merge_stats(self, reset: bool = True) -> dict[str, float]:
        """This rank's merge statistics since the last call (engine's ``merge_stats``): kept
        fraction, update norm before/after merging, sign-conflict rate. With several
        sub-optimizers (dense + expert), keys are prefixed by the sub-optimizer index."""
        per = [inner.merge_stats(reset=reset) for inner in self.inner_optimizers if hasattr(inner, "merge_stats")]
        if len(per) == 1:
            return per[0]
        return {f"{i}/{key}": value for i, stats in enumerate(per) for key, value in stats.items()}


def _sub_optimizers(megatron_optimizer: Any) -> list[Any]:
    return list(getattr(megatron_optimizer, "chained_optimizers", None) or [megatron_optimizer])


def _check_supported(opt: Any) -> None:
    """Refuse, by name, every setting the merge cannot be correct with."""
    kind = type(opt).__name__
    config = getattr(opt, "config", None)

    def refuse(what: str, why: str) -> None:
        raise OnlineMergeUnsupportedError(f"online merge: {what} is not supported ({why}); optimizer {kind}")

    if config is not None:
        if getattr(config, "use_precision_aware_optimizer", False):
            refuse(
                "use_precision_aware_optimizer=True",
                "TE FusedAdam keeps the fp32 master weights inside its fused kernel, so there is no "
                "main param to merge; turn it off",
            )
        if getattr(config, "optimizer_cuda_graph", False):
            refuse(
                "optimizer_cuda_graph=True",
                "a captured optimizer step would freeze the per-step keep-masks and the step-K "
                "schedule into the graph; turn it off",
            )
        if getattr(config, "optimizer_cpu_offload", False):
            refuse("optimizer_cpu_offload=True", "the HybridDeviceOptimizer steps copies of the main params")
        name = getattr(config, "optimizer", "adam")
        if name != "adam":
            refuse(f"optimizer={name!r}", "the merge is built into AdamW; use optimizer='adam'")
        if not getattr(config, "decoupled_weight_decay", True):
            refuse(
                "decoupled_weight_decay=False",
                "Adam with L2-coupled weight decay folds decay into the update that is sparsified; the "
                "method applies decoupled (AdamW) weight decay densely",
            )
    if kind in ("LayerWiseDistributedOptimizer", "HybridDeviceOptimizer") or "Muon" in kind:
        refuse(kind, "only DistributedOptimizer, Float16OptimizerWithFloat16Params and FP32Optimizer are handled")
    ddp_config = getattr(opt, "ddp_config", None)
    if ddp_config is not None and getattr(ddp_config, "use_megatron_fsdp", False):
        refuse("use_megatron_fsdp=True", "Megatron-FSDP shards params outside the distributed optimizer's ranges")
    inner = getattr(opt, "optimizer", None)
    if inner is not None:
        inner_kind = type(inner).__name__
        if inner_kind not in ("AdamW", "Adam", "FusedAdam", "OnlineMergingAdamW"):
            refuse(f"inner optimizer {inner_kind}", "only torch AdamW/Adam and TE/apex FusedAdam can be replaced")
        for group in inner.param_groups:
            if group.get("amsgrad", False):
                refuse("amsgrad=True", "AMSGrad is not implemented by OnlineMergingAdamW")
            if group.get("maximize", False):
                refuse("maximize=True", "not implemented by OnlineMergingAdamW")
            if inner_kind == "Adam" and group.get("weight_decay", 0.0) and not group.get("adam_w_mode", True):
                refuse("Adam with L2 weight decay", "the method needs decoupled weight decay")


def _main_shards(opt: Any) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """(main_param, model_param, start, end) for every param the inner optimizer steps."""
    kind = type(opt).__name__
    out = []
    if hasattr(opt, "shard_fp32_from_float16_groups") and hasattr(opt, "_get_model_param_range_map"):
        # DistributedOptimizer: flat main shards of ranges of the model params.
        pairs = [
            (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
            (opt.model_fp32_groups, opt.shard_fp32_groups),
        ]
        for model_groups, main_groups in pairs:
            for model_group, main_group in zip(model_groups, main_groups):
                for model_param, main_param in zip(model_group, main_group):
                    if main_param is None:
                        raise OnlineMergeUnsupportedError(
                            f"online merge: {kind} has no fp32 main param for a parameter of shape "
                            f"{tuple(model_param.shape)} (precision-aware optimizer or fp8 params without main copies)"
                        )
                    param_range = opt._get_model_param_range_map(model_param)["param"]
                    out.append((main_param, model_param, int(param_range.start), int(param_range.end)))
    elif hasattr(opt, "fp32_from_float16_groups"):
        # Float16OptimizerWithFloat16Params: fp32 copies of the 16-bit params, fp32 params themselves.
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                out.append((main_param, model_param, 0, model_param.numel()))
        for group in opt.fp32_from_fp32_groups:
            for param in group:
                out.append((param, param, 0, param.numel()))
    elif kind == "FP32Optimizer" or hasattr(opt, "optimizer"):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                out.append((param, param, 0, param.numel()))
    else:
        raise OnlineMergeUnsupportedError(f"online merge: unknown megatron optimizer {kind}")
    return out


def _ties_tensor_group(opt: Any, model_param: torch.Tensor, config: OnlineMergeConfig) -> Any:
    """Process group holding the other pieces of a tensor, for OnTIES' exact per-tensor top-p.

    Only tensor-parallel splits can be handled: the engine exchanges candidates tensor by tensor,
    so every rank of the group must step every tensor, which the distributed optimizer's DP
    ranges break (a rank may hold none of a tensor).
    """
    if config.method != "ties" or config.ties_scope != "tensor":
        return None
    dp_group = getattr(opt, "data_parallel_group", None)
    if hasattr(opt, "_get_model_param_range_map") and dp_group is not None and dp_group.size() > 1:
        raise OnlineMergeUnsupportedError(
            "online merge: ties_scope='tensor' is not supported with the distributed optimizer at data-parallel "
            f"size {dp_group.size()} (its DP ranges give ranks different tensors, so a per-tensor exchange "
            "cannot be matched across ranks); use ties_scope='shard' (no collective) or DP size 1"
        )
    if not getattr(model_param, "tensor_model_parallel", False):
        return None  # replicated over TP: the local tensor is the whole tensor
    from megatron.core import parallel_state

    if not getattr(model_param, "allreduce", True):  # expert parameter
        group = parallel_state.get_expert_tensor_parallel_group()
    else:
        group = parallel_state.get_tensor_model_parallel_group()
    return group if group is not None and group.size() > 1 else None


def _engine() -> tuple[Any, Any]:
    from ..optim import OnlineMergingAdamW, Segment

    return OnlineMergingAdamW, Segment


def _replace_inner_optimizer(opt: Any, config: OnlineMergeConfig) -> Any:
    """An OnlineMergingAdamW over the inner optimizer's param groups (same dicts), state carried over."""
    OnlineMergingAdamW, _ = _engine()
    inner = opt.optimizer
    defaults = dict(inner.defaults)
    groups = inner.param_groups
    # The group dicts are kept (not copied): megatron's scheduler and checkpoint code hold and
    # update them (lr, weight decay, wd_mult, ...).
    # The distributed optimizer's fp32 main shards of fp32 models are views of the param buffer
    # (non-leaf tensors), which torch's constructor refuses; megatron itself assigns
    # param_groups directly after construction, and so does this.
    placeholder = torch.zeros(1, requires_grad=True)
    new = OnlineMergingAdamW(
        [placeholder],
        lr=defaults.get("lr", 1e-3),
        betas=tuple(defaults.get("betas", (0.9, 0.999))),
        eps=defaults.get("eps", 1e-8),
        weight_decay=defaults.get("weight_decay", 0.0),
        merge=config,
        # With a loss scaler megatron checks the gradients for inf/NaN itself, agreed over all ranks,
        # and skips the inner step; otherwise the engine's own check stops a non-finite step.
        nonfinite="off" if getattr(opt, "grad_scaler", None) is not None else "raise",
    )
    for group in groups:
        for key, value in new.defaults.items():
            group.setdefault(key, value)
    new.param_groups = groups
    new.state.clear()
    # Existing per-param state (after a checkpoint load or init_state_fn): moments carry over.
    # TE/apex FusedAdam keep `step` in the param group; torch keeps it per param as a float tensor.
    for group in new.param_groups:
        group_step = group.pop("step", None)
        for param in group["params"]:
            state = inner.state.get(param)
            if not state:
                continue
            state = dict(state)
            if "step" not in state and group_step is not None:
                state["step"] = torch.tensor(float(group_step))
            new.state[param] = state
    opt.optimizer = new
    return new


def install_online_merging(
    megatron_optimizer: Any,
    model_chunks: Sequence[Any] | Any,
    config: OnlineMergeConfig,
    reference_delta_source: Any = None,
    *,
    progress: bool | Callable[[int, int, str, int], None] = True,
    checkpointing: bool = True,
    defer_reference: bool = False,
) -> OnlineMergingHandle:
    """Make every ``step()`` of a megatron-core optimizer an online-merging step.

    Args:
        megatron_optimizer: what ``get_megatron_optimizer`` returned (ChainedOptimizer,
            DistributedOptimizer, Float16OptimizerWithFloat16Params or FP32Optimizer).
        model_chunks: the model chunks given to ``get_megatron_optimizer`` (DDP-wrapped or not).
        config: the merge settings.
        reference_delta_source: where the reference delta (SFT minus base) comes from:
            ``None`` when nothing is merged with a reference (method 'none' or alpha 0);
            ``FROM_CHECKPOINT`` when resuming: the delta is loaded with the optimizer state;
            a ``reference.ReferenceDeltaSource`` (``MegatronCheckpointBase``, ``HuggingFaceBase``);
            or a callable ``(name, coords) -> 1-D fp32 tensor`` of the delta at those elements.
        progress: log progress while the reference delta is built (True), stay quiet (False), or
            call ``progress(done, total, tensor_name, bytes_read)`` after each tensor.
        defer_reference: build the reference delta at the first ``step()`` (from the main params
            as they are then) instead of now: for scripts that load the SFT weights after creating
            the optimizer. Skipped if a checkpoint with merge state is loaded before that step.
        checkpointing: make the optimizer's ``sharded_state_dict``/``load_state_dict`` carry the
            merge state (``checkpoint.attach_checkpointing``), so Megatron-LM checkpoints hold it.

    Call it after ``get_megatron_optimizer`` and before the first step or checkpoint load.
    Raises ``OnlineMergeUnsupportedError`` naming any setting the merge cannot support, and
    ``ValueError`` for base weights of another shape; a refused call leaves the optimizer as it was.
    """
    if not isinstance(config, OnlineMergeConfig):
        raise TypeError(f"online merge: config must be an OnlineMergeConfig, got {type(config).__name__}")
    OnlineMergingAdamW, Segment = _engine()
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    subs = [opt for opt in _sub_optimizers(megatron_optimizer) if not getattr(opt, "is_stub_optimizer", False)]
    # Everything that can refuse runs before the first optimizer is changed, so that a refused
    # call leaves the optimizer as it was and a corrected call can follow.
    for opt in subs:
        _check_supported(opt)
        if isinstance(getattr(opt, "optimizer", None), OnlineMergingAdamW):
            raise RuntimeError("online merge: install_online_merging was already called on this optimizer")
    if config.needs_reference and reference_delta_source is None:
        raise ValueError(
            f"online merge: method={config.method!r} with alpha={config.alpha} needs a reference delta "
            f"(SFT minus base): pass reference_delta_source (e.g. MegatronCheckpointBase(path)), or "
            f"FROM_CHECKPOINT when resuming from a checkpoint that holds the merge state"
        )

    per_opt = [_main_shards(opt) for opt in subs]
    coords_by_param = param_coords(chunks, [model for shards in per_opt for _, model, _, _ in shards])
    handle = OnlineMergingHandle(config=config, megatron_optimizers=subs, inner_optimizers=[], model_chunks=chunks)
    handle.shards = [
        [MainShard(main, model, start, end, coords_by_param[model]) for main, model, start, end in shards] for shards in per_opt
    ]
    segments = [
        [Segment(shard.name, shard.coords, 0, _ties_tensor_group(opt, shard.model_param, config)) for shard in shards]
        for opt, shards in zip(subs, handle.shards)
    ]
    from_checkpoint = isinstance(reference_delta_source, str) and reference_delta_source == FROM_CHECKPOINT
    delta_fns = None
    if config.needs_reference and not from_checkpoint and not defer_reference:
        from .reference import reference_delta_fns

        delta_fns = reference_delta_fns(handle, reference_delta_source, progress=progress)

    for opt, shards, segs in zip(subs, handle.shards, segments):
        inner = _replace_inner_optimizer(opt, config)
        for shard, segment in zip(shards, segs):
            inner.set_segments(shard.main_param, [segment])
        handle.inner_optimizers.append(inner)
    if delta_fns is not None:
        for inner, delta_fn in zip(handle.inner_optimizers, delta_fns):
            inner.set_reference_delta(delta_fn=delta_fn)
    elif config.needs_reference and not from_checkpoint:
        handle.pending_reference = reference_delta_source
        _build_reference_at_first_step(handle, megatron_optimizer, progress)
    elif config.needs_reference:
        _require_reference_at_first_step(handle, megatron_optimizer)
    if checkpointing:
        from .checkpoint import attach_checkpointing

        attach_checkpointing(handle, megatron_optimizer)
    return handle


def _build_reference_at_first_step(handle: OnlineMergingHandle, megatron_optimizer: Any, progress: Any) -> None:
    original_step = megatron_optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if handle.pending_reference is not None:
            from .reference import build_reference_deltas

            source, handle.pending_reference = handle.pending_reference, None
            build_reference_deltas(handle, source, progress=progress)
        return original_step(*args, **kwargs)

    megatron_optimizer.step = step


def _require_reference_at_first_step(handle: OnlineMergingHandle, megatron_optimizer: Any) -> None:
    """With FROM_CHECKPOINT, fail the first step clearly if no checkpoint brought a reference delta."""
    original_step = megatron_optimizer.step
    checked = [False]

    def step(*args: Any, **kwargs: Any) -> Any:
        if not checked[0]:
            missing = [
                shard.name
                for inner, shards in zip(handle.inner_optimizers, handle.shards)
                for shard in shards
                if "reference_values" not in inner.state.get(shard.main_param, {})
            ]
            if missing:
                raise RuntimeError(
                    f"online merge: no reference delta for {len(missing)} tensor(s) (e.g. {missing[0]!r}): the "
                    f"source was FROM_CHECKPOINT but no checkpoint with online-merge state was loaded; give the "
                    f"base weights (--online-merge-base / --online-merge-base-hf, or MegatronCheckpointBase / "
                    f"HuggingFaceBase)"
                )
            checked[0] = True
        return original_step(*args, **kwargs)

    megatron_optimizer.step = step


def iter_main_shards(handle: OnlineMergingHandle) -> Iterable[tuple[Any, MainShard]]:
    """(inner optimizer, shard) pairs."""
    for inner, shards in zip(handle.inner_optimizers, handle.shards):
        for shard in shards:
            yield inner, shard
