"""Optimizer step time and memory: torch AdamW against OnlineMergingAdamW, in one run.

A ~52M-parameter set with the tensor shapes of a small Llama (vocab 32000, hidden 512, 6 layers,
gated MLP 1408), a fresh random gradient each step, fp32. Step times come from all optimizers
stepping in turn in one process, round by round; each one's ratio to torch AdamW (foreach) is
taken per round and reported as the median and quartiles. Memory is measured per optimizer in a
fresh process. Prints a Markdown table.
Run: python bench/optimizer_step.py [--steps N] [--layers L]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time
from typing import Any, Callable

import torch

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW


def llama_shapes(vocab: int, hidden: int, ffn: int, layers: int, kv_hidden: int | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama-architecture model (kv_hidden < hidden: grouped-query attention)."""
    kv_hidden = hidden if kv_hidden is None else kv_hidden
    shapes = {"embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "norm.weight": (hidden,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_hidden, hidden),
            p + "self_attn.v_proj.weight": (kv_hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def make_params(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params[name] = p
    return params


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _memory(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_optimizer(kind: str, merge: dict, params: dict[str, torch.nn.Parameter]):
    if kind == "torch-foreach":
        return torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.0, foreach=True)
    if kind == "torch-single":
        return torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.0, foreach=False)
    merge = dict(merge)
    nonfinite = merge.pop("nonfinite", "raise")  # the default: a NaN/Inf gradient check every step
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-5, weight_decay=0.0, merge=OnlineMergeConfig(**merge), nonfinite=nonfinite)
    if opt.merge_config.needs_reference:
        # One delta tensor at a time, as a streamed checkpoint would be: only what the optimizer keeps stays.
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        gen = torch.Generator().manual_seed(1)
        opt.set_reference_delta(delta_fn=lambda name, coords: coords.gather(torch.randn(shapes[name], generator=gen) * 1e-3))
    return opt


WARMUP = 3
"""Untimed steps before timing: the first creates the state; OnTIES' first merges select over the
whole tensor (no predicted cut yet, then Adam's all-tied first step), as a run does once."""


def _fresh_gradients(grads: list[torch.Tensor], gen: torch.Generator) -> None:
    # A fresh gradient each step (not timed): with one gradient repeated, Adam's update is the
    # same in every element and OnTIES' top-k is one big tie, which no training run sees.
    for g in grads:
        g.normal_(0.0, 1e-3, generator=gen)


def _memory_of(kind: str, merge: dict, layers: int, out: mp.Queue) -> None:
    """Peak and retained memory of one optimizer over a few steps, in a fresh process."""
    params = make_params(llama_shapes(32000, 512, 1408, layers), seed=0)
    start = _memory("VmRSS")
    opt = build_optimizer(kind, merge, params)
    opt.step()  # creates the state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) so that it covers the steps only
    gen = torch.Generator().manual_seed(2)
    for _ in range(WARMUP):
        _fresh_gradients([p.grad for p in params.values()], gen)
        opt.step()
    peak = _memory("VmHWM") - start
    state_bytes = tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    # What the optimizer holds between steps (resident memory moves by tens of MiB with the C
    # allocator's caching, more than the differences measured here).
    retained = state_bytes + (opt.buffer_nbytes() if hasattr(opt, "buffer_nbytes") else 0)
    reference = opt.reference_nbytes() if hasattr(opt, "reference_nbytes") else 0
    out.put({"state": state_bytes, "reference": reference, "peak": peak, "retained": retained})


def _step_times(cases: list[tuple[str, str, dict]], layers: int, steps: int, out: mp.Queue) -> None:
    """Seconds per step of every optimizer, interleaved step by step in one process (each with its
    own parameters, all given the same fresh gradient each round), so that a slow spell of the
    machine hits all of them alike and the per-round ratios to the first stay comparable."""
    shapes = llama_shapes(32000, 512, 1408, layers)
    grads = {name: torch.empty(shape) for name, shape in shapes.items()}
    runs = []
    for _, kind, merge in cases:
        params = make_params(shapes, seed=0)
        for name, p in params.items():
            p.grad = grads[name]  # read-only to every optimizer here
        runs.append(build_optimizer(kind, merge, params))
    gen = torch.Generator().manual_seed(2)
    times: list[list[float]] = [[] for _ in cases]
    started = time.perf_counter()
    for step in range(WARMUP + steps):
        _fresh_gradients(list(grads.values()), gen)
        for i, opt in enumerate(runs):
            begin = time.perf_counter()
            opt.step()
            if step >= WARMUP:
                times[i].append(time.perf_counter() - begin)
        if (step + 1) % 10 == 0:
            per_round = (time.perf_counter() - started) / (step + 1)
            print(f"round {step + 1}/{WARMUP + steps}: {per_round:.1f} s a round, about {per_round * (WARMUP + steps - step - 1):.0f} s left", flush=True)
    out.put(times)


def _in_fresh_process(target: Callable[..., None], *args: Any) -> Any:
    """``target(*args, queue)`` in a spawned process; what it put on the queue."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out))
    child.start()
    result = out.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each optimizer, interleaved")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--keep-rate", type=float, default=0.01)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps: at least 2 timed steps for the quartiles, got {args.steps}")

    shapes = llama_shapes(32000, 512, 1408, args.layers)
    n = sum(math.prod(s) for s in shapes.values())
    param_bytes = 4 * n
    p = args.keep_rate
    cases = [
        ("torch AdamW (foreach)", "torch-foreach", {}),
        ("torch AdamW (single-tensor)", "torch-single", {}),
        ("ours, method none", "ours", dict(method="none")),
        (f"OnDARE p={p}", "ours", dict(method="dare", keep_rate=p, alpha=5e-7)),
        (f"OnDARE p={p}, no gradient check", "ours", dict(method="dare", keep_rate=p, alpha=5e-7, nonfinite="off")),
        (f"OnTIES p={p}, top-p per tensor", "ours", dict(method="ties", keep_rate=p, alpha=5e-7, ties_scope="tensor")),
        (f"OnTIES p={p}, top-p per shard", "ours", dict(method="ties", keep_rate=p, alpha=5e-7, ties_scope="shard")),
    ]
    print(f"{n / 1e6:.1f}M parameters in {len(shapes)} tensors, {torch.get_num_threads()} threads, torch {torch.__version__}")
    memory = [_in_fresh_process(_memory_of, kind, merge, args.layers) for _, kind, merge in cases]
    print("memory measured", flush=True)
    times = _in_fresh_process(_step_times, cases, args.layers, args.steps)
    print()
    print("| optimizer | ms/step | vs torch AdamW (foreach): median (quartiles) | peak memory vs AdamW | "
          "retained above AdamW (% of params) | optimizer state | reference delta (% of params) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (label, _, _), mem, own in zip(cases, memory, times):
        ratios = [t / base for t, base in zip(own, times[0])]
        low, mid, high = statistics.quantiles(ratios, n=4)
        above = mem["retained"] - memory[0]["retained"]
        ref = f"{mem['reference'] / 2**20:.1f} MiB ({100 * mem['reference'] / param_bytes:.2f}%)" if mem["reference"] else "-"
        print(
            f"| {label} | {1e3 * statistics.median(own):.1f} | {mid:.2f}x ({low:.2f}-{high:.2f}) | "
            f"{mem['peak'] / memory[0]['peak']:.2f}x | {above / 2**20:+.0f} MiB ({100 * above / param_bytes:+.1f}%) | "
            f"{mem['state'] / 2**20:.0f} MiB | {ref} |"
        )
    print(
        f"\nparameters: {param_bytes / 2**20:.0f} MiB fp32 (and as much again in gradients). Ratios: per step, to torch "
        f"AdamW's step of the same round ({args.steps} rounds after {WARMUP} untimed). Peak memory: the peak resident "
        "memory during the steps after the first, above the parameters and gradients, each optimizer in a fresh "
        "process. Retained: the bytes the optimizer holds from one step to the next (state, stored reference delta, "
        "work buffers) minus torch AdamW's (its two moments). Optimizer state includes the stored reference delta."
    )


if __name__ == "__main__":
    main()
