"""The training loop: DPO / IPO / hinge / KTO / SFT on megatron-core, with online merging.

One step: every data-parallel rank runs `num_microbatches` micro-batches through megatron-core's
pipeline schedule (forward, loss, backward; gradients accumulate in DDP's buffers), DDP
reduce-scatters the gradients, the distributed optimizer clips and steps its shard (with online
merging installed, that step is the merged one) and all-gathers the parameters. LR follows
linear warmup then cosine decay (megatron's OptimizerParamScheduler).

Reference log-probabilities are, by default, computed once with the initial weights and cached
in `output_dir/reference_logps/` (`reference_logps.py`), so no reference model is held during
training; `loss.reference: online` runs a frozen reference model instead.

`Trainer` composes the pieces: the process and its parallel groups (`parallel.py`), the models
(`model_setup.py`), the micro-batches, losses and evaluation (`forward_backward.py`), dist
checkpoints and resumes (`dist_checkpoint.py`), and weights export (`export.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from ..merging.merger import MergeStats
from ..optim import OnlineMergingAdamW, reduce_merge_stats
from .config import TrainConfig, dump_config, steps_from_epochs
from .data import DataStats, StepSampler, load_examples, split_holdout
from .dist_checkpoint import (
    CHECKPOINT_METADATA,
    loading_errors_named,
    lock_output_dir,
    open_checkpoint,
    refuse_nonfinite_weights,
    restored_settings,
    resume_config_changes,
    save_dist_checkpoint,
)
from .export import export_hf_weights
from .forward_backward import ForwardBackward, finalize_sums, format_metrics
from .metrics import MetricsLogger
from .model import LayerSettings, make_bridge, unwrap
from .model_setup import build_and_load, frozen_reference_model, sync_params, wrap_ddp
from .parallel import device, init_distributed, is_rank0, log0

# --------------------------------------------------------------------------- the trainer


def inner_optimizer_class(cfg: TrainConfig) -> Callable[..., OnlineMergingAdamW]:
    """The online-merging optimizer megatron's distributed optimizer steps its shards with
    (`optim.fused`): the fused Triton AdamW + merge step on CUDA when triton imports ('auto'; true
    requires it, validation checks), the PyTorch engine otherwise. On CPU the kernel runs only
    under Triton's interpreter (TRITON_INTERPRET=1, for tests), where true selects it."""
    fused = cfg.optim.fused
    if fused is False:
        return OnlineMergingAdamW
    from onmerge_megatron.kernels import FusedOnlineMergingAdamW, triton_available

    if not triton_available():
        return OnlineMergingAdamW
    if torch.cuda.is_available():
        return FusedOnlineMergingAdamW  # backend 'auto': the kernel on the (CUDA) main shards
    if fused is True:
        return partial(FusedOnlineMergingAdamW, backend="triton")  # interpreter (validated)
    return OnlineMergingAdamW


@dataclasses.dataclass
class TrainResult:
    step: int
    train: dict[str, float]
    eval_first: dict[str, float] | None
    eval_last: dict[str, float] | None
    seconds: float
    output_dir: str


class Trainer:
    """Builds everything from a TrainConfig; `train()` runs the loop. All ranks construct it."""

    def __init__(self, cfg: TrainConfig):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        init_distributed(cfg)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dev = device()
        p = cfg.parallel
        self.num_microbatches = p.global_batch_size // (p.micro_batch_size * self.dp_size)
        self.loss_type = cfg.loss.type
        self.out = cfg.run.output_dir
        self.checkpoint_root = os.path.join(self.out, "checkpoints")
        self.lock = lock_output_dir(self.out)
        # Found (and verified) before anything is built: the merge setup depends on it.
        if cfg.run.resume:
            self.resume_from = ckpt.find_resume_checkpoint(self.checkpoint_root, log0)
        else:
            self.resume_from = None
            existing = ckpt.published_steps(self.checkpoint_root)
            if existing:
                # Starting over would meet these at its own save steps, and a checkpoint is never rewritten.
                raise ckpt.CheckpointError(
                    f"run.resume is false but {self.checkpoint_root} holds checkpoints of an earlier run "
                    f"({', '.join(os.path.basename(d) for _, d in existing[:3])}); choose a new run.output_dir or remove them")
        self.skipped_steps = 0  # steps whose update was skipped for a non-finite gradient (optim.nonfinite)
        self.consecutive_skips = 0

        # Data
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.hf_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        d = cfg.data
        load = partial(load_examples, tokenizer=self.tokenizer, fmt=d.format, max_length=d.max_length,
                       max_prompt_length=d.max_prompt_length, use_chat_template=d.use_chat_template, on_error=d.on_error)
        self.train_examples, train_stats = load(d.train_files)
        if d.eval_files:
            self.eval_examples, eval_stats = load(d.eval_files)
        else:
            self.train_examples, self.eval_examples = split_holdout(self.train_examples, d.eval_fraction, cfg.run.seed)
            eval_stats = DataStats()
        self._report_data(train_stats, eval_stats)
        self.sampler = StepSampler(self.train_examples, p.micro_batch_size, self.num_microbatches, self.dp_size,
                                   d.bucket_size, cfg.run.seed, d.shuffle)
        if cfg.run.epochs:
            # The step count needs the training records (after the held-out split); set before the LR
            # schedule is built and config.yaml written, so they and the checkpoints hold the computed value.
            configured = cfg.run.train_steps
            self.cfg = cfg = steps_from_epochs(cfg, len(self.train_examples))
            log0(f"run.train_steps = {cfg.run.train_steps}: run.epochs {cfg.run.epochs} x {len(self.train_examples)} "
                 f"training records / global batch {p.global_batch_size}, rounded up; this overrides the configured "
                 f"run.train_steps ({configured})")
        if is_rank0():
            dump_config(cfg, os.path.join(self.out, "config.yaml"))

        # Model, DDP, optimizer, LR schedule
        dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        layers = LayerSettings.from_config(cfg)
        log0(f"model: {'Transformer Engine' if layers.transformer_engine else 'local'} layer spec, sequence parallel "
             f"{'on' if layers.sequence_parallel else 'off'}, recompute {layers.recompute}")
        self.bridge = make_bridge(cfg.model.hf_path, dtype, layers)
        self.model = build_and_load(self.bridge, cfg.data.max_length, cfg.model.load_format, cfg.model.hf_path,
                                    cfg.model.megatron_load, layers.transformer_engine)
        self.model = wrap_ddp(self.model, bf16=cfg.model.dtype == "bf16", overlap_grad_reduce=p.overlap_grad_reduce,
                              overlap_param_gather=p.overlap_param_gather)
        self.optimizer, self.scheduler = self._build_optimizer()
        self.merge = self._install_merging()

        # Reference log-probs (cached from the initial weights) or a frozen reference model.
        reference = None if self.loss_type == "sft" else cfg.loss.reference
        self.forward_backward = ForwardBackward(cfg, self.model, self.pad_id,
                                                frozen_reference_model(cfg, self.bridge) if reference == "online" else None)
        if reference == "cached":
            for split, examples, files in (("train", self.train_examples, d.train_files),
                                           ("eval", self.eval_examples, d.eval_files or d.train_files)):
                self.forward_backward.cache_reference_logps(split, examples, files)

        self.step = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.metrics = MetricsLogger(self.out, cfg.run.train_steps, is_rank0(), cfg.run.tensorboard,
                                     resume_step=self.step if self.resume_from is not None else None)

    # ------------------------------------------------------------------ construction helpers

    def _report_data(self, train_stats: DataStats, eval_stats: DataStats) -> None:
        for split, stats, n in (("train", train_stats, len(self.train_examples)), ("eval", eval_stats, len(self.eval_examples))):
            if stats.records or n:
                log0(f"data/{split}: {n} examples from {stats.records} records; skipped {stats.skipped} malformed; "
                     f"truncated prompts {stats.prompt_truncated}, completions {stats.completion_truncated}")
            for reason in stats.skipped_reasons[:5]:
                log0(f"  skipped: {reason}")
            if stats.empty_answers or stats.identical_answers:
                log0(f"WARNING: data/{split}: {stats.empty_answers} record(s) with an empty answer, "
                     f"{stats.identical_answers} pair(s) whose chosen and rejected answers are the same (kept)")
                for reason in stats.suspicious_reasons[:5]:
                    log0(f"  {reason}")
        if not self.eval_examples:
            log0("data/eval: no held-out examples (set data.eval_files or data.eval_fraction); evaluation is skipped")

    def _build_optimizer(self) -> tuple[Any, Any]:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, r = self.cfg.optim, self.cfg.run
        bf16 = self.cfg.model.dtype == "bf16"
        # A constant loss scale of 1 changes no value (x * 1.0 == x), but makes megatron check the
        # main gradients for inf/NaN before every update, on the device, with one host sync,
        # agreed over all ranks: a non-finite gradient then never reaches Adam's moments or the
        # weights (the update itself is finite whenever the gradient is, since adam_eps > 0).
        opt_config = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=True, loss_scale=1.0,
            overlap_param_gather=self.cfg.parallel.overlap_param_gather,
        )
        optimizer = get_megatron_optimizer(opt_config, self.model)
        self.model[0].config.grad_scale_func = optimizer.scale_loss
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=r.train_steps, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=r.train_steps, wd_incr_style="constant",
            override_opt_param_scheduler=r.override_scheduler, use_checkpoint_opt_param_scheduler=not r.override_scheduler,
        )
        return optimizer, scheduler

    def _install_merging(self) -> Any:
        """Make the optimizer's step an online-merging step (Megatron integration): from here on
        `self.optimizer` is the `OnlineMergingOptimizer` wrapping megatron's, also returned (None
        without merging). The reference delta tau = initial weights - base is read now from the base
        checkpoint, or, on a resume, comes back with the optimizer state."""
        online = self.cfg.merge.online
        if not online.merges:
            return None
        from onmerge_megatron.megatron import FROM_CHECKPOINT, MegatronCheckpointBase, install_online_merging

        source = None
        if online.needs_reference:
            g = self.cfg.merge
            if self.resume_from is not None:
                source = FROM_CHECKPOINT
            elif g.base_hf_path:
                from onmerge_megatron.megatron.hf import HuggingFaceBase

                source = HuggingFaceBase(g.base_hf_path, bridge=make_bridge(g.base_hf_path, torch.float32))
            else:
                source = MegatronCheckpointBase(open_checkpoint(g.base_megatron_load, "merge base"))
            where = "the checkpoint" if source == FROM_CHECKPOINT else (g.base_hf_path or g.base_megatron_load)
            log0(f"merge: reference delta = initial weights - base (from {where})")
        inner_class = inner_optimizer_class(self.cfg)
        self.optimizer = install_online_merging(self.optimizer, self.model, online, reference_delta_source=source,
                                                progress=False, optimizer_class=inner_class)
        for inner in self.optimizer.inner_optimizers:
            inner.track_update_norm = self.cfg.merge.log_update_norm
        log0(f"merge: {online.method} p={online.keep_rate} alpha={online.alpha} every {online.merge_every} step(s); "
             f"step: {'fused Triton kernel' if inner_class is not OnlineMergingAdamW else 'PyTorch engine'}")
        return self.optimizer

    # ------------------------------------------------------------------ train / eval

    def train_step(self) -> dict[str, float]:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        ids = self.sampler.microbatches(self.step, self.dp_rank)
        batches = [self.forward_backward.make_batch(self.train_examples, mb, "train") for mb in ids]
        # The LR of step s is the schedule's value at s + 1, so warmup's first step is not lr = 0.
        self.scheduler.step(increment=1)
        local = self.forward_backward.run(batches, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.step += 1
        if not update_ok:
            self._nonfinite_gradient()
        else:
            self.consecutive_skips = 0
        values = finalize_sums(self.loss_type, self.forward_backward.reduce_sums(local))
        values["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["skipped_steps"] = self.skipped_steps
        if self.merge is not None and update_ok:
            values.update(self.merge_stats())
        return values

    def _nonfinite_gradient(self) -> None:
        """The optimizer found inf/NaN in the gradients and left weights and state untouched
        (every rank agrees). Skip the step, or stop, as optim.nonfinite says."""
        o = self.cfg.optim
        where = f"step {self.step}: a gradient holds inf/NaN; the update was not applied (weights and optimizer state are unchanged)"
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if o.nonfinite == "stop":
            raise FloatingPointError(
                f"{where}. Stopping (optim.nonfinite=stop). The last checkpoint is "
                f"{ckpt.read_latest(self.checkpoint_root) or 'none'}. Usual causes: a learning rate too high for "
                f"the model, bad data, fp16/bf16 overflow; optim.nonfinite=skip skips such steps instead")
        if self.consecutive_skips >= o.max_consecutive_skips:
            raise FloatingPointError(
                f"{where}. {self.consecutive_skips} consecutive steps skipped (optim.max_consecutive_skips="
                f"{o.max_consecutive_skips}): the run is not recovering; stopping")
        log0(f"WARNING: {where}; skipped ({self.skipped_steps} so far)")

    def merge_stats(self) -> dict[str, float]:
        """Engine statistics since the last step over all ranks (each merges its own shard): the raw
        sums reduced, then the ratios, so that every element weighs the same whatever its shard."""
        local = MergeStats()
        for inner in self.merge.inner_optimizers:
            local.add(inner.merge_sums())
        stats = reduce_merge_stats(local).as_dict()
        out = {f"merge/{key}": stats[key] for key in ("kept_fraction", "update_norm", "merged_norm")}
        if self.cfg.merge.online.method == "ties":
            out["merge/sign_conflict_rate"] = stats["sign_conflict_rate"]
        return out

    def evaluate(self) -> dict[str, float] | None:
        return self.forward_backward.evaluate(self.eval_examples)

    def train(self) -> TrainResult:
        r = self.cfg.run
        keys = {"kto": ("loss", "kl", "rewards/margins", "lr"), "sft": ("loss", "lr")}.get(
            self.loss_type, ("loss", "rewards/accuracy", "rewards/margins", "lr"))
        keys += ("padding_fraction",)  # padded positions / all positions of the step's rows
        eval_first = None
        if self.step == 0:
            eval_first = self.evaluate()
            if eval_first is not None:
                self.metrics.log("eval", 0, eval_first)
                log0("eval step 0: " + format_metrics(eval_first))
        last: dict[str, float] = {}
        eval_last = eval_first
        t0 = time.time()
        stop = r.stop_at_step or r.train_steps
        while self.step < stop:
            last = self.train_step()
            self.metrics.log("train", self.step, last)
            if self.step % r.log_every == 0 or self.step == r.train_steps:
                self.metrics.progress(self.step, last, keys)
            if r.eval_every and self.step % r.eval_every == 0 and self.step < stop:
                eval_last = self.evaluate()
                if eval_last is not None:
                    self.metrics.log("eval", self.step, eval_last)
                    log0(f"eval step {self.step}: " + format_metrics(eval_last))
            if r.save_every and self.step % r.save_every == 0 and self.step < stop:
                self.save_checkpoint()
        if self.step > 0:
            eval_last = self.evaluate()
            if eval_last is not None:
                self.metrics.log("eval", self.step, eval_last)
                log0(f"eval step {self.step}: " + format_metrics(eval_last))
        if r.save_final or self.step < r.train_steps:
            self.save_checkpoint()
        if r.export_hf and self.step == r.train_steps:
            sync_params(self.model)
            export_hf_weights(self.model, self.bridge, self.tokenizer, os.path.join(self.out, "hf"), self.step,
                              self.cfg.model.hf_path)
        self.metrics.close()
        seconds = time.time() - t0
        result = TrainResult(self.step, last, eval_first, eval_last, seconds, self.out)
        if is_rank0():
            ckpt.atomic_write_text(os.path.join(self.out, "summary.json"), json.dumps(dataclasses.asdict(result), indent=1))
        self.lock.release()
        return result

    # ------------------------------------------------------------------ checkpoints

    # Optimizer state is saved per parameter in model coordinates, so a run can resume with
    # other TP/DP sizes; the merge state (tau, step-K accumulator) travels with it.
    def _sharded_state(self, loading: bool) -> dict[str, Any]:
        model_sd = unwrap(self.model[0]).sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(
                model_sd, is_loading=loading, metadata=CHECKPOINT_METADATA),
        }

    def check_weights_finite(self, what: str) -> None:
        """Refuse to write weights holding inf/NaN (collective)."""
        sync_params(self.model)  # the last step's weights, with parameter all-gather overlap too
        refuse_nonfinite_weights(self.model, self.step, what)

    def save_checkpoint(self) -> str:
        """Write the checkpoint of this step, publish it whole, then point `latest` at it. An
        existing checkpoint of the same step is never rewritten."""
        final = os.path.join(self.checkpoint_root, ckpt.step_name(self.step))
        if os.path.isdir(final):
            log0(f"checkpoint {final} exists; not rewritten")
            return final
        self.check_weights_finite(f"checkpoint {final}")
        state = self._sharded_state(loading=False)
        state["scheduler"] = self.scheduler.state_dict()
        state["trainer"] = {"step": self.step, "config": self.cfg.to_dict(), "skipped_steps": self.skipped_steps}
        save_dist_checkpoint(state, final, f"saving checkpoint {final}")
        if is_rank0():
            ckpt.write_latest(self.checkpoint_root, final)
            if self.cfg.run.keep_last:
                for removed in ckpt.prune_checkpoints(self.checkpoint_root, self.cfg.run.keep_last, protect=final):
                    log0(f"removed checkpoint {removed} (run.keep_last={self.cfg.run.keep_last})")
        dist.barrier()
        log0(f"saved checkpoint {final}")
        return final

    def _resume(self, directory: str) -> None:
        from megatron.core import dist_checkpointing

        from ..megatron import compat

        compat.init_adam_state_for_loading(self.optimizer)
        state = self._sharded_state(loading=True)
        state["scheduler"] = self.scheduler.state_dict()
        state["trainer"] = {"step": 0, "config": {}, "skipped_steps": 0}
        with loading_errors_named(directory):
            loaded = dist_checkpointing.load(state, directory)
            with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
                unwrap(self.model[0]).load_state_dict(loaded["model"])
                self.optimizer.load_state_dict(loaded["optimizer"])
                compat.restore_adam_steps(self.optimizer)
            self.scheduler.load_state_dict(loaded["scheduler"])
            if self.cfg.run.override_scheduler:
                # megatron's scheduler reads each param group's own max_lr/min_lr, which came back
                # from the checkpoint with the groups.
                for group in self.optimizer.param_groups:
                    group.update({k: v for k, v in (("max_lr", self.cfg.optim.lr), ("min_lr", self.cfg.optim.min_lr)) if k in group})
        trainer = loaded["trainer"]
        self.step = int(trainer["step"])
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        log0(f"resumed from {directory} at step {self.step}")
        restored = restored_settings(loaded["scheduler"], self.optimizer.param_groups[0])
        for line in resume_config_changes(trainer.get("config") or {}, self.cfg, restored):
            log0(line)
