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
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.distributed as dist

from .merging import rng
from .merging import state as merge_state
from .merging.config import MergeCheckpointError, OnlineMergeConfig, check_compatible
from .merging.coords import ShardCoords
from .merging.indexing import gather, positions
from .merging.merger import DarePositions, MergeHooks, MergeStats, is_merge_step, merge_segment, segment_top_k
from .merging.reference import ReferenceDelta, reference_draw
from .merging.sources import DeltaFn, NameMap, delta_between, delta_from, prepare, weight_source
from .merging.select import Piece, tensor_thresholds
from .merging.sparsify import CANDIDATE_DEPTH, SAMPLE, Candidates, TensorTopK, cut_from_sample, next_cut, sample_positions, top_k_count

STATE_DICT_KEY = "online_merge"
"""Top-level key of `OnlineMergingAdamW.state_dict()` holding the merge config and skipped_steps
(torch's own load_state_dict ignores top-level keys it does not know)."""

NonFinite = Literal["raise", "skip", "off"]

CANDIDATE_CHUNK = 1 << 19
"""Elements per chunk of the OnTIES candidate pass: its buffers (2 MiB of fp32 and the flags) are
all it keeps between steps, instead of a buffer the size of the largest tensor."""


@dataclass(frozen=True, eq=False)
class TensorGroup:
    """The ranks holding pieces of some tensors, for OnTIES' top-k over each whole tensor
    (ties_scope='tensor'): one batched select per merge step for all of them (`merging.select`).

    Every rank of ``process_group`` holds an equal TensorGroup: the same tensors, in the same order,
    including tensors it holds no piece of (a distributed optimizer's DP range may miss a tensor)."""

    process_group: Any
    numels: dict[str, int]
    """Every tensor any rank of the group holds a piece of: name -> element count of the whole tensor."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.numels)})

    def index(self, name: str) -> int:
        return self._index[name]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Segment:
    """Elements ``[offset, offset + coords.numel)`` of a parameter's flat view belong to tensor ``name``."""

    name: str
    coords: ShardCoords
    offset: int = 0
    group: TensorGroup | None = None
    """The ranks holding the other pieces of the tensor (ties_scope='tensor' only)."""
    counted: bool = True
    """False on a replica whose elements another rank of the group also holds and counts (a
    TP-replicated tensor on TP rank > 0, a replicated DTensor on mesh rank > 0)."""

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
    scratch: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Returns a reusable buffer at least the size of its argument, for magnitude(): a fresh dense
    allocation per tensor and step costs more in page faults than the arithmetic. Asked for only
    when magnitude() runs, so a step that never needs it (top-k candidates from a fused kernel)
    allocates nothing."""
    _dense: torch.Tensor | None = None

    def _update(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (m / (v.sqrt() / self.bias_correction2_sqrt + self.eps)) * (-self.step_size)

    def evaluate(self) -> torch.Tensor:
        """A fresh dense() (equal to it bit for bit), not kept."""
        return self._update(self.exp_avg, self.exp_avg_sq)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return gather(self._dense, positions)
        return self._update(gather(self.exp_avg, positions), gather(self.exp_avg_sq, positions))

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
        out = self.scratch(self.exp_avg)[:n] if self.scratch is not None else torch.empty_like(self.exp_avg)
        torch.sqrt(self.exp_avg_sq, out=out).div_(self.bias_correction2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg, out, out=out).abs_().mul_(self.step_size)

    def top_k_candidates(self, k: int) -> Candidates | None:
        """Positions provably holding the top k of magnitude(), found without computing it: the
        cut comes from the exact magnitudes of a strided sample (as `sparsify.top_k_positions`
        takes it), and an element is offered when v - r2 m^2 < 0 (`_CandidateSearch`), two cheap
        passes instead of magnitude()'s six, chunk by chunk in a small buffer."""
        n = self.exp_avg.numel()
        if self._dense is not None or n <= 4 * SAMPLE:
            return None
        search = _CandidateSearch.start(self.at(sample_positions(n, self.exp_avg.device)).abs(), n, k, self)
        if search is None:
            return None
        chunk = min(n, CANDIDATE_CHUNK)
        margin = self.scratch(self.exp_avg[:chunk])[:chunk] if self.scratch is not None else torch.empty_like(self.exp_avg[:chunk])
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            if not search.add(self.exp_avg[start:stop], self.exp_avg_sq[start:stop], start, margin):
                return None
        return search.candidates()


@dataclass
class _CandidateSearch:
    """One segment's OnTIES candidates: the positions where v - r2 m^2 < 0, offered chunk by chunk,
    with the moments there (read while the chunk is in cache, so that the update at the
    candidates needs no second, scattered pass over memory).

    Why nothing at or above the cut is left out: magnitude = |m| s / (sqrt(v) / c + eps) <
    |m| s c / sqrt(v) (eps > 0), so magnitude >= cut implies r2 m^2 > v for r2 = (s c / cut)^2;
    r2 is raised by 1e-4, far more than the rounding of the few fp32 operations. r2 m^2
    underflowing needs |m| < 2^-63 / sqrt(r2), where magnitude < cut whenever c * eps > 2^-60
    (checked); overflow only offers more."""

    cut: float
    r2: float
    limit: int
    scalars: AdamUpdate
    """Its step size, bias correction and eps evaluate the update at the candidates."""
    found: list[torch.Tensor] = dataclasses.field(default_factory=list)
    moments: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    offered: int = 0

    @classmethod
    def start(cls, sample: torch.Tensor, n: int, k: int, update: AdamUpdate) -> "_CandidateSearch | None":
        """The search for the top k of n elements, its cut taken from the magnitudes of the
        segment's `sample_positions`. None: the whole-segment selection is the cheaper one."""
        cut = cut_from_sample(sample, n, k, CANDIDATE_DEPTH)
        # Many sampled magnitudes equal to the cut (Adam's first step makes them all equal) would
        # offer most of the segment.
        if int((sample >= cut).sum()) > 2 * CANDIDATE_DEPTH * k / n * sample.numel() + 64:
            return None
        return cls.at_cut(float(cut), n, k, update)

    @classmethod
    def at_cut(cls, cut: float, n: int, k: int, update: AdamUpdate) -> "_CandidateSearch | None":
        """The search for the top k of n elements above ``cut`` (it need not be exact: the proof
        holds for any cut, and a cut too high leaves fewer than k candidates, which `top_k_among`
        refuses). None: no proof for this cut."""
        if not (math.isfinite(cut) and cut > 0.0 and update.bias_correction2_sqrt * update.eps > 2.0**-60):
            return None
        r2 = (update.step_size * update.bias_correction2_sqrt / cut) ** 2 * (1.0 + 1e-4)
        # Called off past this many candidates (a cut far too low, or eps dominating many
        # denominators): then the selection over the whole segment is the cheaper one.
        return cls(cut, r2, max(n // 8, 4 * k + 1024), update)

    def add(self, m: torch.Tensor, v: torch.Tensor, start: int, margin: torch.Tensor) -> bool:
        """Offer the elements of one chunk (moments ``m``, ``v`` at segment positions ``start``
        on); ``margin`` is a buffer at least as long. False: too many offered, the search is off."""
        torch.addcmul(v, m, m, value=-self.r2, out=margin[: m.numel()])
        local = positions(margin[: m.numel()], "<", 0.0)
        self.moments.append((gather(m, local), gather(v, local)))
        self.found.append(local.add_(start))
        self.offered += local.numel()
        return self.offered <= self.limit

    def candidates(self) -> Candidates:
        values = self.scalars._update(torch.cat([m for m, _ in self.moments]), torch.cat([v for _, v in self.moments]))
        return Candidates(torch.cat(self.found), self.cut, values)


class _Offered(MergeHooks):
    """The engine's own hooks on a CPU OnTIES merge step: the candidates its dense pass found while
    it updated the moments (`OnlineMergingAdamW._dense_pass`; None: no cut predicted yet, or the
    search was called off), and the cut predicted for the next merge."""

    def __init__(self, optimizer: "OnlineMergingAdamW", param: torch.Tensor, index: int, candidates: Candidates | None) -> None:
        self.optimizer, self.param, self.index, self.candidates = optimizer, param, index, candidates

    def top_k_candidates(self, k: int) -> Candidates | None:
        return self.candidates

    def top_k_selected(self, magnitude: torch.Tensor, k: int, from_candidates: bool) -> None:
        self.optimizer.predict_cut(self.param, self.index, magnitude, k)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def default_segments(param: torch.Tensor, name: str) -> list[Segment]:
    """One segment: the whole tensor, or for a DTensor (FSDP2) its local block of the global tensor
    (its group is filled in by the optimizer, which knows the other tensors on the mesh)."""
    if _is_dtensor(param):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        coords = ShardCoords.block(tuple(param.shape), tuple(local_shape), tuple(offset))
        # Per-tensor OnTIES selects over a 1-D mesh (the optimizer adds the group); there a replica
        # (Replicate placement) is counted by mesh rank 0 alone.
        replicated = param.device_mesh.ndim == 1 and param.placements[0].is_replicate()
        return [Segment(name, coords, 0, None, counted=not replicated or param.device_mesh.get_local_rank() == 0)]
    return [Segment(name, ShardCoords.full(tuple(param.shape)))]


def _is_dtensor(param: torch.Tensor) -> bool:
    return hasattr(param, "device_mesh") and hasattr(param, "placements")


def _collective_device(process_group: Any) -> torch.device:
    """Where a group's reduced counts live: the CUDA device under NCCL, else the CPU."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


@dataclass
class _ParamStep:
    """A parameter's step between its dense pass and its merge."""

    param: torch.Tensor
    data: torch.Tensor
    state: dict[str, Any]
    step: int
    step_size: float
    bias_correction2_sqrt: float
    eps: float
    hooks: list[MergeHooks | None] | None
    updates: list[AdamUpdate] | None
    """Per segment; None when nothing is merged."""


class _HeldWeights:
    """The weights an optimizer holds now, as a weight source read at its own segments."""

    where = "the optimizer's current weights"

    def __init__(self, optimizer: "OnlineMergingAdamW") -> None:
        self._pieces: dict[tuple[str, ShardCoords], torch.Tensor] = {}
        for param, _ in optimizer._names():
            flat = _local(param).detach().reshape(-1)
            for seg in optimizer.segments(param):
                self._pieces[(seg.name, seg.coords)] = flat[seg.slice]
        self._shapes = {name: coords.global_shape for name, coords in self._pieces}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, coords: ShardCoords) -> torch.Tensor:
        return self._pieces[(name, coords)]


def reduce_merge_stats(stats: MergeStats, group: Any = None) -> MergeStats:
    """The sum of every rank's merge statistics over a process group (one small all-reduce)."""
    fields = [f.name for f in dataclasses.fields(MergeStats)]
    values = torch.tensor([float(getattr(stats, f)) for f in fields], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        values = values.to(backend_device)
        dist.all_reduce(values, group=group)
    # Counts back to ints (the fields whose default is one); norms and conflicts stay floats.
    return MergeStats(**{f.name: type(f.default)(v) for f, v in zip(dataclasses.fields(MergeStats), values.tolist())})


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
        self._mesh_groups: dict[int, TensorGroup] = {}
        self._declared_groups: list[TensorGroup] = []
        self._references: dict[torch.Tensor, list[ReferenceDelta]] = {}
        self._stats = MergeStats()
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # OnTIES cuts predicted for the next merge, per parameter and segment index: only a speed
        # hint (a missing or stale one costs a whole-segment selection, never a different result),
        # so it is not optimizer state.
        self._ties_cuts: dict[torch.Tensor, dict[int, float]] = {}

    def _scratch_for(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer at least the size of ``like``, reused across tensors and steps (OnTIES only)."""
        key = (like.device, like.dtype)
        if key not in self._scratch or self._scratch[key].numel() < like.numel():
            self._scratch[key] = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        return self._scratch[key]

    def predicted_cut(self, param: torch.Tensor, index: int) -> float | None:
        """The cut above which the next OnTIES merge of segment ``index`` of ``param`` looks for
        its top k (`predict_cut`); None: none predicted yet."""
        return self._ties_cuts.get(param, {}).get(index)

    def predict_cut(self, param: torch.Tensor, index: int, magnitude: torch.Tensor, k: int) -> None:
        """Predict the next merge's cut from the magnitudes this merge's selection read
        (`sparsify.next_cut`): after the first merge, the candidates need no sample."""
        cut = next_cut(magnitude, k)
        cuts = self._ties_cuts.setdefault(param, {})
        if math.isfinite(cut) and cut > 0.0:
            cuts[index] = cut
        else:
            cuts.pop(index, None)

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
            segments = default_segments(param, name)
            if _is_dtensor(param) and param.device_mesh.ndim == 1:
                group = self._mesh_group(param.device_mesh)
                segments = [dataclasses.replace(seg, group=group) for seg in segments]
            self._segments[param] = segments
        return self._segments[param]

    def declare_tensor_group(self, group: TensorGroup) -> None:
        """Take part in ``group``'s per-tensor select at every OnTIES merge even while holding no
        piece of its tensors. Adapters declare every group they put in segments, in the same order
        on every rank: a rank that holds nothing of a group must still join its collectives."""
        if all(group is not g for g in self._declared_groups):
            self._declared_groups.append(group)

    def _mesh_group(self, mesh: Any) -> TensorGroup:
        """One TensorGroup per 1-D device mesh, over this optimizer's DTensors on it (the same
        parameters on every rank of an FSDP2 mesh)."""
        key = id(mesh.get_group())
        if key not in self._mesh_groups:
            numels = {n: p.numel() for p, n in self._names() if _is_dtensor(p) and p.device_mesh.get_group() is mesh.get_group()}
            self._mesh_groups[key] = TensorGroup(mesh.get_group(), numels)
        return self._mesh_groups[key]

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
        delta: Any = None,
        delta_fn: DeltaFn | None = None,
        name_map: NameMap | None = None,
    ) -> None:
        """Give the optimizer the reference delta (SFT minus base), as exactly one of:

        - ``base``, and ``reference`` (the SFT weights) or, without it, the weights this optimizer
          holds now (the caller's word that they are the SFT weights). Each a module, a state
          dict, a safetensors file or model folder, or any `merging.sources.WeightSource`;
        - ``delta``: full deltas, as any of the same kinds;
        - ``delta_fn(name, coords)`` returning a segment's slice.

        ``name_map`` translates parameter names to the sources' keys. Only each segment's elements
        are read. Everything is checked before anything is stored."""
        if sum([base is not None or reference is not None, delta is not None, delta_fn is not None]) != 1:
            raise ValueError("set_reference_delta: pass base= (and reference=), or delta=, or delta_fn=")
        if reference is not None and base is None:
            raise ValueError("set_reference_delta: reference= needs base= (the delta is reference - base)")
        if base is not None:
            reference = _HeldWeights(self) if reference is None else weight_source(reference, "reference", name_map)
            sources = [reference, weight_source(base, "base", name_map)]
            delta_fn = delta_between(*sources)
        elif delta is not None:
            sources = [weight_source(delta, "reference delta", name_map)]
            delta_fn = delta_from(sources[0])
        else:
            sources = []
        requests = [(seg.name, seg.coords) for param, _ in self._names() for seg in self.segments(param)]
        for source in sources:
            prepare(source, requests)
        config = self.merge_config
        deltas = {param: [delta_fn(seg.name, seg.coords) for seg in self.segments(param)] for param, _ in self._names()}
        top_k = self._tensor_top_k(lambda param, i: deltas[param][i].reshape(-1).float().abs())
        built: dict[torch.Tensor, list[ReferenceDelta]] = {}
        for param, pieces in deltas.items():
            # Built where the delta comes from, kept where the parameter lives (the merge indexes both).
            built[param] = [
                ReferenceDelta.build(delta, config, seg.name, seg.coords, top_k.get((param, i)))
                for i, (seg, delta) in enumerate(zip(self.segments(param), pieces))
            ]
        for param, refs in built.items():
            self._store_references(param, refs)

    def _store_references(self, param: torch.Tensor, references: list[ReferenceDelta]) -> None:
        state = self.state[param]
        for key in merge_state.REFERENCE_KEYS:
            state.pop(key, None)
        offsets = [seg.offset for seg in self.segments(param)]
        state.update(merge_state.store_references(references, offsets, self.merge_config, _local(param)))
        self._references.pop(param, None)

    def _reference_views(self, param: torch.Tensor) -> list[ReferenceDelta] | None:
        """Per-segment views into the reference state (rebuilt after the state is replaced)."""
        if param not in self._references:
            segments = [(seg.name, seg.coords, seg.offset) for seg in self.segments(param)]
            views = merge_state.reference_views(self.state[param], segments, self.merge_config)
            if views is None:
                return None
            self._references[param] = views
        return self._references[param]

    def missing_reference_delta(self) -> list[str]:
        """Names of the tensors whose reference delta the config needs and the optimizer lacks."""
        if not self.merge_config.needs_reference:
            return []
        return [self.segments(p)[0].name for p, _ in self._names() if merge_state.REFERENCE_VALUES not in self.state.get(p, {}) and self.segments(p)]

    def keeps_restored_reference(self, hint: str) -> bool:
        """Asked before the reference delta is taken against the weights held now: False before the
        first step (they are the SFT weights); True when the optimizer has stepped and a resume
        restored every reference delta (keep it); ValueError once it has stepped without them (the
        weights are no longer the SFT weights; ``hint`` says what to do instead)."""
        if not any("step" in s for s in self.state.values()):
            return False
        if not self.missing_reference_delta():
            return True
        raise ValueError(f"online merge: the optimizer has already stepped, so its weights are no longer the SFT weights; {hint}")

    def reference_nbytes(self) -> int:
        """Bytes held for the reference delta (all parameters)."""
        return sum(s[k].numel() * s[k].element_size() for s in self.state.values() for k in merge_state.REFERENCE_KEYS if k in s)

    def buffer_nbytes(self) -> int:
        """Bytes of the work buffers kept from one step to the next (OnTIES' candidate chunk)."""
        return sum(b.numel() * b.element_size() for b in self._scratch.values())

    def _tensor_top_k(self, magnitude: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[tuple[torch.Tensor, int], TensorTopK]:
        """OnTIES per tensor: each whole tensor's top-k threshold, for the segments (param, index)
        that hold pieces of tensors over a TensorGroup, from ``magnitude(param, index)``. One
        batched select per group (`merging.select`); groups are visited in the order they were
        declared (`declare_tensor_group`), then of their first segment, the same on every rank.
        Empty unless the config selects per tensor."""
        config = self.merge_config
        if config.method != "ties" or config.ties_scope != "tensor":
            return {}
        by_group: dict[int, tuple[TensorGroup, list[tuple[torch.Tensor, int, Segment]]]] = {}
        for group in self._declared_groups:
            by_group[id(group)] = (group, [])
        for param, _ in self._names():
            for i, seg in enumerate(self.segments(param)):
                if seg.group is not None:
                    by_group.setdefault(id(seg.group), (seg.group, []))[1].append((param, i, seg))
        out: dict[tuple[torch.Tensor, int], TensorTopK] = {}
        for group, members in by_group.values():
            pieces = [
                Piece(group.index(seg.name), lambda p=param, j=i: magnitude(p, j), seg.coords.global_index, seg.counted)
                for param, i, seg in members
            ]
            numels = list(group.numels.values())
            ks = [top_k_count(n, config.keep_rate) for n in numels]
            device = _collective_device(group.process_group)
            thresholds = tensor_thresholds(pieces, ks, numels, group.process_group, device=device)
            for (param, i, seg), piece in zip(members, pieces):
                out[(param, i)] = TensorTopK(thresholds[piece.tensor])
        return out

    # ---------------------------------------------------------------- merge state in global coordinates
    def merge_state_keys(self) -> list[str]:
        """Names of the dense vectors `export_merge_state` gives per segment (fixed for a config)."""
        return merge_state.exported_keys(self.merge_config)

    def export_merge_state(self, param: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The merge state of each segment of ``param``: dense fp32 CPU vectors of the segment's
        elements, one per `merge_state_keys()` name, for frameworks that save by global coordinates.
        Before the first step the dense state is as the first step would create it."""
        config, state = self.merge_config, self.state.get(param, {})
        flat = _local(param).detach().reshape(-1)
        references = self._reference_views(param) if config.needs_reference else None
        if config.needs_reference and references is None:
            raise MergeCheckpointError(f"online merge: no reference delta set for {self.segments(param)[0].name!r}; nothing to save")
        # Before the first step: as the first step would create it.
        dense = {key: state[key] if key in state else merge_state.new_dense(key, flat) for key in merge_state.dense_keys(config)}
        pieces = []
        for i, seg in enumerate(self.segments(param)):
            piece = {key: value.detach().reshape(-1)[seg.slice].float().cpu() for key, value in dense.items()}
            if references is not None:
                piece.update(merge_state.export_reference(references[i], config, seg.name, seg.coords))
            pieces.append(piece)
        return pieces

    def import_merge_state(
        self, param: torch.Tensor, pieces: list[Mapping[str, torch.Tensor]], step: int | None = None, reference: bool = True
    ) -> None:
        """Set ``param``'s merge state from `export_merge_state`-form vectors of each of its segments
        (saved in any layout; the caller checked the saved config with `check_compatible`), and
        Adam's step counter when given. Dense keys the pieces lack are left as they are. The
        reference delta is rebuilt in this run's layout from the pieces, which must then hold it;
        ``reference=False`` keeps the current one (formats that do not carry it)."""
        config, state = self.merge_config, self.state[param]
        segments = self.segments(param)
        if len(pieces) != len(segments):
            raise ValueError(f"import_merge_state: {len(pieces)} pieces for {len(segments)} segments")
        like = _local(param)
        for key in merge_state.dense_keys(config):
            if all(key in piece for piece in pieces):
                dense = state[key] if key in state else merge_state.new_dense(key, like)
                for seg, piece in zip(segments, pieces):
                    dense.view(-1)[seg.slice] = piece[key].to(device=dense.device, dtype=dense.dtype)
                state[key] = dense
        if config.needs_reference and reference:
            self._store_references(
                param, [merge_state.import_reference(piece, config, seg.name, seg.coords) for seg, piece in zip(segments, pieces)]
            )
        if step:
            state["step"] = torch.tensor(float(step))

    def complete_merge_state(self) -> None:
        """Create the dense merge state the config asks for and a restored state lacks (the
        accumulator, the EMA), for parameters that have stepped: a framework that restored only
        Adam's keys leaves it to be created, and the engine creates it only at a first step."""
        for param, _ in self._names():
            state = self.state.get(param)
            if state and "step" in state:
                state.update(merge_state.new_dense_state(self.merge_config, _local(param), skip=state))

    @contextlib.contextmanager
    def adam_state_only(self, keep_placeholders: bool = False) -> Iterator[None]:
        """Present only Adam's keys, as torch's AdamW would hold them, while a framework (de)serializes
        the state with code that knows only those (megatron's distributed optimizer).

        The merge keys are taken out and put back afterwards into whatever state dict then belongs
        to the parameter (a load replaces them). A parameter that has not stepped gets a fresh Adam
        state meanwhile (megatron reads a per-param step from every entry); ``keep_placeholders``
        leaves those in place (a load has filled them)."""
        stash: list[tuple[torch.Tensor, dict[str, Any]]] = []
        placeholders: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        for param, state in list(self.state.items()):
            extra = {k: state.pop(k) for k in list(state) if k not in merge_state.ADAM_KEYS}
            if extra:
                stash.append((param, extra))
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                if "step" in state:
                    continue
                for key, value in (("step", torch.tensor(0.0)), ("exp_avg", torch.zeros_like(param)), ("exp_avg_sq", torch.zeros_like(param))):
                    if key not in state:
                        state[key] = value
                        placeholders.append((param, key, value))
        try:
            yield
        finally:
            for param, key, value in [] if keep_placeholders else placeholders:
                state = self.state[param]
                if state.get(key) is value:  # untouched: take it back out
                    del state[key]
            for param, extra in stash:
                state = self.state[param]
                for key, value in extra.items():
                    state.setdefault(key, value)
            self._references = {}

    def steps_taken(self) -> int:
        """Adam's step counter, which every parameter that has stepped shares (0 before the first)."""
        steps = {int(s["step"]) for s in self.state.values() if "step" in s}
        if len(steps) > 1:
            raise MergeCheckpointError(f"online merge: params disagree on the step counter ({sorted(steps)})")
        return steps.pop() if steps else 0

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
        elif any(key in s for s in states for key in merge_state.MERGE_KEYS):
            warnings.warn(
                "OnlineMergingAdamW.load_state_dict: the state holds merge state but no merge config (saved by an older "
                "version, or by a wrapper that keeps only 'state' and 'param_groups'), so it cannot be checked against "
                "this run's settings",
                stacklevel=2,
            )
        used = merge_state.used_keys(self.merge_config)
        accumulator = merge_state.ACCUMULATOR
        if accumulator not in used and any(bool(s[accumulator].any()) for s in states if accumulator in s):
            saved_every = saved_config.merge_every if saved_config is not None else "unknown"
            raise MergeCheckpointError(
                f"online merge: merge_every: {saved_every} saved, {self.merge_config.merge_every} now "
                f"(method {self.merge_config.method!r} now): the state was saved between merges and holds plain updates "
                "not merged yet (merge_accumulator), which this run would never merge; resume with the saved merge_every, "
                "or from a state saved at a merge step"
            )
        # torch casts every state tensor to its parameter's dtype: integer positions would turn into
        # floats (exact only below 2^24) and fp32 merge state into bf16. Merge state is put back as saved.
        exact = {pid: {k: v for k, v in s.items() if k in merge_state.MERGE_KEYS} for pid, s in state_dict["state"].items()}
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
    def merge_sums(self, reset: bool = True) -> MergeStats:
        """This process's merge statistics since the last call, as raw sums (counts, squared norms):
        reduce them over ranks with `reduce_merge_stats`, then take ratios with ``as_dict()``."""
        out = self._stats
        if reset:
            self._stats = MergeStats()
        else:
            out = MergeStats()
            out.add(self._stats)
        return out

    def merge_stats(self, reset: bool = True) -> dict[str, float]:
        """Kept fraction, update norm before/after merging, sign-conflict rate since the last call
        (this process's elements only; see `merge_sums` for statistics over ranks)."""
        return self.merge_sums(reset).as_dict()

    @contextlib.contextmanager
    def weight_ema_applied(self) -> Iterator[None]:
        """Temporarily load the weight EMA (baseline option) into the parameters, e.g. to evaluate."""
        swapped = []
        for state_param, state in self.state.items():
            if merge_state.WEIGHT_EMA in state:
                local = _local(state_param).detach()
                swapped.append((local, local.clone()))
                local.copy_(state[merge_state.WEIGHT_EMA])
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
        # Every parameter's dense pass, then every merge: OnTIES per tensor selects over all tensors
        # at once between the two (each parameter's steps are the same either way).
        begun = [
            self._begin_param_step(param, _local(param), _local(param.grad), group, self.merge_config)
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        tensor_top_k = self._step_tensor_top_k(begun)
        dare_positions = self._draw_dare_positions(begun)
        for begun_step in begun:
            self._merge_param(begun_step, tensor_top_k, dare_positions)
        # A whole-segment magnitude buffer (per-tensor OnTIES, or a step where the candidates did not
        # suffice) would be as large as the largest tensor: it is not kept between steps.
        self._scratch = {key: buf for key, buf in self._scratch.items() if buf.numel() <= CANDIDATE_CHUNK}
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
        if config.needs_reference and merge_state.REFERENCE_VALUES not in state:
            raise RuntimeError(
                f"online merge: no reference delta for {self.segments(param)[0].name!r}; call set_reference_delta(...) "
                "before the first step, or after loading a state saved without one (or use alpha=0 / method='none')"
            )
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(data, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(data, memory_format=torch.preserve_format)
        # Not only at the first step: a resume may turn step-K or the EMA on.
        state.update(merge_state.new_dense_state(config, data, skip=state))
        return state

    def _begin_param_step(
        self, param: torch.Tensor, data: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], config: OnlineMergeConfig
    ) -> "_ParamStep":
        """One parameter's step up to its merge: the step counter, then the dense pass (`_dense_pass`)."""
        if grad.is_sparse:
            raise RuntimeError("OnlineMergingAdamW does not support sparse gradients")
        state = self._init_state(param, data, config)
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = group["lr"] / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        hooks = self._dense_pass(param, data, grad, state, group, step, step_size, bias_correction2_sqrt, config)
        updates = None
        if config.merges:
            m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
            scratch = self._scratch_for if config.method == "ties" else None
            updates = [AdamUpdate(m[seg.slice], v[seg.slice], step_size, bias_correction2_sqrt, group["eps"], scratch) for seg in self.segments(param)]
        return _ParamStep(param, data, state, step, step_size, bias_correction2_sqrt, group["eps"], hooks, updates)

    def _step_tensor_top_k(self, begun: list["_ParamStep"]) -> dict[tuple[torch.Tensor, int], TensorTopK]:
        """The per-tensor thresholds of this step's OnTIES merges (none on step-K's plain steps)."""
        config = self.merge_config
        if not any(b.updates and is_merge_step(config, b.step) for b in begun):
            return {}
        by_param = {b.param: b for b in begun}

        def magnitude(param: torch.Tensor, i: int) -> torch.Tensor:
            b = by_param.get(param)
            if b is None or not b.updates:
                return torch.zeros(0)  # no gradient: nothing to offer (the select names the gap)
            update, accumulator = b.updates[i], b.state.get(merge_state.ACCUMULATOR)
            if accumulator is None:
                return update.magnitude()
            # Step-K: the merged update includes the accumulated ones (as merge_segment's), built
            # afresh per call so that no dense copy outlives it.
            seg = self.segments(param)[i]
            return update.evaluate().add_(accumulator.view(-1)[seg.slice]).abs_()

        return self._tensor_top_k(magnitude)

    def _draw_dare_positions(self, begun: list["_ParamStep"]) -> dict[tuple[torch.Tensor, int], DarePositions]:
        """This step's OnDARE keep positions of every segment the engine merges itself, drawn in one
        batch per device (`rng.keep_positions_many`); a segment whose hooks come from a fused
        implementation draws its own."""
        config = self.merge_config
        if config.method != "dare" or not config.merges:
            return {}
        draws: dict[torch.device, list[tuple[tuple[torch.Tensor, int], rng.MaskDraw, rng.MaskDraw | None]]] = {}
        for b in begun:
            if b.hooks is not None or not is_merge_step(config, b.step):
                continue
            references = self._reference_views(b.param) if config.alpha > 0.0 else None
            for i, seg in enumerate(self.segments(b.param)):
                update = rng.MaskDraw(config.seed, seg.name, b.step, rng.STREAM_UPDATE, seg.coords)
                redraw = references is not None and references[i].positions is None
                reference = reference_draw(config, seg.name, seg.coords, b.step) if redraw else None
                draws.setdefault(b.data.device, []).append(((b.param, i), update, reference))
        drawn: dict[tuple[torch.Tensor, int], DarePositions] = {}
        for device, items in draws.items():
            wanted = [d for _, update, reference in items for d in (update, reference) if d is not None]
            positions = iter(rng.keep_positions_many(wanted, config.keep_rate, device))
            for key, _, reference in items:
                drawn[key] = DarePositions(next(positions), next(positions) if reference is not None else None)
        return drawn

    def _merge_param(
        self,
        begun: "_ParamStep",
        tensor_top_k: dict[tuple[torch.Tensor, int], TensorTopK],
        dare_positions: dict[tuple[torch.Tensor, int], DarePositions],
    ) -> None:
        """One parameter's merge of each segment (or the plain update), and the EMA."""
        config, param, state, data = self.merge_config, begun.param, begun.state, begun.data
        if not config.merges:
            denom = (state["exp_avg_sq"].sqrt() / begun.bias_correction2_sqrt).add_(begun.eps)
            data.addcdiv_(state["exp_avg"], denom, value=-begun.step_size)
        else:
            flat = data.view(-1)
            accumulator = state.get(merge_state.ACCUMULATOR)
            references = self._reference_views(param)
            for i, seg in enumerate(self.segments(param)):
                self._stats.add(
                    merge_segment(
                        flat[seg.slice],
                        begun.updates[i],
                        config,
                        seg.name,
                        seg.coords,
                        begun.step,
                        reference=references[i] if references else None,
                        accumulator=accumulator.view(-1)[seg.slice] if accumulator is not None else None,
                        tensor_top_k=tensor_top_k.get((param, i)),
                        track_update_norm=self.track_update_norm,
                        hooks=begun.hooks[i] if begun.hooks is not None else None,
                        dare_positions=dare_positions.get((param, i)),
                    )
                )
        if merge_state.WEIGHT_EMA in state:
            state[merge_state.WEIGHT_EMA].lerp_(data, config.weight_ema)

    def _dense_pass(
        self,
        param: torch.Tensor,
        data: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
        step_size: float,
        bias_correction2_sqrt: float,
        config: OnlineMergeConfig,
    ) -> list[MergeHooks | None] | None:
        """Weight decay and Adam's moments of one parameter (``data``, its local tensor), the same
        operations in the same order as torch.optim.AdamW's single-tensor path (multiplying by
        exactly 1.0 changes no bit, so that pass is skipped without weight decay).

        The hook of fused implementations (kernels/adamw_merge.py): an override may do more in the
        same pass over memory (this step's step-K part, top-k candidates) and returns one
        `MergeHooks` per segment of the parameter (None for a segment: nothing taken over there),
        through which `merge_segment` lets it take over the sparse parts. None: nothing taken
        over. The engine itself does this for OnTIES on a CPU (`_candidate_searches`): reading
        the moments once for both the update and the candidates saves a pass over memory."""
        if group["maximize"]:
            grad = -grad
        beta1, beta2 = group["betas"]
        if group["weight_decay"] != 0:
            data.mul_(1 - group["lr"] * group["weight_decay"])
        searches = self._candidate_searches(param, state, group["eps"], step_size, bias_correction2_sqrt, config)
        live = {i: item for i, item in searches.items() if item[1] is not None}
        if not live:
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:
            # OnTIES on a CPU: the moments chunk by chunk (the same element-wise operations), each
            # chunk offered to the candidate searches while it is in cache, instead of a second
            # pass over them.
            g, m, v = grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
            margin = self._scratch_for(m[:CANDIDATE_CHUNK])
            for start in range(0, m.numel(), CANDIDATE_CHUNK):
                stop = min(m.numel(), start + CANDIDATE_CHUNK)
                g_chunk = g[start:stop]
                m[start:stop].lerp_(g_chunk, 1 - beta1)
                v[start:stop].mul_(beta2).addcmul_(g_chunk, g_chunk, value=1 - beta2)
                for i, (seg, search) in list(live.items()):
                    lo, hi = max(start, seg.offset), min(stop, seg.offset + seg.coords.numel)
                    if lo < hi and not search.add(m[lo:hi], v[lo:hi], lo - seg.offset, margin):
                        del live[i]
        if not searches:
            return None
        hooks: list[MergeHooks | None] = [None] * len(self.segments(param))
        for i, (_, search) in searches.items():
            hooks[i] = _Offered(self, param, i, search.candidates() if i in live else None)
        return hooks

    def _candidate_searches(
        self, param: torch.Tensor, state: dict[str, Any], eps: float, step_size: float, bias_correction2_sqrt: float, config: OnlineMergeConfig
    ) -> dict[int, tuple[Segment, "_CandidateSearch | None"]]:
        """The OnTIES candidate searches the dense pass runs on a CPU, per segment index: where a
        segment's own top k is selected from candidates (`segment_top_k`, K = 1, segments above
        4 * SAMPLE elements), above the cut its previous merge predicted (`predict_cut`). None: no
        cut yet (the first merge, or the first after a resume), the whole segment is selected
        over. On a GPU the search stays in `AdamUpdate` (a fused kernel does better there)."""
        m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        if config.method != "ties" or config.merge_every != 1 or m.device.type != "cpu":
            return {}
        searches = {}
        for i, seg in enumerate(self.segments(param)):
            n = seg.coords.numel
            k = segment_top_k(config, seg.coords, seg.group is not None)
            if k is None or n <= 4 * SAMPLE:
                continue
            cut = self.predicted_cut(param, i)
            update = AdamUpdate(m[seg.slice], v[seg.slice], step_size, bias_correction2_sqrt, eps)
            searches[i] = (seg, _CandidateSearch.at_cut(cut, n, k, update) if cut is not None else None)
        return searches
