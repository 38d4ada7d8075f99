"""Run under torchrun: several short trainer runs in one process group, each with its own settings.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/training/scale_jobs.py SPEC.json

SPEC.json: {"base": <config dict>, "runs": {name: {dotted key: value}}, "out": dir}. Run `name`
trains in out/name (metrics.jsonl from the trainer) and each rank writes out/name/rank{r}.pt:
its TP-local model parameters before and after training (after: gathered, as the next forward
would see them), the layer settings megatron got, and which inner optimizer stepped. Starting the processes once for all runs keeps the tests short.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from onmerge_megatron.training.parallel import quiet_library_warnings

quiet_library_warnings()
from onmerge_megatron.training.config import config_from_dict, validate  # noqa: E402
from onmerge_megatron.training.loop import Trainer  # noqa: E402
from onmerge_megatron.training.model import unwrap  # noqa: E402
from onmerge_megatron.training.model_setup import sync_params  # noqa: E402

with open(sys.argv[1]) as f:
    spec = json.load(f)

for name, overrides in spec["runs"].items():
    tree = copy.deepcopy(spec["base"])
    tree["run"]["output_dir"] = os.path.join(spec["out"], name)
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    cfg = config_from_dict(tree)
    validate(cfg, world_size=int(os.environ["WORLD_SIZE"]), check_devices=True)
    trainer = Trainer(cfg)
    initial = {n: p.detach().clone() for n, p in unwrap(trainer.model[0]).named_parameters()}
    trainer.train()
    sync_params(trainer.model)
    params = {n: p.detach().clone() for n, p in unwrap(trainer.model[0]).named_parameters()}
    inner = sorted({type(o).__name__ for o in getattr(trainer.optimizer, "inner_optimizers", [])})
    counts = [dict(getattr(o, "kernel_counts", {})) for o in getattr(trainer.optimizer, "inner_optimizers", [])]
    config = unwrap(trainer.model[0]).config
    layers = {"recompute_granularity": config.recompute_granularity, "recompute_method": config.recompute_method,
              "recompute_num_layers": config.recompute_num_layers, "sequence_parallel": config.sequence_parallel,
              "overlap_grad_reduce": trainer.model[0].ddp_config.overlap_grad_reduce,
              "overlap_param_gather": trainer.model[0].ddp_config.overlap_param_gather}
    torch.save({"params": params, "initial": initial, "inner": inner, "kernel_counts": counts, "layers": layers},
               os.path.join(spec["out"], name, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
dist.destroy_process_group()
