"""Training runs under faults (torchrun, real megatron-core on CPU): damaged, truncated and zeroed
checkpoint files, relaunches, a second launch on the same directory, killed checkpoint writers
and ranks, resumes with changed settings, and gradients that are not finite. Each case asserts
the clear message (naming the checkpoint, file or key) and that nothing good was lost."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import torchrun_command
from onmerge_megatron.training.checkpoints import RunLock
from train_jobs import ROOT, dpo_config, metrics, torchrun, train, train_args

pytestmark = pytest.mark.slow

DARE_K2 = {"online": {"method": "dare", "keep_rate": 0.3, "alpha": 1e-3, "merge_every": 2}}


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest")


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def unique_records(out: Path) -> list[tuple[str, int]]:
    keys = [(r["split"], r["step"]) for r in metrics(str(out))]
    assert len(keys) == len(set(keys)), f"repeated records: {keys}"
    return keys


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------- damaged checkpoints


def test_bit_flips_in_the_latest_checkpoint_are_named_and_the_previous_one_is_used(tmp_path, tiny_base, tiny_other_base):
    """2 ranks, OnDARE with step-K: bits flipped in one .distcp of step 4. The relaunch names the
    checkpoint and the file, sets it aside and resumes from step 2; since resuming is exact, the
    replayed steps 3 and 4 log the very numbers of the first session."""
    out = tmp_path / "run"
    cfg = dpo_config(tiny_base, str(out), steps=6, merge={**DARE_K2, "base_hf_path": tiny_other_base},
                     run={"save_every": 2, "save_final": True})
    train(2, cfg, tmp_path, ["run.stop_at_step=4"])
    first = {r["step"]: r for r in metrics(str(out)) if r["split"] == "train"}
    step2, step4 = out / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000004"
    victim = max(step4.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    victim.write_bytes(bytes(data))

    proc = train(2, cfg, tmp_path)
    text = output(proc)
    assert f"checkpoint {step4} is damaged" in text and f"{victim.name}: SHA-256" in text
    assert f"moved to {step4}.damaged" in text
    assert f"resumed from {step2} at step 2" in text
    assert checkpoint_names(out) == ["step_0000002", "step_0000004", "step_0000004.damaged", "step_0000006"]
    assert latest(out) == "step_0000006"
    rows = {r["step"]: r for r in metrics(str(out)) if r["split"] == "train"}
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr", "rewards/margins", "merge/merged_norm"):
            assert rows[step][key] == first[step][key], (step, key)
    assert unique_records(out) == [("eval", 0)] + [("train", s) for s in range(1, 7)] + [("eval", 6)]


def test_truncated_empty_and_zeroed_files_name_the_checkpoint(tmp_path, tiny_base):
    """A truncated and an empty file in a converted model are caught by the manifest before
    loading; a checkpoint without a manifest (older versions) with a zeroed common.pt fails to
    load with a message that names it and calls it damaged (not torch's weights_only advice)."""
    converted = tmp_path / "converted"
    torchrun(1, ["-m", "onmerge_megatron.training.cli", "convert-hf", "--hf", tiny_base, "--out", str(converted)])
    assert (converted / "manifest.json").is_file()
    unverified = tmp_path / "unverified"
    shutil.copytree(converted, unverified)

    files = sorted(converted.glob("*.distcp"), key=lambda p: p.stat().st_size)
    truncated, emptied = files[-1], files[0]
    full_size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(full_size // 2)
    emptied_size = emptied.stat().st_size
    emptied.write_bytes(b"")
    model = {"load_format": "megatron", "megatron_load": str(converted)}
    proc = train(1, dpo_config(tiny_base, str(tmp_path / "a"), steps=4, model=model), tmp_path, check=False)
    text = output(proc)
    assert proc.returncode != 0
    assert f"model weights: checkpoint {converted} is damaged" in text
    assert f"{truncated.name}: {full_size // 2} bytes, the manifest says {full_size} (truncated or overwritten)" in text
    assert f"{emptied.name}: 0 bytes, the manifest says {emptied_size}" in text

    (unverified / "manifest.json").unlink()
    common = unverified / "common.pt"
    common.write_bytes(b"\0" * common.stat().st_size)
    model = {"load_format": "megatron", "megatron_load": str(unverified)}
    proc = train(1, dpo_config(tiny_base, str(tmp_path / "b"), steps=4, model=model), tmp_path, check=False)
    text = output(proc)
    assert proc.returncode != 0
    assert f"{unverified} has no manifest.json; its files cannot be verified" in text
    last = [line for line in text.splitlines() if "CheckpointError" in line][-1]
    assert f"checkpoint {unverified} could not be loaded: it is damaged" in last
    assert "weights_only" not in last


# --------------------------------------------------------------------------- relaunches and resumes


def test_relaunch_rewrites_nothing_and_resumes_say_which_settings_apply(tmp_path, tiny_base):
    """One rank. A finished run relaunched leaves its final checkpoint byte-for-byte alone;
    keep_last prunes; a partial directory left by a killed save is never read and is replaced;
    a changed learning rate is reported as ignored unless run.override_scheduler is set, and
    then the new schedule is followed; metrics keep one record per step throughout."""
    out = tmp_path / "run"
    cfg = dpo_config(tiny_base, str(out), steps=4, run={"save_every": 1, "keep_last": 2, "save_final": True})
    train(1, cfg, tmp_path)
    root = out / "checkpoints"
    assert checkpoint_names(out) == ["step_0000003", "step_0000004"] and latest(out) == "step_0000004"
    final = snapshot(root / "step_0000004")

    proc = train(1, cfg, tmp_path)
    assert f"checkpoint {root / 'step_0000004'} exists; not rewritten" in proc.stdout
    assert snapshot(root / "step_0000004") == final
    assert unique_records(out) == [("eval", 0)] + [("train", s) for s in range(1, 5)] + [("eval", 4)]

    # What a save killed at step 5 leaves behind.
    (root / "step_0000005.partial").mkdir()
    (root / "step_0000005.partial" / "__0_0.distcp").write_bytes(b"half written")
    proc = train(1, cfg, tmp_path, ["run.train_steps=6", "optim.lr=0.002", "optim.adam_beta2=0.99", "data.bucket_size=8"])
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert ("resume: optim.lr: 0.001 in the checkpoint, 0.002 now -> IGNORED: the learning-rate schedule is "
            "restored from the checkpoint; set run.override_scheduler=true") in proc.stdout
    assert ("resume: run.train_steps: 4 in the checkpoint, 6 now -> the run goes on to the new step count; the "
            "learning-rate decay keeps the checkpoint's length") in proc.stdout
    assert "resume: optim.adam_beta2: 0.999 in the checkpoint, 0.99 now -> IGNORED: Adam's hyper-parameters" in proc.stdout
    assert "resume: data.bucket_size: 64 in the checkpoint, 8 now -> applies from this step on" in proc.stdout
    rows = {r["step"]: r for r in metrics(str(out)) if r["split"] == "train"}
    assert rows[5]["lr"] == pytest.approx(1e-4, rel=1e-6)  # the old schedule ended at min_lr at step 4
    assert checkpoint_names(out) == ["step_0000005", "step_0000006"] and latest(out) == "step_0000006"
    assert unique_records(out) == ([("eval", 0)] + [("train", s) for s in range(1, 5)] + [("eval", 4)]
                                   + [("train", 5), ("train", 6), ("eval", 6)])

    # The checkpoint of step 6 still holds the schedule of lr 0.001, whatever that session's config said.
    proc = train(1, cfg, tmp_path, ["run.train_steps=8", "optim.lr=0.002", "run.override_scheduler=true"])
    assert "resume: optim.lr: 0.001 in the checkpoint, 0.002 now -> applied" in proc.stdout
    rows = {r["step"]: r for r in metrics(str(out)) if r["split"] == "train"}
    # Megatron's cosine decay after 2 warmup steps, from 0.002 to min_lr 1e-4 over 8 steps.
    for step in (7, 8):
        ratio = (step - 2) / (8 - 2)
        assert rows[step]["lr"] == pytest.approx(1e-4 + 0.5 * (math.cos(math.pi * ratio) + 1) * (0.002 - 1e-4), rel=1e-6)


def test_a_second_launch_on_the_same_output_dir_is_refused(tmp_path, tiny_base):
    out = tmp_path / "run"
    holder = RunLock(str(out))
    holder.acquire()
    try:
        proc = train(1, dpo_config(tiny_base, str(out), steps=4), tmp_path, check=False)
    finally:
        holder.release()
    assert proc.returncode != 0
    assert f"run.output_dir {out} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, started" in output(proc)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_a_fresh_start_over_existing_checkpoints_is_refused(tmp_path, tiny_base):
    out = tmp_path / "run"
    cfg = dpo_config(tiny_base, str(out), steps=4, run={"save_final": True})
    train(1, cfg, tmp_path)
    proc = train(1, cfg, tmp_path, ["run.resume=false"], check=False)
    assert proc.returncode != 0
    assert "run.resume is false but" in output(proc) and "step_0000004" in output(proc)
    assert checkpoint_names(out) == ["step_0000004"]


@pytest.fixture
def small_disk(tmp_path):
    """A 7 MiB filesystem (tmpfs): room for the run's small files and about one checkpoint."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk is simulated with a small tmpfs, which needs mount permission: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, tiny_base, small_disk):
    from onmerge_megatron.training.checkpoints import find_resume_checkpoint

    out = small_disk / "run"
    cfg = dpo_config(tiny_base, str(out), steps=20, run={"save_every": 1}, merge={"online": {"method": "none"}})
    proc = train(1, cfg, tmp_path, check=False)
    text = output(proc)
    assert proc.returncode != 0, text[-3000:]
    assert "CheckpointError: saving checkpoint " in text, text[-3000:]
    failed = text.split("CheckpointError: saving checkpoint ")[1].split(" failed, nothing was published (")
    # The cause as the writer saw it: ENOSPC, or torch.save's zip writer coming up short.
    assert any(cause in failed[1].splitlines()[0] for cause in ("No space left on device", "unexpected pos"))
    stats = os.statvfs(small_disk)
    assert stats.f_bavail * stats.f_frsize < 2**20  # it was the disk
    assert not os.path.isdir(failed[0])
    root = out / "checkpoints"
    assert find_resume_checkpoint(str(root), print) == str(root / latest(out))  # intact: matches its manifest
    assert latest(out) < os.path.basename(failed[0])


# --------------------------------------------------------------------------- killed processes


def _children(pid: int) -> set[int]:
    pids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def _launch(tmp_path: Path, cfg: dict, log: Path) -> subprocess.Popen:
    cmd, env = torchrun_command(2, train_args(cfg, tmp_path))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no {text!r} within {seconds}s"
        time.sleep(0.1)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds processes through /proc (Linux)")
def test_a_killed_checkpoint_writer_fails_the_run_within_seconds(tmp_path, tiny_base):
    """A checkpoint writer (a process a rank forks for each save) is stopped and killed while it
    writes: the run fails with a message naming the checkpoint within seconds (megatron alone
    would wait for it until the process group's timeout), and `latest` still names the
    previous, intact checkpoint."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cfg = dpo_config(tiny_base, str(out), steps=400, run={"save_every": 1}, merge={"online": {"method": "none"}})
    proc = _launch(tmp_path, cfg, log)
    try:
        _wait_for(log, "saved checkpoint", proc)
        ranks = _children(proc.pid)
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            for rank in ranks:
                for child in _children(rank):
                    if _cmdline(child) == _cmdline(rank):  # forked, not exec'ed: a writer
                        os.kill(child, signal.SIGSTOP)  # caught mid-write, whatever the machine's speed
                        victim = child
                        break
                if victim:
                    break
        assert victim is not None, "no checkpoint writer seen"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode != 0
    assert elapsed < 60, elapsed
    assert f"helper process {victim} was killed by SIGKILL" in text
    saving = text.split("HelperProcessError: saving checkpoint ")[1].split(":")[0]
    assert saving.endswith(".partial") is False and os.path.basename(saving).startswith("step_")
    assert not os.path.isdir(saving)  # never published
    assert latest(out) < os.path.basename(saving) and (out / "checkpoints" / latest(out) / "manifest.json").is_file()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds processes through /proc (Linux)")
def test_a_killed_rank_leaves_no_process_behind(tmp_path, tiny_base):
    """Kill -9 one rank: torchrun stops the other, and every helper process the ranks started
    (the checkpoint writers' results server, ~270 MB each) is gone too."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cfg = dpo_config(tiny_base, str(out), steps=400, run={"save_every": 2}, merge={"online": {"method": "none"}})
    proc = _launch(tmp_path, cfg, log)
    try:
        _wait_for(log, "saved checkpoint", proc)
        ranks = sorted(_children(proc.pid))
        helpers = {c for r in ranks for c in _children(r)}
        assert helpers, "the ranks started no helper process"
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in helpers | set(ranks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [(p, _cmdline(p)[:80]) for p in helpers | set(ranks) if _alive(p)]
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


# --------------------------------------------------------------------------- non-finite values


def test_a_non_finite_gradient_stops_the_run_before_the_update(tmp_path, tiny_base):
    """lr = 1e30 makes step 1's weights huge (finite) and step 2's gradients NaN: the run stops at
    step 2 with the reason and the last checkpoint named; no checkpoint after step 1 exists."""
    out = tmp_path / "run"
    cfg = dpo_config(tiny_base, str(out), steps=6, optim={"lr": 1e30, "min_lr": 0.0, "warmup_steps": 0},
                     run={"save_every": 1})
    proc = train(1, cfg, tmp_path, check=False)
    text = output(proc)
    assert proc.returncode != 0
    assert ("step 2: a gradient holds inf/NaN; the update was not applied (weights and optimizer state are "
            f"unchanged). Stopping (optim.nonfinite=stop). The last checkpoint is {out / 'checkpoints' / 'step_0000001'}") in text
    assert checkpoint_names(out) == ["step_0000001"]


def test_skipped_steps_are_counted_and_non_finite_weights_are_never_saved(tmp_path, tiny_base):
    """optim.nonfinite=skip: a model whose weights hold a NaN gets every step skipped and counted,
    and its final checkpoint is refused, naming the tensor."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_base, poisoned)
    weights = load_file(str(poisoned / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    cfg = dpo_config(str(poisoned), str(out), steps=2, optim={"nonfinite": "skip", "max_consecutive_skips": 3,
                                                              "warmup_steps": 0}, run={"save_final": True})
    proc = train(1, cfg, tmp_path, check=False)
    text = output(proc)
    assert proc.returncode != 0
    assert "step 1: a gradient holds inf/NaN; the update was not applied" in text and "skipped (1 so far)" in text
    assert [r["skipped_steps"] for r in metrics(str(out)) if r["split"] == "train"] == [1, 2]
    assert "step 2: the weights hold inf/NaN (on this rank: decoder.layers.0.mlp.linear_fc2.weight" in text
    assert "refusing to write checkpoint" in text
    assert not (out / "checkpoints").exists() or checkpoint_names(out) == []


def test_too_many_consecutive_skips_stop_the_run(tmp_path, tiny_base):
    out = tmp_path / "run"
    cfg = dpo_config(tiny_base, str(out), steps=6, optim={"lr": 1e30, "min_lr": 0.0, "warmup_steps": 0,
                                                          "nonfinite": "skip", "max_consecutive_skips": 2})
    proc = train(1, cfg, tmp_path, check=False)
    assert proc.returncode != 0
    assert "2 consecutive steps skipped (optim.max_consecutive_skips=2): the run is not recovering" in output(proc)
    rows = [r for r in metrics(str(out)) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1]
    assert torch.isfinite(torch.tensor(rows[0]["loss"]))
