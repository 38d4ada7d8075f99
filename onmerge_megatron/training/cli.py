"""Command line: `onmerge train --config FILE.yaml [--set key=value ...]`, and
`onmerge export-hf --checkpoint DIR --out DIR` (a saved checkpoint in Hugging Face format).

Single process:        onmerge train --config configs/tiny_cpu_dpo.yaml
Several processes:     torchrun --nproc-per-node 2 -m onmerge_megatron.training.cli train --config ...
The configuration is loaded and checked (unknown keys, types, files, parallel sizes against
WORLD_SIZE) before any process group, model or data is touched; errors exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config
from .parallel import quiet_library_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onmerge", description="DPO/IPO/KTO on megatron-core with online merging")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see docs/config.md)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=1e-6 (repeatable)")
    check = sub.add_parser("check-config", help="validate a config and print it, without training")
    check.add_argument("--config", required=True)
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--world-size", type=int, default=None)
    check.add_argument("--no-paths", action="store_true", help="skip the existence checks of input files")
    conv = sub.add_parser("convert-hf", help="save an HF model as a megatron dist checkpoint (e.g. a base for merging)")
    conv.add_argument("--hf", required=True, help="HF model directory")
    conv.add_argument("--out", required=True, help="output checkpoint directory")
    conv.add_argument("--tensor-parallel", type=int, default=1)
    conv.add_argument("--pipeline-parallel", type=int, default=1)
    exp = sub.add_parser("export-hf", help="export a checkpoint of a run in Hugging Face format (one process, any TP/PP)")
    exp.add_argument("--checkpoint", required=True,
                     help="a checkpoint directory (OUTPUT_DIR/checkpoints/step_N), or a run's output_dir for its newest intact one")
    exp.add_argument("--out", required=True, help="the export directory (written whole or not at all)")
    exp.add_argument("--hf", default=None, help="the HF model the run started from (architecture, tokenizer, generation "
                     "config); default: model.hf_path as saved in the checkpoint")
    exp.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    from .plan import add_arguments as add_plan_arguments

    add_plan_arguments(sub.add_parser("plan", help="per-GPU memory (and time) of a config at a world size, "
                                      "without launching it; exit status 1 when it does not fit"))
    from ..evaluation.cli import add_arguments as add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="capability tasks (lm-eval), preference reward and tax "
                                      "against the SFT model; see docs/eval.md"))
    # Its own options (see tiny_pipeline.py); main() hands them over untouched.
    sub.add_parser("tiny-pipeline", help="the tiny base -> SFT -> DPO+OnDARE pipeline (run under torchrun); "
                   "options: see python -m onmerge_megatron.training.tiny_pipeline --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tiny-pipeline"]:
        from .tiny_pipeline import main as tiny_main

        tiny_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    quiet_library_warnings()
    if args.command == "plan":
        from .plan import run as run_plan

        return run_plan(args)
    if args.command == "eval":
        from ..evaluation.cli import run as run_eval

        return run_eval(args)
    if args.command == "export-hf":
        from .export import run_export_command

        return run_export_command(args.checkpoint, args.out, args.hf, args.overwrite)
    train = args.command == "train"
    if args.command == "convert-hf":
        from .export import convert_hf_to_megatron

        convert_hf_to_megatron(args.hf, args.out, args.tensor_parallel, args.pipeline_parallel)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        return 0
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if train else args.world_size
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size,
                          check_paths=train or not args.no_paths, check_devices=train)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from .loop import Trainer
    from .parallel import is_rank0

    try:
        result = Trainer(cfg).train()
    except ConfigError as exc:  # found once the data is read (run.epochs against the record count)
        if is_rank0():
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    if is_rank0():
        print(f"done: {result.step} steps in {result.seconds:.1f}s; outputs in {result.output_dir}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
