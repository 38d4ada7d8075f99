"""Sparsifiers, each a small function on plain tensors.

Random (DARE) keep-masks come from `rng.keep_positions`; this module adds the magnitude top-k of
TIES, with a deterministic tie-break: elements are ordered by (|x| descending, global index
ascending) and the first k are kept. Adam's first step makes every |update| equal to lr, so
without that rule the kept set would depend on the sorting algorithm and on the sharding.
Selection uses a linear-time select (`indexing.kth_smallest`), never a full sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy
import torch

from .indexing import gather, kth_smallest, positions

if TYPE_CHECKING:
    from .coords import ShardCoords

IndexMap = Callable[[torch.Tensor], torch.Tensor]
"""Maps shard positions to global indices (the tie-break key)."""


def top_k_count(numel: int, keep_rate: float) -> int:
    """k = floor(p * n), as the reference code computes it. k < 1 means nothing is masked."""
    return int(numel * keep_rate)


@dataclass(frozen=True)
class TopKThreshold:
    """The k-th kept element: keep x when |x| > magnitude, or |x| == magnitude and index <= index."""

    magnitude: float
    index: int


def top_k_threshold(magnitude: torch.Tensor, k: int, global_index: IndexMap) -> TopKThreshold | None:
    """Threshold that keeps exactly the first k elements in (|x| desc, global index asc) order.

    Returns None when every element is kept (k < 1 by the reference rule, or k >= n).
    """
    n = magnitude.numel()
    if k < 1 or k >= n:
        return None
    value = kth_smallest(magnitude, n - k + 1)
    need = k - int((magnitude > value).sum())
    ties = positions(magnitude, "==", float(value))
    tie_index = global_index(ties)
    index = tie_index.max() if need >= ties.numel() else kth_smallest(tie_index, need)
    return TopKThreshold(float(value), int(index))


def above_threshold(magnitude: torch.Tensor, threshold: TopKThreshold | None, global_index: IndexMap) -> torch.Tensor:
    """Positions kept by a threshold (sorted); all positions when the threshold is None."""
    if threshold is None:
        return torch.arange(magnitude.numel(), device=magnitude.device)
    kept = positions(magnitude, ">=", threshold.magnitude)
    tie = gather(magnitude, kept) == threshold.magnitude
    if tie.any():
        kept = kept[~tie | (global_index(kept) <= threshold.index)]
    return kept


SAMPLE = 1 << 14
"""Elements in the strided sample `sample_cut` reads, at most (segments above 4x this are sampled)."""
SAMPLE_STRIDE = 64
"""The sample reads at most every 64th element: on a segment of a few hundred thousand elements
SAMPLE elements would be a sixteenth of it, while a few thousand place the cut well enough."""


def _stride(n: int) -> int:
    return max(n // SAMPLE, SAMPLE_STRIDE)


def sample_positions(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The strided sample `sample_cut` reads of a segment of n > 4 * SAMPLE elements."""
    return torch.arange(0, n, _stride(n), device=device)


def cut_from_sample(sample: torch.Tensor, n: int, k: int, depth: float) -> torch.Tensor:
    """`sample_cut` of a large segment from the magnitudes at its `sample_positions` alone."""
    expected = k / n * sample.numel()
    rank = min(sample.numel(), int(depth * expected + 4.0 * expected**0.5 + 16))
    return kth_smallest(sample, sample.numel() - rank + 1)


def sample_cut(magnitude: torch.Tensor, k: int, depth: float) -> torch.Tensor:
    """A magnitude about ``depth * k`` elements deep into ``magnitude`` (0-d tensor), read off a
    strided sample when the tensor is large (above 4 * SAMPLE elements), exactly otherwise.

    The rank asked of the sample is raised by four standard deviations plus 16, so the cut lies
    below the k-th largest with high probability; callers check that it does.
    """
    n = magnitude.numel()
    if n > 4 * SAMPLE:
        return cut_from_sample(magnitude[:: _stride(n)], n, k, depth)
    rank = min(n, int(depth * k) + 16)
    return kth_smallest(magnitude, n - rank + 1)


CANDIDATE_DEPTH = 1.25
"""How deep below the k-th largest (in multiples of k) the sample's cut for candidates is aimed."""

NEXT_CUT_DEPTH = 1.25
NEXT_CUT_LOWER = 0.95
"""A cut predicted for the next merge sits NEXT_CUT_DEPTH * k elements deep into this merge's
magnitudes, times NEXT_CUT_LOWER: magnitudes drift between steps, and a cut that leaves fewer
than k candidates costs a whole-segment selection, while extra candidates cost little."""


def next_cut(magnitude: torch.Tensor, k: int) -> float:
    """The cut for a segment's next merge, from the magnitudes this merge's selection read (all
    of the segment, or its candidates: then the cut is at most a little below this one's and
    settles at about 1.4 k candidates). Rounded to float32, so that a float32 comparison uses
    exactly the cut its proof uses. Only a speed hint: any cut gives the same top k."""
    return float(numpy.float32(float(sample_cut(magnitude, k, NEXT_CUT_DEPTH)) * NEXT_CUT_LOWER))


def _candidates(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of a superset of the top k, found from a strided sample (no full sort or select).

    The sample's quantile a little below the target puts the cut safely under the k-th largest;
    one compare-and-compact pass then leaves about 1.3 k candidates. If the sample misjudged (fewer
    than k survive) every position is a candidate, so the result is exact either way.
    """
    n = magnitude.numel()
    if n <= 4 * SAMPLE:
        return torch.arange(n, device=magnitude.device)
    candidates = positions(magnitude, ">=", float(sample_cut(magnitude, k, CANDIDATE_DEPTH)))
    if candidates.numel() < k:
        return torch.arange(n, device=magnitude.device)
    return candidates


@dataclass(frozen=True)
class Candidates:
    """Positions offered as holding a segment's top k, with a proof obligation: every position
    left out has a magnitude below ``bound``. They hold the top k when at least k are offered and
    the k-th largest of them is at least ``bound`` (`top_k_among` checks both)."""

    positions: torch.Tensor
    """Sorted ascending (int64)."""
    bound: float
    values: torch.Tensor | None = None
    """The update at ``positions``, bit for bit `Update.at(positions)`, where the producer had it at
    hand (read while its memory was in cache); None: the engine gathers it."""


def _top_k(magnitude: torch.Tensor, k: int, global_index: IndexMap) -> tuple[torch.Tensor, float]:
    """``above_threshold(magnitude, top_k_threshold(...))`` for 1 <= k < numel, and the k-th
    largest magnitude. Where exactly k elements reach the k-th largest (no tie across it, the
    common case) they are the result, without the tie-break's passes."""
    value = float(kth_smallest(magnitude, magnitude.numel() - k + 1))
    kept = positions(magnitude, ">=", value)
    if kept.numel() == k:
        return kept, value
    threshold = top_k_threshold(magnitude, k, global_index)
    return above_threshold(magnitude, threshold, global_index), threshold.magnitude


def top_k_among(magnitude: torch.Tensor, candidates: Candidates, k: int, global_index: IndexMap) -> torch.Tensor | None:
    """`top_k_positions` of the whole segment, taken among ``candidates`` alone, whose magnitudes
    are ``magnitude``, as indices into the candidates (``candidates.positions[result]`` are the
    positions); None when the candidates cannot be proven to hold the whole top k."""
    offered = candidates.positions
    if offered.numel() < k:
        return None
    if k == offered.numel():
        chosen, kth = torch.arange(k, device=offered.device), float(magnitude.min())
    else:
        chosen, kth = _top_k(magnitude, k, lambda pos: global_index(offered[pos]))
    # Every element left out is below the bound; if the k-th largest offered is not, none of them
    # can be in the top k, and the tie-break among equal magnitudes is decided among the offered.
    return chosen if kth >= candidates.bound else None


def top_k_positions(magnitude: torch.Tensor, k: int, global_index: IndexMap) -> torch.Tensor:
    """Positions of the k largest magnitudes, ties to the lower global index (sorted)."""
    if k < 1 or k >= magnitude.numel():
        return torch.arange(magnitude.numel(), device=magnitude.device)
    candidates = _candidates(magnitude, k)
    return gather(candidates, _top_k(gather(magnitude, candidates), k, lambda pos: global_index(candidates[pos]))[0])


@dataclass(frozen=True)
class TensorTopK:
    """A tensor's top-k threshold, found over all its pieces on all ranks (`merging.select`)."""

    threshold: TopKThreshold | None
    """None: every element of the tensor is kept (k < 1 or k >= numel)."""


def ties_positions(
    magnitude: torch.Tensor,
    keep_rate: float,
    scope: str,
    coords: "ShardCoords",
    name: str,
    tensor_top_k: TensorTopK | None = None,
) -> torch.Tensor:
    """TIES keep-positions of a segment: top-p over the segment ('shard') or the whole tensor ('tensor').

    With 'tensor' on a piece of a tensor, the tensor's threshold comes from all its pieces
    (``tensor_top_k``, found by `merging.select.tensor_thresholds`); a segment holding the whole
    tensor finds it alone.
    """
    if tensor_top_k is not None:
        return above_threshold(magnitude, tensor_top_k.threshold, coords.global_index)
    if scope == "tensor" and coords.numel != coords.global_numel:
        raise ValueError(f"{name!r}: ties_scope='tensor' on a shard needs the process group holding the tensor's pieces (a TensorGroup in its Segment)")
    return top_k_positions(magnitude, top_k_count(coords.numel, keep_rate), coords.global_index)


def dare_rescale(values: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Inverted-dropout scaling: E[F(x)] = x."""
    return values / keep_rate


def l1_rescale(values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Scale the kept values to the dense update's L1 norm, then clamp to [-1, 1] (reference option)."""
    kept_norm = values.abs().sum()
    if kept_norm == 0:
        return values
    return (values * (dense.abs().sum() / kept_norm)).clamp_(-1.0, 1.0)
