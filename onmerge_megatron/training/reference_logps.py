"""Reference log-probabilities computed once, with the initial weights, and cached on disk.

DPO-style losses need log pi_ref(y|x) of every completion. When the reference is the policy's
starting point (the SFT model, the usual case), a single forward pass over the data before the
first step gives all of them, so training holds no second model. The cache lives in
`output_dir/reference_logps/<split>.pt` with a fingerprint of everything that determines the
values (data files' contents, initial weights' location, tokenizer, lengths, format); a cache
whose fingerprint differs is recomputed, never silently reused.

Columns: pairs [chosen, rejected]; KTO [completion, mismatched completion for the KL estimate].
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .checkpoints import atomic_open, brief, file_sha256
from .config import TrainConfig
from .context_parallel import context_parallel_group, sequence_logps
from .data import Batch, Example, eval_microbatches
from .parallel import device

# megatron's forward_step_func with the loss function bound first: (loss_fn, data_iterator, model)
# -> (output, loss function of the micro-batch); ForwardBackward.forward_step is one.
ForwardStep = Callable[[Callable, Iterator[Batch], torch.nn.Module], tuple[torch.Tensor, Callable]]


def fingerprint(cfg: TrainConfig, split: str, files: Sequence[str], n_examples: int, with_kl: bool) -> str:
    m, d = cfg.model, cfg.data
    weights = m.hf_path if m.load_format == "hf" else m.megatron_load
    weight_files = []
    if weights and os.path.isdir(weights):
        for name in sorted(os.listdir(weights)):
            if name.endswith((".safetensors", ".json", ".distcp", ".pt", "latest")):
                st = os.stat(os.path.join(weights, name))
                weight_files.append((name, st.st_size, int(st.st_mtime)))
    payload = {
        "split": split, "files": [file_sha256(f) for f in files], "n": n_examples,
        "weights": os.path.abspath(weights) if weights else None, "weight_files": weight_files,
        "tokenizer": os.path.abspath(m.tokenizer_path or m.hf_path), "format": d.format,
        "max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "chat": d.use_chat_template,
        "eval_fraction": d.eval_fraction, "seed": cfg.run.seed if not d.eval_files else None,
        "kl": with_kl, "dtype": m.dtype,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _collect(batch: Any, output: torch.Tensor):
    # Per sequence, whether the batch is packed or not and however CP splits it: the cached
    # values are the same for every layout.
    seq_logps, _ = sequence_logps(-output.float(), batch, context_parallel_group())
    return torch.zeros((), device=output.device), {"logps": seq_logps.detach().double().cpu(), "ids": batch.example_ids.cpu()}


@torch.no_grad()
def compute_reference_logps(forward_step: ForwardStep, make_batch: Callable[[list[int]], Batch], model: list[torch.nn.Module],
                            n_examples: int, micro_batch_size: int, columns: int) -> torch.Tensor:
    """[n_examples, columns] float64 sequence log-probs under the current weights of `model`, run
    through megatron's schedule with `forward_step`; `make_batch(ids)` collates examples `ids`."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    table = torch.zeros(n_examples, columns, dtype=torch.float64)
    for chunk in model:
        chunk.eval()
    mbs = eval_microbatches(n_examples, micro_batch_size, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Fixed shapes under pipeline parallelism: pad the short tail by repeating its first id.
        mbs = [mb + [mb[0]] * (micro_batch_size - len(mb)) for mb in mbs]
    batches = [make_batch(mb) for mb in mbs]
    if batches:
        results = get_forward_backward_func()(
            forward_step_func=partial(forward_step, _collect),
            data_iterator=iter(batches), model=model, num_microbatches=len(batches),
            seq_length=batches[0].input_ids.shape[1], micro_batch_size=batches[0].input_ids.shape[0],
            forward_only=True,
        )
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
            for item in results:
                ids, logps = item["ids"], item["logps"]
                table[ids] = logps.view(columns, len(ids)).t()
    # Rows are filled once (by one rank each); a sum over all ranks assembles the table everywhere.
    total = table.to(device())
    dist.all_reduce(total)
    return total.cpu()


def cached_reference_logps(cfg: TrainConfig, split: str, examples: Sequence[Example], files: Sequence[str], with_kl: bool,
                           compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load the cache for `split` from output_dir if its fingerprint matches, else `compute()`
    the table and store it."""
    if not examples:
        return torch.zeros(0, 2, dtype=torch.float64)
    path = os.path.join(cfg.run.output_dir, "reference_logps", f"{split}.pt")
    key = fingerprint(cfg, split, files, len(examples), with_kl)
    if os.path.isfile(path):
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache is recomputed, never used
            stored = {}
            if dist.get_rank() == 0:
                print(f"WARNING: reference log-probs ({split}): {path} is unreadable ({brief(exc)}); recomputing", flush=True)
        if stored.get("fingerprint") == key and stored["logps"].shape[0] == len(examples):
            if dist.get_rank() == 0:
                print(f"reference log-probs ({split}): cached {path}", flush=True)
            return stored["logps"]
    if dist.get_rank() == 0:
        print(f"reference log-probs ({split}): computing {len(examples)} examples with the initial weights", flush=True)
    table = compute()
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, "wb") as f:
            torch.save({"fingerprint": key, "logps": table}, f)
    dist.barrier()
    return table
