"""Micro-batches through megatron-core's pipeline schedule: batches from examples, the forward
step (with the frozen reference model when there is one), the loss of each family (DPO / IPO /
hinge, KTO, SFT) with its metric sums, and evaluation. The optimizer step around it is the
trainer's (loop.py)."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .config import TrainConfig
from .data import Batch, Example, collate, eval_microbatches
from .losses import kto_kl_estimate, kto_loss, paired_loss, sft_loss
from .model import causal_attention_mask
from .parallel import device
from .reference_logps import cached_reference_logps, compute_reference_logps

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


def format_metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


class ForwardBackward:
    """The forward and backward passes of one rank over its micro-batches; all ranks construct it
    after the model (and its DDP wrapping) exists."""

    def __init__(self, cfg: TrainConfig, model: list[torch.nn.Module], pad_id: int,
                 reference_model: list[torch.nn.Module] | None = None):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.model = model
        self.pad_id = pad_id
        self.reference_model = reference_model
        # Per split, [N, columns] reference log-probs of `loss.reference: cached` (cache_reference_logps).
        self.reference_logps: dict[str, torch.Tensor] = {}
        self.loss_type = cfg.loss.type
        # SFT on preference data trains on the chosen side only.
        self.kind = {"kto": "unpaired", "sft": "sft"}.get(self.loss_type, "pairs")
        self.with_kl = self.loss_type == "kto" and cfg.loss.kto_kl
        self.dev = device()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.tp_rank = ps.get_tensor_model_parallel_rank()

    def cache_reference_logps(self, split: str, examples: Sequence[Example], files: Sequence[str]) -> None:
        """Reference log-probs of `split` under the current (initial) weights, from the cache in
        output_dir when its fingerprint matches, else computed with this forward step."""
        columns = 2 if (self.kind == "pairs" or self.with_kl) else 1
        compute = partial(compute_reference_logps, self.forward_step, lambda ids: self.make_batch(examples, ids, split=None),
                          self.model, len(examples), self.cfg.parallel.micro_batch_size, columns)
        self.reference_logps[split] = cached_reference_logps(self.cfg, split, examples, files, self.with_kl, compute)

    def _to_device(self, batch: Batch) -> Batch:
        if self.dev.type == "cpu":
            return batch
        return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(self.dev, non_blocking=True)
                                             for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)})

    def make_batch(self, examples: Sequence[Example], ids: Sequence[int], split: str | None) -> Batch:
        pad_to = self.cfg.data.max_length if self.pp_size > 1 else None
        batch = collate(examples, ids, self.kind, self.pad_id, self.cfg.data.max_length, pad_to, self.with_kl)
        if split is not None and split in self.reference_logps:
            cache = self.reference_logps[split][batch.example_ids]  # [B, columns]
            # Sequence order in a batch: first column for every example, then the second.
            batch.reference_logps = cache.t().reshape(-1)
        return batch

    def forward_step(self, loss_fn: Callable, data_iterator: Iterator[Batch],
                     model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        """megatron's forward_step_func with `loss_fn(batch, output)` bound first: the model's
        per-token cross entropy and the loss function of this micro-batch."""
        batch = self._to_device(next(data_iterator))
        mask = causal_attention_mask(batch.input_ids.shape[1], self.dev)
        output = model(batch.input_ids, batch.position_ids, mask, labels=batch.labels)
        if self.reference_model is not None and self.is_last_stage and self.loss_type != "sft":
            with torch.no_grad():
                ref_tokens = self.reference_model[0](batch.input_ids, batch.position_ids, mask, labels=batch.labels)
                batch.reference_logps = -(ref_tokens.float() * batch.loss_mask).sum(-1)
        return output, partial(loss_fn, batch)

    def loss(self, training: bool, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
                    dist.all_reduce(kl, group=self.dp_group)
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

    def run(self, batches: list[Batch], forward_only: bool) -> torch.Tensor:
        """Run the pipeline schedule over `batches`; return this rank's metric sums (zeros off the
        last stage and off TP rank 0, so that one world all-reduce gives the global sums)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        names = sum_names(self.loss_type)
        local = torch.zeros(len(names), dtype=torch.float64)
        if batches:
            width = batches[0].input_ids.shape[1]
            results = get_forward_backward_func()(
                forward_step_func=partial(self.forward_step, partial(self.loss, not forward_only)),
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

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example]) -> dict[str, float] | None:
        """Held-out metrics of `examples` (the "eval" split), or None when there are none."""
        if not examples:
            return None
        for chunk in self.model:
            chunk.eval()
        mbs = eval_microbatches(len(examples), self.cfg.parallel.micro_batch_size, self.dp_size, self.dp_rank,
                                drop_last=self.pp_size > 1)
        if self.cfg.run.eval_batches:
            mbs = mbs[: self.cfg.run.eval_batches]
        batches = [self.make_batch(examples, mb, "eval") for mb in mbs]
        local = self.run(batches, forward_only=True)
        return finalize_sums(self.loss_type, self.reduce_sums(local))
