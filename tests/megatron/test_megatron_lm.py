"""Online merging through Megatron-LM's own training package (``megatron.training``), on CPU/gloo.

``megatron.training`` is not in the megatron-core wheel: these tests run when ``ONMERGE_MEGATRON_LM``
points at a Megatron-LM checkout of the release matching the installed megatron-core (tag
``core_v0.16.1``), and are skipped otherwise. See docs/megatron.md, "Megatron-LM's pretrain()".

- the parser: ``megatron.training.arguments.parse_args`` with ``extra_args_provider`` gets every
  ``--online-merge-*`` flag;
- the wrapped factory: ``enable_online_merging_in_megatron_lm`` makes
  ``megatron.training.training.get_megatron_optimizer`` return an ``OnlineMergingOptimizer`` built
  from the parsed flags (GPTModel, DDP, distributed optimizer at DP=2);
- ``pretrain()`` itself: ``pretrain_gpt.py``'s providers and ``forward_step`` driven by
  ``pretrain`` with the lines docs/megatron.md gives, on 2 gloo processes with ``--mock-data``:
  a first run saves a base checkpoint, a second runs OnDARE against it (τ = initial weights − base,
  built at the first step) and saves, a third resumes from that checkpoint. Every inner optimizer
  step is recorded (fp32 main shards, gradients, learning rate) and the runs are replayed by the
  independent dense transcription of the paper's Algorithm 2 (tests/reference_impl.py) from the
  recorded gradients, with τ read from the base checkpoint by megatron's own reader.

This file is also the training script of the ``pretrain()`` runs (``__main__`` below).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

CHECKOUT_ENV = "ONMERGE_MEGATRON_LM"
RECORD_FLAG = "--test-record-file"
LR = 1e-2
KEEP_RATE = 0.5
ALPHA = 0.3
SEED = 5
TRAIN_ITERS = 3
RESUMED_ITERS = 2


def _checkout() -> Path:
    value = os.environ.get(CHECKOUT_ENV)
    if not value:
        pytest.skip(f"{CHECKOUT_ENV} is not set: point it at a Megatron-LM checkout (tag core_v0.16.1) to run these tests")
    path = Path(value)
    if not (path / "megatron" / "training" / "training.py").is_file() or not (path / "pretrain_gpt.py").is_file():
        pytest.fail(f"{CHECKOUT_ENV}={value} is not a Megatron-LM checkout (no megatron/training/training.py, pretrain_gpt.py)")
    return path


def _use_checkout(path: str) -> None:
    """Make ``megatron.training`` importable in this (child) process. Appended, not prepended:
    ``megatron`` is a namespace package, so ``megatron.core`` stays the installed wheel's."""
    if path not in sys.path:
        sys.path.append(path)


def _tiny_gpt_flags() -> list[str]:
    """Megatron-LM flags of a tiny GPT that runs on CPU: local layer spec, no fused kernels."""
    return [
        "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4",
        "--transformer-impl", "local", "--use-cpu-initialization", "--distributed-backend", "gloo",
        "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-rope-fusion",
        "--attention-dropout", "0", "--hidden-dropout", "0",
        "--lr", str(LR), "--lr-decay-style", "constant", "--lr-decay-iters", "100", "--weight-decay", "0", "--seed", "1234",
    ]


MERGE_FLAGS = [
    "--online-merge", "dare", "--online-merge-keep-rate", str(KEEP_RATE), "--online-merge-alpha", str(ALPHA),
    "--online-merge-seed", str(SEED),
]


# ------------------------------------------------------------------------------------ the parser
def parser_job(rank: int, world: int, tp: int, pp: int, tmp: str, checkout: str, argv: list[str]) -> None:
    _use_checkout(checkout)
    from megatron.training.arguments import parse_args

    from onmerge_megatron.megatron.args import OnlineMergeSettings, add_online_merge_args

    saved, sys.argv = sys.argv, ["pretrain_gpt.py", *_tiny_gpt_flags(), *argv]  # parse_args reads sys.argv
    try:
        args = parse_args(extra_args_provider=add_online_merge_args)
    finally:
        sys.argv = saved
    settings = OnlineMergeSettings.from_args(args)
    torch.save({"settings": settings.to_dict(), "num_layers": args.num_layers, "lr": args.lr}, Path(tmp, "parsed.pt"))


def test_megatron_lm_parser_takes_the_flags(tmp_path: Path) -> None:
    """Every ``--online-merge-*`` flag, each with a value other than its default (test_args'
    table), through Megatron-LM's own parser, next to Megatron-LM's flags."""
    import mcore_harness as h
    from test_args import FLAG_VALUES

    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron.args import OnlineMergeSettings

    checkout = _checkout()
    # OnDARE: the table's 'resampled' reference mask has no meaning with OnTIES.
    argv = ["--online-merge", "dare", *(arg for name, (flags, _) in FLAG_VALUES.items() if name != "method" for arg in flags),
            "--online-merge-base", "/ckpts/base", "--online-merge-base-key-prefix", "model."]
    h.spawn(parser_job, 1, tmp_path, checkout=str(checkout), argv=argv)
    parsed = torch.load(tmp_path / "parsed.pt")
    assert parsed["num_layers"] == 2 and parsed["lr"] == LR  # Megatron-LM's own flags still parse
    settings = OnlineMergeSettings(**parsed["settings"])
    expected = {name: value for name, (_, value) in FLAG_VALUES.items()} | {"method": "dare"}
    assert settings.merge_config() == OnlineMergeConfig(**expected)
    assert (settings.base, settings.base_hf, settings.base_key_prefix) == ("/ckpts/base", None, "model.")


# ----------------------------------------------------------------------------- the wrapped factory
def factory_job(rank: int, world: int, tp: int, pp: int, tmp: str, checkout: str) -> None:
    import mcore_harness as h

    _use_checkout(checkout)
    import megatron.training.training as training
    from megatron.core.optimizer import OptimizerConfig
    from megatron.training.arguments import parse_args
    from megatron.training.global_vars import set_args

    from onmerge_megatron import OnlineMergingAdamW
    from onmerge_megatron.megatron import OnlineMergingOptimizer
    from onmerge_megatron.megatron.args import add_online_merge_args, enable_online_merging_in_megatron_lm

    saved, sys.argv = sys.argv, ["pretrain_gpt.py", *_tiny_gpt_flags(), *MERGE_FLAGS, "--online-merge-base", "/ckpts/base"]
    try:
        args = parse_args(extra_args_provider=add_online_merge_args)
    finally:
        sys.argv = saved
    set_args(args)  # what initialize_megatron does; the wrapped factory reads get_args()
    enable_online_merging_in_megatron_lm()
    enable_online_merging_in_megatron_lm()  # idempotent: wraps once
    model = h.wrap_ddp(h.build_model(), tp, pp)
    optimizer = training.get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, use_distributed_optimizer=True), [model]
    )
    assert isinstance(optimizer, OnlineMergingOptimizer), type(optimizer)
    inners = optimizer.inner_optimizers
    torch.save({
        "config": optimizer.merge_config,
        "inner": sorted({type(inner).__name__ for inner in inners}),
        "merging_adamw": all(isinstance(inner, OnlineMergingAdamW) for inner in inners),
        "lr": sorted({group["lr"] for inner in inners for group in inner.param_groups}),
        "pending_base": getattr(optimizer.pending_reference, "path", None),
        "wrapped_once": getattr(training.get_megatron_optimizer, "__wrapped__", None) is not None
        and not getattr(training.get_megatron_optimizer.__wrapped__, "__wrapped_by_online_merge__", False),
    }, Path(tmp, f"factory{rank}.pt"))


@pytest.mark.slow
def test_megatron_lm_factory_builds_the_merging_optimizer(tmp_path: Path) -> None:
    import mcore_harness as h

    from onmerge_megatron import OnlineMergeConfig

    checkout = _checkout()
    h.spawn(factory_job, 2, tmp_path, checkout=str(checkout))
    for rank in range(2):
        built = torch.load(tmp_path / f"factory{rank}.pt", weights_only=False)
        assert built["config"] == OnlineMergeConfig(method="dare", keep_rate=KEEP_RATE, alpha=ALPHA, seed=SEED)
        assert built["inner"] == ["OnlineMergingAdamW"] and built["merging_adamw"]
        assert built["lr"] == [LR]
        assert built["pending_base"] == "/ckpts/base"  # τ is built at the first step, after pretrain's load
        assert built["wrapped_once"]


# ----------------------------------------------------------------------------------- pretrain()
def _run_pretrain(checkout: Path, tmp: Path, record: Path, flags: list[str]) -> str:
    from distributed import torchrun_command

    command, env = torchrun_command(2, [__file__, *_tiny_gpt_flags(), "--mock-data", "--tokenizer-type", "NullTokenizer",
                                        "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
                                        "--use-distributed-optimizer", RECORD_FLAG, str(record), *flags])
    env[CHECKOUT_ENV] = str(checkout)
    done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    ranks = "\n".join(line for line in output.splitlines() if line.startswith("[rank"))  # the ranks' tracebacks
    assert done.returncode == 0, (ranks or output)[-6000:]
    return output


def _assemble(pieces: list[dict[str, Any]], key: str) -> dict[str, torch.Tensor]:
    """Whole flat tensors from the ranks' pieces (each with the global indices it holds)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for piece in pieces:
        name, numel = piece["name"], piece["numel"]
        out.setdefault(name, torch.full((numel,), float("nan")))
        seen.setdefault(name, torch.zeros(numel, dtype=torch.int64))
        out[name][piece["index"]] = piece[key]
        seen[name][piece["index"]] += 1
    for name, count in seen.items():
        assert bool((count == 1).all()), f"{name}: elements held by {sorted(set(count.tolist()))} ranks"
    return out


def _base_delta(base: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """τ = initial weights − base, the base read whole from its checkpoint by megatron's reader:
    names are checkpoint keys, ``key[i]`` for layer i of a layer-stacked key."""
    delta = {}
    for name, values in init.items():
        key, _, layer = name.rstrip("]").partition("[")
        full = base[key].float()
        delta[name] = values - (full[int(layer)] if layer else full).reshape(-1)
    return delta


@pytest.mark.slow
def test_pretrain_gpt_runs_online_merging(tmp_path: Path) -> None:
    """Megatron-LM's pretrain() with --online-merge dare at DP=2 (distributed optimizer) on CPU equals
    Algorithm 2 replayed on the gradients pretrain computed; the checkpoint it saves holds the merge
    state, and a pretrain() resumed from it continues the replay. A first pretrain() run (merging
    off) trains one step and saves the base."""
    import mcore_harness as h
    from reference_impl import Algorithm2

    checkout = _checkout()
    _run_pretrain(checkout, tmp_path, tmp_path / "plain-rank", ["--train-iters", "1", "--save", str(tmp_path / "base"), "--save-interval", "1"])
    plain = torch.load(tmp_path / "plain-rank0", weights_only=False)
    assert plain["optimizer"] == "ChainedOptimizer" and plain["inner"] == ["AdamW"], plain  # flags off: megatron's own

    base_dir = tmp_path / "base" / "iter_0000001"
    merged = _run_pretrain(checkout, tmp_path, tmp_path / "merge-rank",
                           ["--train-iters", str(TRAIN_ITERS), *MERGE_FLAGS, "--online-merge-base", str(base_dir),
                            "--save", str(tmp_path / "merged"), "--save-interval", str(TRAIN_ITERS)])
    records = [torch.load(tmp_path / f"merge-rank{rank}", weights_only=False) for rank in range(2)]
    for record in records:
        assert record["optimizer"] == "OnlineMergingOptimizer" and record["inner"] == ["OnlineMergingAdamW"], record
        assert record["steps_taken"] == [TRAIN_ITERS] and len(record["steps"]) == TRAIN_ITERS
        assert record["losses"] and all(torch.isfinite(torch.tensor(record["losses"]))), record["losses"]
    logged = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", merged)]
    assert len(logged) == TRAIN_ITERS and all(torch.isfinite(torch.tensor(logged))), logged

    # Replay: the ranks' pieces of each step, whole.
    steps = [[piece for record in records for piece in record["steps"][t]] for t in range(TRAIN_ITERS)]
    assert {piece["lr"] for step in steps for piece in step} == {LR}
    assert {piece["weight_decay"] for step in steps for piece in step} == {0.0}
    init = _assemble(steps[0], "before")
    base = h.plain_tensors(base_dir)
    delta = _base_delta(base, init)
    reference, without_tau = (
        Algorithm2(init, delta, method="dare", keep_rate=KEEP_RATE, alpha=alpha, merge_every=1, lr=LR, weight_decay=0.0, seed=SEED)
        for alpha in (ALPHA, 0.0)
    )
    worst = 0.0
    for t, step in enumerate(steps):
        grads = _assemble(step, "grad")
        reference.step(grads)
        without_tau.step(grads)
        after = _assemble(step, "after")
        for name, values in after.items():
            worst = max(worst, float((values - reference.params[name]).abs().max()))
        if t + 1 < TRAIN_ITERS:  # the next step starts where this one ended (megatron's all-gather)
            following = _assemble(steps[t + 1], "before")
            assert all(torch.equal(following[n], after[n]) for n in after)
    assert worst == 0.0, worst  # bit for bit: the same element-wise operations on the same values
    # τ took part: the same run without it (alpha 0) ends elsewhere.
    assert max(float((after[n] - without_tau.params[n]).abs().max()) for n in after) > 1e-3

    # pretrain's checkpoint holds the merge state (τ, its mask, the step counter, the settings) ...
    saved = h.plain_tensors(tmp_path / "merged" / f"iter_{TRAIN_ITERS:07d}")
    assert any(key.startswith("online_merge.reference.") for key in saved), sorted(saved)[:20]

    # ... and pretrain resumes from it without the base (τ, Adam's moments and step come back):
    # the resumed steps continue the replay.
    _run_pretrain(checkout, tmp_path, tmp_path / "resume-rank",
                  ["--train-iters", str(TRAIN_ITERS + RESUMED_ITERS), *MERGE_FLAGS, "--load", str(tmp_path / "merged"),
                   "--override-opt_param-scheduler"])  # a longer run than saved: megatron's own flag
    records = [torch.load(tmp_path / f"resume-rank{rank}", weights_only=False) for rank in range(2)]
    assert all(record["steps_taken"] == [TRAIN_ITERS + RESUMED_ITERS] for record in records), records[0]["steps_taken"]
    resumed = [[piece for record in records for piece in record["steps"][t]] for t in range(RESUMED_ITERS)]
    start = _assemble(resumed[0], "before")
    assert all(torch.equal(start[n], after[n]) for n in after)  # the saved weights
    worst = 0.0
    for step in resumed:
        reference.step(_assemble(step, "grad"))
        after = _assemble(step, "after")
        worst = max(worst, *(float((after[n] - reference.params[n]).abs().max()) for n in after))
    assert worst == 0.0, worst


# ------------------------------------------------------------- the training script of those runs
def _record_inner_steps(optimizer: Any, rank_steps: list[list[dict[str, Any]]]) -> None:
    """Record, at every inner optimizer step of this rank, each fp32 main shard before and after,
    its gradient and its group's lr, with the global indices of its elements."""
    from onmerge_megatron.megatron import compat

    inners = [sub.optimizer for sub in compat.sub_optimizers(optimizer)]
    for inner in inners:
        if not hasattr(inner, "segments"):  # merging off: megatron's own Adam, nothing to record
            continue
        original = inner.step

        def step(closure: Any = None, inner: Any = inner, original: Any = original) -> Any:
            pieces = []
            for group in inner.param_groups:
                for param in group["params"]:
                    (segment,) = inner.segments(param)
                    coords = segment.coords
                    pieces.append({
                        "name": segment.name, "numel": coords.global_numel, "param": param,
                        "index": coords.global_index(torch.arange(coords.numel)),
                        "before": param.detach().clone().reshape(-1), "grad": param.grad.detach().clone().reshape(-1),
                        "lr": group["lr"], "weight_decay": group["weight_decay"],
                    })
            result = original(closure)
            for piece in pieces:
                piece["after"] = piece.pop("param").detach().clone().reshape(-1)
            rank_steps.append(pieces)
            return result

        inner.step = step


def _record_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(RECORD_FLAG, dest="test_record_file", type=str, default=None)
    return parser


def main() -> None:
    """pretrain_gpt.py's ``__main__`` with the online-merge lines of docs/megatron.md, on CPU."""
    _use_checkout(os.environ[CHECKOUT_ENV])
    from functools import partial

    import megatron.training.training as training
    import pretrain_gpt  # the checkout's script: its providers and forward_step
    from gpt_builders import gpt_builder
    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain
    from model_provider import model_provider

    from onmerge_megatron.megatron import compat, cpu
    from onmerge_megatron.megatron.args import add_online_merge_args, combine_extra_args_providers, enable_online_merging_in_megatron_lm

    cpu.enable_cpu_megatron_lm(script_modules=("pretrain_gpt",))
    enable_online_merging_in_megatron_lm()  # the documented line

    # Instrumentation: the optimizer pretrain builds, its inner steps and the losses.
    built: list[Any] = []
    steps: list[list[dict[str, Any]]] = []
    losses: list[float] = []
    wrapped_factory = training.get_megatron_optimizer

    def recording_factory(*args: Any, **kwargs: Any) -> Any:
        optimizer = wrapped_factory(*args, **kwargs)
        built.append(optimizer)
        _record_inner_steps(optimizer, steps)
        return optimizer

    training.get_megatron_optimizer = recording_factory
    loss_func = pretrain_gpt.loss_func

    def recording_loss(*args: Any, **kwargs: Any) -> Any:
        loss, num_tokens, report = loss_func(*args, **kwargs)
        losses.append(float(loss) / max(int(num_tokens), 1))
        return loss, num_tokens, report

    pretrain_gpt.loss_func = recording_loss

    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(model_provider, gpt_builder),
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=combine_extra_args_providers(_record_provider, add_online_merge_args),
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )
    (optimizer,) = built
    inners = [sub.optimizer for sub in compat.sub_optimizers(optimizer)]
    args = get_args()
    torch.save({
        "optimizer": type(optimizer).__name__,
        "inner": sorted({type(inner).__name__ for inner in inners}),
        "steps_taken": sorted({inner.steps_taken() for inner in inners}) if hasattr(inners[0], "steps_taken") else None,
        "steps": steps,
        "losses": losses,
    }, f"{args.test_record_file}{torch.distributed.get_rank()}")


if __name__ == "__main__":
    main()
