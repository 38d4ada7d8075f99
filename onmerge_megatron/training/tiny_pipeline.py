"""The whole pipeline, tiny, on CPU: base model -> SFT -> DPO with OnDARE against tau = SFT - base.

    torchrun --nproc-per-node 2 -m onmerge_megatron.training.tiny_pipeline --out runs/tiny

1. base:  a tokenizer trained in code on the shipped texts (data/tiny) and a randomly initialised
          Llama-architecture model, both saved in Hugging Face format (rank 0).
2. sft:   supervised fine-tuning on data/tiny/sft.jsonl with data parallelism (DP=2), exported to
          HF format: this is the reference model and the policy's starting point.
3. dpo:   DPO (beta 0.1) on data/tiny/train.jsonl with tensor parallelism (TP=2) and online
          merging (OnDARE) against tau = SFT - base; reference log-probs are cached from the SFT
          weights; held-out pairs from data/tiny/eval.jsonl are evaluated before and after.
Ends with a summary table and a plot of the training curves (curves.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from .config import config_from_dict, validate
from .metrics import format_duration, read_metrics

TINY_MODEL = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    hidden_act="silu", initializer_range=0.05,
)


def make_base(out_dir: str, data_dir: str, seed: int = 0) -> str:
    """Tokenizer + random tiny Llama in HF format under out_dir/base (idempotent)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import train_tiny_tokenizer

    base = os.path.join(out_dir, "base")
    if os.path.isfile(os.path.join(base, "model.safetensors")):
        return base
    texts = []
    for name in ("sft.jsonl", "train.jsonl"):
        with open(os.path.join(data_dir, name)) as f:
            for line in f:
                record = json.loads(line)
                texts.append(record["prompt"])
                for key in ("completion", "chosen", "rejected"):
                    value = record.get(key)
                    if isinstance(value, str):
                        texts.append(value)
                    elif isinstance(value, list):
                        texts.append(value[-1]["content"])
    tokenizer = train_tiny_tokenizer(texts, vocab_size=384)
    # Embedding rows rounded up to a multiple of 64 so any small TP size divides the vocabulary.
    vocab = -(-len(tokenizer) // 64) * 64
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)
    # What save_pretrained would record; TRL builds its reference model from this field.
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    # Written directly with safetensors (what save_pretrained writes for an untied model) to keep
    # this step free of accelerate's optional integrations.
    from safetensors.torch import save_file

    os.makedirs(base, exist_ok=True)
    config.save_pretrained(base)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(base, "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(base)
    return base


def stage_configs(out: str, data: str, base: str, steps_sft: int, steps_dpo: int) -> tuple[dict, dict]:
    sft = {
        "model": {"hf_path": base},
        "data": {"train_files": [f"{data}/sft.jsonl"], "eval_files": [f"{data}/eval.jsonl"], "format": "sft",
                 "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "sft"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": min(5, steps_sft - 1), "clip_grad": 1.0},
        "parallel": {"tensor_parallel": 1, "micro_batch_size": 8, "global_batch_size": 32},
        "run": {"output_dir": f"{out}/sft", "train_steps": steps_sft, "eval_every": max(steps_sft // 4, 1),
                "export_hf": True, "save_final": True, "log_every": 10},
    }
    dpo = {
        "model": {"hf_path": f"{out}/sft/hf"},
        "data": {"train_files": [f"{data}/train.jsonl"], "eval_files": [f"{data}/eval.jsonl"], "format": "pairs",
                 "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": min(3, steps_dpo - 1), "clip_grad": 1.0},
        "parallel": {"tensor_parallel": 2, "micro_batch_size": 8, "global_batch_size": 32},
        # Tiny-scale settings: a 100k-parameter model trained for 60 steps at lr 1e-3 needs a larger
        # keep rate and merge weight than the paper's 8B (p = 0.01, alpha = 5e-7, lr 5e-7). With a
        # fixed tau mask each step adds alpha/p * tau on the same elements, so alpha * steps / p
        # must stay well below 1: alpha = 5e-2 here collapses, as alpha = 1e-4 does in the paper.
        "merge": {"online": {"method": "dare", "keep_rate": 0.2, "alpha": 1e-2, "seed": 0}, "base_hf_path": base},
        "run": {"output_dir": f"{out}/dpo", "train_steps": steps_dpo, "eval_every": max(steps_dpo // 4, 1),
                "export_hf": True, "save_final": True, "log_every": 5},
    }
    return sft, dpo


def _series(records: list[dict], split: str, key: str) -> tuple[list, list]:
    rows = [r for r in records if r["split"] == split and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_curves(out: str, stages: list[tuple[str, str]]) -> str:
    """Training curves, 1500 x 900 px: SFT NLL; then, for every DPO run, loss, held-out reward
    accuracy, margins and the held-out NLL of chosen answers (how far the policy drifts from SFT:
    the alignment tax). Each run keeps one colour in every panel; train: thin line, held-out: dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sft = read_metrics(os.path.join(out, "sft", "metrics.jsonl"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    ax_sft, ax_loss, ax_acc, ax_margin, ax_nll, ax_key = axes.flat
    sft_color = "black"
    colors = {label: f"C{i}" for i, (label, _) in enumerate(stages)}

    def train_and_eval(ax, records, key, color):
        ax.plot(*_series(records, "train", key), color=color, alpha=0.35, linewidth=1)
        ax.plot(*_series(records, "eval", key), "o-", color=color, markersize=4)

    train_and_eval(ax_sft, sft, "loss", sft_color)
    for label, directory in stages:
        records = read_metrics(os.path.join(out, directory, "metrics.jsonl"))
        train_and_eval(ax_loss, records, "loss", colors[label])
        for ax, key in ((ax_acc, "rewards/accuracy"), (ax_margin, "rewards/margins"), (ax_nll, "sft_nll")):
            ax.plot(*_series(records, "eval", key), "o-", color=colors[label], markersize=4)
    panels = (
        (ax_sft, "SFT: NLL per token", "SFT step", "NLL per completion token (nats)"),
        (ax_loss, "DPO loss", "DPO step", "DPO loss (nats)"),
        (ax_acc, "held-out reward accuracy (ties count as wrong)", "DPO step", "fraction of pairs, chosen reward > rejected"),
        (ax_margin, "held-out reward margin", "DPO step", "chosen - rejected reward (beta x log-ratio, nats)"),
        (ax_nll, "held-out NLL of chosen answers (drift from SFT)", "DPO step", "NLL per token of chosen answers (nats)"),
    )
    for ax, title, xlabel, ylabel in panels:
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_key.axis("off")
    handles = [Line2D([], [], color=sft_color, label="SFT")]
    handles += [Line2D([], [], color=colors[label], linewidth=3, label=label) for label, _ in stages]
    handles += [Line2D([], [], color="gray", alpha=0.35, label="train (every step)"),
                Line2D([], [], color="gray", marker="o", markersize=4, label="held-out evaluation")]
    ax_key.legend(handles=handles, loc="center", fontsize=12, frameon=False)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_table(out: str, stages: list[tuple[str, str]], timings: dict[str, float]) -> str:
    sft = json.load(open(os.path.join(out, "sft", "summary.json")))
    runs = [(label, json.load(open(os.path.join(out, d, "summary.json"))), d) for label, d in stages]
    first = runs[0][1]["eval_first"]
    header = ["held-out metric", "SFT model"] + [label for label, _, _ in runs]
    rows = [header]
    rows.append(["NLL per token (base -> SFT)", f"{sft['eval_first']['loss']:.3f} -> {sft['eval_last']['loss']:.3f}"] + [""] * len(runs))
    for key, name in (("loss", "DPO loss"), ("rewards/accuracy", "reward accuracy"), ("rewards/margins", "reward margin"),
                      ("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"),
                      ("sft_nll", "NLL of chosen answers")):
        rows.append([name, f"{first[key]:.3f}"] + [f"{r['eval_last'][key]:.3f}" for _, r, _ in runs])
    for label, _, directory in runs:
        train = [r for r in read_metrics(os.path.join(out, directory, "metrics.jsonl")) if r["split"] == "train"]
        kept = [r["merge/kept_fraction"] for r in train if "merge/kept_fraction" in r]
        if kept:
            rows.append([f"kept fraction ({label})", "", f"{sum(kept) / len(kept):.3f}"] + [""] * (len(runs) - 1))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    lines.append("time: " + ", ".join(f"{k} {format_duration(v)}" for k, v in timings.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tiny base -> SFT -> DPO+OnDARE pipeline on CPU")
    parser.add_argument("--out", default="runs/tiny")
    parser.add_argument("--data", default="data/tiny")
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--merge", choices=("dare", "ties"), default="dare", help="online merge of the DPO stage")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-AdamW DPO run used for comparison")
    args = parser.parse_args(argv)
    from .parallel import quiet_library_warnings

    quiet_library_warnings()
    t0 = time.time()
    timings: dict[str, float] = {}

    from .loop import Trainer
    from .parallel import init_distributed

    sft_cfg, dpo_cfg = stage_configs(args.out, args.data, os.path.join(args.out, "base"), args.sft_steps, args.dpo_steps)
    cfg = config_from_dict(sft_cfg)
    init_distributed(cfg)  # the process group is shared by all stages
    rank = dist.get_rank()
    stages = [(f"DPO+On{args.merge.upper()}", "dpo")] + ([] if args.no_baseline else [("DPO AdamW", "dpo_adamw")])
    n_stages = 2 + len(stages)
    if rank == 0:
        # Every run starts the stages afresh (a finished stage would otherwise be resumed).
        for stage in ["sft"] + [d for _, d in stages]:
            shutil.rmtree(os.path.join(args.out, stage), ignore_errors=True)
        print(f"[1/{n_stages}] base model and tokenizer -> {args.out}/base", flush=True)
        make_base(args.out, args.data)
    dist.barrier()
    timings["base"] = time.time() - t0

    t = time.time()
    if rank == 0:
        print(f"[2/{n_stages}] SFT of the base model (data parallel x{dist.get_world_size()})", flush=True)
    validate(cfg, world_size=dist.get_world_size())
    Trainer(cfg).train()
    timings["sft"] = time.time() - t

    for i, (label, directory) in enumerate(stages):
        t = time.time()
        stage_cfg = json.loads(json.dumps(dpo_cfg))
        stage_cfg["run"]["output_dir"] = os.path.join(args.out, directory)
        if directory == "dpo":
            stage_cfg["merge"]["online"]["method"] = args.merge
            what = f"{label} against tau = SFT - base"
        else:
            stage_cfg["merge"] = {"online": {"method": "none"}}
            what = f"{label} (no merging), for comparison"
        if rank == 0:
            print(f"[{3 + i}/{n_stages}] {what} (tensor parallel x2)", flush=True)
        cfg = config_from_dict(stage_cfg)
        validate(cfg, world_size=dist.get_world_size())
        Trainer(cfg).train()
        timings[directory] = time.time() - t
    timings["total"] = time.time() - t0

    if rank == 0:
        plot = plot_curves(args.out, stages)
        print()
        print(summary_table(args.out, stages, timings))
        print(f"curves: {plot}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
