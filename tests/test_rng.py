"""Keep-masks: Philox bits, Bernoulli statistics, and independence from the sharding."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from onmerge_megatron.merging import rng
from onmerge_megatron.merging.coords import Block, ShardCoords


def words(counter, key):
    return [int(w) for w in rng.philox4x32([torch.tensor([c]) for c in counter], key)]


def test_philox_known_answers():
    # Known-answer vectors of Philox-4x32-10 published with Random123 (kat_vectors).
    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1
    ]


def test_philox_matches_triton():
    """The CPU generator gives the bits Triton's tl.philox draws (checked in Triton's interpreter)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from onmerge_megatron.merging import rng

        @triton.jit
        def kernel(out, seed, n):
            offs = tl.arange(0, 128)
            c = offs.to(tl.uint32)
            a, b, cc, d = tl.philox(seed, c, c * 3, c + 7, c ^ 5, 10)
            tl.store(out + offs, a.to(tl.int64) & 0xFFFFFFFF, mask=offs < n)
            tl.store(out + 128 + offs, d.to(tl.int64) & 0xFFFFFFFF, mask=offs < n)

        seed = 0x1234567890ABCDEF
        out = torch.zeros(256, dtype=torch.int64)
        kernel[(1,)](out, seed, 128)
        c = torch.arange(128)
        ours = rng.philox4x32([c, c * 3, c + 7, c ^ 5], (seed & 0xFFFFFFFF, seed >> 32))
        assert torch.equal(out[:128], ours[0]) and torch.equal(out[128:], ours[3]), "mismatch"
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "mismatch" not in done.stderr:
        pytest.skip(f"Triton interpreter unavailable here: {done.stderr.strip().splitlines()[-1:]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("keep_rate", [1e-3, 0.01, 0.3, 0.9])
def test_keep_rate(keep_rate):
    n = 1 << 22
    kept = rng.keep_positions(3, "w", 1, rng.STREAM_UPDATE, ShardCoords.full((n,)), keep_rate)
    sigma = math.sqrt(n * keep_rate * (1 - keep_rate))
    assert abs(kept.numel() - n * keep_rate) < 5 * sigma
    assert torch.all(kept[1:] > kept[:-1]) and kept[0] >= 0 and kept[-1] < n


def test_keep_all_at_rate_one():
    assert torch.equal(rng.keep_positions(0, "w", 1, 0, ShardCoords.full((10, 7)), 1.0), torch.arange(70))


def test_dare_is_unbiased_and_independent_over_steps():
    """E[F(x)] = x element by element: per-element keep counts over T steps are Binomial(T, p)."""
    n, steps, p = 20_000, 200, 0.05
    coords = ShardCoords.full((n,))
    counts = torch.zeros(n)
    for t in range(1, steps + 1):
        counts[rng.keep_positions(0, "w", t, rng.STREAM_UPDATE, coords, p)] += 1
    estimate = counts / (steps * p)  # mean of F_R(1) over steps, per element
    assert abs(estimate.mean().item() - 1.0) < 5 * math.sqrt((1 - p) / (p * n * steps))
    # Variance of a Binomial(T, p) count; correlated steps would inflate or deflate it.
    expected_var = steps * p * (1 - p)
    assert abs(counts.var().item() / expected_var - 1.0) < 5 * math.sqrt(2 / n)


def test_streams_names_steps_are_independent():
    n, p = 1 << 20, 0.1
    coords = ShardCoords.full((n,))
    base = rng.keep_positions(0, "w", 1, rng.STREAM_UPDATE, coords, p)
    others = [
        rng.keep_positions(0, "w", 2, rng.STREAM_UPDATE, coords, p),
        rng.keep_positions(0, "w", 1, rng.STREAM_REFERENCE, coords, p),
        rng.keep_positions(0, "w2", 1, rng.STREAM_UPDATE, coords, p),
        rng.keep_positions(1, "w", 1, rng.STREAM_UPDATE, coords, p),
    ]
    for other in others:
        overlap = torch.isin(base, other).sum().item()
        assert abs(overlap - n * p * p) < 5 * math.sqrt(n * p * p)


def test_same_key_same_mask():
    coords = ShardCoords.full((5000,))
    assert torch.equal(rng.keep_positions(7, "a", 3, 0, coords, 0.2), rng.keep_positions(7, "a", 3, 0, coords, 0.2))


LAYOUTS = {
    # A ZeRO-style uneven flat partition.
    "flat": lambda shape: [ShardCoords.flat_range(shape, a, b) for a, b in [(0, 1), (1, 70_001), (70_001, 90_000 + 7), (90_007, 300 * 1000)]],
    # Tensor-parallel column split (row-parallel linear), each split again into flat DP ranges.
    "tp_columns": lambda shape: [
        ShardCoords.block(shape, (300, 500), (0, c), a, b) for c in (0, 500) for a, b in [(0, 77_777), (77_777, 150_000)]
    ],
    # Gated MLP fc1: local tensor = [gate rows of rank r; up rows of rank r] of the global [gate; up].
    "gated_fc1": lambda shape: [
        ShardCoords(shape, (Block(0, (75, 1000), (75 * r, 0)), Block(75_000, (75, 1000), (150 + 75 * r, 0))), a, b)
        for r in (0, 1)
        for a, b in [(0, 100_000), (100_000, 150_000)]
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_masks_do_not_depend_on_sharding(layout):
    shape = (300, 1000)
    whole = set(rng.keep_positions(1, "w", 5, 0, ShardCoords.full(shape), 0.02).tolist())
    pieces = LAYOUTS[layout](shape)
    union = []
    for coords in pieces:
        local = rng.keep_positions(1, "w", 5, 0, coords, 0.02)
        union.extend(coords.global_index(local).tolist())
    assert len(union) == len(set(union))
    assert set(union) == whole


@pytest.mark.parametrize("batch_words", [rng.ROWS_PER_BATCH_WORDS, 1])
def test_many_draws_at_once_equal_each_drawn_alone(batch_words, monkeypatch):
    """The batched draw of a step equals drawing each segment alone, whatever the mix of names,
    steps, streams and layouts (including shards that hold nothing and multi-block spans), in one
    batch or (batch_words=1) one batch per draw."""
    monkeypatch.setattr(rng, "ROWS_PER_BATCH_WORDS", batch_words)
    shape = (300, 1000)
    draws = [rng.MaskDraw(3, "big", 7, rng.STREAM_UPDATE, ShardCoords.full((4, 70_000)))]
    draws += [rng.MaskDraw(1, f"w{i % 3}", 5 + i, i % 2, coords) for layout in sorted(LAYOUTS) for i, coords in enumerate(LAYOUTS[layout](shape))]
    draws += [rng.MaskDraw(2, "empty", 1, 0, ShardCoords.flat_range((10, 10), 40, 40)), rng.MaskDraw(2, "tiny", 1, 1, ShardCoords.full((3,)))]
    together = rng.keep_positions_many(draws, 0.02)
    alone = [rng.keep_positions(d.seed, d.name, d.step, d.stream, d.coords, 0.02) for d in draws]
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]
    assert sum(t.numel() for t in together) > 1000


def test_draws_that_hold_nothing():
    empty = [rng.MaskDraw(0, "e", 1, 0, ShardCoords.flat_range((10, 10), 40, 40)), rng.MaskDraw(0, "z", 1, 0, ShardCoords.full((0,)))]
    assert [t.numel() for t in rng.keep_positions_many(empty, 0.1)] == [0, 0]
    assert rng.keep_positions_many([], 0.1) == []
