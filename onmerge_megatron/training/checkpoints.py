"""Checkpoint directories a run can trust: published whole, checksummed, never rewritten.

Layout of ``run.output_dir``::

    .lock                       held (flock) by the run's rank 0 while it runs: host, pid, start time
    checkpoints/
        step_0000040/           a published checkpoint: megatron dist checkpoint + manifest.json
        step_0000050.partial/   being written; never read, removed by the next save
        latest                  the newest published checkpoint's name (replaced atomically)

A checkpoint is written under ``<name>.partial``, its files are hashed (SHA-256, spread over the
ranks) into ``manifest.json``, and only then is the directory renamed to its final name and
``latest`` replaced: a kill at any moment leaves the previous checkpoint and ``latest`` intact.
A published checkpoint is never written again. At load every file is checked against the
manifest first; a damaged checkpoint is named, moved aside as ``<name>.damaged``, and the run
falls back to the newest intact one.

The writer processes that megatron's dist_checkpointing forks are watched while they write
(``processes.run_watching_children``): one that dies makes the save an error within a second
instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
import warnings
from typing import Any, Callable, Iterator

import torch.distributed as dist

from ..processes import HelperProcessError, run_watching_children

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
DAMAGED_SUFFIX = ".damaged"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, unreadable, or cannot be written; the message names it."""


class RunLockedError(RuntimeError):
    """Another run holds the output directory."""


# --------------------------------------------------------------------------- atomic files


def fsync_dir(path: str) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``,
    so readers see the old content or the new, never a part. On error nothing is replaced."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_replace_dir(src: str, dst: str) -> None:
    """Put directory ``src`` at ``dst``; an existing ``dst`` is swapped out first and removed only
    after ``src`` is in place (a kill in between leaves ``dst.old`` behind, never nothing)."""
    old = dst + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
    if os.path.exists(old):
        shutil.rmtree(old)


# --------------------------------------------------------------------------- manifest


def _relative_files(directory: str) -> list[str]:
    files = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                files.append(rel)
    return sorted(files)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    rank, world = _distributed()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_manifest(directory: str) -> None:
    """Hash every file of a complete checkpoint (collective: ranks share the files) and write
    ``manifest.json`` (rank 0)."""
    rank, world = _distributed()
    files = _relative_files(directory)
    mine = {rel: {"bytes": os.path.getsize(os.path.join(directory, rel)), "sha256": file_sha256(os.path.join(directory, rel))}
            for rel in files[rank::world]}
    entries: dict[str, Any] = {}
    for part in _gather(mine):
        entries.update(part)
    manifest = {"format": 1, "files": dict(sorted(entries.items()))}
    if rank == 0:
        atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def verify_checkpoint(directory: str) -> list[str] | None:
    """Problems found by checking ``directory`` against its manifest (collective: every rank gets
    the same list): empty when intact, None when there is no manifest to check against."""
    rank, world = _distributed()
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
        if not isinstance(entries, dict):
            raise ValueError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} is unreadable ({exc})"]
    problems: list[str] = []
    for rel in sorted(entries)[rank::world]:
        expected = entries[rel]
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel}: missing")
            continue
        size = os.path.getsize(full)
        if size != expected["bytes"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)")
            continue
        digest = file_sha256(full)
        if digest != expected["sha256"]:
            problems.append(f"{rel}: SHA-256 {digest[:12]}... differs from the manifest's {expected['sha256'][:12]}... (corrupted)")
    if rank == 0:
        extra = sorted(set(_relative_files(directory)) - set(entries))
        problems += [f"{rel}: not in the manifest (added after the save)" for rel in extra]
    return sorted(p for part in _gather(problems) for p in part)


def brief(exc: BaseException) -> str:
    """An error's type and the last line of its text, where torch's long per-rank reports state the
    cause. Advice to load with weights_only=False is dropped: for a damaged file it is wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1][:300] if lines else ""
    return type(exc).__name__ + (f": {last}" if last and "weights_only" not in last else "")


def _summary(problems: list[str]) -> str:
    return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")


def require_intact(directory: str, what: str, log: Callable[[str], None]) -> None:
    """Raise CheckpointError naming ``directory`` and its bad files unless it matches its manifest
    (collective). A directory without a manifest (written by other tools) is loaded unverified."""
    problems = verify_checkpoint(directory)
    if problems is None:
        log(f"{what}: {directory} has no {MANIFEST}; its files cannot be verified before loading")
    elif problems:
        raise CheckpointError(f"{what}: checkpoint {directory} is damaged: {_summary(problems)}")


# --------------------------------------------------------------------------- the checkpoints of a run


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def published_steps(root: str) -> list[tuple[int, str]]:
    """(step, directory) of every published checkpoint under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() and os.path.isdir(os.path.join(root, name)):
            out.append((int(name[len(STEP_PREFIX):]), os.path.join(root, name)))
    return sorted(out, reverse=True)


def read_latest(root: str) -> str | None:
    """The directory ``latest`` names, or None when there is no ``latest`` file."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    return os.path.join(root, name) if name else None


def write_latest(root: str, directory: str) -> None:
    atomic_write_text(os.path.join(root, LATEST), os.path.basename(directory) + "\n")


def set_aside_damaged(directory: str) -> str:
    """Rename a damaged checkpoint so that it is never loaded or overwritten (kept for inspection)."""
    target = directory + DAMAGED_SUFFIX
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{directory}{DAMAGED_SUFFIX}{n}"
    os.rename(directory, target)
    return target


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def publish_checkpoint(final: str, write: Callable[[str], None], what: str) -> None:
    """Have every rank ``write(directory)`` into ``<final>.partial``, hash it into a manifest, and
    rename it to ``final`` (collective). ``final`` appears whole or not at all; a partial directory
    left by a killed save is removed first (it was never published, so nothing reads it)."""
    rank, _ = _distributed()
    if os.path.exists(final):
        raise CheckpointError(f"{what}: {final} exists; a checkpoint is never rewritten")
    partial = final + PARTIAL_SUFFIX
    if rank == 0:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    _barrier()
    try:
        run_watching_children(lambda: write(partial), what)
    except (HelperProcessError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # e.g. the disk is full (torch's CheckpointException is a BaseException)
        raise CheckpointError(f"{what} failed, nothing was published ({brief(exc)})") from exc
    _barrier()
    write_manifest(partial)
    if rank == 0:
        os.rename(partial, final)
        fsync_dir(os.path.dirname(os.path.abspath(final)))
    _barrier()


def find_resume_checkpoint(root: str, log: Callable[[str], None]) -> str | None:
    """The newest intact published checkpoint under ``root`` (collective), or None if there is
    none at all. A damaged one is named and set aside (``<name>.damaged``), and the next newest is
    tried; raises CheckpointError when checkpoints exist but none is intact, rather than silently
    starting over."""
    rank, _ = _distributed()
    latest = read_latest(root)
    candidates = [d for _, d in published_steps(root)]
    if latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)  # what the last run published comes first
    damaged = []
    for directory in candidates:
        problems = verify_checkpoint(directory)
        if problems is None:
            log(f"WARNING: checkpoint {directory} has no {MANIFEST} (written by an older version); loading it unverified")
            return directory
        if not problems:
            if damaged:
                log(f"WARNING: resuming from {directory}, the newest intact checkpoint")
            return directory
        moved = directory + DAMAGED_SUFFIX
        if rank == 0:
            moved = set_aside_damaged(directory)
        _barrier()
        log(f"WARNING: checkpoint {directory} is damaged and will not be used ({_summary(problems)}); moved to {moved}")
        damaged.append(directory)
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint under {root}: {', '.join(damaged)} failed verification (moved aside as *{DAMAGED_SUFFIX}); "
            f"restore a good copy, or start a new run.output_dir"
        )
    return None


def prune_checkpoints(root: str, keep_last: int, protect: str) -> list[str]:
    """Remove all but the newest ``keep_last`` published checkpoints (never ``protect``). Each is
    renamed out of the checkpoint namespace before removal, so a kill midway never leaves a
    half-deleted directory that looks like a checkpoint."""
    removed = []
    for _, directory in published_steps(root)[keep_last:]:
        if os.path.abspath(directory) == os.path.abspath(protect):
            continue
        doomed = os.path.join(root, f".removing-{os.path.basename(directory)}")
        os.rename(directory, doomed)
        shutil.rmtree(doomed)
        removed.append(directory)
    return removed


# --------------------------------------------------------------------------- the run lock


class RunLock:
    """An exclusive lock on an output directory for the lifetime of a run (flock on ``.lock``,
    released by the kernel when the process ends, so a killed run leaves no stale lock)."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                warnings.warn(f"could not lock {self.path} ({exc}); this filesystem does not support flock, so a "
                              f"second run on the same output_dir would not be detected")
                return
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown holder"
            os.close(fd)
            raise RunLockedError(
                f"run.output_dir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to end, "
                f"or choose another run.output_dir"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
