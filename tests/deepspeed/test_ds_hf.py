"""Pieces of the Hugging Face glue that run without DeepSpeed: weight sources read by slices, the
argument dataclass, and the installer used for DDP / FSDP2 (checked on real FSDP2, 2 gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ds_harness import base_weights, build_model, full_batch, loss_fn
from ds_reference import max_abs_diff
from safetensors.torch import save_file

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
from onmerge_megatron.deepspeed.hf import OnlineMergeArguments, install_on_parameters
from onmerge_megatron.merging.coords import ShardCoords
from onmerge_megatron.merging.sources import weight_source

MERGE = {"method": "dare", "keep_rate": 0.3, "alpha": 0.2, "merge_every": 2}


def test_safetensors_source_reads_flat_ranges(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(7, 5, 3), "b": torch.randn(11)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = weight_source(tmp_path, "base")
    for name, t in tensors.items():
        flat = t.reshape(-1)
        for start, end in [(0, flat.numel()), (4, 23), (15, 16), (30, 30), (flat.numel() - 3, flat.numel())]:
            if end > flat.numel():
                continue
            assert torch.equal(source.read(name, ShardCoords.flat_range(t.shape, start, end)), flat[start:end])
    # A row block of a TP-style split, and a flat range inside it (a Megatron DP shard of a TP block).
    w = tensors["w"]
    block = ShardCoords.block((7, 5, 3), (3, 5, 3), (2, 0, 0))
    assert torch.equal(source.read("w", block), w[2:5].reshape(-1))
    column = ShardCoords.block((7, 5, 3), (7, 2, 3), (0, 3, 0), start=4, end=33)
    assert torch.equal(source.read("w", column), w[:, 3:5].reshape(-1)[4:33])
    with pytest.raises(ValueError, match="shape"):
        source.read("w", ShardCoords.flat_range((5, 7, 3), 0, 3))
    with pytest.raises(KeyError, match="name_map"):
        source.read("missing", ShardCoords.flat_range((1,), 0, 1))


def test_merge_arguments_to_config() -> None:
    args = OnlineMergeArguments(merge_method="ties", merge_keep_rate=0.05, merge_alpha=1e-6, merge_every=2, merge_options='{"sign_election": "weighted"}')
    config = args.to_config()
    assert (config.method, config.keep_rate, config.alpha, config.merge_every, config.sign_election) == ("ties", 0.05, 1e-6, 2, "weighted")
    with pytest.raises(ValueError, match="unknown key"):
        OnlineMergeArguments(merge_options='{"no_such_field": 1}').to_config()


def _train(model: torch.nn.Module, optimizer: OnlineMergingAdamW, steps: int = 4) -> None:
    for step in range(1, steps + 1):
        x, y = full_batch(step, True)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()


def _fsdp2_run(rank: int, world: int, base_file: str) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = OnlineMergingAdamW(model.named_parameters(), lr=2e-2, weight_decay=0.01, merge=OnlineMergeConfig(**MERGE))
    # The Trainer's path: base from a checkpoint file, reference = the (sharded) weights now.
    install_on_parameters(optimizer, base=base_file)
    _train(model, optimizer)
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_fsdp2_install_matches_single_process(tmp_path: Path) -> None:
    from distributed import run_distributed, torch_threads

    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base_weights(build_model()).items()}, str(base_file))
    results = run_distributed(_fsdp2_run, 2, str(base_file))

    model = build_model()
    optimizer = OnlineMergingAdamW(model.named_parameters(), lr=2e-2, weight_decay=0.01, merge=OnlineMergeConfig(**MERGE))
    optimizer.set_reference_delta(reference=model, base=base_weights(model))
    with torch_threads():  # the ranks' count, for the same matmul bits
        _train(model, optimizer)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    for got in results:
        assert max_abs_diff(got, expected) == 0.0


TRAINER_SCRIPT = r"""
import json, sys
import torch
from onmerge_megatron.deepspeed.compat import skip_shm_comm_op_build
skip_shm_comm_op_build()
from transformers import Trainer, TrainingArguments
from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
from onmerge_megatron.deepspeed.hf import OnlineMergeArguments, with_online_merge

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3)
    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), labels)}

data = [{"x": torch.randn(6), "labels": torch.randn(3)} for _ in range(16)]
model = Net()
mine = OnlineMergingAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0, merge=OnlineMergeConfig(method="dare", keep_rate=0.5, alpha=0.0))
ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2},
      "zero_allow_untested_optimizer": True, "gradient_clipping": "auto", "fp16": {"enabled": False}, "bf16": {"enabled": False}}
args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, deepspeed=ds, max_steps=2, per_device_train_batch_size=4,
                         report_to=[], save_strategy="no", logging_steps=1)
trainer = with_online_merge(Trainer)(model=model, args=args, train_dataset=data, optimizers=(mine, None),
                                     online_merge=OnlineMergeArguments(merge_method="dare", merge_keep_rate=0.5, merge_alpha=0.0))
trainer.train()
engine = trainer.deepspeed
steps = [int(s["step"]) for s in mine.state.values() if "step" in s]
print("RESULT", json.dumps({"kept": engine.basic_optimizer is mine, "steps": steps}))
"""


@pytest.mark.slow
def test_trainer_keeps_a_passed_optimizer_under_deepspeed(tmp_path: Path) -> None:
    """Plain Trainer + DeepSpeed would drop optimizers=(instance, None) and build AdamW."""
    import json
    import subprocess
    import sys

    from distributed import single_rank_env

    env = dict(single_rank_env(), ACCELERATE_USE_DEEPSPEED="true", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-c", TRAINER_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-6000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["kept"] is True
    assert got["steps"] == [2]


UNIVERSAL_SCRIPT = r"""
import json, sys
import torch
from onmerge_megatron.deepspeed.compat import skip_shm_comm_op_build
skip_shm_comm_op_build()
from deepspeed.utils import safe_get_full_fp32_param
from transformers import Trainer, TrainingArguments
from onmerge_megatron.deepspeed.hf import OnlineMergeArguments, with_online_merge

out, resume, base, sft = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3)
    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), labels)}

gen = torch.Generator().manual_seed(5)
data = [{"x": torch.randn(6, generator=gen), "labels": torch.randn(3, generator=gen)} for _ in range(16)]
ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3},
      "zero_allow_untested_optimizer": True, "gradient_clipping": "auto", "fp16": {"enabled": False}, "bf16": {"enabled": False}}
if resume != "-":
    ds["checkpoint"] = {"load_universal": True}
args = TrainingArguments(output_dir=out, use_cpu=True, deepspeed=ds, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         weight_decay=0.0, report_to=[], save_strategy="steps", save_steps=2, logging_steps=1)
merge = OnlineMergeArguments(merge_method="dare", merge_keep_rate=0.5, merge_alpha=0.2, merge_every=3,
                             merge_base_model=base, merge_reference_model=sft)
trainer = with_online_merge(Trainer)(model=Net(), args=args, train_dataset=data, online_merge=merge)
trainer.train(resume_from_checkpoint=None if resume == "-" else resume)
weights = {n: safe_get_full_fp32_param(p).reshape(-1).tolist() for n, p in trainer.deepspeed.module.named_parameters()}
print("RESULT", json.dumps(weights))
"""


@pytest.mark.slow
def test_trainer_resumes_zero3_universal_checkpoint_with_merge_state(tmp_path: Path) -> None:
    """Trainer + ZeRO-3, step-K (K=3): save at step 2 (accumulator full), convert to universal,
    resume from it; the accumulator must come back (DeepSpeed's ZeRO-3 loader skips it)."""
    import json
    import subprocess
    import sys

    torch.manual_seed(0)
    sft = {k: v.contiguous() for k, v in torch.nn.Linear(6, 3).state_dict().items()}
    sft = {f"lin.{k}": v for k, v in sft.items()}
    save_file(sft, str(tmp_path / "sft.safetensors"))
    save_file({k: v - 0.1 for k, v in sft.items()}, str(tmp_path / "base.safetensors"))
    from distributed import single_rank_env

    env = dict(single_rank_env(), ACCELERATE_USE_DEEPSPEED="true", PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def run(out: Path, resume: str) -> dict[str, list[float]]:
        done = subprocess.run([sys.executable, "-c", UNIVERSAL_SCRIPT, str(out), resume, str(tmp_path / "base.safetensors"), str(tmp_path / "sft.safetensors")],
                              capture_output=True, text=True, timeout=300, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and lines, done.stderr[-6000:]
        return json.loads(lines[-1][len("RESULT "):])

    full = run(tmp_path / "run", "-")
    ckpt = tmp_path / "run" / "checkpoint-2"
    done = subprocess.run([sys.executable, "-m", "onmerge_megatron.deepspeed.checkpoint", "--input_folder", str(ckpt / "global_step2"),
                           "--output_folder", str(ckpt / "global_step2_universal")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = run(tmp_path / "resumed", str(ckpt))
    assert resumed == full
