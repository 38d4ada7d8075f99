"""Online merging on DeepSpeed's flat fp32 partitions (ZeRO-1, ZeRO-2, ZeRO-3, BF16_Optimizer).

DeepSpeed keeps the client optimizer but swaps its parameters: each param group becomes one
flat fp32 tensor holding this rank's share of the group's weights, laid end to end (ZeRO-1/2,
BF16_Optimizer), or one flat tensor per ZeRO-3 sub-group holding every weight's
``ds_tensor``. The client `OnlineMergingAdamW` then steps those flat tensors. This module tells
it which elements of which weight each piece of a flat tensor is, in the weight's own flattened
coordinates (`ShardCoords.flat_range`), so that masks, top-p tie-breaks and the reference delta
are those of the unsharded weight: a ZeRO run draws the same masks as a single-process run.
DeepSpeed's own bookkeeping of those pieces is not public API: it is read through `compat`,
which refuses DeepSpeed releases the adapter was not tested on.

Padding (ZeRO-1/2 group alignment, ZeRO-3 per-weight padding, which is uninitialised memory)
belongs to no segment, so the merge never reads or writes it. Nothing here runs in the step: the
step is DeepSpeed calling the client's `step()`, which adds no collective (OnTIES with
ties_scope="tensor" excepted: its small per-tensor all_gather is the option's documented cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..merging.coords import ShardCoords
from ..optim import OnlineMergingAdamW, Segment, TensorGroup
from . import compat
from ..merging.sources import NameMap


class UnsupportedDeepSpeedSetup(RuntimeError):
    """A DeepSpeed configuration the online merge cannot run under, with the reason."""


@dataclass(frozen=True)
class Fragment:
    """Elements [start, end) of weight ``name`` (flattened) sit at ``offset`` in a flat partition."""

    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def coords(self) -> ShardCoords:
        return ShardCoords.flat_range(self.shape, self.start, self.end)


@dataclass
class FlatPartition:
    """A tensor the client optimizer steps, and the weight fragments it holds."""

    tensor: torch.Tensor
    group_index: int
    """Index of the client optimizer's param group this tensor is stepped in."""
    fragments: list[Fragment] = field(default_factory=list)


def _hp_fragments(groups: list[tuple[list[torch.Tensor], torch.Tensor]], names: dict[torch.Tensor, str]) -> list[FlatPartition]:
    """ZeRO-1/2 and BF16_Optimizer: one flat partition per param group, weights laid end to end."""
    partitions = []
    for index, (params, flat) in enumerate(groups):
        part = FlatPartition(flat, index)
        for lp in params:
            fragment = compat.hp_fragment(lp)
            if fragment is None:
                continue  # no element of this weight lives on this rank
            start, end, offset = fragment
            part.fragments.append(Fragment(names[lp], tuple(lp.shape), start, end, offset))
        part.fragments.sort(key=lambda f: f.offset)
        partitions.append(part)
    return partitions


def _stage3_fragments(zero_optimizer: Any) -> list[FlatPartition]:
    """ZeRO-3: a sub-group's flat tensor is its weights' partitions end to end."""
    partitions = []
    names = compat.optimizer_param_names(zero_optimizer)
    for sub_group, (flat, group_index, params) in enumerate(compat.zero3_sub_groups(zero_optimizer)):
        part = FlatPartition(flat, group_index)
        offset = 0
        for p in params:
            shape, start, end, size = compat.zero3_partition(zero_optimizer, p)
            part.fragments.append(Fragment(names[p], shape, start, end, offset))
            offset += size
        # A rank may hold only padding of a small weight (n < world * ceil(n / world)): drop such
        # empty fragments, unless nothing else is left (the optimizer wants a segment per tensor).
        real = [f for f in part.fragments if f.numel > 0]
        part.fragments = real or part.fragments[:1]
        if offset != flat.numel():
            raise UnsupportedDeepSpeedSetup(
                f"ZeRO-3 sub-group {sub_group}: weights' partitions add up to {offset} elements but the fp32 partition has "
                f"{flat.numel()} (optimizer state swapped to NVMe is not supported)"
            )
        partitions.append(part)
    return partitions


def flat_partitions(engine: Any) -> list[FlatPartition]:
    """The tensors the client optimizer steps on this rank, with the fragments each holds."""
    zero_optimizer = engine.optimizer
    kind = type(zero_optimizer).__name__
    if compat.is_zero3(zero_optimizer):
        return _stage3_fragments(zero_optimizer)
    groups = compat.hp_partition_groups(zero_optimizer)
    if groups is not None:  # ZeRO-1/2, BF16_Optimizer
        return _hp_fragments(groups, compat.optimizer_param_names(zero_optimizer))
    if compat.is_fp16_stage0_wrapper(zero_optimizer):
        raise UnsupportedDeepSpeedSetup(
            f"online merge: ZeRO stage 0 with fp16/bf16 wraps the optimizer in {kind}, which runs one step with zero "
            "gradients while DeepSpeed initialises; that step would count as a merge step. Use ZeRO stage 1, 2 or 3 "
            "(bf16 with ZeRO-1 uses BF16_Optimizer, which is supported)"
        )
    if zero_optimizer is compat.client_optimizer(engine):
        # ZeRO disabled and fp32: the client optimizer steps the module's own parameters.
        names = compat.module_param_names(engine)
        partitions = []
        for index, group in enumerate(zero_optimizer.param_groups):
            for p in group["params"]:
                partitions.append(FlatPartition(p, index, [Fragment(names[p], tuple(p.shape), 0, p.numel(), 0)]))
        return partitions
    raise UnsupportedDeepSpeedSetup(
        f"online merge: DeepSpeed wrapped the optimizer in {kind}, which the adapter does not support; "
        "use ZeRO stage 1, 2 or 3 (fp32, bf16 or fp16; ZeRO-1 + bf16 runs BF16_Optimizer), or ZeRO disabled with fp32"
    )


def check_engine(engine: Any) -> OnlineMergingAdamW:
    """Refuse setups where the merge would silently not happen or be wrong; return the client optimizer."""
    optimizer = compat.client_optimizer(engine)
    section = compat.config_optimizer_name(engine)
    if section:
        if isinstance(optimizer, OnlineMergingAdamW):
            raise UnsupportedDeepSpeedSetup(
                f"online merge: the DeepSpeed config has an \"optimizer\" section ({section!r}) besides the "
                "OnlineMergingAdamW passed to deepspeed.initialize; its settings would be silently ignored. Remove the section "
                "and set lr/betas/eps/weight_decay on OnlineMergingAdamW"
            )
    if not isinstance(optimizer, OnlineMergingAdamW):
        if section:
            raise UnsupportedDeepSpeedSetup(
                f"online merge: the DeepSpeed config has an \"optimizer\" section ({section!r}), so DeepSpeed built "
                "its own optimizer and ignored OnlineMergingAdamW; remove that section and pass the optimizer to deepspeed.initialize"
            )
        raise UnsupportedDeepSpeedSetup(
            f"online merge: DeepSpeed steps a {type(optimizer).__name__}, not OnlineMergingAdamW; pass "
            "OnlineMergingAdamW(...) as optimizer= to deepspeed.initialize (Hugging Face Trainer: see onmerge_megatron.deepspeed.hf)"
        )
    if optimizer.nonfinite == "skip" and engine.optimizer is not optimizer:
        # Each rank checks only its own partition, one param group (ZeRO-1/2) or sub-group (ZeRO-3)
        # per call: a skip would drop part of a step, on some ranks only.
        raise UnsupportedDeepSpeedSetup(
            "online merge: OnlineMergingAdamW(nonfinite='skip') under ZeRO / BF16_Optimizer would skip part of a step on "
            "one rank only (each rank steps its own partition, one group at a time). DeepSpeed skips steps with inf/NaN "
            "gradients itself (fp16; bf16 with check_grad_overflow; any dtype with gradient clipping): use "
            "nonfinite='raise' (default) or 'off'"
        )
    if compat.runs_pipeline_parallel(engine):
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed pipeline parallelism is not supported; use the Megatron adapter")
    if compat.mpu_tensor_parallel_size(engine) > 1:
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed tensor parallelism is not supported; use the Megatron adapter")
    if compat.autotp_size(engine) > 1:
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed AutoTP is not supported (weights would be named per TP slice)")
    zero_optimizer = engine.optimizer
    if compat.zero3_partial_offload(zero_optimizer):
        raise UnsupportedDeepSpeedSetup(
            "online merge: ZeRO-3 partial optimizer offload (offload_optimizer.ratio < 1) steps the sub-groups kept on the "
            "accelerator with DeepSpeed's own AdamW, which does not merge; use ratio 1.0 or no offload"
        )
    if compat.zero3_offloads_to_nvme(zero_optimizer):
        raise UnsupportedDeepSpeedSetup("online merge: ZeRO-3 optimizer offload to NVMe is not supported (offload to CPU is)")
    if compat.elastic_checkpoint(zero_optimizer):
        raise UnsupportedDeepSpeedSetup(
            "online merge: zero_optimization.elastic_checkpoint=true stores one Adam step per group and drops the merge "
            "state; set it to false and use universal checkpoints to change world size"
        )
    if compat.uses_autocast_grad_scaler(zero_optimizer):
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed torch_autocast with a GradScaler is not supported")
    if compat.uses_zenflow(zero_optimizer):
        raise UnsupportedDeepSpeedSetup("online merge: ZenFlow replaces the optimizer step and is not supported")
    return optimizer


def _tensor_group(partitions: list[FlatPartition]) -> TensorGroup:
    """The weights split over ranks, for OnTIES' per-tensor select (ties_scope='tensor').

    Built once at setup: every rank publishes the pieces it holds, and every rank lists the same
    split weights in the same order. A weight held whole by one rank selects alone."""
    mine = sorted((f.name, f.start, f.end, f.coords.global_numel) for part in partitions for f in part.fragments if f.numel != f.coords.global_numel)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    pieces: dict[str, list[tuple[int, int]]] = {}
    numels: dict[str, int] = {}
    for fragments in everyone:
        for name, start, end, numel in fragments:
            pieces.setdefault(name, []).append((start, end))
            numels[name] = numel
    for name, ranges in pieces.items():
        ranges.sort()
        if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
            # Replicated partitions (MiCS shard groups) would count the same elements twice.
            raise UnsupportedDeepSpeedSetup(
                f"online merge: ties_scope='tensor' needs each element of {name!r} on one rank, but several ranks hold the "
                "same elements (MiCS?); use ties_scope='shard'"
            )
    return TensorGroup(dist.group.WORLD, dict(sorted(numels.items())))


@dataclass
class ZeroOnlineMerge:
    """Handle returned by `install_online_merging`: what was installed, for checkpoints and logging."""

    engine: Any
    optimizer: OnlineMergingAdamW
    partitions: list[FlatPartition]

    def fragments(self) -> Iterator[tuple[FlatPartition, Fragment]]:
        for part in self.partitions:
            for frag in part.fragments:
                yield part, frag

    def merge_stats(self, reset: bool = True) -> dict[str, float]:
        """This rank's merge statistics since the last call (see OnlineMergingAdamW.merge_stats)."""
        return self.optimizer.merge_stats(reset)

    def applied_steps(self) -> int:
        """Optimizer steps actually applied (DeepSpeed skips the client's step on fp16 overflow)."""
        steps = [int(self.optimizer.state[p.tensor]["step"]) for p in self.partitions if "step" in self.optimizer.state.get(p.tensor, {})]
        return max(steps) if steps else 0


class _FlatsInParamGroups:
    """ZeRO-3 keeps the client's param groups empty outside its step; put the flat tensors in."""

    def __init__(self, optimizer: OnlineMergingAdamW, partitions: list[FlatPartition]):
        self.optimizer, self.partitions = optimizer, partitions
        self.saved: list[list[Any]] = []

    def __enter__(self) -> None:
        self.saved = [group["params"] for group in self.optimizer.param_groups]
        present = {id(p) for params in self.saved for p in params}
        fresh = [list(params) for params in self.saved]
        for part in self.partitions:
            if id(part.tensor) not in present:
                fresh[part.group_index].append(part.tensor)
        for group, params in zip(self.optimizer.param_groups, fresh):
            group["params"] = params

    def __exit__(self, *exc: Any) -> None:
        for group, params in zip(self.optimizer.param_groups, self.saved):
            group["params"] = params


def install_online_merging(
    engine: Any,
    *,
    base: Any = None,
    reference: Any = None,
    delta: Any = None,
    name_map: NameMap | None = None,
    allow_untested_version: bool = False,
) -> ZeroOnlineMerge:
    """Make the OnlineMergingAdamW inside a DeepSpeed engine merge on ZeRO's partitions.

    Call right after ``deepspeed.initialize`` (optimizer=OnlineMergingAdamW(...)), before the first
    step and before ``engine.load_checkpoint`` (after a same-world-size load it is also fine: the
    reference delta restored with each partition is kept).

    The reference delta tau = reference - base is computed for the elements this rank owns only:
      base: the pre-trained weights (state dict, unpartitioned module, safetensors/.bin file or
        model folder). Needed when the merge uses a reference (alpha > 0).
      reference: the SFT weights, same kinds; default None = the engine's fp32 master weights at
        this moment, which are the SFT weights when the policy was loaded from them and has not
        stepped yet (resuming: install before load_checkpoint, with the model built from SFT).
      delta: instead of base/reference, full tau tensors by name (state dict).
      name_map: translates module parameter names to the sources' keys.
      allow_untested_version: try a DeepSpeed release other than `compat.TESTED_VERSIONS` (also
        ONMERGE_ALLOW_UNTESTED_DEEPSPEED=1); refused otherwise, as the adapter reads its internals.
    """
    compat.check_deepspeed_version(allow_untested_version)
    optimizer = check_engine(engine)
    partitions = flat_partitions(engine)
    config = optimizer.merge_config
    group = None
    if config.method == "ties" and config.ties_scope == "tensor" and dist.is_initialized() and dist.get_world_size() > 1:
        group = _tensor_group(partitions)
        optimizer.declare_tensor_group(group)
    for part in partitions:
        segments = [Segment(f.name, f.coords, f.offset, group if f.numel != f.coords.global_numel else None) for f in part.fragments]
        optimizer.set_segments(part.tensor, segments)

    if config.needs_reference:
        if reference is None and delta is None:
            with _FlatsInParamGroups(optimizer, partitions):
                resumed = optimizer.keeps_restored_reference(
                    "call install_online_merging before the first step and before engine.load_checkpoint (a loaded "
                    "checkpoint has stepped too), or pass reference= (the SFT weights)"
                )
            if resumed:
                # Resumed at the same world size: DeepSpeed restored each partition's own reference
                # delta (it refuses a different layout outside universal checkpoints). Keep it.
                return ZeroOnlineMerge(engine, optimizer, partitions)
        for what, source in (("base", base), ("reference", reference), ("reference delta", delta)):
            if isinstance(source, torch.nn.Module) and any(compat.is_zero3_partitioned(p) for p in source.parameters()):
                raise ValueError(f"online merge: the {what} module is partitioned by ZeRO-3; pass its checkpoint path instead")
        with _FlatsInParamGroups(optimizer, partitions):
            if delta is not None and (base is not None or reference is not None):
                raise ValueError("online merge: pass either delta= or base= (with optional reference=), not both")
            if delta is None and base is None:
                raise ValueError("online merge: alpha > 0 needs the base (pre-trained) weights: pass base= (or delta=)")
            # reference=None: tau is taken against the fp32 master weights the engine holds now.
            optimizer.set_reference_delta(reference=reference, base=base, delta=delta, name_map=name_map)
    elif any(x is not None for x in (base, reference, delta)) and config.merges:
        pass  # alpha == 0 (gradient dropout) ignores the reference; accepted so that configs can toggle alpha
    return ZeroOnlineMerge(engine, optimizer, partitions)
