"""The training loop: DPO / IPO / hinge / KTO / SFT on megatron-core, with online merging.

One step: every data-parallel rank runs `num_microbatches` micro-batches through megatron-core's
pipeline schedule (forward, loss, backward; gradients accumulate in DDP's buffers), DDP
reduce-scatters the gradients, the distributed optimizer clips and steps its shard (with online
merging installed, that step is the merged one) and all-gathers the parameters. LR follows
linear warmup then cosine decay (megatron's OptimizerParamScheduler).

Reference log-probabilities are, by default, computed once with the initial weights and cached
in `output_dir/reference_logps/` (`reference_logps.py`), so no reference model is held during
training; `loss.reference: online` runs a frozen reference model instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import time
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ..megatron.compat import checkpoint_results_queue_dies_with_process
from ..processes import forked_children_die_with_parent
from . import checkpoints as ckpt
from .config import TrainConfig, dump_config, validate
from .data import Batch, DataStats, Example, StepSampler, collate, eval_microbatches, load_examples, split_holdout
from .losses import kto_kl_estimate, kto_loss, paired_loss, sft_loss
from .metrics import MetricsLogger
from .model import build_model, causal_attention_mask, export_hf, load_hf_weights, make_bridge, on_gpu, unwrap

# --------------------------------------------------------------------------- distributed setup


def init_distributed(cfg: TrainConfig) -> None:
    """Process group from torchrun's environment (or a single local process), then megatron's
    model-parallel groups. Checks the parallel sizes against the world size first."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world_size, check_paths=False, check_devices=True)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if on_gpu() else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    # Checkpoint writers die with this rank (see save_dist_checkpoint).
    forked_children_die_with_parent()
    from megatron.core import parallel_state

    tp, pp, seed = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.run.seed
    if on_gpu():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        from onmerge_megatron.megatron.cpu import enable_cpu_megatron, initialize_cpu_model_parallel

        enable_cpu_megatron()
        initialize_cpu_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def is_rank0() -> bool:
    return dist.get_rank() == 0


def log0(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


# Optimizer state saved per parameter in model coordinates (reshardable across TP and DP), gathered
# without the non-gloo path that would move tensors to the GPU.
CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}

# --------------------------------------------------------------------------- metric bookkeeping

# Sums reduced over micro-batches and ranks each step; names per loss family.
PAIR_SUMS = ("pairs", "loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logps", "rejected_logps", "sft_nll")
KTO_SUMS = ("examples", "loss", "desirable", "desirable_reward", "undesirable", "undesirable_reward", "kl", "microbatches")
SFT_SUMS = ("tokens", "nll", "sequences")


def sum_names(loss_type: str) -> tuple[str, ...]:
    return {"kto": KTO_SUMS, "sft": SFT_SUMS}.get(loss_type, PAIR_SUMS)


def finalize_sums(loss_type: str, sums: dict[str, float]) -> dict[str, float]:
    """Averages from reduced sums: the numbers that are logged."""
    if loss_type == "sft":
        nll = sums["nll"] / max(sums["tokens"], 1)
        return {"loss": nll, "nll": nll, "perplexity": math.exp(min(nll, 50)), "tokens": sums["tokens"]}
    if loss_type == "kto":
        n = max(sums["examples"], 1)
        out = {"loss": sums["loss"] / n, "kl": sums["kl"] / max(sums["microbatches"], 1)}
        out["rewards/desirable"] = sums["desirable_reward"] / max(sums["desirable"], 1)
        out["rewards/undesirable"] = sums["undesirable_reward"] / max(sums["undesirable"], 1)
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return out
    n = max(sums["pairs"], 1)
    return {
        "loss": sums["loss"] / n,
        "rewards/accuracy": sums["accuracy"] / n,
        "rewards/chosen": sums["chosen_reward"] / n,
        "rewards/rejected": sums["rejected_reward"] / n,
        "rewards/margins": sums["margin"] / n,
        "logps/chosen": sums["chosen_logps"] / n,
        "logps/rejected": sums["rejected_logps"] / n,
        "sft_nll": sums["sft_nll"] / n,
    }


# --------------------------------------------------------------------------- the trainer


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
        self.ps = ps
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dev = device()
        p = cfg.parallel
        self.num_microbatches = p.global_batch_size // (p.micro_batch_size * self.dp_size)
        self.loss_type = cfg.loss.type
        # SFT on preference data trains on the chosen side only.
        self.kind = {"kto": "unpaired", "sft": "sft"}.get(self.loss_type, "pairs")
        self.with_kl = self.loss_type == "kto" and cfg.loss.kto_kl
        self.out = cfg.run.output_dir
        self.checkpoint_root = os.path.join(self.out, "checkpoints")
        self.lock = self._lock_output_dir()
        if is_rank0():
            dump_config(cfg, os.path.join(self.out, "config.yaml"))
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

        # Model, DDP, optimizer, LR schedule
        dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        self.bridge = make_bridge(cfg.model.hf_path, dtype)
        self.model = self._build_and_load(cfg.model.load_format, cfg.model.hf_path, cfg.model.megatron_load)
        self.model = self._wrap_ddp(self.model)
        self.optimizer, self.scheduler = self._build_optimizer()
        self.merge = self._install_merging()

        # Reference log-probs (cached from the initial weights) or a frozen reference model.
        self.ref_model = None
        self.ref_cache: dict[str, torch.Tensor] = {}
        if self.loss_type != "sft":
            if cfg.loss.reference == "cached":
                from .reference_logps import cached_reference_logps

                for split, examples, files in (("train", self.train_examples, d.train_files),
                                               ("eval", self.eval_examples, d.eval_files or d.train_files)):
                    self.ref_cache[split] = cached_reference_logps(self, split, examples, files)
            else:
                fmt = "megatron" if cfg.loss.reference_megatron_load else "hf"
                self.ref_model = self._build_and_load(fmt, cfg.loss.reference_hf_path or cfg.model.hf_path,
                                                      cfg.loss.reference_megatron_load)
                if cfg.model.dtype == "bf16":
                    from megatron.core.transformer.module import Float16Module

                    self.ref_model = [Float16Module(c.config, c) for c in self.ref_model]
                for chunk in self.ref_model:
                    chunk.eval()
                    chunk.requires_grad_(False)

        self.step = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.metrics = MetricsLogger(self.out, cfg.run.train_steps, is_rank0(), cfg.run.tensorboard,
                                     resume_step=self.step if self.resume_from is not None else None)

    # ------------------------------------------------------------------ construction helpers

    def _lock_output_dir(self) -> ckpt.RunLock:
        """Rank 0 locks output_dir before anything is written there; every rank learns the
        outcome, so a second launch on the same directory fails as a whole, naming the holder."""
        lock = ckpt.RunLock(self.out)
        error = None
        if is_rank0():
            try:
                lock.acquire()
            except ckpt.RunLockedError as exc:
                error = str(exc)
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ckpt.RunLockedError(verdict[0])
        return lock

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

    def _build_and_load(self, fmt: str, hf_path: str, megatron_load: str | None) -> list[torch.nn.Module]:
        chunks = build_model(self.bridge, self.cfg.data.max_length)
        if fmt == "hf":
            load_hf_weights(self.bridge, chunks, hf_path)
        else:
            directory = open_checkpoint(megatron_load, "model weights")
            with loading_errors_named(directory):
                from megatron.core import dist_checkpointing

                state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, directory)
                chunks[0].load_state_dict(state["model"], strict=True)
        return chunks

    def _wrap_ddp(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            use_distributed_optimizer=True,
            # Non-finite gradients are caught by the optimizer's found-inf check (see
            # _build_optimizer), which can skip a step; DDP's own check can only abort.
            check_for_nan_in_grad=False,
        )
        if self.cfg.model.dtype == "bf16":
            from megatron.core.transformer.module import Float16Module

            # As Megatron-LM: every parameter (norms included) in bf16, inputs cast, fp32 loss out.
            chunks = [Float16Module(c.config, c) for c in chunks]
        wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks]
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads  # DP reduce-scatter + tied-embedding sync
        config.no_sync_func = wrapped[0].no_sync
        return wrapped

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
        """Make the optimizer's step an online-merging step (Megatron integration). The reference
        delta tau = initial weights - base is read now from the base checkpoint, or, on a resume,
        comes back with the optimizer state."""
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
        handle = install_online_merging(self.optimizer, self.model, online, reference_delta_source=source, progress=False)
        for inner in handle.inner_optimizers:
            if hasattr(inner, "track_update_norm"):
                inner.track_update_norm = self.cfg.merge.log_update_norm
        log0(f"merge: {online.method} p={online.keep_rate} alpha={online.alpha} every {online.merge_every} step(s)")
        return handle

    # ------------------------------------------------------------------ forward / loss

    def _to_device(self, batch: Batch) -> Batch:
        if self.dev.type == "cpu":
            return batch
        return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(self.dev, non_blocking=True)
                                             for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)})

    def make_batch(self, examples: Sequence[Example], ids: Sequence[int], split: str | None) -> Batch:
        pad_to = self.cfg.data.max_length if self.pp_size > 1 else None
        batch = collate(examples, ids, self.kind, self.pad_id, self.cfg.data.max_length, pad_to, self.with_kl)
        if split is not None and split in self.ref_cache:
            cache = self.ref_cache[split][batch.example_ids]  # [B, columns]
            # Sequence order in a batch: first column for every example, then the second.
            batch.reference_logps = cache.t().reshape(-1)
        return batch

    def _forward_step(self, loss_fn: Callable, data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = self._to_device(next(data_iterator))
        mask = causal_attention_mask(batch.input_ids.shape[1], self.dev)
        output = model(batch.input_ids, batch.position_ids, mask, labels=batch.labels)
        if self.ref_model is not None and self.is_last_stage and self.loss_type != "sft":
            with torch.no_grad():
                ref_tokens = self.ref_model[0](batch.input_ids, batch.position_ids, mask, labels=batch.labels)
                batch.reference_logps = -(ref_tokens.float() * batch.loss_mask).sum(-1)
        return output, partial(loss_fn, batch)

    def _loss(self, training: bool, batch: Batch, output: torch.Tensor):
        """Loss of one micro-batch (mean over its pairs/examples) and its metric sums."""
        lo = self.cfg.loss
        token_logps = -output.float()  # GPTModel with labels returns per-token cross entropy [S, T]
        seq_logps = (token_logps * batch.loss_mask).sum(-1)
        lengths = batch.loss_mask.sum(-1)
        names = sum_names(self.loss_type)
        if self.loss_type == "sft":
            n = len(batch.example_ids)  # the first n sequences: the completions (chosen sides of pairs)
            chosen, chosen_len = seq_logps[:n], lengths[:n]
            loss = sft_loss(chosen, chosen_len)
            sums = torch.stack([chosen_len.sum(), -chosen.sum().detach(), torch.tensor(float(n))])
        elif self.loss_type == "kto":
            b = len(batch.example_ids)
            ref = batch.reference_logps.to(seq_logps)
            if self.with_kl:
                kl = kto_kl_estimate(seq_logps[b:], ref[b:])
                if training and self.dp_size > 1:
                    # TRL gathers the KL estimate over processes; average it over data-parallel ranks.
                    dist.all_reduce(kl, group=self.ps.get_data_parallel_group())
                    kl = (kl / self.dp_size).clamp(min=0)
            else:
                kl = torch.zeros((), device=seq_logps.device)
            out = kto_loss(seq_logps[:b], ref[:b], batch.labels_desirable, kl, lo.beta, lo.desirable_weight, lo.undesirable_weight)
            loss = out.losses.mean()
            des = batch.labels_desirable.float()
            if lo.sft_weight:
                loss = loss + lo.sft_weight * sft_loss(seq_logps[:b][batch.labels_desirable], lengths[:b][batch.labels_desirable])
            sums = torch.stack([torch.tensor(float(b)), out.losses.detach().sum(), des.sum(), (out.rewards * des).sum(),
                                (1 - des).sum(), (out.rewards * (1 - des)).sum(), kl.detach(), torch.tensor(1.0)])
        else:
            b = len(batch.example_ids)
            ref = batch.reference_logps.to(seq_logps)
            out = paired_loss(self.loss_type, seq_logps[:b], seq_logps[b:], ref[:b], ref[b:], lengths[:b], lengths[b:],
                              lo.beta, lo.label_smoothing)
            loss = out.losses.mean()
            nll = sft_loss(seq_logps[:b], lengths[:b])
            if lo.sft_weight:
                loss = loss + lo.sft_weight * nll
            sums = torch.stack([
                torch.tensor(float(b)), out.losses.detach().sum(),
                (out.chosen_rewards > out.rejected_rewards).float().sum(), out.chosen_rewards.sum(),
                out.rejected_rewards.sum(), (out.chosen_rewards - out.rejected_rewards).sum(),
                seq_logps[:b].detach().sum(), seq_logps[b:].detach().sum(), nll.detach() * b,
            ])
        assert len(sums) == len(names)
        return loss, {"sums": sums.detach().double().cpu()}

    def run_microbatches(self, batches: list[Batch], forward_only: bool) -> torch.Tensor:
        """Run the pipeline schedule over `batches`; return this rank's metric sums (zeros off the
        last stage and off TP rank 0, so that one world all-reduce gives the global sums)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        names = sum_names(self.loss_type)
        local = torch.zeros(len(names), dtype=torch.float64)
        if batches:
            width = batches[0].input_ids.shape[1]
            results = get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, partial(self._loss, not forward_only)),
                data_iterator=iter(batches),
                model=self.model,
                num_microbatches=len(batches),
                seq_length=width,
                micro_batch_size=batches[0].input_ids.shape[0],
                forward_only=forward_only,
            )
            if self.is_last_stage and self.tp_rank == 0:
                for item in results:
                    local += item["sums"]
        return local

    def reduce_sums(self, local: torch.Tensor) -> dict[str, float]:
        total = local.to(self.dev)
        dist.all_reduce(total)
        return dict(zip(sum_names(self.loss_type), total.cpu().tolist()))

    # ------------------------------------------------------------------ train / eval

    def train_step(self) -> dict[str, float]:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        ids = self.sampler.microbatches(self.step, self.dp_rank)
        batches = [self.make_batch(self.train_examples, mb, "train") for mb in ids]
        # The LR of step s is the schedule's value at s + 1, so warmup's first step is not lr = 0.
        self.scheduler.step(increment=1)
        local = self.run_microbatches(batches, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.step += 1
        if not update_ok:
            self._nonfinite_gradient()
        else:
            self.consecutive_skips = 0
        values = finalize_sums(self.loss_type, self.reduce_sums(local))
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
        """Engine statistics since the last step, reduced over all ranks (each merges its own shard):
        kept fraction and sign-conflict rate averaged over ranks, update norms before/after merging
        combined as sqrt of summed squares (the norm of the whole model's update)."""
        stats = [inner.merge_stats() for inner in self.merge.inner_optimizers if callable(getattr(inner, "merge_stats", None))]
        n = max(len(stats), 1)
        vec = torch.tensor([
            sum(s.get("kept_fraction", 0.0) for s in stats) / n,
            sum(s.get("update_norm", 0.0) ** 2 for s in stats),
            sum(s.get("merged_norm", 0.0) ** 2 for s in stats),
            sum(s.get("sign_conflict_rate", 0.0) for s in stats) / n,
        ], dtype=torch.float64, device=self.dev)
        dist.all_reduce(vec)
        world = dist.get_world_size()
        kept, update_sq, merged_sq, conflicts = vec.cpu().tolist()
        out = {"merge/kept_fraction": kept / world, "merge/update_norm": update_sq ** 0.5, "merge/merged_norm": merged_sq ** 0.5}
        if self.cfg.merge.online.method == "ties":
            out["merge/sign_conflict_rate"] = conflicts / world
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if not self.eval_examples:
            return None
        for chunk in self.model:
            chunk.eval()
        mbs = eval_microbatches(len(self.eval_examples), self.cfg.parallel.micro_batch_size, self.dp_size, self.dp_rank,
                                drop_last=self.pp_size > 1)
        if self.cfg.run.eval_batches:
            mbs = mbs[: self.cfg.run.eval_batches]
        batches = [self.make_batch(self.eval_examples, mb, "eval") for mb in mbs]
        local = self.run_microbatches(batches, forward_only=True)
        return finalize_sums(self.loss_type, self.reduce_sums(local))

    def train(self) -> TrainResult:
        r = self.cfg.run
        keys = {"kto": ("loss", "kl", "rewards/margins", "lr"), "sft": ("loss", "lr")}.get(
            self.loss_type, ("loss", "rewards/accuracy", "rewards/margins", "lr"))
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
            self.export_hf(os.path.join(self.out, "hf"))
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

    def _init_optimizer_state_for_loading(self) -> None:
        """Give every main param an (empty) Adam state before a load: the distributed optimizer's
        state template reads exp_avg/exp_avg_sq and torch AdamW's per-param `step`, which exist
        only after a first step. The loaded values replace these in place."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                continue
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state[param]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(param.data)
                        state["exp_avg_sq"] = torch.zeros_like(param.data)
                    if "step" not in state:
                        state["step"] = torch.tensor(0.0, dtype=torch.float32)

    def _restore_adam_steps(self) -> None:
        """megatron 0.16 restores torch AdamW's `step` into the param groups, but the dp_reshardable
        parameter-state load then copies the (non-persistent, freshly initialised) per-param
        `step` over it, restarting Adam's bias correction. Put the saved step back."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            for group in getattr(inner, "param_groups", []):
                if "step" not in group:
                    continue
                for param in group["params"]:
                    state = inner.state.get(param)
                    if state is not None and "step" in state:
                        state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

    def check_weights_finite(self, what: str) -> None:
        """Refuse to write weights holding inf/NaN (collective; one host sync, at save time only)."""
        from onmerge_megatron.optim import nonfinite_flags

        named = [(name, p) for chunk in self.model for name, p in unwrap(chunk).named_parameters() if p.numel()]
        flags = nonfinite_flags([p.detach() for _, p in named])
        found = flags.any().to(self.dev, torch.float32).reshape(1)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if found.item() > 0:
            bad = [name for (name, _), flag in zip(named, flags.tolist()) if flag]
            mine = f" (on this rank: {', '.join(bad[:3])})" if bad else ""
            raise FloatingPointError(f"step {self.step}: the weights hold inf/NaN{mine}; refusing to write {what}")

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

        self._init_optimizer_state_for_loading()
        state = self._sharded_state(loading=True)
        state["scheduler"] = self.scheduler.state_dict()
        state["trainer"] = {"step": 0, "config": {}, "skipped_steps": 0}
        with loading_errors_named(directory):
            loaded = dist_checkpointing.load(state, directory)
            with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
                unwrap(self.model[0]).load_state_dict(loaded["model"])
                self.optimizer.load_state_dict(loaded["optimizer"])
                self._restore_adam_steps()
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

    def export_hf(self, out_dir: str) -> None:
        """Write the weights in HF format to `out_dir`, replacing it only once the export is whole."""
        self.check_weights_finite(f"the export {out_dir}")
        staging = out_dir + ckpt.PARTIAL_SUFFIX
        if is_rank0() and os.path.exists(staging):
            shutil.rmtree(staging)
        dist.barrier()
        export_hf(self.bridge, [unwrap(c) for c in self.model], staging, self.tokenizer)
        dist.barrier()
        if is_rank0():
            ckpt.atomic_replace_dir(staging, out_dir)
        dist.barrier()
        log0(f"exported HF weights to {out_dir}")


def format_metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def save_dist_checkpoint(state: dict[str, Any], final: str, what: str) -> None:
    """dist_checkpointing.save of `state`, published at `final` whole or not at all (all ranks
    call it, from the main thread). Its writer processes are watched (one that dies fails the
    save) and, like their results server, die with the rank."""
    from megatron.core import dist_checkpointing

    checkpoint_results_queue_dies_with_process()  # before the first save, from this (main) thread
    ckpt.publish_checkpoint(final, partial(dist_checkpointing.save, state), what)


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory, or a run/checkpoints directory whose `latest` file names one."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        latest = ckpt.read_latest(candidate)
        if latest is not None:
            return latest
    return path


def open_checkpoint(path: str, what: str) -> str:
    """Resolve `path` (see resolve_checkpoint_dir) and verify it against its manifest (collective)."""
    directory = resolve_checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise ckpt.CheckpointError(f"{what}: checkpoint directory {directory} does not exist")
    ckpt.require_intact(directory, what, log0)
    return directory


@contextlib.contextmanager
def loading_errors_named(directory: str) -> Iterator[None]:
    """Any error while reading a checkpoint names the checkpoint and calls it damaged or
    incompatible (torch and dist_checkpointing raise bare EOFError, unpickling errors, ...)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if type(exc).__module__.startswith("onmerge_megatron"):
            raise  # our own errors already say what is wrong
        raise ckpt.CheckpointError(
            f"checkpoint {directory} could not be loaded: it is damaged, or it was written for another model or "
            f"layout ({ckpt.brief(exc)})"
        ) from exc


# Keys whose new value a resumed run does not use, and why (besides the restored state below).
_FROM_CHECKPOINT = {
    "model.": "the weights come from the checkpoint",
    "merge.base_": "the reference delta comes from the checkpoint",
}
# Keys that only steer this session.
_SESSION_KEYS = ("run.stop_at_step", "run.resume", "run.override_scheduler")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def restored_settings(scheduler_state: dict[str, Any], adam_group: dict[str, Any]) -> dict[str, Any]:
    """The config values a checkpoint imposes on a resume, as its state holds them: the LR schedule
    (megatron's scheduler state) and Adam's hyper-parameters (the optimizer's param groups)."""
    return {
        "optim.lr": scheduler_state["max_lr"], "optim.min_lr": scheduler_state["min_lr"],
        "optim.warmup_steps": scheduler_state["lr_warmup_steps"], "optim.lr_decay_style": scheduler_state["lr_decay_style"],
        "optim.weight_decay": scheduler_state["start_wd"], "run.train_steps": scheduler_state["lr_decay_steps"],
        "optim.adam_beta1": adam_group["betas"][0], "optim.adam_beta2": adam_group["betas"][1], "optim.adam_eps": adam_group["eps"],
    }


def resume_config_changes(saved: dict[str, Any], cfg: TrainConfig, restored: dict[str, Any]) -> list[str]:
    """One line per setting that differs from what the checkpoint holds, saying whether it takes
    effect. `restored`: what the checkpoint's state imposes (restored_settings); other keys are
    compared with the config saved in the checkpoint."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    lines = []
    for key in sorted(set(old) | set(restored)):
        was = restored.get(key, old.get(key))
        now = new.get(key)
        if key in _SESSION_KEYS or key not in new or was == now:
            continue
        change = f"{key}: {was!r} in the checkpoint, {now!r} now"
        if key == "run.train_steps":
            note = ("the run goes on to the new step count; the learning-rate decay "
                    + ("is rebuilt to end there (run.override_scheduler=true)" if cfg.run.override_scheduler else
                       "keeps the checkpoint's length: set run.override_scheduler=true to rebuild it"))
        elif key.startswith("optim.adam_"):
            note = "IGNORED: Adam's hyper-parameters are restored with its state"
        elif key in restored:
            note = ("applied (run.override_scheduler=true: the learning-rate schedule is rebuilt from the new values)"
                    if cfg.run.override_scheduler else
                    "IGNORED: the learning-rate schedule is restored from the checkpoint; set run.override_scheduler=true "
                    "to apply the new value")
        else:
            reason = next((why for prefix, why in _FROM_CHECKPOINT.items() if key.startswith(prefix)), None)
            note = f"IGNORED: {reason}" if reason else "applies from this step on"
        lines.append(f"resume: {change} -> {note}")
    return lines


def convert_hf_to_megatron(hf_path: str, out_dir: str, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> str:
    """Save an HF model as a model-only dist checkpoint that `model.megatron_load`,
    `merge.base_megatron_load` and `loss.reference_megatron_load` read (all ranks call it)."""
    from .config import config_from_dict

    cfg = config_from_dict({"model": {"hf_path": hf_path}, "data": {"train_files": ["unused.jsonl"]},
                            "parallel": {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel,
                                         "global_batch_size": int(os.environ.get("WORLD_SIZE", "1"))}})
    init_distributed(cfg)
    bridge = make_bridge(hf_path, torch.float32)
    chunks = build_model(bridge, 1)
    load_hf_weights(bridge, chunks, hf_path)
    save_dist_checkpoint({"model": chunks[0].sharded_state_dict()}, out_dir, f"converting {hf_path}")
    log0(f"saved {hf_path} as a megatron dist checkpoint in {out_dir}")
    return out_dir

