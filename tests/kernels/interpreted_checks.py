"""Runs FusedOnlineMergingAdamW's Triton kernel (interpreter mode, CPU) against the engine.

Executed in a subprocess by test_adamw_merge.py with TRITON_INTERPRET=1, so the interpreter setting
never reaches other tests. Prints one JSON line per case: mismatching (step, tensor, state key,
count, max ulp, max absolute difference) entries and how the fused optimizer took its steps.

torch's CPU `sqrt` is not correctly rounded (it differs from IEEE sqrt in the last bit for a few
elements in a thousand); torch's CUDA `sqrt`, which the engine uses on a GPU, is. The kernel uses
IEEE sqrt, so the bitwise cases run the engine with `Tensor.sqrt` made correctly rounded, and the
"cpu_sqrt" cases measure the difference from the unmodified CPU engine instead.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from onmerge_megatron.kernels import FusedOnlineMergingAdamW
from onmerge_megatron.merging import OnlineMergeConfig, ShardCoords
from onmerge_megatron.optim import OnlineMergingAdamW, Segment

_TORCH_SQRT = torch.Tensor.sqrt


def _ieee_sqrt(self: torch.Tensor) -> torch.Tensor:
    # sqrt of a float32 computed in float64 and rounded once is the correctly rounded float32 sqrt.
    if self.dtype in (torch.float32, torch.bfloat16):
        return _TORCH_SQRT(self.double()).float().to(self.dtype)
    return _TORCH_SQRT(self)


SHAPES = {"w0": (40, 48), "w1": (3001,), "w2": (17,)}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place (same-sign floats; sign flips count large)."""
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    ia, ib = a.reshape(-1).view(bits).to(torch.int64), b.reshape(-1).view(bits).to(torch.int64)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def run_case(name: str, config: OnlineMergeConfig, dtype: torch.dtype, steps: int, weight_decay: float = 0.01,
             maximize: bool = False, sharded: bool | list = False, shapes: dict | None = None,
             resume_after: int | None = None) -> dict:
    torch.manual_seed(0)
    base = {k: torch.randn(s) * 0.02 for k, s in (shapes or SHAPES).items()}
    delta = {k: torch.randn(v.shape) * 1e-3 for k, v in base.items()}

    def build(cls, **kw):
        params = {k: torch.nn.Parameter(v.clone().to(dtype)) for k, v in base.items()}
        if sharded:
            # A ZeRO-like flat buffer holding pieces of some weights, then 50 elements no segment covers.
            pieces = sharded if isinstance(sharded, list) else [("w0", 100, 1300), ("w1", 0, 900)]
            flat = torch.nn.Parameter(torch.cat([base[n].reshape(-1)[a:b] for n, a, b in pieces] + [torch.zeros(50)]).to(dtype))
            rest = {n: params[n] for n in params if n not in {piece[0] for piece in pieces}}
            params = {"flat": flat, **rest}
        opt = cls(list(params.items()), lr=1e-3, weight_decay=weight_decay, merge=config, maximize=maximize, **kw)
        if sharded:
            segments, offset = [], 0
            for n, a, b in pieces:
                segments.append(Segment(n, ShardCoords.flat_range(tuple(base[n].shape), a, b), offset))
                offset += b - a
            opt.set_segments(flat, segments)
        if config.needs_reference:
            opt.set_reference_delta(delta=delta)
        return params, opt

    engine_params, engine = build(OnlineMergingAdamW)
    fused_params, fused = build(FusedOnlineMergingAdamW, backend="triton", block_size=1024)
    gen = torch.Generator().manual_seed(1)
    mismatches = []
    for step in range(1, steps + 1):
        for key, p in engine_params.items():
            # Correlated gradients (a drift plus noise), as in training, so magnitudes evolve smoothly.
            grad = ((torch.randn(p.shape, generator=gen) + 1.0) * 1e-2).to(dtype)
            p.grad, fused_params[key].grad = grad.clone(), grad.clone()
        engine.step()
        fused.step()
        if step == resume_after:
            # A checkpoint round trip: a fresh fused optimizer loads the state dict (same keys as
            # the engine's) and carries on; its caches (OnTIES cut, reference positions) start empty.
            saved = fused.state_dict()
            fused = FusedOnlineMergingAdamW(
                list(fused_params.items()), lr=1e-3, weight_decay=weight_decay, merge=config, maximize=maximize,
                backend="triton", block_size=1024,
            )
            if sharded:
                fused.set_segments(fused_params["flat"], engine.segments(engine_params["flat"]))
            fused.load_state_dict(saved)
            engine.merge_stats()  # both count merge statistics from here on
        for key, p in engine_params.items():
            q = fused_params[key]
            if set(engine.state[p]) != set(fused.state[q]):
                mismatches.append([step, key, "state keys", -1, -1, float("inf")])
            pairs = [("param", p.detach(), q.detach())]
            pairs += [(s, engine.state[p][s], fused.state[q][s]) for s in ("exp_avg", "exp_avg_sq", "merge_accumulator") if s in engine.state[p]]
            for what, a, b in pairs:
                if a.dtype != b.dtype:
                    mismatches.append([step, key, what, -1, -1, float("inf")])
                elif not torch.equal(a, b):
                    mismatches.append([step, key, what, int((a != b).sum()), _ulps(a, b), float((a.double() - b.double()).abs().max())])
    # Logged statistics: counts exactly, norms up to summation order (summed on the device).
    expected, got = engine.merge_stats(), fused.merge_stats()
    stats_ok = expected["kept_fraction"] == got["kept_fraction"] and all(
        abs(expected[k] - got[k]) <= 1e-9 * max(abs(expected[k]), 1e-30) for k in expected
    )
    return {"case": name, "mismatches": mismatches, "counts": fused.kernel_counts, "stats_ok": stats_ok, "stats": [expected, got]}


def cases() -> list[tuple]:
    f32, bf16 = torch.float32, torch.bfloat16
    dare = dict(method="dare", keep_rate=0.1, alpha=0.3)
    ties = dict(method="ties", keep_rate=0.05, alpha=0.3)
    return [
        ("dare-fp32", OnlineMergeConfig(**dare), f32, 4, {}),
        ("dare-fp32-K2-dropout-maximize", OnlineMergeConfig(**{**dare, "alpha": 0.0, "merge_every": 2}), f32, 4, {"maximize": True, "weight_decay": 0.0}),
        ("ties-fp32", OnlineMergeConfig(**ties), f32, 6, {}),
        ("ties-fp32-K3-weighted", OnlineMergeConfig(**ties, merge_every=3, sign_election="weighted"), f32, 7, {}),
        ("dare-bf16", OnlineMergeConfig(**dare), bf16, 4, {}),
        ("dare-bf16-K2", OnlineMergeConfig(**dare, merge_every=2), bf16, 4, {}),
        ("ties-bf16", OnlineMergeConfig(**ties), bf16, 6, {}),
        ("ties-bf16-dropout", OnlineMergeConfig(**{**ties, "alpha": 0.0}), bf16, 6, {}),
        ("dare-fp32-sharded", OnlineMergeConfig(**dare), f32, 3, {"sharded": True}),
        # Several 2^16-index mask blocks, a segment starting inside a block, two Philox loop turns per block.
        ("dare-fp32-multiblock", OnlineMergeConfig(**dare), f32, 2,
         {"shapes": {"big": (2, 70001), "w2": (17,)}, "sharded": [("big", 70000, 140002)]}),
        ("dare-bf16-multiblock-l1", OnlineMergeConfig(**dare, l1_rescale=True), bf16, 2, {"shapes": {"big": (140001,)}}),
        ("ties-fp32-K2-sharded", OnlineMergeConfig(**ties, merge_every=2), f32, 6, {"sharded": True}),
        ("dare-fp32-resume", OnlineMergeConfig(**dare), f32, 4, {"resume_after": 2}),
        ("ties-fp32-K2-sharded-resume", OnlineMergeConfig(**ties, merge_every=2), f32, 9, {"sharded": True, "resume_after": 3}),
    ]


def nonfinite_case(name: str, config: OnlineMergeConfig, nan_at: int, steps: int) -> dict:
    """The fused kernel path with a NaN gradient at step ``nan_at``: 'raise' leaves params and state
    bit-identical; 'skip' ends where a run that never saw that step ends."""
    torch.manual_seed(0)
    base = {k: torch.randn(s) * 0.02 for k, s in SHAPES.items()}
    delta = {k: torch.randn(v.shape) * 1e-3 for k, v in base.items()}
    gen = torch.Generator().manual_seed(1)
    grads = [{k: (torch.randn(v.shape, generator=gen) + 1.0) * 1e-2 for k, v in base.items()} for _ in range(steps)]
    grads[nan_at - 1]["w1"][5] = float("nan")

    def build(nonfinite: str):
        params = {k: torch.nn.Parameter(v.clone()) for k, v in base.items()}
        opt = FusedOnlineMergingAdamW(list(params.items()), lr=1e-3, merge=config, nonfinite=nonfinite, backend="triton")
        opt.set_reference_delta(delta=delta)
        return params, opt

    def run(params, opt, which):
        for t in which:
            for k, p in params.items():
                p.grad = grads[t - 1][k].clone()
            opt.step()

    def snapshot(params, opt):
        return [p.detach().clone() for p in params.values()] + [
            v.clone() for p in params.values() for v in opt.state[p].values() if torch.is_tensor(v)
        ]

    problems = []
    params, opt = build("raise")
    run(params, opt, range(1, nan_at))
    before = snapshot(params, opt)
    try:
        run(params, opt, [nan_at])
        problems.append("raise: no error")
    except FloatingPointError as error:
        if "'w1' has 1 NaN/Inf" not in str(error):
            problems.append(f"raise: {error}")
    if not all(torch.equal(a, b) for a, b in zip(before, snapshot(params, opt))):
        problems.append("raise: state changed")
    skipped, skipping = build("skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(skipped, skipping, range(1, steps + 1))
    clean, cleaning = build("skip")
    run(clean, cleaning, [t for t in range(1, steps + 1) if t != nan_at])
    if skipping.skipped_steps != 1:
        problems.append(f"skip: skipped_steps={skipping.skipped_steps}")
    if not all(torch.equal(a, b) for a, b in zip(snapshot(skipped, skipping), snapshot(clean, cleaning))):
        problems.append("skip: differs from the run without the step")
    return {"case": name, "problems": problems, "counts": skipping.kernel_counts}


def main(which: str) -> None:
    if which == "nonfinite":
        dare, ties = dict(method="dare", keep_rate=0.1, alpha=0.3), dict(method="ties", keep_rate=0.05, alpha=0.3)
        for name, config in (("dare", OnlineMergeConfig(**dare)), ("ties-K2", OnlineMergeConfig(**ties, merge_every=2))):
            print(json.dumps(nonfinite_case(name, config, nan_at=3, steps=5)), flush=True)
        return
    if which == "cpu_sqrt":
        todo = [c for c in cases() if c[0] in ("dare-fp32", "ties-fp32", "ties-fp32-K3-weighted", "dare-bf16-K2")]
    else:
        torch.Tensor.sqrt = _ieee_sqrt
        todo = cases()
    for name, config, dtype, steps, kw in todo:
        print(json.dumps(run_case(name, config, dtype, steps, **kw)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ieee_sqrt")
