"""Run a function in N gloo processes (real torch.distributed, CPU)."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
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
