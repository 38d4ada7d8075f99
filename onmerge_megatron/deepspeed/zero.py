"""Online merging on DeepSpeed's flat fp32 partitions (ZeRO-1, ZeRO-2, ZeRO-3, BF16_Optimizer).

DeepSpeed keeps the client optimizer but swaps its parameters: each param group becomes one
flat fp32 tensor holding this rank's share of the group's weights, laid end to end (ZeRO-1/2,
BF16_Optimizer), or one flat tensor per ZeRO-3 sub-group holding every weight's
``ds_tensor``. The client `OnlineMergingAdamW` then steps those flat tensors. This module tells
it which elements of which weight each piece of a flat tensor is, in the weight's own flattened
coordinates (`ShardCoords.flat_range`), so that masks, top-p tie-breaks and the reference delta
are those of the unsharded weight: a ZeRO run draws the same masks as a single-process run.

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
from ..optim import OnlineMergingAdamW, Segment
from .sources import NameMap, WeightSource, weight_source


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


def _is_stage3(zero_optimizer: Any) -> bool:
    return hasattr(zero_optimizer, "fp32_partitioned_groups_flat")


def _hp_fragments(lp_groups: list[list[torch.Tensor]], names: dict, flats: list[torch.Tensor]) -> list[FlatPartition]:
    """ZeRO-1/2 and BF16_Optimizer: every weight with a piece here carries `_hp_mapping`."""
    partitions = []
    for index, (params, flat) in enumerate(zip(lp_groups, flats)):
        part = FlatPartition(flat, index)
        for lp in params:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue  # no element of this weight lives on this rank
            lp_addr, hp_addr = mapping.lp_fragment_address, mapping.hp_fragment_address
            part.fragments.append(
                Fragment(names[lp], tuple(lp.shape), lp_addr.start, lp_addr.start + lp_addr.numel, hp_addr.start)
            )
        part.fragments.sort(key=lambda f: f.offset)
        partitions.append(part)
    return partitions


def _stage3_fragments(zero_optimizer: Any) -> list[FlatPartition]:
    """ZeRO-3: a sub-group's flat tensor is its weights' partitions end to end, each
    ``partition_numel()`` long; rank r holds elements [r * n_p, r * n_p + n_p) of each flattened
    weight, cut at the weight's end (the rest is padding)."""
    partitions = []
    names = zero_optimizer.param_names
    for sub_group, params in enumerate(zero_optimizer.fp16_groups):
        flat = zero_optimizer.fp32_partitioned_groups_flat[sub_group]
        part = FlatPartition(flat, zero_optimizer.sub_group_to_group_id[sub_group])
        offset = 0
        for p in params:
            size = p.partition_numel()
            rank = zero_optimizer._get_param_partition_rank(p)
            total = p.ds_numel
            start = min(rank * size, total)
            end = min(start + size, total)
            part.fragments.append(Fragment(names[p], tuple(p.ds_shape), start, end, offset))
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
    names = engine.param_names if hasattr(engine, "param_names") else {p: n for n, p in engine.module.named_parameters()}
    if _is_stage3(zero_optimizer):
        return _stage3_fragments(zero_optimizer)
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return _hp_fragments(zero_optimizer.bit16_groups, zero_optimizer.param_names, zero_optimizer.single_partition_of_fp32_groups)
    if hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
        return _hp_fragments(zero_optimizer.bf16_groups, zero_optimizer.param_names, zero_optimizer.fp32_groups_flat_partition)
    if kind in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        raise UnsupportedDeepSpeedSetup(
            f"online merge: ZeRO stage 0 with fp16/bf16 wraps the optimizer in {kind}, which runs one step with zero "
            "gradients while DeepSpeed initialises; that step would count as a merge step. Use ZeRO stage 1, 2 or 3 "
            "(bf16 with ZeRO-1 uses BF16_Optimizer, which is supported)"
        )
    if zero_optimizer is engine.basic_optimizer:
        # ZeRO disabled and fp32: the client optimizer steps the module's own parameters.
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
    optimizer = getattr(engine, "basic_optimizer", None)
    config = engine._config
    if getattr(config, "optimizer_name", None):
        if isinstance(optimizer, OnlineMergingAdamW):
            raise UnsupportedDeepSpeedSetup(
                f"online merge: the DeepSpeed config has an \"optimizer\" section ({config.optimizer_name!r}) besides the "
                "OnlineMergingAdamW passed to deepspeed.initialize; its settings would be silently ignored. Remove the section "
                "and set lr/betas/eps/weight_decay on OnlineMergingAdamW"
            )
    if not isinstance(optimizer, OnlineMergingAdamW):
        if getattr(config, "optimizer_name", None):
            raise UnsupportedDeepSpeedSetup(
                f"online merge: the DeepSpeed config has an \"optimizer\" section ({config.optimizer_name!r}), so DeepSpeed built "
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
    if getattr(engine, "pipeline_parallelism", False):
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed pipeline parallelism is not supported; use the Megatron adapter")
    mpu = getattr(engine, "mpu", None)
    if mpu is not None:
        tp = mpu.get_tensor_model_parallel_world_size() if hasattr(mpu, "get_tensor_model_parallel_world_size") else 1
        if tp > 1:
            raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed tensor parallelism is not supported; use the Megatron adapter")
    if getattr(engine, "autotp_size", lambda: 0)() > 1:
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed AutoTP is not supported (weights would be named per TP slice)")
    zero_optimizer = engine.optimizer
    if _is_stage3(zero_optimizer) and getattr(zero_optimizer, "offload_optimizer", False) and getattr(zero_optimizer, "partial_offload", 1.0) != 1.0:
        raise UnsupportedDeepSpeedSetup(
            "online merge: ZeRO-3 partial optimizer offload (offload_optimizer.ratio < 1) steps the sub-groups kept on the "
            "accelerator with DeepSpeed's own AdamW, which does not merge; use ratio 1.0 or no offload"
        )
    if _is_stage3(zero_optimizer) and getattr(zero_optimizer, "swap_optimizer", False):
        raise UnsupportedDeepSpeedSetup("online merge: ZeRO-3 optimizer offload to NVMe is not supported (offload to CPU is)")
    if getattr(zero_optimizer, "elastic_checkpoint", False):
        raise UnsupportedDeepSpeedSetup(
            "online merge: zero_optimization.elastic_checkpoint=true stores one Adam step per group and drops the merge "
            "state; set it to false and use universal checkpoints to change world size"
        )
    if getattr(zero_optimizer, "torch_autocast_gradscaler", None) is not None:
        raise UnsupportedDeepSpeedSetup("online merge: DeepSpeed torch_autocast with a GradScaler is not supported")
    if getattr(zero_optimizer, "zenflow", False):
        raise UnsupportedDeepSpeedSetup("online merge: ZenFlow replaces the optimizer step and is not supported")
    return optimizer


def _weight_groups(partitions: list[FlatPartition]) -> dict[str, Any]:
    """Process groups of the ranks holding pieces of each split weight (ties_scope='tensor').

    Built once at setup: every rank publishes which weights it holds pieces of, and every rank
    creates the same groups in the same order (new_group is collective over the world).
    """
    # A whole weight needs no exchange (ZeRO disabled, or a weight inside one partition).
    mine = sorted((f.name, f.start, f.end) for part in partitions for f in part.fragments if f.numel != f.coords.global_numel)
    world = dist.get_world_size()
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    holders: dict[str, list[int]] = {}
    pieces: dict[str, list[tuple[int, int]]] = {}
    for rank, fragments in enumerate(everyone):
        for name, start, end in fragments:
            if not holders.get(name) or holders[name][-1] != rank:
                holders.setdefault(name, []).append(rank)
            pieces.setdefault(name, []).append((start, end))
    for name, ranges in pieces.items():
        ranges.sort()
        if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
            # Replicated partitions (MiCS shard groups) would offer the same candidates twice.
            raise UnsupportedDeepSpeedSetup(
                f"online merge: ties_scope='tensor' needs each element of {name!r} on one rank, but several ranks hold the "
                "same elements (MiCS?); use ties_scope='shard'"
            )
    groups: dict[tuple[int, ...], Any] = {}
    # Every partial piece exchanges with the other holders, even alone (an empty piece of a weight
    # held whole elsewhere): its segment is not the whole weight, so the merge asks for a group.
    for ranks in sorted({tuple(r) for r in holders.values()}):
        groups[ranks] = dist.group.WORLD if len(ranks) == world else dist.new_group(list(ranks))
    return {name: groups.get(tuple(ranks)) for name, ranks in holders.items()}


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
    """
    optimizer = check_engine(engine)
    partitions = flat_partitions(engine)
    config = optimizer.merge_config
    groups: dict[str, Any] = {}
    if config.method == "ties" and config.ties_scope == "tensor" and dist.is_initialized() and dist.get_world_size() > 1:
        groups = _weight_groups(partitions)
    for part in partitions:
        segments = [
            Segment(f.name, f.coords, f.offset, groups.get(f.name) if f.numel != f.coords.global_numel else None)
            for f in part.fragments
        ]
        optimizer.set_segments(part.tensor, segments)

    if config.needs_reference:
        stepped = any("step" in optimizer.state.get(part.tensor, {}) for part in partitions)
        loaded = all("reference_values" in optimizer.state.get(part.tensor, {}) for part in partitions)
        if stepped and reference is None and delta is None and loaded:
            # Resumed at the same world size: DeepSpeed restored each partition's own reference
            # delta (it refuses a different layout outside universal checkpoints). Keep it.
            return ZeroOnlineMerge(engine, optimizer, partitions)
        if stepped and reference is None and delta is None:
            raise ValueError(
                "online merge: the optimizer has already stepped (or a checkpoint was loaded), so the engine's weights are no "
                "longer the SFT weights: call install_online_merging before the first step and before engine.load_checkpoint, "
                "or pass reference= (the SFT weights)"
            )
        with _FlatsInParamGroups(optimizer, partitions):
            optimizer.set_reference_delta(delta_fn=_delta_fn(partitions, base, reference, delta, name_map))
    elif any(x is not None for x in (base, reference, delta)) and config.merges:
        pass  # alpha == 0 (gradient dropout) ignores the reference; accepted so that configs can toggle alpha
    return ZeroOnlineMerge(engine, optimizer, partitions)


def _delta_fn(partitions: list[FlatPartition], base: Any, reference: Any, delta: Any, name_map: NameMap | None):
    """tau for one fragment, read from the sources (only the fragment's range is read)."""
    # tau lives where the partition lives (the accelerator, or the CPU with optimizer offload).
    device = {(f.name, f.start, f.end): part.tensor.device for part in partitions for f in part.fragments}
    if delta is not None:
        if base is not None or reference is not None:
            raise ValueError("online merge: pass either delta= or base= (with optional reference=), not both")
        delta_source = weight_source(delta, "reference delta", name_map)

        def from_delta(name: str, coords: ShardCoords) -> torch.Tensor:
            return delta_source.read(name, coords.global_shape, coords.start, coords.end).to(device[(name, coords.start, coords.end)])

        return from_delta
    if base is None:
        raise ValueError("online merge: alpha > 0 needs the base (pre-trained) weights: pass base= (or delta=)")
    base_source: WeightSource = weight_source(base, "base", name_map)
    reference_source: WeightSource | None = weight_source(reference, "reference", name_map) if reference is not None else None
    # The SFT weights as the engine holds them now, before any step (reference=None).
    current = {(f.name, f.start, f.end): part.tensor.detach().reshape(-1)[f.offset : f.offset + f.numel] for part in partitions for f in part.fragments}

    def from_weights(name: str, coords: ShardCoords) -> torch.Tensor:
        shape, start, end = coords.global_shape, coords.start, coords.end
        if reference_source is not None:
            ref = reference_source.read(name, shape, start, end)
        else:
            ref = current[(name, start, end)].to(device="cpu", dtype=torch.float32)
        return (ref - base_source.read(name, shape, start, end)).to(device[(name, start, end)])

    return from_weights
