"""`OnlineMergingAdamW`: AdamW whose every step is merged with the reference delta.

A drop-in for `torch.optim.AdamW` (same hyper-parameters, param-group keys and per-parameter state
keys `step`, `exp_avg`, `exp_avg_sq`), so frameworks that own an inner AdamW (Megatron's
distributed optimizer, DeepSpeed's ZeRO) can be handed this one instead. With method="none" it is
bit-identical to `torch.optim.AdamW`.

A NaN/Inf gradient is refused before anything changes (``nonfinite="raise"``), or the whole step
is skipped (``"skip"``): once in Adam's moments, one non-finite element would reach the weights at
the next merge that keeps it (OnDARE), or silently freeze it (OnTIES never selects a NaN).

Which elements a parameter tensor holds is described by `Segment`s: by default one segment, the
whole tensor under its own name. Sharding adapters replace that with the pieces a rank owns
(a Megatron shard, a ZeRO partition holding parts of many weights), and the merge then runs on
each piece with global coordinates, so masks and results do not depend on the layout.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.distributed as dist

from .merging.config import MergeCheckpointError, OnlineMergeConfig, check_compatible
from .merging.coords import ShardCoords
from .merging.merger import MergeStats, merge_segment
from .merging.reference import ReferenceDelta, reference_positions
from .merging.sparsify import Exchange

# Merge state restored exactly as saved by load_state_dict (no cast to the parameter's dtype).
_EXACT_STATE = ("reference_values", "reference_positions", "reference_delta", "merge_accumulator", "weight_ema")
_REFERENCE_STATE = ("reference_values", "reference_positions", "reference_delta")

STATE_DICT_KEY = "online_merge"
"""Top-level key of `OnlineMergingAdamW.state_dict()` holding the merge config and skipped_steps
(torch's own load_state_dict ignores top-level keys it does not know)."""

NonFinite = Literal["raise", "skip", "off"]

DeltaFn = Callable[[str, ShardCoords], torch.Tensor]
"""Returns a segment's reference delta (1-D, coords.numel elements) given its name and coordinates."""


@dataclass(frozen=True)
class Segment:
    """Elements ``[offset, offset + coords.numel)`` of a parameter's flat view belong to tensor ``name``."""

    name: str
    coords: ShardCoords
    offset: int = 0
    group: Any = None
    """Process group of the ranks holding the other pieces of the tensor (ties_scope='tensor' only)."""

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.coords.numel)


@dataclass
class AdamUpdate:
    """Adam's update -lr_t * m_hat / (sqrt(v_hat) + eps), evaluated only where asked."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step_size: float
    bias_correction2_sqrt: float
    eps: float
    scratch: torch.Tensor | None = None
    """Reusable buffer of at least the segment's size for magnitude(): a fresh dense allocation
    per tensor and step costs more in page faults than the arithmetic."""
    _dense: torch.Tensor | None = None

    def _update(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (m / (v.sqrt() / self.bias_correction2_sqrt + self.eps)) * (-self.step_size)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return self._dense[positions]
        return self._update(self.exp_avg[positions], self.exp_avg_sq[positions])

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self._update(self.exp_avg, self.exp_avg_sq)
        return self._dense

    def magnitude(self) -> torch.Tensor:
        """|dense()|, valid until the scratch buffer is used again."""
        if self._dense is not None:
            return self._dense.abs()
        # |m / d * -s| == |m / d| * s exactly, so the magnitude is built in place in one buffer.
        n = self.exp_avg.numel()
        out = self.scratch[:n] if self.scratch is not None else torch.empty_like(self.exp_avg)
        torch.sqrt(self.exp_avg_sq, out=out).div_(self.bias_correction2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg, out, out=out).abs_().mul_(self.step_size)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def default_segments(param: torch.Tensor, name: str) -> list[Segment]:
    """One segment: the whole tensor, or for a DTensor (FSDP2) its local block of the global tensor."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        coords = ShardCoords.block(tuple(param.shape), tuple(local_shape), tuple(offset))
        group = param.device_mesh.get_group() if param.device_mesh.ndim == 1 else None
        return [Segment(name, coords, 0, group)]
    return [Segment(name, ShardCoords.full(tuple(param.shape)))]


def _used_merge_state(config: OnlineMergeConfig) -> set[str]:
    """The merge state keys a config reads."""
    used = set(_REFERENCE_STATE) if config.needs_reference else set()
    if config.merges and config.merge_every > 1:
        used.add("merge_accumulator")
    if config.weight_ema > 0:
        used.add("weight_ema")
    return used


def all_gather_exchange(group: Any) -> Exchange:
    """Gather variable-length (magnitude, index) candidate lists over a process group."""

    def exchange(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        world = dist.get_world_size(group)
        count = torch.tensor([values.numel()], device=values.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        longest = int(max(counts))
        padded_v = values.new_zeros(longest)
        padded_v[: values.numel()] = values
        padded_i = indices.new_zeros(longest)
        padded_i[: indices.numel()] = indices
        all_v = [torch.empty_like(padded_v) for _ in range(world)]
        all_i = [torch.empty_like(padded_i) for _ in range(world)]
        dist.all_gather(all_v, padded_v, group=group)
        dist.all_gather(all_i, padded_i, group=group)
        return (
            torch.cat([v[: int(c)] for v, c in zip(all_v, counts)]),
            torch.cat([i[: int(c)] for i, c in zip(all_i, counts)]),
        )

    return exchange


def _as_mapping(source: Any, what: str) -> Mapping[str, torch.Tensor]:
    if source is None:
        raise ValueError(f"set_reference_delta: {what} is required")
    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict(keep_vars=False))
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"set_reference_delta: {what} must be a module or a state dict, got {type(source).__name__}")


def _lookup(mapping: Mapping[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    if name in mapping:
        return mapping[name]
    # DDP and torch.compile wrap modules; accept the unwrapped names too.
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix) and name[len(prefix) :] in mapping:
            return mapping[name[len(prefix) :]]
    sample = ", ".join(sorted(mapping)[:5])
    raise ValueError(f"set_reference_delta: parameter {name!r} has no entry in the {what} (it has {len(mapping)} keys, e.g. {sample})")


def delta_from_models(reference: Any, base: Any) -> DeltaFn:
    """Reference delta = reference - base, taken from modules or state dicts, checked name by name."""
    reference_map, base_map = _as_mapping(reference, "reference"), _as_mapping(base, "base")

    def delta_fn(name: str, coords: ShardCoords) -> torch.Tensor:
        ref, base_t = _lookup(reference_map, name, "reference"), _lookup(base_map, name, "base")
        if ref.shape != base_t.shape:
            raise ValueError(f"set_reference_delta: {name!r} has shape {tuple(ref.shape)} in the reference but {tuple(base_t.shape)} in the base")
        if ref.dtype != base_t.dtype:
            raise ValueError(f"set_reference_delta: {name!r} has dtype {ref.dtype} in the reference but {base_t.dtype} in the base")
        return delta_from_full({name: ref.float() - base_t.float()})(name, coords)

    return delta_fn


def delta_from_full(delta: Mapping[str, torch.Tensor]) -> DeltaFn:
    """Segments' slices of precomputed full reference deltas."""

    def delta_fn(name: str, coords: ShardCoords) -> torch.Tensor:
        full = _lookup(delta, name, "reference delta")
        if tuple(full.shape) != coords.global_shape:
            raise ValueError(f"set_reference_delta: {name!r} has shape {tuple(full.shape)} in the delta, expected {coords.global_shape}")
        return coords.gather(full.detach().cpu().float()).to(torch.float32)

    return delta_fn


def nonfinite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One bool per (non-empty, dense) tensor: does it hold a NaN or Inf? Extremes are checked, not
    a sum of squares, which would overflow on large finite values; NaN propagates through both.
    On CUDA one fused max-|x| reduction per dtype (torch._foreach_norm); elsewhere each tensor's
    min and max in one pass (torch.aminmax: 10x faster than _foreach_norm(inf) on CPU). The flags
    stay on the first tensor's device (no host synchronisation)."""
    device = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    flags: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for (group_device, _), indices in groups.items():
        if group_device.type == "cuda":
            norms = torch._foreach_norm([tensors[i] for i in indices], ord=math.inf)
            group_flags = ~torch.isfinite(torch.stack(norms))
        else:
            group_flags = torch.stack([~torch.isfinite(torch.stack(torch.aminmax(tensors[i]))).all() for i in indices])
        group_flags = group_flags.to(device)
        for j, i in enumerate(indices):
            flags[i] = group_flags[j]  # a view: put back in order without an indexing kernel
    return torch.stack(flags)


class OnlineMergingAdamW(torch.optim.Optimizer):
    """AdamW with online merging (OnDARE / OnTIES / step-K) of every step with a reference delta.

    Args:
        params: parameters, ``named_parameters()``, or param groups (named ones carry "param_names").
            Masks are keyed by parameter names, so pass names when merging.
        lr, betas, eps, weight_decay: as in `torch.optim.AdamW`.
        merge: the merge settings; None means OnlineMergeConfig() (OnDARE, p=0.01).
        nonfinite: what a NaN/Inf in any gradient does to a step, checked before anything changes
            (one reduction per device and one host synchronisation per step):
            "raise" (default): FloatingPointError naming the first such parameter and its count.
            "skip": the whole step is skipped (no parameter, moment, step counter, accumulator or
            EMA changes; an LR scheduler still advances), warned about and counted in
            ``skipped_steps``, which is saved with the state. With DTensor (FSDP2) parameters the
            ranks of each device mesh take the same decision (one small all-reduce per step, in
            this mode only); plain tensors (DDP replicas, ZeRO or Megatron shards) are decided by
            each process alone.
            "off": no check, for frameworks that skip such steps themselves (Megatron's and
            DeepSpeed's loss-scaler overflow check) or for speed.
            With any check, eps must be > 0: m / (sqrt(v) + 0) is 0/0 = NaN wherever every gradient
            so far was zero, which no gradient check sees.

    ``state_dict()`` also saves the merge config; ``load_state_dict`` refuses state whose
    reference delta was built under other settings (`merging.config.check_compatible`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        merge: OnlineMergeConfig | None = None,
        maximize: bool = False,
        nonfinite: NonFinite = "raise",
    ) -> None:
        if nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'off', got {nonfinite!r}")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))
        zero_eps = [i for i, group in enumerate(self.param_groups) if group["eps"] == 0]
        if zero_eps and nonfinite != "off":
            raise ValueError(
                f"eps=0 (param group {zero_eps[0]}) with nonfinite={nonfinite!r}: Adam's m / (sqrt(v) + eps) is 0/0 = NaN "
                "wherever every gradient so far was zero, which the gradient check cannot see; use eps > 0, or nonfinite='off'"
            )
        self.merge_config = merge if merge is not None else OnlineMergeConfig()
        self.nonfinite: NonFinite = nonfinite
        self.skipped_steps = 0
        """Steps skipped for a non-finite gradient (nonfinite='skip'); saved with the state."""
        self.track_update_norm = False
        self._segments: dict[torch.Tensor, list[Segment]] = {}
        self._references: dict[torch.Tensor, list[ReferenceDelta]] = {}
        self._stats = MergeStats()
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _scratch_for(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer at least the size of ``like``, reused across tensors and steps (OnTIES only)."""
        key = (like.device, like.dtype)
        if key not in self._scratch or self._scratch[key].numel() < like.numel():
            self._scratch[key] = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        return self._scratch[key]

    # ---------------------------------------------------------------- segments
    def _names(self) -> Iterator[tuple[torch.Tensor, str]]:
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield p, names[i] if names else f"group{g}.param{i}"

    def segments(self, param: torch.Tensor) -> list[Segment]:
        """The segments of a parameter (default: the whole tensor under its own name)."""
        if param not in self._segments:
            name = dict((id(p), n) for p, n in self._names())[id(param)]
            self._segments[param] = default_segments(param, name)
        return self._segments[param]

    def set_segments(self, param: torch.Tensor, segments: list[Segment]) -> None:
        """Declare which global elements each piece of ``param``'s flat view holds (sharding adapters)."""
        numel = _local(param).numel()
        covered = torch.zeros(numel, dtype=torch.bool)
        for seg in segments:
            if seg.offset < 0 or seg.offset + seg.coords.numel > numel:
                raise ValueError(f"segment {seg.name!r} [{seg.offset}, {seg.offset + seg.coords.numel}) exceeds the parameter's {numel} elements")
            if covered[seg.slice].any():
                raise ValueError(f"segment {seg.name!r} overlaps another segment")
            covered[seg.slice] = True
        self._segments[param] = list(segments)
        self._references.pop(param, None)

    # ---------------------------------------------------------------- reference delta
    def set_reference_delta(
        self,
        reference: Any = None,
        base: Any = None,
        *,
        delta: Mapping[str, torch.Tensor] | None = None,
        delta_fn: DeltaFn | None = None,
    ) -> None:
        """Give the optimizer the reference delta (SFT minus base), as exactly one of:
        ``reference`` and ``base`` (modules or state dicts), ``delta`` (state dict of full deltas), or
        ``delta_fn(name, coords)`` returning a segment's slice. Everything is checked before
        anything is stored."""
        given = [reference is not None or base is not None, delta is not None, delta_fn is not None]
        if sum(given) != 1:
            raise ValueError("set_reference_delta: pass reference= and base=, or delta=, or delta_fn=")
        if given[0]:
            delta_fn = delta_from_models(reference, base)
        elif given[1]:
            delta_fn = delta_from_full(delta)
        config = self.merge_config
        built: dict[torch.Tensor, list[ReferenceDelta]] = {}
        for param, _ in self._names():
            # Built where the delta comes from, kept where the parameter lives (the merge indexes both).
            built[param] = [
                ReferenceDelta.build(delta_fn(seg.name, seg.coords), config, seg.name, seg.coords, self._exchange(seg)).to(
                    _local(param).device
                )
                for seg in self.segments(param)
            ]
        for param, refs in built.items():
            state = self.state[param]
            # A parameter may hold no segment at all (a ZeRO-3 sub-group that is padding on this rank).
            empty = _local(param).new_zeros(0, dtype=torch.float32)
            state["reference_values"] = torch.cat([empty] + [r.values for r in refs])
            if config.method == "ties":
                # Positions in the parameter's flat view; int32 unless a (ZeRO flat) tensor is that large.
                dtype = torch.int32 if _local(param).numel() < 2**31 else torch.int64
                state["reference_positions"] = torch.cat(
                    [empty.to(dtype)] + [r.positions.to(dtype) + seg.offset for r, seg in zip(refs, self.segments(param))]
                )
            if config.reference_mask == "resampled":
                state["reference_delta"] = torch.cat([empty] + [r.dense for r in refs])
        self._references = {}

    def _reference_views(self, param: torch.Tensor) -> list[ReferenceDelta] | None:
        """Per-segment views into the reference state (rebuilt after load_state_dict)."""
        state = self.state[param]
        if "reference_values" not in state:
            return None
        if param not in self._references:
            config, refs, cursor = self.merge_config, [], 0
            for seg in self.segments(param):
                if "reference_delta" in state:
                    refs.append(ReferenceDelta(values=state["reference_values"][:0], dense=state["reference_delta"][seg.slice]))
                    continue
                if "reference_positions" in state:
                    pos = state["reference_positions"]
                    inside = (pos >= seg.offset) & (pos < seg.offset + seg.coords.numel)
                    count = int(inside.sum())
                    refs.append(ReferenceDelta(values=state["reference_values"][cursor : cursor + count], positions=pos[cursor : cursor + count] - seg.offset))
                else:
                    count = reference_positions(config, seg.name, seg.coords, 0).numel()
                    refs.append(ReferenceDelta(values=state["reference_values"][cursor : cursor + count]))
                cursor += count
            self._references[param] = refs
        return self._references[param]

    def reference_state_changed(self, param: torch.Tensor | None = None) -> None:
        """Call after writing the reference state keys of ``param`` (all when None) directly, as
        checkpoint loaders do: the per-segment views into them are rebuilt at the next step."""
        if param is None:
            self._references = {}
        else:
            self._references.pop(param, None)

    def reference_nbytes(self) -> int:
        """Bytes held for the reference delta (all parameters)."""
        keys = ("reference_values", "reference_positions", "reference_delta")
        return sum(s[k].numel() * s[k].element_size() for s in self.state.values() for k in keys if k in s)

    def _exchange(self, seg: Segment) -> Exchange | None:
        return all_gather_exchange(seg.group) if seg.group is not None else None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[STATE_DICT_KEY] = {"config": self.merge_config.to_dict(), "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after checking (before anything changes) that the saved merge state fits this
        run's settings. Merge state this run's settings do not use is dropped."""
        saved = state_dict.get(STATE_DICT_KEY)
        saved_config = None if saved is None else OnlineMergeConfig.from_dict(saved["config"], where="saved optimizer state's merge config")
        states = state_dict["state"].values()
        if saved_config is not None:
            check_compatible(saved_config, self.merge_config)
        elif any(key in s for s in states for key in _EXACT_STATE):
            warnings.warn(
                "OnlineMergingAdamW.load_state_dict: the state holds merge state but no merge config (saved by an older "
                "version, or by a wrapper that keeps only 'state' and 'param_groups'), so it cannot be checked against "
                "this run's settings",
                stacklevel=2,
            )
        used = _used_merge_state(self.merge_config)
        if "merge_accumulator" not in used and any(bool(s["merge_accumulator"].any()) for s in states if "merge_accumulator" in s):
            saved_every = saved_config.merge_every if saved_config is not None else "unknown"
            raise MergeCheckpointError(
                f"online merge: merge_every: {saved_every} saved, {self.merge_config.merge_every} now "
                f"(method {self.merge_config.method!r} now): the state was saved between merges and holds plain updates "
                "not merged yet (merge_accumulator), which this run would never merge; resume with the saved merge_every, "
                "or from a state saved at a merge step"
            )
        # torch casts every state tensor to its parameter's dtype: integer positions would turn into
        # floats (exact only below 2^24) and fp32 merge state into bf16. Merge state is put back as saved.
        exact = {pid: {k: v for k, v in s.items() if k in _EXACT_STATE} for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            for key, value in exact.get(pid, {}).items():
                if key in used:
                    self.state[param][key] = value.to(device=_local(param).device)
                else:
                    # Kept, a reference delta unused now could later be checked against the wrong settings.
                    self.state[param].pop(key, None)
        if saved is not None:
            self.skipped_steps = int(saved.get("skipped_steps", 0))
        self._references = {}

    # ---------------------------------------------------------------- stats and EMA
    def merge_stats(self, reset: bool = True) -> dict[str, float]:
        """Kept fraction, update norm before/after merging, sign-conflict rate since the last call."""
        out = self._stats.as_dict()
        if reset:
            self._stats = MergeStats()
        return out

    @contextlib.contextmanager
    def weight_ema_applied(self) -> Iterator[None]:
        """Temporarily load the weight EMA (baseline option) into the parameters, e.g. to evaluate."""
        swapped = []
        for state_param, state in self.state.items():
            if "weight_ema" in state:
                local = _local(state_param).detach()
                swapped.append((local, local.clone()))
                local.copy_(state["weight_ema"])
        try:
            yield
        finally:
            for local, saved in swapped:
                local.copy_(saved)

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "off" and self._nonfinite_step():
            return loss
        config = self.merge_config
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._step_param(param, _local(param), _local(param.grad), group, lr, beta1, beta2, eps, weight_decay, config)
        return loss

    def _nonfinite_step(self) -> bool:
        """Check every gradient for NaN/Inf before anything changes. Returns True when this step is
        skipped (nonfinite='skip'); raises FloatingPointError with nonfinite='raise'."""
        grads = [(p, name, _local(p.grad)) for p, name in self._names() if p.grad is not None]
        # Sparse gradients are refused by the step itself; empty pieces hold nothing to check.
        grads = [(p, name, g) for p, name, g in grads if g.numel() and not g.is_sparse]
        flags = nonfinite_flags([g for _, _, g in grads]) if grads else None
        found = flags.any() if flags is not None else torch.zeros((), dtype=torch.bool)
        if self.nonfinite == "skip":
            found = self._agree_over_meshes(found)
        if not bool(found):  # the one host synchronisation of a step without NaN/Inf
            return False
        bad = [i for i, flag in enumerate(flags.tolist()) if flag] if flags is not None else []
        where = self._describe_nonfinite(grads[bad[0]], len(bad), len(grads)) if bad else "on another rank of the device mesh"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite gradient: {where}; the step was refused and nothing changed "
                "(OnlineMergingAdamW(nonfinite='skip') skips such steps, 'off' disables the check)"
            )
        self.skipped_steps += 1
        warnings.warn(
            f"OnlineMergingAdamW: non-finite gradient ({where}); step skipped, {self.skipped_steps} so far", RuntimeWarning, stacklevel=3
        )
        return True

    def _agree_over_meshes(self, found: torch.Tensor) -> torch.Tensor:
        """OR of the flag over the device meshes of DTensor parameters, so every rank skips together.
        Meshes are visited in parameter order, the same on every rank."""
        meshes = {}
        for p, _ in self._names():
            if hasattr(p, "device_mesh"):
                meshes.setdefault(id(p.device_mesh), (p.device_mesh, _local(p).device))
        for mesh, device in meshes.values():
            flag = found.to(device=device, dtype=torch.int32).reshape(1)
            for group in mesh.get_all_groups():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            found = flag[0] > 0
        return found

    def _describe_nonfinite(self, item: tuple[torch.Tensor, str, torch.Tensor], count: int, total: int) -> str:
        param, name, grad = item
        bad = ~torch.isfinite(grad.reshape(-1))
        first = int(bad.nonzero()[0])
        # A flat ZeRO / Megatron partition holds pieces of many weights: name the weight as well.
        weight = next((s.name for s in self.segments(param) if s.offset <= first < s.offset + s.coords.numel), name)
        inside = f" (element {first}, of {weight!r})" if weight != name else ""
        return f"{name!r}{inside} has {int(bad.sum())} NaN/Inf element(s); {count} of {total} gradients hold some"

    def _init_state(self, param: torch.Tensor, data: torch.Tensor, config: OnlineMergeConfig) -> dict[str, Any]:
        """The parameter's state, created at its first step (checked for a reference delta first); merge
        state that the config asks for and a resumed state lacks is created too."""
        state = self.state[param]
        if config.needs_reference and "reference_values" not in state:
            raise RuntimeError(
                f"online merge: no reference delta for {self.segments(param)[0].name!r}; call set_reference_delta(...) "
                "before the first step, or after loading a state saved without one (or use alpha=0 / method='none')"
            )
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(data, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(data, memory_format=torch.preserve_format)
        # Not only at the first step: a resume may turn step-K or the EMA on.
        if config.merges and config.merge_every > 1 and "merge_accumulator" not in state:
            state["merge_accumulator"] = torch.zeros_like(data, dtype=torch.float32)
        if config.weight_ema > 0 and "weight_ema" not in state:
            state["weight_ema"] = data.detach().clone()
        return state

    def _step_param(self, param, data, grad, group, lr, beta1, beta2, eps, weight_decay, config) -> None:
        if grad.is_sparse:
            raise RuntimeError("OnlineMergingAdamW does not support sparse gradients")
        if group["maximize"]:
            grad = -grad
        state = self._init_state(param, data, config)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = int(state["step"].item())

        # The same operations, in the same order, as torch.optim.AdamW's single-tensor path
        # (multiplying by exactly 1.0 changes no bit, so that pass is skipped without weight decay).
        if weight_decay != 0:
            data.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5

        if not config.merges:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            data.addcdiv_(exp_avg, denom, value=-step_size)
        else:
            flat, m, v = data.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
            accumulator = state.get("merge_accumulator")
            references = self._reference_views(param)
            scratch = self._scratch_for(m) if config.method == "ties" else None
            for i, seg in enumerate(self.segments(param)):
                update = AdamUpdate(m[seg.slice], v[seg.slice], step_size, bias_correction2_sqrt, eps, scratch)
                self._stats.add(
                    merge_segment(
                        flat[seg.slice],
                        update,
                        config,
                        seg.name,
                        seg.coords,
                        step,
                        reference=references[i] if references else None,
                        accumulator=accumulator.view(-1)[seg.slice] if accumulator is not None else None,
                        exchange=self._exchange(seg),
                        track_update_norm=self.track_update_norm,
                    )
                )
        if "weight_ema" in state:
            state["weight_ema"].lerp_(data, config.weight_ema)
