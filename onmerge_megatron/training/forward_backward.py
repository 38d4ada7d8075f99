"""Micro-batches through megatron-core's pipeline schedule: batches from examples, the forward
step (with the frozen reference model when there is one), the loss of each family (DPO / IPO /
hinge, KTO, SFT) with its metric sums, and evaluation. The optimizer step around it is the
trainer's (loop.py).

Packed batches (`data.pack_sequences`) reach the model as THD sequences (Transformer Engine's
cu_seqlens) with the TE layer spec, and elsewhere as rows with a block-diagonal causal mask and
RoPE positions restarting per sequence; either way the loss sees the per-sequence sums of
unpacked batches. Under context parallelism each rank holds part of every row and the sums are
completed over the CP group (context_parallel.py)."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .config import TrainConfig, cp_slot_multiple, effective_pack_length
from ..megatron import compat
from .context_parallel import PER_POSITION, context_parallel_group, sequence_logps, split_for_context_parallel
from .data import Batch, Example, collate, collate_packed, eval_microbatches
from .losses import kto_kl_estimate, kto_loss, paired_loss, sft_loss
from .model import causal_attention_mask, unwrap, use_transformer_engine
from .parallel import device
from .reference_logps import cached_reference_logps, compute_reference_logps

# Sums reduced over micro-batches and ranks each step; names per loss family.
PAIR_SUMS = ("pairs", "loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logps", "rejected_logps", "sft_nll")
KTO_SUMS = ("examples", "loss", "desirable", "desirable_reward", "undesirable", "undesirable_reward", "kl", "microbatches")
SFT_SUMS = ("tokens", "nll", "sequences")
# Positions of the micro-batches' rows, and those of them that are padding (every loss family).
ROW_SUMS = ("row_tokens", "pad_tokens")


def sum_names(loss_type: str) -> tuple[str, ...]:
    return {"kto": KTO_SUMS, "sft": SFT_SUMS}.get(loss_type, PAIR_SUMS) + ROW_SUMS


def padding_fraction(sums: dict[str, float]) -> dict[str, float]:
    """Padded positions / all positions of the rows, from reduced sums."""
    return {"padding_fraction": sums["pad_tokens"] / max(sums["row_tokens"], 1)}


def finalize_sums(loss_type: str, sums: dict[str, float]) -> dict[str, float]:
    """Averages from reduced sums: the numbers that are logged."""
    if loss_type == "sft":
        nll = sums["nll"] / max(sums["tokens"], 1)
        return {"loss": nll, "nll": nll, "perplexity": math.exp(min(nll, 50)), "tokens": sums["tokens"], **padding_fraction(sums)}
    if loss_type == "kto":
        n = max(sums["examples"], 1)
        out = {"loss": sums["loss"] / n, "kl": sums["kl"] / max(sums["microbatches"], 1)}
        out["rewards/desirable"] = sums["desirable_reward"] / max(sums["desirable"], 1)
        out["rewards/undesirable"] = sums["undesirable_reward"] / max(sums["undesirable"], 1)
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return {**out, **padding_fraction(sums)}
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
        **padding_fraction(sums),
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
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        self.cp_group = context_parallel_group()
        # One rank of each TP x CP group reports the metric sums (the others hold the same ones).
        self.reports_sums = self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0
        self.pack_length = effective_pack_length(cfg.data)
        # Packed rows go to Transformer Engine as THD sequences; the local spec takes a mask.
        self.thd = bool(self.pack_length) and use_transformer_engine(cfg)
        # Row widths split evenly: over TP ranks with sequence parallelism, into 2 x CP chunks;
        # so does every packed sequence under CP (TE splits each THD sequence into 2 x CP chunks).
        sequence_parallel = bool(getattr(unwrap(model[0]).config, "sequence_parallel", False))
        self.sequence_multiple = cp_slot_multiple(self.cp_size)
        self.width_multiple = (ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1) * self.sequence_multiple

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
        d = self.cfg.data
        if self.pack_length:
            batch = collate_packed(examples, ids, self.kind, self.pad_id, d.max_length, self.pack_length, self.with_kl,
                                   self.width_multiple, self.sequence_multiple)
        else:
            pad_to = d.max_length if self.pp_size > 1 else None
            batch = collate(examples, ids, self.kind, self.pad_id, d.max_length, pad_to, self.with_kl, self.width_multiple)
        if split is not None and split in self.reference_logps:
            cache = self.reference_logps[split][batch.example_ids]  # [B, columns]
            # Sequence order in a batch: first column for every example, then the second.
            batch.reference_logps = cache.t().reshape(-1)
        return batch

    def forward_step(self, loss_fn: Callable, data_iterator: Iterator[Batch],
                     model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        """megatron's forward_step_func with `loss_fn(batch, output)` bound first: the model's
        per-token cross entropy and the loss function of this micro-batch."""
        batch = self._this_rank_part(self._to_device(next(data_iterator)))
        output = self._token_losses(model, batch)
        if self.reference_model is not None and self.is_last_stage and self.loss_type != "sft":
            with torch.no_grad():
                ref_tokens = self._token_losses(self.reference_model[0], batch)
                batch.reference_logps = sequence_logps(-ref_tokens.float(), batch, self.cp_group)[0]
        return output, partial(loss_fn, batch)

    def _this_rank_part(self, batch: Batch) -> Batch:
        """The batch as this rank's model reads it: THD packed rows laid end to end as one row,
        and under CP this rank's positions (megatron's 2 x CP chunks of every row, or of every
        THD sequence, as Transformer Engine's thd_get_partitioned_indices picks them)."""
        if not self.thd:
            return split_for_context_parallel(batch, self.cp_size, self.cp_rank)
        batch = flatten_rows(batch)
        if self.cp_size == 1:
            return batch
        _, padded, _ = thd_boundaries(batch.segments)
        index = compat.thd_partitioned_indices(padded.to(self.dev), batch.input_ids.shape[1], self.cp_size, self.cp_rank)
        return split_for_context_parallel(batch, self.cp_size, self.cp_rank, index)

    def _token_losses(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The model's per-position cross entropy of `batch`, shaped like its input_ids (on the
        last pipeline stage; the hidden states elsewhere)."""
        if batch.sequence_index is None:
            mask = causal_attention_mask(batch.input_ids.shape[1], self.dev)
            return model(batch.input_ids, batch.position_ids, mask, labels=batch.labels)
        if self.thd:
            cu_seqlens, padded, max_seqlen = thd_boundaries(batch.segments)
            params = compat.thd_packed_seq_params(cu_seqlens.to(self.dev), max_seqlen,
                                                  padded.to(self.dev) if self.cp_size > 1 else None, self.cp_group)
            return model(batch.input_ids, batch.position_ids, None, labels=batch.labels, packed_seq_params=params)
        mask = packed_attention_mask(batch.sequence_index)
        with compat.rope_at_positions(model, batch.position_ids):
            return model(batch.input_ids, batch.position_ids, mask, labels=batch.labels)

    def loss(self, training: bool, batch: Batch, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (mean over its pairs/examples) and its metric sums."""
        lo = self.cfg.loss
        token_logps = -output.float()  # GPTModel with labels returns per-position cross entropy [R, T]
        seq_logps, lengths = sequence_logps(token_logps, batch, self.cp_group)  # [S] each
        names = sum_names(self.loss_type)
        if self.loss_type == "sft":
            n = len(batch.example_ids)  # the first n sequences: the completions (chosen sides of pairs)
            chosen, chosen_len = seq_logps[:n], lengths[:n]
            loss = sft_loss(chosen, chosen_len)
            sums = torch.stack([chosen_len.sum(), -chosen.sum().detach(), seq_logps.new_tensor(float(n))])
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
            sums = torch.stack([seq_logps.new_tensor(float(b)), out.losses.detach().sum(), des.sum(), (out.rewards * des).sum(),
                                (1 - des).sum(), (out.rewards * (1 - des)).sum(), kl.detach(), seq_logps.new_tensor(1.0)])
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
                seq_logps.new_tensor(float(b)), out.losses.detach().sum(),
                (out.chosen_rewards > out.rejected_rewards).float().sum(), out.chosen_rewards.sum(),
                out.rejected_rewards.sum(), (out.chosen_rewards - out.rejected_rewards).sum(),
                seq_logps[:b].detach().sum(), seq_logps[b:].detach().sum(), nll.detach() * b,
            ])
        assert len(sums) == len(names) - len(ROW_SUMS)
        sums = torch.cat([sums, torch.zeros(len(ROW_SUMS), dtype=sums.dtype, device=sums.device)])
        return loss, {"sums": sums.detach().double().cpu()}

    def run(self, batches: list[Batch], forward_only: bool) -> torch.Tensor:
        """Run the pipeline schedule over `batches`; return this rank's metric sums (zeros off the
        last stage and off TP rank 0, so that one world all-reduce gives the global sums)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        names = sum_names(self.loss_type)
        local = torch.zeros(len(names), dtype=torch.float64)
        if batches and self.reports_sums:
            local[-2:] = torch.tensor([float(sum(b.row_tokens for b in batches)), float(sum(b.pad_tokens for b in batches))],
                                      dtype=torch.float64)
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
            if self.reports_sums:
                for item in results:
                    local += item["sums"]
        return local

    def reduce_sums(self, local: torch.Tensor) -> dict[str, float]:
        """The world sum of every rank's `run` sums, by name."""
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


# --------------------------------------------------------------------------- packed rows


def packed_attention_mask(sequence_index: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] bool, True where attention is masked: a position sees the earlier positions
    of its own sequence only (padding, index -1, sees earlier padding; it carries no loss)."""
    same = sequence_index[:, None, :, None] == sequence_index[:, None, None, :]
    width = sequence_index.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_index.device).tril()
    return ~(same & causal)


def flatten_rows(batch: Batch) -> Batch:
    """A packed batch's rows laid end to end as one row [1, R x T] (the THD layout)."""
    return dataclasses.replace(batch, **{name: getattr(batch, name).reshape(1, -1) for name in PER_POSITION})


def thd_boundaries(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(cu_seqlens, cu_seqlens_padded, max padded length) of THD `segments` [K, 2] (length,
    padded length; Batch.segments): int32 on the CPU."""
    segments = segments.cpu()
    zero = torch.zeros(1, dtype=torch.int32)
    cu = torch.cat([zero, segments[:, 0].cumsum(0).to(torch.int32)])
    padded = torch.cat([zero, segments[:, 1].cumsum(0).to(torch.int32)])
    return cu, padded, int(segments[:, 1].max())
