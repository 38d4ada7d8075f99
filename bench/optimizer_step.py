"""Optimizer step time and memory: torch AdamW against OnlineMergingAdamW, in one run.

A ~52M-parameter set with the tensor shapes of a small Llama (vocab 32000, hidden 512, 6 layers,
gated MLP 1408), random gradients, fp32. Prints a Markdown table with ratios to torch AdamW
(foreach). Run: python bench/optimizer_step.py [--steps N] [--layers L]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

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


def run(label: str, build, params: dict[str, torch.nn.Parameter], steps: int) -> dict:
    opt = build(params)
    opt.step()  # creates the state; not timed
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state_bytes = tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    reference = opt.reference_nbytes() if hasattr(opt, "reference_nbytes") else 0
    result = {"label": label, "ms": 1e3 * statistics.median(times), "state": state_bytes, "reference": reference}
    del opt
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--keep-rate", type=float, default=0.01)
    args = parser.parse_args()

    shapes = llama_shapes(32000, 512, 1408, args.layers)
    params = make_params(shapes, seed=0)
    reference_delta = {n: torch.randn(s) * 1e-3 for n, s in shapes.items()}
    param_bytes = tensor_bytes(params.values())
    p = args.keep_rate

    def ours(**merge):
        def build(ps):
            opt = OnlineMergingAdamW(list(ps.items()), lr=1e-5, weight_decay=0.0, merge=OnlineMergeConfig(**merge))
            if opt.merge_config.needs_reference:
                opt.set_reference_delta(delta=reference_delta)
            return opt

        return build

    cases = [
        ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps.values(), lr=1e-5, weight_decay=0.0, foreach=True)),
        ("torch AdamW (single-tensor)", lambda ps: torch.optim.AdamW(ps.values(), lr=1e-5, weight_decay=0.0, foreach=False)),
        ("ours, method none", ours(method="none")),
        (f"OnDARE p={p}", ours(method="dare", keep_rate=p, alpha=5e-7)),
        (f"OnTIES p={p}, top-p per tensor", ours(method="ties", keep_rate=p, alpha=5e-7, ties_scope="tensor")),
        (f"OnTIES p={p}, top-p per shard", ours(method="ties", keep_rate=p, alpha=5e-7, ties_scope="shard")),
    ]
    n = sum(t.numel() for t in params.values())
    print(f"{n / 1e6:.1f}M parameters in {len(params)} tensors, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = [run(label, build, params, args.steps) for label, build in cases]
    baseline = results[0]["ms"]
    print()
    print("| optimizer | ms/step | vs torch AdamW (foreach) | optimizer state | reference delta (% of params) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        ref = f"{r['reference'] / 2**20:.1f} MiB ({100 * r['reference'] / param_bytes:.2f}%)" if r["reference"] else "-"
        print(f"| {r['label']} | {r['ms']:.1f} | {r['ms'] / baseline:.2f}x | {r['state'] / 2**20:.0f} MiB | {ref} |")
    print(f"\nparameters: {param_bytes / 2**20:.0f} MiB fp32; state includes the stored reference delta.")


if __name__ == "__main__":
    main()
