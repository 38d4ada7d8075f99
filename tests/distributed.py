"""Run a function in N gloo processes (real torch.distributed, CPU)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A matrix product's summation order, and so its bits, depends on the intra-op thread count: ranks
# compared bit for bit with a single-process reference run with this many, and the reference too
# (torch_threads), whatever count the test process was left with.
THREADS = 1


@contextmanager
def torch_threads(threads: int = THREADS) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call fn(rank, world_size, *args) in world_size processes; return each rank's result."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(fn, world_size, free_port(), args, results), nprocs=world_size, join=True)
        return [results[r] for r in range(world_size)]
