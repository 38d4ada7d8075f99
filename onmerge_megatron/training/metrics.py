"""Metrics out: a progress line with rate and ETA, JSONL records, TensorBoard scalars.

Only the process that calls with `enabled=True` (rank 0 by convention) writes anything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """Appends to ``metrics.jsonl`` (and TensorBoard), one record per split and step. A run resumed
    at ``resume_step`` first drops the records after that step (they belong to the session that
    was cut short and are written again); a run starting afresh (``resume_step=None``) drops all."""

    def __init__(self, output_dir: str, total_steps: int, enabled: bool, tensorboard: bool = True, prefix: str = "",
                 resume_step: int | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.prefix = prefix
        self.jsonl = None
        self.tb = None
        self._t0 = time.time()
        self._first_step: int | None = None
        self._logged: set[tuple[str, int]] = set()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.isfile(path):
            self._logged = _keep_records_up_to(path, -1 if resume_step is None else resume_step)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of the cut-short session from TensorBoard likewise.
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=0 if resume_step is None else resume_step + 1)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, split: str, step: int, values: Mapping[str, Any]) -> None:
        """Append one record {"split", "step", "time", **values} and mirror scalars to TensorBoard.
        A (split, step) already recorded (e.g. the evaluation of the step a run resumed at) is not repeated."""
        if not self.enabled or (split, step) in self._logged:
            return
        self._logged.add((split, step))
        record = {"split": split, "step": step, "time": round(time.time() - self._t0, 3)}
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    self.tb.add_scalar(f"{split}/{key}", float(value), step)

    def progress(self, step: int, values: Mapping[str, float], keys: tuple[str, ...]) -> None:
        """One line: step/total, chosen metrics, steps per second and ETA (from this session's start)."""
        if not self.enabled:
            return
        now = time.time()
        if self._first_step is None:
            self._first_step, self._t_first = step - 1, self._t0
        done = step - self._first_step
        rate = done / max(now - self._t_first, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        parts = [f"{self.prefix}step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for key in keys:
            if key in values:
                value = values[key]
                parts.append(f"{key} {value:.3e}" if key == "lr" else f"{key} {value:.4f}")
        parts.append(f"{rate:.2f} it/s")
        parts.append(f"eta {format_duration(eta)}")
        print(" | ".join(parts), flush=True)
        sys.stdout.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _keep_records_up_to(path: str, step: int) -> set[tuple[str, int]]:
    """Rewrite ``path`` (atomically) without the records after ``step``, and without a torn last
    line; return the (split, step) pairs it keeps."""
    from .checkpoints import atomic_write_text

    kept, keys = [], set()
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            key = (record.get("split"), record.get("step"))
            if isinstance(key[1], int) and key[1] <= step and key not in keys:
                keys.add(key)
                kept.append(json.dumps(record) + "\n")
    atomic_write_text(path, "".join(kept))
    return keys


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
