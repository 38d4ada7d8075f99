"""Online merging inside the optimizer that megatron-core's ``get_megatron_optimizer`` returns.

Megatron's optimizers wrap an inner torch-style Adam that steps this rank's fp32 main params:
the distributed optimizer's shards (a flat ``[start, end)`` range of each TP-local parameter),
the fp32 copies of a Float16Optimizer, or the model params of an FP32Optimizer. After the inner
step, megatron copies main params to model params and all-gathers them. Replacing the inner Adam
by ``OnlineMergingAdamW`` (or a subclass, e.g. the fused ``FusedOnlineMergingAdamW``) over the same
param groups therefore merges every step on exactly the elements this rank owns, and the merged
values reach every rank through megatron's existing all-gather: the step path gets no new
collective (with the default ``ties_scope='shard'``).

``install_online_merging`` does that and returns an ``OnlineMergingOptimizer``: a wrapper in
megatron-core's own style (as ``ChainedOptimizer`` wraps a list of optimizers) whose ``step``,
``sharded_state_dict``, ``load_state_dict`` and ``state_dict`` add what merging needs (a reference
delta built at the first step, the merge state in checkpoints) and delegate the rest. Use it as
the optimizer from then on.

Each main param is described to the engine by its checkpoint key and global coordinates
(``coords.param_coords``) restricted to the DP range, so masks do not depend on the layout.
Everything read from megatron-core's internals comes from ``compat``.

Usage (after ``get_megatron_optimizer`` and after the SFT weights are in the main params, before
the first step and before loading a checkpoint to resume)::

    optimizer = get_megatron_optimizer(opt_config, model)
    optimizer = install_online_merging(optimizer, model, OnlineMergeConfig(method="dare"),
                                       reference_delta_source=MegatronCheckpointBase(base_dir))
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch

from ..merging.config import OnlineMergeConfig
from ..optim import OnlineMergingAdamW, Segment, TensorGroup
from . import compat
from .checkpoint import PREFIX, complete_engine_state, hidden_merge_state, load_merge_state, merge_sharded_state_dict, trained_by
from .compat import OnlineMergeUnsupportedError
from .coords import MainShard, param_coords, unwrap_model_chunk
from .reference import Progress, reference_source

logger = logging.getLogger(__name__)

FROM_CHECKPOINT = "from-checkpoint"
"""``reference_delta_source`` for a resume: the reference delta is loaded with the optimizer state."""

__all__ = ["FROM_CHECKPOINT", "MainShard", "OnlineMergeUnsupportedError", "OnlineMergingOptimizer", "install_online_merging"]


class OnlineMergingOptimizer:
    """A megatron-core optimizer whose every step is an online-merging step.

    Wraps what ``get_megatron_optimizer`` returned (``megatron_optimizer``), whose inner Adams
    ``install_online_merging`` replaced by online-merging ones. It has the interface of
    ``megatron.core.optimizer.MegatronOptimizer``: ``step``, ``zero_grad``, ``param_groups``,
    ``sharded_state_dict``, ``load_state_dict`` ... delegate to the wrapped optimizer, and
    ``step``/``step_with_ready_grads``, ``sharded_state_dict``, ``load_state_dict`` and
    ``state_dict`` add the merge's part. Any other attribute (``config``, the wrapped optimizer's
    ``OptimizerConfig``; ``chained_optimizers``, ``save_parameter_state``, ...) is the wrapped
    optimizer's. The merge settings are ``merge_config``.
    """

    def __init__(
        self,
        megatron_optimizer: Any,
        merge_config: OnlineMergeConfig,
        model_chunks: list[Any],
        megatron_optimizers: list[Any],
        shards: list[list[MainShard]],
        inner_optimizers: list[OnlineMergingAdamW],
        *,
        pending_reference: Any = None,
        reference_from_checkpoint: bool = False,
        progress: bool | Progress = True,
    ) -> None:
        self.megatron_optimizer = megatron_optimizer
        """What ``get_megatron_optimizer`` returned (ChainedOptimizer, DistributedOptimizer, ...)."""
        self.merge_config = merge_config
        self.model_chunks = model_chunks
        self.megatron_optimizers = megatron_optimizers
        """The sub-optimizers (DistributedOptimizer, Float16/FP32 optimizers) now merging."""
        self.shards = shards
        """Main shards per sub-optimizer."""
        self.inner_optimizers = inner_optimizers
        """Their inner optimizers (OnlineMergingAdamW or a subclass), same order."""
        self.pending_reference = pending_reference
        """A reference source whose delta is built at the first step (``defer_reference=True``)."""
        self._reference_from_checkpoint = reference_from_checkpoint
        self._progress = progress

    # ------------------------------------------------------------------ what merging adds
    def _before_step(self) -> None:
        if self.pending_reference is not None:
            source, self.pending_reference = self.pending_reference, None
            self.set_reference(source, self._progress)
        if self._reference_from_checkpoint:
            # FROM_CHECKPOINT: fail the first step clearly if no checkpoint brought a reference delta.
            missing = [name for inner in self.inner_optimizers for name in inner.missing_reference_delta()]
            if missing:
                raise RuntimeError(
                    f"online merge: no reference delta for {len(missing)} tensor(s) (e.g. {missing[0]!r}): the "
                    f"source was FROM_CHECKPOINT but no checkpoint with online-merge state was loaded; give the "
                    f"base weights (--online-merge-base / --online-merge-base-hf, or MegatronCheckpointBase / "
                    f"HuggingFaceBase)"
                )
            self._reference_from_checkpoint = False

    def set_reference(self, source: Any, progress: bool | Progress = True) -> None:
        """Give every inner optimizer its shards' reference delta (SFT minus base) from ``source``
        (see ``install_online_merging``), taking the main params as they are now as the SFT weights."""
        given = reference_source(source, [shard for shards in self.shards for shard in shards], self.model_chunks, progress)
        for inner in self.inner_optimizers:
            inner.set_reference_delta(**given)

    def step(self) -> Any:
        """megatron's step (gradient checks, clipping, the inner merging step, the param gather);
        the first one builds a deferred reference delta first."""
        self._before_step()
        return self.megatron_optimizer.step()

    def step_with_ready_grads(self) -> bool:
        self._before_step()
        return self.megatron_optimizer.step_with_ready_grads()

    def sharded_state_dict(self, model_sharded_state_dict: Any = None, is_loading: bool = False, *args: Any, **kwargs: Any) -> Any:
        """megatron's sharded optimizer state, plus the merge state under ``online_merge``
        (reshardable across TP, PP and DP; see checkpoint.py)."""
        with hidden_merge_state(self, keep_adam_state=is_loading):
            state = self.megatron_optimizer.sharded_state_dict(
                {} if model_sharded_state_dict is None else model_sharded_state_dict, is_loading, *args, **kwargs
            )
        if state is None:
            state = {}
        state[PREFIX] = merge_sharded_state_dict(self, is_loading=is_loading)
        if is_loading:
            complete_engine_state(self)
        return state

    def load_state_dict(self, state_dict: Any) -> Any:
        """megatron's load of its part, then the merge state from ``online_merge`` (taken out of
        ``state_dict``)."""
        merge_state = state_dict.pop(PREFIX, None) if isinstance(state_dict, dict) else None
        # no_grad: megatron's dp_reshardable load copies into the main params in place, which for
        # fp32 models are views of parameters that require grad (its fully_reshardable load is
        # already decorated with no_grad).
        with hidden_merge_state(self, keep_adam_state=True), torch.no_grad():
            result = self.megatron_optimizer.load_state_dict(state_dict)
        if merge_state is not None:
            load_merge_state(self, merge_state)
            if self.merge_config.needs_reference:
                self.pending_reference = None  # the checkpoint's delta replaces a deferred build
        elif self.pending_reference is not None:
            logger.warning(
                "online merge: the checkpoint holds no online-merge state, so the reference delta will be built at the "
                "first step from the weights then, i.e. this checkpoint's, not the SFT model's"
            )
        else:
            logger.warning("online merge: the checkpoint holds no online-merge state; keeping the current one")
        complete_engine_state(self)
        return result

    def state_dict(self) -> Any:
        """megatron's (non-sharded) state dict, which knows Adam's keys only: the merge state is
        saved by ``sharded_state_dict``."""
        with hidden_merge_state(self):
            return self.megatron_optimizer.state_dict()

    def merge_stats(self, reset: bool = True) -> dict[str, float]:
        """This rank's merge statistics since the last call (engine's ``merge_stats``): kept
        fraction, update norm before/after merging, sign-conflict rate. With several
        sub-optimizers (dense + expert), keys are prefixed by the sub-optimizer index."""
        per = [inner.merge_stats(reset=reset) for inner in self.inner_optimizers]
        if len(per) == 1:
            return per[0]
        return {f"{i}/{key}": value for i, stats in enumerate(per) for key, value in stats.items()}

    # ------------------------------------------------------------------ MegatronOptimizer, delegated
    @property
    def param_groups(self) -> list[dict]:
        return self.megatron_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.megatron_optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.megatron_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.megatron_optimizer.zero_grad(set_to_none)

    def prepare_grads(self) -> bool:
        return self.megatron_optimizer.prepare_grads()

    def get_loss_scale(self) -> torch.Tensor:
        return self.megatron_optimizer.get_loss_scale()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.megatron_optimizer.scale_loss(loss)

    def get_grad_norm(self) -> Any:
        return self.megatron_optimizer.get_grad_norm()

    def clip_grad_norm(self, clip_grad: float) -> float:
        return self.megatron_optimizer.clip_grad_norm(clip_grad)

    def count_zeros(self) -> float:
        return self.megatron_optimizer.count_zeros()

    def reload_model_params(self, state_dict: Any = None) -> None:
        self.megatron_optimizer.reload_model_params(state_dict)

    def get_parameters(self) -> list[torch.nn.Parameter]:
        return self.megatron_optimizer.get_parameters()

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found above; guarded so that a half-built wrapper (during
        # copy/pickle) does not recurse.
        if name == "megatron_optimizer":
            raise AttributeError(name)
        return getattr(self.megatron_optimizer, name)


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
        if inner_kind not in ("AdamW", "Adam", "FusedAdam"):
            refuse(f"inner optimizer {inner_kind}", "only torch AdamW/Adam and TE/apex FusedAdam can be replaced")
        for group in inner.param_groups:
            if group.get("amsgrad", False):
                refuse("amsgrad=True", "AMSGrad is not implemented by OnlineMergingAdamW")
            if group.get("maximize", False):
                refuse("maximize=True", "not implemented by OnlineMergingAdamW")
            if inner_kind == "Adam" and group.get("weight_decay", 0.0) and not group.get("adam_w_mode", True):
                refuse("Adam with L2 weight decay", "the method needs decoupled weight decay")


def _ties_tensor_groups(opt: Any, shards: list[MainShard], chunks: list[Any], config: OnlineMergeConfig) -> list[tuple[TensorGroup | None, bool]]:
    """Per main shard, the group for OnTIES' per-tensor top-p, and whether this rank counts the
    shard's elements (None: per-shard top-p, or no other rank holds a piece of the tensor).

    The group is every rank holding pieces of this optimizer's tensors: the tensor-parallel group,
    times the data-parallel group over which a distributed optimizer shards. Its TensorGroup lists
    every tensor the optimizer trains on any rank (a DP rank may hold none of a tensor), the same
    on every rank. A TP-replicated tensor (a layer norm) is held alike by every TP rank: only TP
    rank 0 counts it.
    """
    if config.method != "ties" or config.ties_scope != "tensor":
        return [(None, True)] * len(shards)
    expert = [not getattr(shard.model_param, "allreduce", True) for shard in shards]
    dp_group = compat.data_parallel_group(opt)
    dp = dp_group.size() if dp_group is not None else 1
    if any(expert) and (dp > 1 or compat.expert_tensor_parallel_size() > 1):
        raise OnlineMergeUnsupportedError(
            "online merge: ties_scope='tensor' is not supported for expert parameters split over ranks (megatron-core "
            "has no expert tensor-and-data-parallel group to select over); use ties_scope='shard' (no collective)"
        )
    group, tp_rank = compat.tensor_and_data_parallel_group(dp_group)
    if group is None or group.size() == 1:
        return [(None, True)] * len(shards)
    params = [p for chunk in chunks for p in unwrap_model_chunk(chunk).parameters() if p.requires_grad]
    trained = [p for p in params if trained_by(opt, p, shards)]
    coords = param_coords(chunks, trained)
    tensor_group = TensorGroup(group, {coords[p].key: math.prod(coords[p].global_shape) for p in trained})
    return [(tensor_group, getattr(shard.model_param, "tensor_model_parallel", False) or tp_rank == 0) for shard in shards]


def _new_inner_optimizer(opt: Any, config: OnlineMergeConfig, optimizer_class: Callable[..., Any]) -> OnlineMergingAdamW:
    """An online-merging optimizer built with the inner optimizer's hyper-parameters; it holds a
    placeholder until ``_adopt_inner_optimizer`` gives it the inner optimizer's param groups."""
    defaults = opt.optimizer.defaults
    # The distributed optimizer's fp32 main shards of fp32 models are views of the param buffer
    # (non-leaf tensors), which torch's constructor refuses; megatron itself assigns
    # param_groups directly after construction, and so does _adopt_inner_optimizer.
    placeholder = torch.zeros(1, requires_grad=True)
    new = optimizer_class(
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
    if not isinstance(new, OnlineMergingAdamW):
        raise TypeError(f"online merge: optimizer_class must build an OnlineMergingAdamW (or a subclass), got {type(new).__name__}")
    return new


def _adopt_inner_optimizer(opt: Any, new: OnlineMergingAdamW) -> None:
    """Make ``new`` the inner optimizer of ``opt``, over its param groups (the same dicts), with
    its per-param state carried over."""
    inner = opt.optimizer
    groups = inner.param_groups
    # The group dicts are kept (not copied): megatron's scheduler and checkpoint code hold and
    # update them (lr, weight decay, wd_mult, ...).
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


def install_online_merging(
    megatron_optimizer: Any,
    model_chunks: Sequence[Any] | Any,
    config: OnlineMergeConfig,
    reference_delta_source: Any = None,
    *,
    progress: bool | Progress = True,
    defer_reference: bool = False,
    optimizer_class: Callable[..., Any] = OnlineMergingAdamW,
) -> OnlineMergingOptimizer:
    """Make every ``step()`` of a megatron-core optimizer an online-merging step; returns the
    optimizer to use from now on (it wraps ``megatron_optimizer``).

    Args:
        megatron_optimizer: what ``get_megatron_optimizer`` returned (ChainedOptimizer,
            DistributedOptimizer, Float16OptimizerWithFloat16Params or FP32Optimizer).
        model_chunks: the model chunks given to ``get_megatron_optimizer`` (DDP-wrapped or not).
        config: the merge settings.
        reference_delta_source: where the reference delta (SFT minus base) comes from:
            ``None`` when nothing is merged with a reference (method 'none' or alpha 0);
            ``FROM_CHECKPOINT`` when resuming: the delta is loaded with the optimizer state;
            a ``reference.BaseWeightsSource`` (``MegatronCheckpointBase``, ``HuggingFaceBase``);
            or a callable ``(name, coords) -> 1-D fp32 tensor`` of the delta at those elements.
        progress: log progress while the reference delta is built (True), stay quiet (False), or
            call ``progress(done, total, tensor_name, bytes_read)`` after each tensor.
        defer_reference: build the reference delta at the first ``step()`` (from the main params
            as they are then) instead of now: for scripts that load the SFT weights after creating
            the optimizer. Skipped if a checkpoint with merge state is loaded before that step.
        optimizer_class: the inner optimizer, ``OnlineMergingAdamW`` or a subclass, constructed
            with its arguments (``lr``, ``betas``, ``eps``, ``weight_decay``, ``merge``,
            ``nonfinite``); e.g. ``onmerge_megatron.kernels.FusedOnlineMergingAdamW``, or a
            ``functools.partial`` of it with more arguments (``backend="triton"``).

    Call it after ``get_megatron_optimizer`` and before the first step or checkpoint load.
    Raises ``compat.MegatronVersionError`` for an untested megatron-core version,
    ``OnlineMergeUnsupportedError`` naming any setting the merge cannot support, and
    ``ValueError`` for base weights of another shape; a refused call leaves the optimizer as it was.
    """
    if not isinstance(config, OnlineMergeConfig):
        raise TypeError(f"online merge: config must be an OnlineMergeConfig, got {type(config).__name__}")
    compat.require_tested_megatron()
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    subs = [opt for opt in compat.sub_optimizers(megatron_optimizer) if not getattr(opt, "is_stub_optimizer", False)]
    # Everything that can refuse runs before the first optimizer is changed, so that a refused
    # call leaves the optimizer as it was and a corrected call can follow.
    for opt in subs:
        if isinstance(getattr(opt, "optimizer", None), OnlineMergingAdamW):
            raise RuntimeError("online merge: install_online_merging was already called on this optimizer")
        _check_supported(opt)
    if config.needs_reference and reference_delta_source is None:
        raise ValueError(
            f"online merge: method={config.method!r} with alpha={config.alpha} needs a reference delta "
            f"(SFT minus base): pass reference_delta_source (e.g. MegatronCheckpointBase(path)), or "
            f"FROM_CHECKPOINT when resuming from a checkpoint that holds the merge state"
        )

    per_opt = [compat.main_params(opt) for opt in subs]
    coords_by_param = param_coords(chunks, [model for shards in per_opt for _, model, _, _ in shards])
    shards = [[MainShard(main, model, start, end, coords_by_param[model]) for main, model, start, end in found] for found in per_opt]
    segments = [
        [
            Segment(shard.name, shard.coords, 0, group, counted)
            for shard, (group, counted) in zip(opt_shards, _ties_tensor_groups(opt, opt_shards, chunks, config))
        ]
        for opt, opt_shards in zip(subs, shards)
    ]
    from_checkpoint = isinstance(reference_delta_source, str) and reference_delta_source == FROM_CHECKPOINT
    deferred = config.needs_reference and not from_checkpoint and defer_reference
    reference = None
    if config.needs_reference and not from_checkpoint and not defer_reference:
        # Read (and checked) now, from the shards alone: a bad base is refused before anything changes.
        reference = reference_source(reference_delta_source, [shard for found in shards for shard in found], chunks, progress)
    inners = [_new_inner_optimizer(opt, config, optimizer_class) for opt in subs]

    # Nothing below refuses.
    compat.fix_fully_reshardable_load()  # the inner optimizers keep a per-param `step`
    for opt, inner, opt_shards, segs in zip(subs, inners, shards, segments):
        _adopt_inner_optimizer(opt, inner)
        for group in dict.fromkeys(seg.group for seg in segs if seg.group is not None):
            inner.declare_tensor_group(group)
        for shard, segment in zip(opt_shards, segs):
            inner.set_segments(shard.main_param, [segment])
    if reference is not None:
        for inner in inners:
            inner.set_reference_delta(**reference)
    return OnlineMergingOptimizer(
        megatron_optimizer, config, chunks, subs, shards, inners,
        pending_reference=reference_delta_source if deferred else None,
        reference_from_checkpoint=config.needs_reference and from_checkpoint,
        progress=progress,
    )
