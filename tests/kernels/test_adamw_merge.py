"""The fused Triton kernel against the engine (OnlineMergingAdamW), bit for bit.

The kernel runs on CPU through Triton's interpreter, in a subprocess so that TRITON_INTERPRET=1
stays out of every other test. Without Triton the kernel tests skip; the dispatch tests below
(engine fallback) need no Triton.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onmerge_megatron.kernels import FusedOnlineMergingAdamW, triton_available
from onmerge_megatron.merging import OnlineMergeConfig, ShardCoords, rng
from onmerge_megatron.optim import OnlineMergingAdamW

ROOT = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).with_name("interpreted_checks.py")
LR = 1e-3  # the checks' learning rate


def _run_checks(which: str) -> dict[str, dict]:
    if not triton_available():
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(CHECKS), which], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in results}


@pytest.fixture(scope="module")
def ieee_results() -> dict[str, dict]:
    return _run_checks("ieee_sqrt")


@pytest.fixture(scope="module")
def cpu_sqrt_results() -> dict[str, dict]:
    return _run_checks("cpu_sqrt")


CASES = [
    "dare-fp32",
    "dare-fp32-K2-dropout-maximize",
    "ties-fp32",
    "ties-fp32-K3-weighted",
    "dare-bf16",
    "dare-bf16-K2",
    "ties-bf16-dropout",
    "dare-fp32-sharded",
    "dare-fp32-multiblock",
    "dare-bf16-multiblock-l1",
    "ties-fp32-K2-sharded",
    "dare-fp32-resume",
    "ties-fp32-K2-sharded-resume",
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_engine_bitwise(ieee_results, case):
    """Params, moments and the step-K accumulator equal the engine's bit for bit after every step
    (engine with correctly rounded sqrt, as torch computes it on CUDA)."""
    result = ieee_results[case]
    assert result["mismatches"] == [], result
    assert result["stats_ok"], result["stats"]  # merge_stats(): same counts, norms up to summation order
    counts = result["counts"]
    assert counts["engine"] == 0 and counts["fused"] > 0, counts  # the kernel really ran
    if case.startswith("dare") and "K2" not in case and "l1" not in case:
        # The update's keep-mask was drawn inside the sparse kernel, not by the torch generator.
        assert counts["dare_kernel"] > 0 and counts["dare_torch"] == 0, counts
    if case.startswith("ties"):
        # After the first merge every eligible segment's top-k came from the kernel's candidate list.
        assert counts["ties_fast"] > 0, counts
        assert counts["ties_too_few"] + counts["ties_too_many"] + counts["ties_margin"] <= counts["ties_fast"], counts


def test_ties_without_step_k_matches_unmodified_cpu_engine(cpu_sqrt_results):
    """OnTIES with K = 1 never applies the kernel's dense update: the kernel writes the moments,
    and the kept update is the engine's own torch ops, so even torch's inexact CPU sqrt changes nothing."""
    assert cpu_sqrt_results["ties-fp32"]["mismatches"] == []


@pytest.mark.parametrize("case", ["dare-fp32", "ties-fp32-K3-weighted", "dare-bf16-K2"])
def test_against_unmodified_cpu_engine_within_bound(cpu_sqrt_results, case):
    """Where the kernel evaluates the update itself (OnDARE's kept elements, step-K's plain steps),
    torch's CPU sqrt (not correctly rounded) differs from the kernel's IEEE sqrt in the last bit:
    the moments stay identical and the weights differ by a few ulps of the update (< 1e-5 * lr)."""
    for step, tensor, what, count, ulps, diff in cpu_sqrt_results[case]["mismatches"]:
        assert what in ("param", "merge_accumulator"), (step, tensor, what)
        assert diff < 1e-5 * LR, (step, tensor, what, count, ulps, diff)


@pytest.fixture(scope="module")
def nonfinite_results() -> dict[str, dict]:
    return _run_checks("nonfinite")


@pytest.mark.parametrize("case", ["dare", "ties-K2"])
def test_kernel_path_refuses_or_skips_nonfinite_gradients(nonfinite_results, case):
    """The gradient check is in the shared step(): with the kernel running (interpreter), a NaN
    gradient is refused with nothing changed, or its step skipped exactly (step-K mid-cycle too)."""
    result = nonfinite_results[case]
    assert result["problems"] == [], result
    assert result["counts"]["engine"] == 0 and result["counts"]["fused"] > 0, result["counts"]


def test_falls_back_to_engine_on_cpu_without_interpreter():
    """backend='auto' on CPU tensors is the engine path: identical results, state keys and counts."""
    torch.manual_seed(0)
    config = OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.2)
    shapes = {"a": (8, 16), "b": (50,)}
    delta = {k: torch.randn(s) * 1e-3 for k, s in shapes.items()}
    start = {k: torch.randn(s) for k, s in shapes.items()}
    made = []
    for cls in (OnlineMergingAdamW, FusedOnlineMergingAdamW):
        params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        opt = cls(list(params.items()), lr=1e-2, merge=config)
        opt.set_reference_delta(delta=delta)
        made.append((params, opt))
    for _ in range(3):
        for k in shapes:
            grad = torch.randn(shapes[k])
            for params, _ in made:
                params[k].grad = grad.clone()
        for _, opt in made:
            opt.step()
    (pa, oa), (pb, ob) = made
    for k in shapes:
        assert torch.equal(pa[k], pb[k])
        assert set(oa.state[pa[k]]) == set(ob.state[pb[k]])
    assert ob.kernel_counts["fused"] == 0 and ob.kernel_counts["engine"] == 6


@pytest.mark.parametrize(
    "coords",
    [
        ShardCoords.full((300, 700)),
        ShardCoords.flat_range((300, 700), 70_000, 150_001),
        ShardCoords.block((300, 700), (300, 350), (0, 350)),  # a tensor-parallel column block
        ShardCoords.block((300, 700), (150, 700), (150, 0), 1000, 60_000),
    ],
)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_keep_positions_on_gpu_equals_cpu(coords):
    """Masks drawn on the GPU (as the fused class does) are the CPU's, bit for bit."""
    for step, stream in ((0, rng.STREAM_REFERENCE), (7, rng.STREAM_UPDATE)):
        expected = rng.keep_positions(5, "layer.w", step, stream, coords, 0.01)
        got = rng.keep_positions(5, "layer.w", step, stream, coords, 0.01, torch.device("cuda"))
        assert torch.equal(expected, got.cpu())


def test_backend_is_validated():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        FusedOnlineMergingAdamW([("p", p)], backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        FusedOnlineMergingAdamW([("p", p)], block_size=100)


def _compile_for_h100(kernel, signature: dict[str, str], constexprs: dict) -> str:
    """PTX of a kernel compiled for sm_90 as the GPU path launches it (no GPU needed: Triton
    compiles with its bundled ptxas)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    except (FileNotFoundError, RuntimeError) as error:  # no ptxas for this platform
        if "ptxas" in str(error):
            pytest.skip(f"cannot compile for CUDA here: {error}")
        raise
    return compiled.asm["ptx"]


def _float_ops(ptx: str) -> dict[str, int]:
    ops = re.findall(r"^\s*((?:mul|add|sub|fma|div|sqrt)\.[a-z0-9.]*f32)\b", ptx, re.M)
    return {op: ops.count(op) for op in set(ops)}


def test_kernels_compile_for_cuda_with_exact_rounding():
    """Both kernels compile for an H100 (sm_90), and their PTX holds exactly the source's float
    operations, each IEEE round-to-nearest: no approximate sqrt or division, no multiply-add fused
    beyond the two explicit fmas (lerp, addcmul). 8 elements per thread (1024 / 4 warps / 32)."""
    from onmerge_megatron.kernels import adamw_merge

    dense_signature = dict(
        param_ptr="*fp32", grad_ptr="*fp32", exp_avg_ptr="*fp32", exp_avg_sq_ptr="*fp32", acc_ptr="*fp32",
        cand_ptr="*i64", count_ptr="*i32", n="i64", lerp_weight="fp32", beta2="fp32", addcmul_value="fp32",
        decay="fp32", neg_step_size="fp32", bc2_sqrt="fp32", inv_bc2_sqrt="fp32", eps="fp32", cut="fp32", capacity="i32",
    )
    dense = dict(PARAM_BF16=False, STATE_BF16=False, WEIGHT_DECAY=True, NEGATE_GRAD=False, LERP_SMALL=True,
                 LERP_FUSED=True, ADDCMUL=adamw_merge.ADDCMUL_PRODUCT_FMA, MODE=adamw_merge.MODE_ACCUMULATE, CANDIDATES=False, RECIPROCAL_DIV=True, BLOCK=1024)
    ptx = _compile_for_h100(adamw_merge._adamw_merge_kernel, dense_signature, dense)
    assert "approx" not in ptx and ".ftz" not in ptx
    # Per element: mul: v*b2, g*g, sqrt(v)*(1/bc2), q*(-s), p*decay; add: +eps, p+u, acc+u; sub: g-m;
    # fma: lerp, addcmul; one sqrt, one division (m / denom).
    per_element = {"mul.rn.f32": 5, "add.rn.f32": 3, "sub.rn.f32": 1, "fma.rn.f32": 2, "sqrt.rn.f32": 1, "div.rn.f32": 1}
    assert _float_ops(ptx) == {op: 8 * count for op, count in per_element.items()}

    sparse_signature = dict(
        param_ptr="*fp32", exp_avg_ptr="*fp32", exp_avg_sq_ptr="*fp32", lookup_ptr="*i32", thresholds_ptr="*i64",
        stats_ptr="*fp64", seed="u64", first_block="i64", lo="i64", hi="i64", step="i32", stream="i32",
        n_thresholds="i32", bc2_sqrt="fp32", inv_bc2_sqrt="fp32", eps="fp32", neg_step_size="fp32",
        keep_rate="fp32", inv_keep_rate="fp32", update_weight="fp32",
    )
    sparse = dict(PARAM_BF16=False, STATE_BF16=False, RESCALE=True, RECIPROCAL_DIV=True, CALLS=256, SEARCH_STEPS=13, MASK_BLOCK=1 << 16)
    ptx = _compile_for_h100(adamw_merge._dare_update_kernel, sparse_signature, sparse)
    assert "approx" not in ptx and ".ftz" not in ptx
    ops = _float_ops(ptx)
    assert "fma.rn.f32" not in ops and ops["sqrt.rn.f32"] == ops["div.rn.f32"] == 8  # 4 * 256 words / 128 threads


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("method", ["dare", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_cuda_engine(method, dtype):
    """On a GPU: the compiled kernel against the engine on the same device, bit for bit."""
    if method == "ties" and dtype == torch.bfloat16:
        config = OnlineMergeConfig(method=method, keep_rate=0.01, alpha=0.0, merge_every=2)
    else:
        config = OnlineMergeConfig(method=method, keep_rate=0.01, alpha=0.3, merge_every=2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"a": (1024, 1536), "b": (300_001,), "c": (7,)}
    start = {k: torch.randn(s, device="cuda", generator=gen) * 0.02 for k, s in shapes.items()}
    delta = {k: torch.randn(s, device="cuda", generator=gen) * 1e-3 for k, s in shapes.items()}
    made = []
    for cls in (OnlineMergingAdamW, FusedOnlineMergingAdamW):
        params = {k: torch.nn.Parameter(v.clone().to(dtype)) for k, v in start.items()}
        opt = cls(list(params.items()), lr=1e-3, weight_decay=0.01, merge=config)
        if config.needs_reference:
            # A delta_fn returning CUDA tensors keeps the engine's reference state on the GPU.
            opt.set_reference_delta(delta_fn=lambda name, coords: delta[name].reshape(-1))
        made.append((params, opt))
    for _ in range(6):
        for k in shapes:
            grad = ((torch.randn(shapes[k], device="cuda", generator=gen) + 1.0) * 1e-2).to(dtype)
            for params, _ in made:
                params[k].grad = grad.clone()
        for _, opt in made:
            opt.step()
        (pa, oa), (pb, ob) = made
        for k in shapes:
            assert torch.equal(pa[k], pb[k]), k
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(oa.state[pa[k]][key], ob.state[pb[k]][key]), (k, key)
    assert made[1][1].kernel_counts["fused"] > 0


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_torch_rounding_matches_torch_on_fresh_values(device):
    """The roundings `torch_rounding` reads off a device are torch's on a million other values
    (Adam-like moments, and moments at zero as at the first step), each form computed in float64
    on the CPU; every other form misses many of them. (On an H200 with torch 2.11 the probe's
    values told the forms apart: lerp fused, addcmul fma(c, g*g, v), and a division by a scalar
    that multiplies by float(1 / c) computed in double, which alone reproduces the counts by which
    it missed the two other division forms, 1477 and 1714 of 4096.)"""
    from onmerge_megatron.kernels import adamw_merge as am

    rounding = am.torch_rounding(torch.device(device))
    assert rounding is not None, am.rounding_misses(torch.device(device))
    gen = torch.Generator().manual_seed(123)
    n = 1 << 20
    g = torch.randn(n, generator=gen) * 3e-3 + 2e-3
    m = torch.randn(n, generator=gen) * 1e-3
    v = torch.rand(n, generator=gen) * 1e-5
    v[::3] = 0.0
    dev = torch.device(device)
    w, c, d = am._f32(0.1), am._f32(1 - 0.95), am._f32(0.2236068)
    lerp = m.to(dev, copy=True).lerp_(g.to(dev), 0.1).cpu()
    addcmul = v.to(dev, copy=True).addcmul_(g.to(dev), g.to(dev), value=1 - 0.95).cpu()
    divided = (m.to(dev) / 0.2236068).cpu()
    diff = (g - m).double()
    lerp_by = {True: (w * diff + m.double()).float(), False: m + (w * diff).float()}
    addcmul_by = {
        am.ADDCMUL_SCALED_FMA: ((c * g).double() * g.double() + v.double()).float(),
        am.ADDCMUL_PRODUCT_FMA: (c * (g * g).double() + v.double()).float(),
        am.ADDCMUL_SCALED: v + (c * g) * g,
        am.ADDCMUL_PRODUCT: v + c * (g * g),
    }
    divided_by = {form: (m.double() * am._reciprocal(0.2236068, form)).float()
                  for form in (am.DIV_RECIPROCAL_OF_FLOAT, am.DIV_RECIPROCAL_OF_DOUBLE)}
    divided_by[am.DIV_TRUE] = (m.double() / d).float()
    for chosen, forms, torch_result in ((rounding.lerp_fused, lerp_by, lerp), (rounding.addcmul, addcmul_by, addcmul),
                                        (rounding.scalar_div, divided_by, divided)):
        assert int((forms[chosen] != torch_result).sum()) <= 1
        for other in set(forms) - {chosen}:
            assert int((forms[other] != torch_result).sum()) > 100, other
