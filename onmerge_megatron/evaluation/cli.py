"""The `onmerge eval` subcommand's options and entry point (registered in training/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
                        help="an exported Hugging Face model directory (repeatable; the order is the report's)")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names, e.g. gsm8k,mmlu")
    parser.add_argument("--reward-tasks", default="",
                        help="comma-separated lm-eval tasks that score the reward (e.g. a rule-based one); no tax")
    parser.add_argument("--include-path", default=None, help="directory of local lm-eval task YAML files")
    parser.add_argument("--reference", default="sft", help="name of the reference (SFT) model: tax 0, π_ref of the rewards")
    parser.add_argument("--reward-pairs", default=None, help="held-out preference pairs (JSONL/Parquet, the trainer's layout)")
    parser.add_argument("--reward-model", default=None, help="HF sequence-classification model scoring greedy generations")
    parser.add_argument("--categories", default=None, help="YAML file of 'task: category' entries (added to the defaults)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for results.md, results.json, reward_vs_tax.png")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    parser.add_argument("--add-bos-token", action="store_true", help="prepend BOS to lm-eval contexts (lm-eval's HFLM option)")
    parser.add_argument("--no-chat-template", action="store_true", help="render pairs as bos+prompt, completion+eos")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation length for the reward model")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run code-execution tasks (humaneval, mbpp): sets HF_ALLOW_CODE_EVAL=1")


def run(args: argparse.Namespace) -> int:
    from .runner import EvalInputError, EvalRequest, evaluate_models, parse_model_specs

    try:
        if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
            raise EvalInputError(f"--batch-size, --max-new-tokens and --limit must be positive, got "
                                 f"{args.batch_size}, {args.max_new_tokens}, {args.limit}")
        if args.allow_code_execution:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # lm-eval's code-execution metrics read it
        device = args.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        request = EvalRequest(
            models=parse_model_specs(args.models), tasks=[t for t in args.tasks.split(",") if t], out=args.out,
            reward_tasks=[t for t in args.reward_tasks.split(",") if t],
            reference=args.reference, include_path=args.include_path, reward_pairs=args.reward_pairs,
            reward_model=args.reward_model, categories_file=args.categories, device=device, dtype=args.dtype,
            batch_size=args.batch_size, limit=args.limit, add_bos_token=args.add_bos_token,
            use_chat_template=not args.no_chat_template, max_new_tokens=args.max_new_tokens,
            allow_code_execution=args.allow_code_execution,
        )
        evaluate_models(request)
    except EvalInputError as exc:
        print(f"eval error: {exc}", file=sys.stderr)
        return 2
    return 0
