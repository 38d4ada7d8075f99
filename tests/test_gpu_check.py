"""bench/gpu_check.sh and bench/gpu_check.py: what can be checked without a GPU.

The slow test runs the check's CPU smoke mode end to end (the fused kernels under Triton's
interpreter against the engine, the tiny model's DPO runs) and reads the results file it writes;
the GPU-only part must say that it did not run, and why.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
SECTIONS = ("## Machine", "## (a) Fused kernel vs engine: bit equality", "## (b) Optimizer step against the HBM roofline",
            "## (c) DPO on one GPU: AdamW vs OnDARE vs OnTIES")


def _check(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its kernel part's process only
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_shell_script_parses():
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_and_argument_errors():
    proc = _check("--help")
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout and "--parts" in proc.stdout
    proc = _check("--parts", "fused,warp")
    assert proc.returncode == 2 and "warp" in proc.stderr
    proc = _check("--dpo-global-batch", "6", "--dpo-micro-batch", "4")
    assert proc.returncode == 2 and "--dpo-global-batch" in proc.stderr


def test_unselected_and_gpu_only_parts_say_why(tmp_path):
    """Only the roofline part, on a machine without CUDA: each section is there and says why it did
    not run; nothing else was started."""
    out = tmp_path / "results.md"
    proc = _check("--cpu-smoke", "--parts", "roofline", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for section in SECTIONS:
        assert section in text
    assert "Status: not run: needs a CUDA GPU" in text
    assert text.count("Status: not run: not selected (--parts)") == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".gpu_results.")]  # written atomically


@pytest.mark.slow
def test_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "results.md"
    proc = _check("--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--dpo-steps", "1",
                  "--dpo-global-batch", "8", "--dpo-micro-batch", "4", "--time-scale", "4", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for section in SECTIONS:
        assert section in text
    fused = text[text.index(SECTIONS[1]):text.index(SECTIONS[2])]
    # Six cases (OnDARE, step-K, OnTIES in fp32 and bf16), every one bit-identical to the engine.
    assert fused.count("| bit-identical |") == 6 and "DIFFERS" not in fused and "Status:" not in fused
    assert "Status: not run: needs a CUDA GPU" in text[text.index(SECTIONS[2]):text.index(SECTIONS[3])]
    dpo = text[text.index(SECTIONS[3]):]
    assert "Status:" not in dpo
    for label in ("| AdamW |", "| OnDARE |", "| OnTIES |"):
        assert label in dpo
    assert "OnlineMergingAdamW" in dpo and "packing: True" in dpo and "recompute: selective" in dpo
    assert "torch " in text and "triton" in text  # the machine section's versions
