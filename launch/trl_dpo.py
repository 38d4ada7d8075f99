"""DPO (or KTO) with TRL and an online merging optimizer, under DeepSpeed, FSDP2, DDP or one process.

    accelerate launch --config_file deepspeed_zero3.yaml launch/trl_dpo.py \
        --model_name_or_path path/to/sft-model --dataset path/to/prefs.jsonl \
        --merge_base_model path/to/base-model --merge_method dare --merge_keep_rate 0.01 --merge_alpha 1e-7 \
        --output_dir runs/dpo-ondare --learning_rate 5e-7 --beta 0.1 --per_device_train_batch_size 4

    # or with a DeepSpeed config file (no "optimizer" section: the optimizer is OnlineMergingAdamW)
    torchrun --nproc_per_node 8 launch/trl_dpo.py --deepspeed ds_zero2.json ...

The dataset is a local .json/.jsonl file (or a Hub dataset name) with prompt / chosen / rejected
columns; --trainer kto unpairs it into KTO's prompt / completion / label form.
``--cpu_gloo`` runs on CPUs with the gloo backend (tests, laptops).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "the SFT model (the policy starts here; also the DPO reference)"})
    dataset: str = field(metadata={"help": "local .json/.jsonl file or Hub dataset with prompt/chosen/rejected"})
    dataset_split: str = "train"
    trainer: str = field(default="dpo", metadata={"help": "dpo or kto"})
    cpu_gloo: bool = field(default=False, metadata={"help": "CPU processes with gloo (no GPU)"})


def _cpu_gloo_state() -> None:
    """accelerate on CPU: one gloo process group for all launched processes.

    Without an explicit state, accelerate on CPU treats each torchrun process as its own world;
    DeepSpeed's shared-memory comm op (a g++ JIT build) is not needed by gloo and is skipped.
    """
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or "--deepspeed" in sys.argv:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from onmerge_megatron.deepspeed.compat import skip_shm_comm_op_build

        skip_shm_comm_op_build()
    PartialState(backend="gloo", cpu=True)


def main() -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    from onmerge_megatron.deepspeed.hf import OnlineMergeArguments, with_online_merge

    script_args, merge_args, rest = HfArgumentParser((ScriptArguments, OnlineMergeArguments)).parse_args_into_dataclasses(
        return_remaining_strings=True
    )
    if script_args.cpu_gloo:
        _cpu_gloo_state()
    if script_args.trainer == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as TrainerCls
    elif script_args.trainer == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as TrainerCls
    else:
        raise SystemExit(f"--trainer must be dpo or kto, got {script_args.trainer!r}")
    if script_args.cpu_gloo:
        # TRL configs default to bf16, which the CPU path of TrainingArguments refuses.
        rest = ["--use_cpu", "true", *(["--bf16", "false"] if "--bf16" not in rest else []), *rest]
    (training_args,) = HfArgumentParser(Config).parse_args_into_dataclasses(args=rest)
    if script_args.cpu_gloo:
        training_args.accelerator_config.use_configured_state = True

    path = script_args.dataset
    if path.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=path, split=script_args.dataset_split)
    else:
        dataset = load_dataset(path, split=script_args.dataset_split)
    if script_args.trainer == "kto":
        from trl.data_utils import unpair_preference_dataset

        dataset = unpair_preference_dataset(dataset)

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype=dtype)

    trainer = with_online_merge(TrainerCls)(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        online_merge=merge_args,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
