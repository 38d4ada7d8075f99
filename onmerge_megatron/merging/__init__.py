"""The merge engine: plain tensors only, no framework imports.

Read in this order: config (the settings), coords (where a shard's elements sit in the full
tensor), rng (counter-based keep-masks), sparsify (DARE and TIES sparsifiers), consensus (linear
and sign consensus), reference (how the reference delta is stored), merger (one merged step).
"""

from .config import MergeCheckpointError, OnlineMergeConfig, check_compatible
from .coords import Block, ShardCoords
from .merger import DenseUpdate, MergeStats, merge_segment
from .reference import ReferenceDelta

__all__ = [
    "Block",
    "DenseUpdate",
    "MergeCheckpointError",
    "MergeStats",
    "OnlineMergeConfig",
    "ReferenceDelta",
    "ShardCoords",
    "check_compatible",
    "merge_segment",
]
