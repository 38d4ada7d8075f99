"""The GPU check: one command, one GPU; writes docs/gpu_results.md. Run time: each part has a time
limit (a: 100, b: 150, c: 60 s to prepare + 90 s for each of its 3 optimizer runs; 580 s in all,
GPU_LIMITS); about 4 to 5 minutes on an H200.

    bash bench/gpu_check.sh                  # on the GPU machine (installs bench/wheels/ if present)
    python bench/gpu_check.py --cpu-smoke    # the same parts at tiny sizes on CPU (what the tests run)

Three independent parts, each in its own process with its own time limit, so that a failure or a
missing feature in one is reported ("failed: ..." / "not run: ...") and the others still run:

(a) fused:     FusedOnlineMergingAdamW (the Triton kernels) against the engine (OnlineMergingAdamW),
               bit for bit, on a few steps of OnDARE, step-K OnDARE and OnTIES (fp32 and bf16).
(b) roofline:  optimizer step time and achieved bandwidth against the HBM peak: bytes that must
               move per step (param, grad, exp_avg, exp_avg_sq read; param, exp_avg, exp_avg_sq
               written; the sparse reference delta read) over the median step time, for torch's
               fused AdamW, Transformer Engine / apex FusedAdam where they import, and the fused
               merging steps. TinyLlama-1.1B tensor shapes, fp32.
(c) dpo:       the trainer on one GPU: DPO on a randomly initialised ~1B Llama-shaped model (config,
               weights and a tokenizer made here; nothing downloaded), bf16, Transformer Engine layers
               when TE imports, packed sequences (data.pack_sequences) and activation recomputation
               (model.recompute); AdamW vs OnDARE vs OnTIES for a few steps: step time, tokens/s,
               peak memory (torch.cuda.max_memory_allocated) next to `onmerge plan`'s prediction.

--cpu-smoke runs (a) with the kernels under Triton's interpreter (TRITON_INTERPRET=1, in that part's
process only) on small tensors, skips (b) with its reason, and runs (c) with the tiny test model in
fp32 on CPU, writing runs/gpu_check_cpu_smoke.md unless --out says otherwise (docs/gpu_results.md
is for GPU results). The results file is written atomically at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):  # bench/ for fused_step's helpers, the repository for the package
    if path not in sys.path:
        sys.path.insert(0, path)

PARTS = ("fused", "roofline", "dpo")
METHODS = ("none", "dare", "ties")
METHOD_LABEL = {"none": "AdamW", "dare": "OnDARE", "ties": "OnTIES"}
# Seconds each part's process may take on the GPU (times --time-scale): (c) is dpo_prepare once and
# dpo_run once per method, 100 + 150 + 60 + 3 x 90 = 580 s in all (one H200 took 58, 66, 18 and
# 42-70 s; (b) once took over 96 s).
GPU_LIMITS = {"fused": 100, "roofline": 150, "dpo_prepare": 60, "dpo_run": 90}


class NotRun(Exception):
    """A part that cannot run here; its message is the reason."""


# --------------------------------------------------------------------------- (a) bit equality


def _ieee_sqrt_patch():
    """torch's CPU sqrt is not correctly rounded (the kernel's and CUDA's are): on CPU the engine
    runs with a correctly rounded sqrt so that bit equality is the right test (tests/kernels does
    the same). Returns the function that undoes it."""
    import torch

    original = torch.Tensor.sqrt

    def ieee_sqrt(self):
        if self.dtype in (torch.float32, torch.bfloat16):
            return original(self.double()).float().to(self.dtype)
        return original(self)

    torch.Tensor.sqrt = ieee_sqrt
    return lambda: setattr(torch.Tensor, "sqrt", original)


def part_fused(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
    from onmerge_megatron.kernels import FusedOnlineMergingAdamW, triton_available

    if not triton_available():
        raise NotRun("triton does not import")
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise NotRun("no CUDA device (on CPU the kernels run under TRITON_INTERPRET=1: use --cpu-smoke)")
    device = torch.device("cuda" if on_gpu else "cpu")
    undo = None if on_gpu else _ieee_sqrt_patch()
    # Several 2^16-index mask blocks and odd sizes on the GPU; small tensors for the interpreter.
    shapes = ({"w0": (1024, 4096), "w1": (3, 70001), "w2": (17,)} if on_gpu else {"w0": (40, 48), "w1": (3001,), "w2": (17,)})
    dare = dict(method="dare", keep_rate=0.1, alpha=0.3)
    ties = dict(method="ties", keep_rate=0.05, alpha=0.3)
    cases = [
        ("OnDARE", OnlineMergeConfig(**dare), torch.float32, 4),
        ("OnDARE step-K (K=2)", OnlineMergeConfig(**dare, merge_every=2), torch.float32, 4),
        ("OnTIES", OnlineMergeConfig(**ties), torch.float32, 6),
        ("OnTIES step-K (K=3)", OnlineMergeConfig(**ties, merge_every=3), torch.float32, 7),
        ("OnDARE bf16", OnlineMergeConfig(**dare), torch.bfloat16, 4),
        ("OnTIES bf16", OnlineMergeConfig(**ties), torch.bfloat16, 6),
    ]
    rows, all_equal = [], True
    try:
        for label, config, dtype, steps in cases:
            gen = torch.Generator(device=device).manual_seed(0)
            base = {k: torch.randn(s, device=device, generator=gen) * 0.02 for k, s in shapes.items()}
            delta = {k: torch.randn(v.shape, device=device, generator=gen) * 1e-3 for k, v in base.items()}

            def build(cls, **kw):
                params = {k: torch.nn.Parameter(v.clone().to(dtype)) for k, v in base.items()}
                opt = cls(list(params.items()), lr=1e-3, weight_decay=0.01, merge=config, **kw)
                opt.set_reference_delta(delta=delta)
                return params, opt

            engine_params, engine = build(OnlineMergingAdamW)
            fused_params, fused = build(FusedOnlineMergingAdamW, backend="auto" if on_gpu else "triton")
            differing, checked, by_state = 0, 0, {}
            for _ in range(steps):
                for key, p in engine_params.items():
                    # Correlated gradients (a drift plus noise), as in training.
                    grad = ((torch.randn(p.shape, device=device, generator=gen) + 1.0) * 1e-2).to(dtype)
                    p.grad, fused_params[key].grad = grad.clone(), grad.clone()
                engine.step()
                fused.step()
                for key, p in engine_params.items():
                    q = fused_params[key]
                    pairs = [("param", p.detach(), q.detach())] + [(s, engine.state[p][s], fused.state[q][s]) for s in
                                                                   ("exp_avg", "exp_avg_sq", "merge_accumulator") if s in engine.state[p]]
                    for what, a, b in pairs:
                        checked += a.numel()
                        count = a.numel() if a.dtype != b.dtype else int((a != b).sum())
                        differing += count
                        by_state[what] = by_state.get(what, 0) + count
            kernel = {k: v for k, v in fused.kernel_counts.items() if v}
            equal = differing == 0
            # Equal because the kernels stood aside (the engine ran both) proves nothing.
            used = bool(kernel.get("fused"))
            all_equal &= equal and used
            result = ("bit-identical" if equal else "DIFFERS") if used else "kernel not used"
            rows.append([label, str(dtype).replace("torch.", ""), steps, f"{checked:,}",
                         f"{differing}" + ("" if equal else " (" + ", ".join(f"{k} {v}" for k, v in by_state.items()) + ")"),
                         result, ", ".join(f"{k} {v}" for k, v in sorted(kernel.items()))])
    finally:
        if undo is not None:
            undo()
    where = "CUDA" if on_gpu else "CPU, Triton interpreter, engine with a correctly rounded sqrt"
    from onmerge_megatron.kernels.adamw_merge import rounding_misses, torch_rounding

    rounding, misses = torch_rounding(device), rounding_misses(device)
    return {"status": "ok" if all_equal else "failed: the fused step differs from the engine, or the kernels were not used",
            "headers": ["case", "dtype", "steps", "elements compared", "differing", "result", "kernel paths taken"],
            "rows": rows,
            "notes": [f"Tensors {dict(shapes)} on {where}; params, exp_avg, exp_avg_sq and the step-K accumulator "
                      "compared after every step with torch.equal.",
                      f"torch's roundings read off the device (`torch_rounding`): {rounding}; elements each "
                      f"candidate form misses (`rounding_misses`): {misses}."]}


# --------------------------------------------------------------------------- (b) roofline


def _copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written), the practical ceiling."""
    import torch

    n = 1 << 30  # 4 GiB of fp32 each way
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 4 / statistics.median(times) / 1e9


def part_roofline(args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch

    if args.cpu_smoke or not torch.cuda.is_available():
        raise NotRun("needs a CUDA GPU (HBM bandwidth)")
    from fused_step import device_peak_gbps, optional_fused_adams, rotating_gradients, time_steps
    from optimizer_step import llama_shapes

    from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
    from onmerge_megatron.kernels import FusedOnlineMergingAdamW, triton_available

    device = torch.device("cuda")
    peak, peak_source = device_peak_gbps(device, args.peak_gbps)
    copy_gbps = _copy_bandwidth(device)
    shapes = llama_shapes(32000, 2048, 5632, 22, 256)  # TinyLlama-1.1B
    gen = torch.Generator(device=device).manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for n, s in shapes.items()}
    next_gradients = rotating_gradients(params, 3, gen)
    numel = sum(p.numel() for p in params.values())
    keep = 0.01
    hyper = dict(lr=1e-5, weight_decay=0.0)
    # Unavoidable traffic per element, fp32: read param, grad, exp_avg, exp_avg_sq; write param,
    # exp_avg, exp_avg_sq (28 bytes). The merging steps also read the sparse reference delta.
    dense = 28 * numel
    named = list(params.items())

    def merging(cls, method: str, every: int = 1):
        def build():
            opt = cls(named, merge=OnlineMergeConfig(method=method, keep_rate=keep, alpha=1e-6, merge_every=every), **hyper)
            opt.set_reference_delta(delta_fn=lambda name, coords: params[name].detach().reshape(-1).float() * 1e-2)
            return opt
        return build

    tau_dare, tau_ties = int(numel * keep) * 4, int(numel * keep) * 8
    rows_spec = [("torch AdamW (fused=True)", lambda: torch.optim.AdamW(params.values(), fused=True, **hyper), dense)]
    rows_spec += [(label, (lambda b=build: b(list(params.values()), **hyper)), dense) for label, build in optional_fused_adams()]
    if triton_available():
        rows_spec += [("fused OnDARE", merging(FusedOnlineMergingAdamW, "dare"), dense + tau_dare),
                      ("fused OnDARE step-K (K=2)", merging(FusedOnlineMergingAdamW, "dare", 2), dense + 8 * numel + tau_dare),
                      ("fused OnTIES", merging(FusedOnlineMergingAdamW, "ties"), dense + tau_ties)]
    rows_spec += [("engine OnDARE (unfused torch ops)", merging(OnlineMergingAdamW, "dare"), dense + tau_dare)]
    rows, syncs = [], []
    for label, build, nbytes in rows_spec:
        opt = build()
        seconds = time_steps(opt, device, warmup=3, steps=args.bench_steps, next_gradients=next_gradients)
        syncs.append(f"{label} {_profile_step(opt, label, args.work, next_gradients)}")
        del opt
        gc.collect()
        torch.cuda.empty_cache()
        gbps = nbytes / seconds / 1e9
        rows.append([label, f"{seconds * 1e3:.2f}", f"{nbytes / numel:.1f}", f"{gbps:.0f}",
                     f"{100 * gbps / peak:.0f}%" if peak else "n/a", f"{100 * gbps / copy_gbps:.0f}%"])
    missing = [] if any("FusedAdam" in r[0] for r in rows) else ["Transformer Engine and apex FusedAdam do not import here."]
    return {"status": "ok",
            "headers": ["optimizer", "step (ms)", "bytes/element", "GB/s", "% of peak", "% of measured copy"],
            "rows": rows,
            "notes": [f"{numel / 1e9:.3f}e9 fp32 parameters (TinyLlama-1.1B shapes), weight decay 0, p = {keep}; median "
                      f"of {args.bench_steps} steps after 3 warm-up steps.",
                      f"Peak {peak:.0f} GB/s ({peak_source}); a device-to-device copy measured {copy_gbps:.0f} GB/s "
                      "(bytes read + written)." if peak else f"Peak unknown ({peak_source}); copy {copy_gbps:.0f} GB/s.",
                      "bytes/element: 28 for Adam's dense traffic, plus the step-K accumulator (read + written) and "
                      "the sparse reference delta (fp32 values; OnTIES also int32 positions) over all elements.",
                      "Host synchronisations in one step (torch.cuda sync debug mode): " + "; ".join(syncs) + ".",
                      "Gradients: three random sets, rotated between steps outside the timed region.",
                      *missing]}


def _profile_step(opt, label: str, work: str, next_gradients) -> int:
    """One more step under torch.profiler, its busiest CUDA kernels and host ops written to
    work/profile-<label>.txt; returns the host synchronisations the step made."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    next_gradients()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                opt.step()
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    averages = prof.key_averages()
    slug = "".join(c if c.isalnum() else "_" for c in label)[:48]
    with open(os.path.join(work, f"profile-{slug}.txt"), "w") as f:
        f.write(f"{label}: {len(syncs)} host synchronisations\n")
        for w in syncs[:20]:
            f.write(f"  sync at {w.filename}:{w.lineno}\n")
        f.write(averages.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60) + "\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60) + "\n")
    return len(syncs)


# --------------------------------------------------------------------------- (c) DPO on one GPU


def _long_pairs(path: str, n: int, seed: int, words_per_side: tuple[int, int]) -> None:
    """Preference pairs of a few hundred words each from the shipped tiny texts' vocabulary."""
    import random

    words = set()
    with open(os.path.join(ROOT, "data", "tiny", "train.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            words.update(record["prompt"].replace("?", " ").replace(".", " ").split())
    vocab = sorted(words)
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(vocab, k=words_per_side[0]))
            answer = lambda: " ".join(rng.choices(vocab, k=words_per_side[1]))  # noqa: E731
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "user", "content": prompt},
                                                             {"role": "assistant", "content": answer()}],
                                "rejected": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer()}]}) + "\n")


GPU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02)
"""TinyLlama-1.1B's shape (Llama architecture, grouped-query attention)."""


def part_dpo_prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The model (policy start = SFT stand-in), its base (the SFT weights minus a small random task
    vector) and the data, under args.work."""
    import torch

    from onmerge_megatron.training.tiny_pipeline import make_base

    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "train.jsonl")
    if args.cpu_smoke or not torch.cuda.is_available():
        if not args.cpu_smoke:
            raise NotRun("needs a CUDA GPU (use --cpu-smoke for the tiny CPU run)")
        sft = make_base(os.path.join(args.work, "sft"), os.path.join(ROOT, "data", "tiny"))
        base = make_base(os.path.join(args.work, "base"), os.path.join(ROOT, "data", "tiny"), seed=1)
        # As many pairs as the steps use: the reference log-probs are computed for every record.
        with open(os.path.join(ROOT, "data", "tiny", "train.jsonl")) as f:
            lines = f.readlines()[: args.dpo_global_batch * (args.dpo_steps + 1)]
        with open(data, "w") as f:
            f.writelines(lines)
        return {"status": "ok", "sft": sft, "base": base, "data": data}
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # The tokenizer of the tiny pipeline (trained in code on the shipped texts); the model's
    # embedding has TinyLlama's 32000 rows, of which the tokenizer uses the first few hundred.
    tiny = make_base(os.path.join(args.work, "tiny"), os.path.join(ROOT, "data", "tiny"))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **GPU_MODEL)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = {}
    for name, weights in (("sft", state), ("base", {k: (v.float() - torch.randn_like(v, dtype=torch.float32) * 1e-3)
                                                    .to(torch.bfloat16) for k, v in state.items()})):
        directory = os.path.join(args.work, name)
        os.makedirs(directory, exist_ok=True)
        config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        save_file({k: v.cpu() for k, v in weights.items()}, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        out[name] = directory
    del model, state
    torch.cuda.empty_cache()
    pairs = args.dpo_global_batch * (args.dpo_steps + 1)
    _long_pairs(data, pairs, seed=0, words_per_side=(300, 650))
    return {"status": "ok", "sft": out["sft"], "base": out["base"], "data": data,
            "params": sum(v.numel() for v in weights.values())}


def dpo_config(args: argparse.Namespace, prepared: dict[str, Any], method: str) -> dict[str, Any]:
    smoke = args.cpu_smoke
    cfg = {
        "model": {"hf_path": prepared["sft"], "dtype": "fp32" if smoke else "bf16",
                  "transformer_impl": "local" if smoke else "auto", "recompute": args.recompute},
        "data": {"train_files": [prepared["data"]], "format": "pairs", "max_length": 64 if smoke else 1024,
                 "max_prompt_length": 32 if smoke else 512, "pack_sequences": True},
        "loss": {"type": "dpo", "beta": 0.1, "reference": "cached"},
        "optim": {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 1, "clip_grad": 1.0, "fused": "auto"},
        "parallel": {"tensor_parallel": 1, "micro_batch_size": args.dpo_micro_batch,
                     "global_batch_size": args.dpo_global_batch},
        "run": {"output_dir": os.path.join(args.work, f"run_{method}"), "train_steps": args.dpo_steps + 1,
                "save_final": False, "tensorboard": False, "log_every": 1, "resume": False},
    }
    if method != "none":
        cfg["merge"] = {"online": {"method": method, "keep_rate": 0.01, "alpha": 5e-7}, "base_hf_path": prepared["base"]}
    return cfg


def part_dpo_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from onmerge_megatron.training.config import ConfigError, config_from_dict, validate
    from onmerge_megatron.training.parallel import quiet_library_warnings
    from onmerge_megatron.training.plan import load_dims, plan_memory

    quiet_library_warnings()
    with open(args.prepared) as f:
        prepared = json.load(f)
    try:
        cfg = config_from_dict(dpo_config(args, prepared, args.method))
        validate(cfg, world_size=1, check_paths=True, check_devices=True)
    except ConfigError as exc:
        raise NotRun(f"config: {exc}") from None
    from onmerge_megatron.training.loop import Trainer
    from onmerge_megatron.training.model import use_transformer_engine

    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if on_gpu else 80.0
    # Planned with the layers this machine builds ('auto' plans for Transformer Engine by default).
    impl = "transformer_engine" if use_transformer_engine(cfg) else "local"
    planned_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, transformer_impl=impl))
    plan = plan_memory(planned_cfg, 1, load_dims(cfg), gpu_memory_gib=gpu_gib)

    trainer = Trainer(cfg)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens, last = [], [], {}
    for _ in range(args.dpo_steps + 1):  # the first step (kernel compilation, allocator growth) is not timed
        ids = trainer.sampler.microbatches(trainer.step, 0)
        n_tokens = sum(len(trainer.train_examples[i].prompt_ids) * 2 + sum(len(c) for c in trainer.train_examples[i].completions)
                       for mb in ids for i in mb)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        last = trainer.train_step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(n_tokens)
    step = statistics.median(times[1:])
    tok_s = statistics.median(t / s for t, s in zip(tokens[1:], times[1:]))
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    fused = type(trainer.merge.inner_optimizers[0]).__name__ if trainer.merge is not None else "torch Adam (megatron)"
    return {"status": "ok", "method": METHOD_LABEL[args.method], "step_s": step, "tokens_per_s": tok_s,
            "tokens_per_step": statistics.mean(tokens[1:]), "peak_gib": peak, "planned_gib": plan.total / 2**30,
            "planned": {r.component: r.bytes / 2**30 for r in plan.rows}, "loss": last.get("loss"),
            "te": use_transformer_engine(cfg), "optimizer": fused, "recompute": cfg.model.recompute,
            "packing": cfg.data.pack_sequences}


def part_dpo(args: argparse.Namespace, run_part) -> dict[str, Any]:
    """Prepare once, then one process per method (a failing method does not stop the others)."""
    prepared = run_part("dpo_prepare", [])
    if prepared["status"] != "ok":
        return prepared
    path = os.path.join(args.work, "prepared.json")
    with open(path, "w") as f:
        json.dump(prepared, f)
    rows, statuses, detail = [], [], None
    for method in METHODS:
        result = run_part("dpo_run", ["--method", method, "--prepared", path])
        statuses.append(result["status"])
        if result["status"] != "ok":
            rows.append([METHOD_LABEL[method], result["status"], "", "", "", "", "", ""])
            continue
        peak = _size(result["peak_gib"]) if result["peak_gib"] is not None else "n/a (CPU)"
        ratio = f"{result['peak_gib'] / result['planned_gib']:.2f}" if result["peak_gib"] is not None else "n/a"
        rows.append([result["method"], f"{result['step_s']:.3f}", f"{result['tokens_per_s']:.0f}",
                     f"{result['tokens_per_step']:.0f}", peak, _size(result["planned_gib"]), ratio, result["optimizer"]])
        detail = detail or result
    status = "ok" if all(s == "ok" for s in statuses) else next(s for s in statuses if s != "ok")
    notes = []
    if detail:
        model = "the tiny test model (fp32, CPU)" if args.cpu_smoke else \
            f"a random {prepared.get('params', 0) / 1e9:.2f}e9-parameter Llama (TinyLlama-1.1B shape), bf16"
        notes.append(f"{model}; Transformer Engine layers: {'yes' if detail['te'] else 'no'}; packing: "
                     f"{detail['packing']}; recompute: {detail['recompute']}; "
                     f"micro-batch {args.dpo_micro_batch} pairs, global batch {args.dpo_global_batch}; median of "
                     f"{args.dpo_steps} steps after one untimed step.")
        notes.append("planned: `onmerge plan`'s total for this config (weights, gradients, main params, moments, "
                     "merge state, activations, logits; no reserve); peak: torch.cuda.max_memory_allocated over the "
                     "training steps. Planner components (first method that ran): "
                     + ", ".join(f"{k} {_size(v)}" for k, v in detail["planned"].items()))
    return {"status": status, "headers": ["optimizer", "step (s)", "tokens/s", "tokens/step", "peak memory",
                                          "planned", "peak / planned", "shard step by"], "rows": rows, "notes": notes}


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


# --------------------------------------------------------------------------- orchestration


def machine_info() -> list[tuple[str, str]]:
    import importlib.metadata as md

    import torch

    info = [("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
            ("python", platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch build)", str(torch.version.cuda))]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info += [("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")]
    else:
        info += [("GPU", "none (CPU)")]
    for dist in ("triton", "megatron-core", "transformers", "mbridge", "transformer-engine", "apex"):
        try:
            info.append((dist, md.version(dist)))
        except md.PackageNotFoundError:
            info.append((dist, "not installed"))
    return info


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


TITLES = {
    "fused": "(a) Fused kernel vs engine: bit equality",
    "roofline": "(b) Optimizer step against the HBM roofline",
    "dpo": "(c) DPO on one GPU: AdamW vs OnDARE vs OnTIES",
}


def render(results: dict[str, dict[str, Any]], info: list[tuple[str, str]], smoke: bool, command: str) -> str:
    lines = ["# GPU check results", "",
             f"Written by `{command}`{' (CPU smoke mode: tiny sizes, not GPU results)' if smoke else ''}. "
             "Each part runs in its own process; a part that could not run says why.", "",
             "## Machine", ""]
    lines += _table(["", ""], [[k, v] for k, v in info])
    for part in PARTS:
        result = results[part]
        lines += ["", f"## {TITLES[part]}", ""]
        if result["status"] != "ok":
            lines += [f"Status: {result['status']}", ""]
        if result.get("rows"):
            lines += _table(result["headers"], result["rows"]) + [""]
        lines += [note for n in result.get("notes", []) for note in (n, "")]
    return "\n".join(lines).rstrip() + "\n"


def atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gpu_results.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_log(path: str, stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    with open(path, "w") as f:
        for name, text in (("stdout", stdout), ("stderr", stderr)):
            text = text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
            f.write(f"===== {name}\n{text}\n")


def _tail(text: str, n: int = 600) -> str:
    text = " ".join(text.strip().splitlines()[-6:])
    return text[-n:]


def orchestrate(args: argparse.Namespace) -> int:
    args.work = args.work or tempfile.mkdtemp(prefix="onmerge-gpu-check-")
    os.makedirs(args.work, exist_ok=True)
    scale = args.time_scale
    smoke_flags = ["--cpu-smoke"] if args.cpu_smoke else []
    common = smoke_flags + ["--work", args.work, "--dpo-steps", str(args.dpo_steps), "--dpo-micro-batch",
                            str(args.dpo_micro_batch), "--dpo-global-batch", str(args.dpo_global_batch),
                            "--recompute", args.recompute, "--bench-steps", str(args.bench_steps)]
    if args.peak_gbps:
        common += ["--peak-gbps", str(args.peak_gbps)]

    def run_part(name: str, extra: list[str]) -> dict[str, Any]:
        result_path = os.path.join(args.work, f"{name}-{'-'.join(extra[1:2]) or 'x'}.json")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if name == "fused" and args.cpu_smoke:
            env["TRITON_INTERPRET"] = "1"  # this part's process only
        limit = GPU_LIMITS.get(name, 120) * scale
        cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", result_path, *common, *extra]
        started = time.time()
        print(f"[gpu_check] {name} {' '.join(extra[:2])} ...", flush=True)
        log_path = result_path[: -len(".json")] + ".log"  # the part's whole output, for a failure's traceback
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            _write_log(log_path, exc.stdout, exc.stderr)
            result = {"status": f"failed: did not finish within {limit:.0f} s"}
        else:
            _write_log(log_path, proc.stdout, proc.stderr)
            if os.path.isfile(result_path):
                with open(result_path) as f:
                    result = json.load(f)
            else:
                result = {"status": f"failed: exit status {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"}
        print(f"[gpu_check] {name} {' '.join(extra[:2])}: {result['status']} ({time.time() - started:.0f} s)", flush=True)
        return result

    results = {}
    for part in args.parts:
        results[part] = part_dpo(args, run_part) if part == "dpo" else run_part(part, [])
    for part in PARTS:
        results.setdefault(part, {"status": "not run: not selected (--parts)"})
    command = "python bench/gpu_check.py --cpu-smoke" if args.cpu_smoke else "bash bench/gpu_check.sh"
    atomic_write(args.out, render(results, machine_info(), args.cpu_smoke, command))
    print(f"[gpu_check] wrote {args.out}")
    for part in PARTS:
        print(f"  {part}: {results[part]['status']}")
    return 0 if all(results[p]["status"] == "ok" or results[p]["status"].startswith("not run") for p in PARTS) else 1


def run_one_part(args: argparse.Namespace) -> int:
    """One part in this process; its result (or why it did not run, or its error) goes to --result."""
    functions = {"fused": part_fused, "roofline": part_roofline, "dpo_prepare": part_dpo_prepare, "dpo_run": part_dpo_run}
    try:
        result = functions[args.part](args)
    except NotRun as exc:
        result = {"status": f"not run: {exc}"}
    except Exception as exc:  # noqa: BLE001 - reported in the results file, the other parts go on
        traceback.print_exc()
        result = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results file (markdown; default docs/gpu_results.md, with "
                        "--cpu-smoke runs/gpu_check_cpu_smoke.md)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (kernels under the Triton interpreter)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--work", default=None, help="scratch directory for models and runs (default: a new temporary one)")
    parser.add_argument("--dpo-steps", type=int, default=5, help="timed DPO steps per optimizer (after one untimed step)")
    parser.add_argument("--dpo-micro-batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--dpo-global-batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="selective", help="model.recompute of the DPO runs")
    parser.add_argument("--bench-steps", type=int, default=10, help="timed optimizer steps per row of (b)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="HBM peak for (b) (default: from the device name)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every part's time limit (slow machines)")
    # Internal: one part in a process of its own.
    parser.add_argument("--part", choices=("fused", "roofline", "dpo_prepare", "dpo_run"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(ROOT, "runs", "gpu_check_cpu_smoke.md") if args.cpu_smoke else os.path.join(ROOT, "docs", "gpu_results.md")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; expected some of {list(PARTS)}")
    for key in ("dpo_steps", "dpo_micro_batch", "dpo_global_batch", "bench_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.dpo_global_batch % args.dpo_micro_batch:
        parser.error(f"--dpo-global-batch ({args.dpo_global_batch}) must be a multiple of --dpo-micro-batch ({args.dpo_micro_batch})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_one_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
