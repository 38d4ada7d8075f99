"""Optimizer step time and achieved memory bandwidth: AdamW against online merging, fused and not.

Rows, in one run on one device:
  torch AdamW (fused=True, and foreach), apex FusedAdam and Transformer Engine FusedAdam when
  importable, the engine's OnlineMergingAdamW (OnDARE, OnTIES: unfused torch ops), and
  FusedOnlineMergingAdamW (OnDARE, OnTIES: the Triton kernel; CUDA only).
Parameters have the tensor shapes of a Llama-style model: by default TinyLlama-1.1B's on CUDA
(1.1e9 parameters) and a 4-layer, 256-wide one on CPU. Gradients are random, with a drift, and
the reference delta is 1% of the weights.

Bandwidth is the optimizer's unavoidable traffic (read param, grad, exp_avg, exp_avg_sq once and
write param, exp_avg, exp_avg_sq once; plus the sparse reference delta for the merging rows)
divided by the step time, and shown as a fraction of the device's peak, taken from a table of
known devices or --peak-gbps.

Run: python bench/fused_step.py [--steps N] [--dtype fp32|bf16] [--keep-rate P] [--peak-gbps G]
                                [--hidden H --ffn F --layers L --vocab V]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time
from typing import Any, Callable

import torch

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
from onmerge_megatron.kernels import FusedOnlineMergingAdamW, triton_available
from optimizer_step import llama_shapes  # same folder: run as a script

# Peak DRAM bandwidth in GB/s (vendor datasheets), matched against torch.cuda.get_device_name.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB parts
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]


def device_peak_gbps(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, "unknown (pass --peak-gbps)"
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, f"table entry {key!r}"
    return None, "unknown device (pass --peak-gbps)"


def optional_fused_adams() -> list[tuple[str, Callable[..., Any]]]:
    """apex and Transformer Engine FusedAdam (AdamW mode), where installed."""
    found = []
    try:
        from apex.optimizers import FusedAdam as ApexFusedAdam

        found.append(("apex FusedAdam", lambda params, **kw: ApexFusedAdam(params, adam_w_mode=True, **kw)))
    except Exception:  # noqa: BLE001 - absent or built without its CUDA extension
        pass
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam as TEFusedAdam

        found.append(("TE FusedAdam", lambda params, **kw: TEFusedAdam(params, adam_w_mode=True, **kw)))
    except Exception:  # noqa: BLE001
        pass
    return found


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotating_gradients(params: dict[str, torch.nn.Parameter], sets: int, gen: torch.Generator) -> Callable[[], None]:
    """A function that gives every parameter the next of ``sets`` random gradients (a drift plus
    noise). A gradient that never changes makes Adam's update lr * sign(grad) everywhere after a
    few steps, so OnTIES's top-k would be one large tie at every step, which real training never
    shows."""
    grads = [{n: ((torch.randn(p.shape, device=p.device, generator=gen) + 0.5) * 1e-3).to(p.dtype) for n, p in params.items()}
             for _ in range(sets)]
    turn = itertools.cycle(grads)

    def next_gradients() -> None:
        chosen = next(turn)
        for n, p in params.items():
            p.grad = chosen[n]

    next_gradients()
    return next_gradients


def time_steps(opt: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int,
               next_gradients: Callable[[], None] | None = None) -> float:
    """Median seconds per step. Warm-up steps create the state, compile kernels and, for OnTIES,
    give the kernel its first cut prediction (its first two merges take the engine's selection).
    ``next_gradients`` runs before each step, outside the timed region."""
    for _ in range(warmup):
        if next_gradients is not None:
            next_gradients()
        opt.step()
    sync(device)
    times = []
    for _ in range(steps):
        if next_gradients is not None:
            next_gradients()
            sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter (and hence state) dtype")
    parser.add_argument("--keep-rate", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=1e-6)
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--ffn", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    # TinyLlama-1.1B on a GPU (1.10e9 parameters); a small model on CPU, where only the unfused rows run.
    size = dict(vocab=32000, hidden=2048, ffn=5632, layers=22, kv=256) if on_gpu else dict(vocab=8000, hidden=256, ffn=704, layers=4, kv=256)
    for key in ("vocab", "hidden", "ffn", "layers"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    shapes = llama_shapes(size["vocab"], size["hidden"], size["ffn"], size["layers"], min(size["kv"], size["hidden"]))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    params = {n: torch.nn.Parameter((torch.randn(s, device=device, generator=gen) * 0.02).to(dtype)) for n, s in shapes.items()}
    next_gradients = rotating_gradients(params, 3, gen)
    numel = sum(p.numel() for p in params.values())
    elem = torch.finfo(dtype).bits // 8
    dense_bytes = numel * (2 * elem + elem + 4 * elem)  # param r/w, grad r, exp_avg r/w, exp_avg_sq r/w

    def delta_fn(name: str, coords) -> torch.Tensor:
        return params[name].detach().reshape(-1).float() * 1e-2

    rows: list[tuple[str, Callable[[], torch.optim.Optimizer] | None, int, str]] = []
    named = list(params.items())
    hyper = dict(lr=1e-5, weight_decay=0.01)
    if on_gpu:
        rows.append(("torch AdamW (fused)", lambda: torch.optim.AdamW(params.values(), fused=True, **hyper), dense_bytes, ""))
    rows.append(("torch AdamW (foreach)", lambda: torch.optim.AdamW(params.values(), foreach=True, **hyper), dense_bytes, ""))
    if on_gpu:
        for label, build in optional_fused_adams():
            rows.append((label, (lambda b=build: b(list(params.values()), **hyper)), dense_bytes, ""))
    for method in ("dare", "ties"):
        config = OnlineMergeConfig(method=method, keep_rate=args.keep_rate, alpha=args.alpha)
        # The sparse reference delta read each step: values (fp32), plus int32 positions for OnTIES.
        tau_bytes = int(numel * args.keep_rate) * (4 if method == "dare" else 8)
        label = "OnDARE" if method == "dare" else "OnTIES"

        def engine(config=config):
            opt = OnlineMergingAdamW(named, merge=config, **hyper)
            opt.set_reference_delta(delta_fn=delta_fn)
            return opt

        def fused(config=config):
            opt = FusedOnlineMergingAdamW(named, merge=config, **hyper)
            opt.set_reference_delta(delta_fn=delta_fn)
            return opt

        rows.append((f"{label} engine (unfused)", engine, dense_bytes + tau_bytes, ""))
        usable = on_gpu and triton_available()
        why = "" if usable else ("needs a CUDA GPU" if not on_gpu else "needs triton")
        rows.append((f"{label} fused (Triton)", fused if usable else None, dense_bytes + tau_bytes, why))

    peak, peak_source = device_peak_gbps(device, args.peak_gbps)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'n/a'} ({peak_source})")
    print(f"torch {torch.__version__}; {numel / 1e9:.3f}e9 parameters in {len(params)} tensors, {args.dtype}; "
          f"keep_rate={args.keep_rate}, alpha={args.alpha}; median of {args.steps} steps after {args.warmup} warm-up")
    print()
    print("| optimizer | step (ms) | vs first row | GB/s | % of peak |")
    print("|---|---|---|---|---|")
    baseline = None
    for label, build, nbytes, why in rows:
        if build is None:
            print(f"| {label} | {why} | | | |")
            continue
        opt = build()
        seconds = time_steps(opt, device, args.warmup, args.steps, next_gradients)
        del opt
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        if baseline is None:
            baseline = seconds
        gbps = nbytes / seconds / 1e9
        share = f"{100 * gbps / peak:.0f}%" if peak else "n/a"
        print(f"| {label} | {seconds * 1e3:.2f} | {seconds / baseline:.2f}x | {gbps:.1f} | {share} |", flush=True)
    print()
    print(f"Bytes per element counted: {dense_bytes / numel:.0f} (param, grad, exp_avg, exp_avg_sq once each), "
          f"plus the sparse reference delta for the merging rows. The first row is the baseline.")


if __name__ == "__main__":
    main()
