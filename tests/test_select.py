"""Exact per-tensor top-k over pieces held by any ranks (merging/select.py) on real gloo processes,
against `top_k_threshold` / `top_k_positions` on each whole tensor in one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from onmerge_megatron.merging.coords import ShardCoords
from onmerge_megatron.merging.select import RADIX_BITS, Piece, tensor_thresholds
from onmerge_megatron.merging.sparsify import above_threshold, top_k_positions, top_k_threshold

from distributed import run_distributed


def identity(pos):
    return pos


def make_tensors() -> list[torch.Tensor]:
    """The same magnitudes on every rank: exact ties in most, bf16 and fp32."""
    gen = torch.Generator().manual_seed(7)
    return [
        torch.randint(0, 5, (12, 50), generator=gen).float(),  # integers: ties everywhere
        torch.full((600,), 1e-3, dtype=torch.bfloat16),  # Adam's first step: every |update| equals lr
        torch.randn(16, 40, generator=gen).abs().mul(4).round().div(4),  # TP column blocks, ties
        torch.randint(0, 3, (40,), generator=gen).float(),  # a layer norm, replicated over TP
        torch.randn(1000, generator=gen).abs(),  # no ties
        torch.randint(0, 6, (30, 20), generator=gen).to(torch.bfloat16),
        torch.tensor([3.0]),  # one element: never selected
    ]


def flat_cuts(numel: int, world: int) -> list[int]:
    """Uneven cut points of a flat range into 2 * world chunks, one of them empty."""
    cuts = [numel * i * i // (2 * world) ** 2 for i in range(2 * world + 1)]
    cuts[1] = cuts[0]  # chunk 0 is empty
    return cuts


def layout(tensor: int, shape: tuple[int, ...], rank: int, world: int) -> list[tuple[ShardCoords, bool]]:
    """This rank's pieces of a tensor, each (coords, counted)."""
    numel = math.prod(shape)
    tp, dp, dp_size = rank % 2, rank // 2, world // 2
    if tensor in (0, 4):  # flat ranges: chunks r and 2W-1-r, two non-adjacent pieces (rank 0's first is empty)
        cuts = flat_cuts(numel, world)
        return [(ShardCoords.flat_range(shape, cuts[c], cuts[c + 1]), True) for c in (rank, 2 * world - 1 - rank)]
    if tensor == 1:  # held whole by the last rank, nothing elsewhere
        return [(ShardCoords.full(shape), True)] if rank == world - 1 else []
    if tensor == 2:  # TP=2 column blocks, each a flat DP range of the block (uneven)
        block = (shape[0], shape[1] // 2)
        cuts = [0, 150, 320][:: 2 if dp_size == 1 else 1]
        return [(ShardCoords.block(shape, block, (0, tp * block[1]), cuts[dp], cuts[dp + 1]), True)]
    if tensor == 3:  # replicated over TP, DP ranges; TP rank 0 counts
        cuts = [0, 17, 40][:: 2 if dp_size == 1 else 1]
        return [(ShardCoords.flat_range(shape, cuts[dp], cuts[dp + 1]), tp == 0)]
    if tensor == 5:  # row blocks (FSDP-like), 30 rows over the ranks
        rows = [30 * r // world for r in range(world + 1)]
        return [(ShardCoords.block(shape, (rows[rank + 1] - rows[rank], shape[1]), (rows[rank], 0)), True)]
    return [(ShardCoords.full(shape), True)] if rank == 0 else []


def k_cases(numel: int) -> list[int]:
    return [0, 1, numel - 1, numel, numel // 20, numel * 3 // 10]


def counting_all_reduce(log: list[int]):
    """dist.all_reduce, recording each call's payload in bytes."""

    def all_reduce(tensor, **kwargs):
        log.append(tensor.numel() * tensor.element_size())
        return dist.all_reduce(tensor, **kwargs)

    return all_reduce


def my_pieces(tensors: list[torch.Tensor], rank: int, world: int, copies: int = 1) -> list[tuple[Piece, ShardCoords]]:
    """This rank's pieces of ``copies`` repetitions of the tensor list (tensor ids continue)."""
    out = []
    for copy in range(copies):
        for t, full in enumerate(tensors):
            for coords, counted in layout(t, tuple(full.shape), rank, world):
                magnitude = coords.gather(full)
                piece = Piece(copy * len(tensors) + t, lambda m=magnitude: m, coords.global_index, counted)
                out.append((piece, coords))
    return out


def _select_job(rank: int, world: int) -> dict:
    tensors = make_tensors()
    numels = [t.numel() for t in tensors]
    calls = [[k_cases(n)[case] for n in numels] for case in range(len(k_cases(1)))]
    calls.append([k_cases(n)[t % 6] for t, n in enumerate(numels)])  # mixed
    calls.append([50 if t == 4 else 0 for t in range(len(numels))])  # no ties: every tie kept, one max-reduction
    pieces = my_pieces(tensors, rank, world)
    results = []
    for ks in calls:
        log: list[int] = []
        thresholds = tensor_thresholds([p for p, _ in pieces], ks, numels, all_reduce=counting_all_reduce(log))
        kept = []  # per piece: (tensor, global indices held, global indices kept)
        for p, coords in pieces:
            positions = above_threshold(p.magnitude(), thresholds[p.tensor], p.global_index)
            held = coords.global_index(torch.arange(coords.numel))
            kept.append((p.tensor, held.tolist(), coords.global_index(positions).tolist()))
        results.append((ks, thresholds, kept, log))
    # Ten times the tensors: the same collectives, ten times the bytes.
    many: list[int] = []
    ten_times = [p for p, _ in my_pieces(tensors, rank, world, copies=10)]
    tensor_thresholds(ten_times, calls[4] * 10, numels * 10, all_reduce=counting_all_reduce(many))
    # A replica counted twice: every rank refuses, none hangs.
    doubled = [Piece(p.tensor, p.magnitude, p.global_index) for p, _ in pieces]
    try:
        tensor_thresholds(doubled, calls[4], numels)
        refused = None
    except ValueError as err:
        refused = str(err)
    return {"calls": results, "many": many, "refused": refused}


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2-ranks", "4-ranks"])
def select_run(request):
    return request.param, run_distributed(_select_job, request.param)


def _expected(full: torch.Tensor, k: int) -> tuple[object, set[int]]:
    magnitude = full.reshape(-1).float()  # bf16 -> float32 is exact
    return top_k_threshold(magnitude, k, identity), set(top_k_positions(magnitude, k, identity).tolist())


def test_thresholds_and_kept_sets_equal_whole_tensor(select_run):
    world, per_rank = select_run
    tensors = make_tensors()
    for call in range(len(per_rank[0]["calls"])):
        ks = per_rank[0]["calls"][call][0]
        for t, full in enumerate(tensors):
            threshold, kept = _expected(full, ks[t])
            union: set[int] = set()
            for rank_result in per_rank:
                _, thresholds, pieces, _ = rank_result["calls"][call]
                assert thresholds[t] == threshold, (world, ks[t], t)
                for tensor, held, kept_here in (p for p in pieces if p[0] == t):
                    # Each piece, replicas included, keeps exactly its share of the whole tensor's top k.
                    assert kept_here == sorted(kept & set(held)), (world, ks[t], t)
                    union |= set(kept_here)
            assert union == kept, (world, ks[t], t)


def expected_collectives(tensors: list[torch.Tensor], ks: list[int]) -> list[int]:
    """Payload bytes of each all-reduce of a call, derived from the whole tensors: four magnitude
    rounds of [S, 256] int64 counts (S tensors with 1 <= k < n), then one max of S int64 when every
    tensor keeps all elements equal to its k-th largest, else the rounds of the index select."""
    selected = [(full.reshape(-1).float(), k) for full, k in zip(tensors, ks) if 1 <= k < full.numel()]
    if not selected:
        return []
    histogram = len(selected) * (1 << RADIX_BITS) * 8
    keeps_all_ties = all(int((m >= torch.kthvalue(m, m.numel() - k + 1).values).sum()) == k for m, k in selected)
    if keeps_all_ties:
        return [histogram] * 4 + [len(selected) * 8]
    index_bits = (max(m.numel() for m, _ in selected) - 1).bit_length()
    return [histogram] * (4 + math.ceil(index_bits / RADIX_BITS))


def test_collectives_are_bounded_and_independent_of_tensor_count(select_run):
    _, per_rank = select_run
    tensors = make_tensors()
    paths = set()
    for rank_result in per_rank:
        for ks, _, _, log in rank_result["calls"]:
            assert log == expected_collectives(tensors, ks), ks
            # At most 4 + ceil(log2(1000) / 8) = 6, whatever the number of tensors.
            assert len(log) <= 6
            paths.add(len(log))
        # Ten times the tensors: the same collectives, each ten times the bytes.
        ks = rank_result["calls"][4][0]
        assert rank_result["many"] == [10 * b for b in expected_collectives(tensors, ks)]
    assert paths == {0, 5, 6}  # no tensor selected; every tie kept; index tie-break


def test_pieces_counted_twice_are_refused_on_every_rank(select_run):
    _, per_rank = select_run
    for rank_result in per_rank:
        assert rank_result["refused"] == (
            "tensor_thresholds: tensor 3: the counted pieces hold 80 elements, expected 40 "
            "(counted pieces must cover each tensor exactly once, magnitudes non-negative)"
        )


def test_a_tensor_no_rank_offers_is_left_out_of_this_call():
    """An optimizer stepping its tensors in sub-groups (ZeRO-3) selects each sub-group in its own
    call: a tensor nobody offers gets no threshold; the others are exact, in one process."""
    tensors = make_tensors()
    offered = [0, 2, 4]
    pieces = [Piece(t, lambda x=tensors[t]: x.reshape(-1), identity) for t in offered]
    numels = [x.numel() for x in tensors]
    ks = [max(1, n // 10) for n in numels]
    got = tensor_thresholds(pieces, ks, numels, all_reduce=lambda *args, **kwargs: None)
    for t, x in enumerate(tensors):
        expected = top_k_threshold(x.reshape(-1).float(), ks[t], identity) if t in offered else None
        assert got[t] == expected, t
    # A tensor offered in part is refused (every rank sees the same sums, so every rank refuses).
    half = [Piece(0, lambda x=tensors[0]: x.reshape(-1)[:100], identity)]
    with pytest.raises(ValueError, match="tensor 0: the counted pieces hold 100 elements, expected 600"):
        tensor_thresholds(half, ks, numels, all_reduce=lambda *args, **kwargs: None)
