"""Sparsifiers, each a small function on plain tensors.

Random (DARE) keep-masks come from `rng.keep_positions`; this module adds the magnitude top-k of
TIES, with a deterministic tie-break: elements are ordered by (|x| descending, global index
ascending) and the first k are kept. Adam's first step makes every |update| equal to lr, so
without that rule the kept set would depend on the sorting algorithm and on the sharding.
Selection uses `kthvalue` (a linear-time quickselect), never a full sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

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
    value = torch.kthvalue(magnitude, n - k + 1).values
    need = k - int((magnitude > value).sum())
    ties = torch.nonzero(magnitude == value).squeeze(1)
    tie_index = global_index(ties)
    index = tie_index.max() if need >= ties.numel() else torch.kthvalue(tie_index, need).values
    return TopKThreshold(float(value), int(index))


def above_threshold(magnitude: torch.Tensor, threshold: TopKThreshold | None, global_index: IndexMap) -> torch.Tensor:
    """Positions kept by a threshold (sorted); all positions when the threshold is None."""
    if threshold is None:
        return torch.arange(magnitude.numel(), device=magnitude.device)
    kept = torch.nonzero(magnitude >= threshold.magnitude).squeeze(1)
    tie = magnitude[kept] == threshold.magnitude
    if tie.any():
        kept = kept[~tie | (global_index(kept) <= threshold.index)]
    return kept


_SAMPLE = 1 << 14


def _candidates(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of a superset of the top k, found from a strided sample (no full sort or select).

    The sample's quantile a little below the target puts the cut safely under the k-th largest;
    one compare-and-compact pass then leaves about 1.3 k candidates. If the sample misjudged (fewer
    than k survive) every position is a candidate, so the result is exact either way.
    """
    n = magnitude.numel()
    if n <= 4 * _SAMPLE:
        return torch.arange(n, device=magnitude.device)
    sample = magnitude[:: n // _SAMPLE]
    expected = k / n * sample.numel()
    rank = min(sample.numel(), int(1.25 * expected + 4.0 * expected**0.5 + 16))
    cut = torch.kthvalue(sample, sample.numel() - rank + 1).values
    candidates = torch.nonzero(magnitude >= cut).squeeze(1)
    if candidates.numel() < k:
        return torch.arange(n, device=magnitude.device)
    return candidates


def top_k_positions(magnitude: torch.Tensor, k: int, global_index: IndexMap) -> torch.Tensor:
    """Positions of the k largest magnitudes, ties to the lower global index (sorted)."""
    if k < 1 or k >= magnitude.numel():
        return torch.arange(magnitude.numel(), device=magnitude.device)
    candidates = _candidates(magnitude, k)
    sub = magnitude[candidates]
    index_of_sub = lambda pos: global_index(candidates[pos])  # noqa: E731
    return candidates[above_threshold(sub, top_k_threshold(sub, k, index_of_sub), index_of_sub)]


Exchange = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Gathers (magnitudes, global indices) of candidates from every piece of a tensor."""


def _unique_first(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct indices and the position of one occurrence of each."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    first = torch.empty_like(unique).scatter_(0, inverse, torch.arange(indices.numel(), device=indices.device))
    return unique, first


def tensor_positions(magnitude: torch.Tensor, k: int, global_index: IndexMap, exchange: Exchange) -> torch.Tensor:
    """Positions of this piece's elements among the whole tensor's top k, the tensor split over ranks.

    The global top k lies inside the union of each piece's own top k, so each rank offers at most
    k candidates and every rank derives the same threshold from the gathered union. ``k`` is the
    tensor's, the same on every rank, so all ranks take the same branches and collectives.
    """
    if k < 1:  # the reference rule: nothing is masked
        return torch.arange(magnitude.numel(), device=magnitude.device)
    local = top_k_positions(magnitude, k, global_index)
    values, indices = exchange(magnitude[local], global_index(local))
    # Replicas (a rank holding the whole tensor beside others) offer the same elements twice.
    indices, first = _unique_first(indices)
    threshold = top_k_threshold(values[first], k, lambda pos: indices[pos])
    if threshold is None:  # k covers every candidate, so every candidate is kept
        return local
    index_of_local = lambda pos: global_index(local[pos])  # noqa: E731
    return local[above_threshold(magnitude[local], threshold, index_of_local)]


def ties_positions(
    magnitude: torch.Tensor,
    keep_rate: float,
    scope: str,
    coords: "ShardCoords",
    exchange: Exchange | None,
    name: str,
) -> torch.Tensor:
    """TIES keep-positions of a segment: top-p over the segment ('shard') or the whole tensor ('tensor').

    With 'tensor', whether to exchange depends only on whether a group is given, never on the size
    of this rank's piece: every rank of the group must take part, even one holding all or nothing.
    """
    if scope == "tensor" and exchange is not None:
        return tensor_positions(magnitude, top_k_count(coords.global_numel, keep_rate), coords.global_index, exchange)
    if scope == "tensor" and coords.numel != coords.global_numel:
        raise ValueError(f"{name!r}: ties_scope='tensor' on a shard needs the process group holding the tensor's pieces")
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
