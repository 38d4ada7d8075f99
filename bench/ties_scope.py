"""How far apart are OnTIES' per-shard and per-tensor top-p?

For weights cut into D equal flat pieces (how ZeRO and Megatron's distributed optimizer shard),
compares the elements kept by top-p over each piece with those kept by top-p over the whole
tensor. Two kinds of update: homogeneous (every element alike) and row-heterogeneous (each
output row scaled by a log-normal factor, as real layers have rows of very different scale).
Prints the fraction of the per-tensor kept set that per-shard top-p also keeps.
Run: python bench/ties_scope.py
"""

from __future__ import annotations

import argparse

import torch

from onmerge_megatron.merging.coords import ShardCoords
from onmerge_megatron.merging.sparsify import top_k_count, top_k_positions

SHAPES = {"attention (512x512)": (512, 512), "mlp up (1408x512)": (1408, 512), "embedding (32000x512)": (32000, 512)}


def kept_sets(magnitude: torch.Tensor, keep_rate: float, pieces: int) -> tuple[set, set]:
    n = magnitude.numel()
    whole = top_k_positions(magnitude.reshape(-1), top_k_count(n, keep_rate), lambda p: p)
    per_shard = []
    bounds = [n * i // pieces for i in range(pieces + 1)]
    for a, b in zip(bounds, bounds[1:]):
        coords = ShardCoords.flat_range(tuple(magnitude.shape), a, b)
        local = top_k_positions(coords.gather(magnitude), top_k_count(coords.numel, keep_rate), coords.global_index)
        per_shard.append(coords.global_index(local))
    return set(whole.tolist()), set(torch.cat(per_shard).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-rate", type=float, default=0.01)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"keep_rate p = {args.keep_rate}; cell = |per-shard kept ∩ per-tensor kept| / |per-tensor kept|\n")
    print("| tensor | update | D=2 | D=4 | D=8 |")
    print("|---|---|---:|---:|---:|")
    for label, shape in SHAPES.items():
        base = torch.randn(shape, generator=gen).abs()
        rows = torch.exp(torch.randn(shape[0], 1, generator=gen))
        for kind, magnitude in (("homogeneous", base), ("row scales ~ logN(0,1)", base * rows)):
            cells = []
            for pieces in (2, 4, 8):
                whole, shard = kept_sets(magnitude, args.keep_rate, pieces)
                cells.append(f"{len(whole & shard) / len(whole):.3f}")
            print(f"| {label} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
