"""DPO (or KTO) with TRL and an online merging optimizer, under DeepSpeed, FSDP2, DDP or one process.

    accelerate launch --config_file deepspeed_zero3.yaml launch/trl_dpo.py \
        --model_name_or_path path/to/sft-model --dataset path/to/prefs.jsonl \
        --merge_base_model path/to/base-model --merge_method dare --merge_keep_rate 0.01 --merge_alpha 1e-7 \
        --output_dir runs/dpo-ondare --learning_rate 5e-7 --beta 0.1 --per_device_train_batch_size 4

    # or with a DeepSpeed config file (no "optimizer" section: the optimizer is OnlineMergingAdamW)
    torchrun --nproc_per_node 8 launch/trl_dpo.py --deepspeed ds_zero2.json ...

The dataset is a local .json/.jsonl/.parquet file (or a Hub dataset name) in any layout the
Megatron trainer reads (onmerge_megatron/training/data.py): prompt / chosen / rejected as strings, or
chosen / rejected as whole conversations ending with the assistant's answer (UltraFeedback-binarized),
or KTO's prompt / completion / label. Records are converted to TRL's conversational layout, rendered
with the tokenizer's chat template as the Megatron trainer renders them:

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

(``--use_chat_template false`` keeps plain-string records as text.) --trainer kto unpairs
preference pairs into KTO's prompt / completion / label form.
``--cpu_gloo`` runs on CPUs with the gloo backend (tests, laptops), one process or under torchrun.
Try it on the CPU demo's models (``make demo`` writes runs/tiny):

    python launch/trl_dpo.py --cpu_gloo --model_name_or_path runs/tiny/sft/hf --dataset data/tiny/train.jsonl \
        --merge_base_model runs/tiny/base --merge_method dare --merge_keep_rate 0.2 --merge_alpha 1e-2 \
        --output_dir runs/tiny/trl_dpo --max_steps 20 --per_device_train_batch_size 8 --learning_rate 1e-3
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "the SFT model (the policy starts here; also the DPO reference)"})
    dataset: str = field(metadata={"help": "local .json/.jsonl/.parquet file or Hub dataset (layouts: see the module docstring)"})
    dataset_split: str = "train"
    trainer: str = field(default="dpo", metadata={"help": "dpo or kto"})
    use_chat_template: bool = field(default=True, metadata={
        "help": "render plain-string records with the tokenizer's chat template, as the Megatron trainer's "
                "data.use_chat_template does"})
    cpu_gloo: bool = field(default=False, metadata={"help": "CPU processes with gloo (no GPU)"})


def _cpu_gloo_state() -> bool:
    """accelerate on CPU: one gloo process group for all launched processes; False (nothing done)
    for a single process started without a launcher, which needs no process group.

    Without an explicit state, accelerate on CPU treats each torchrun process as its own world;
    DeepSpeed's shared-memory comm op (a g++ JIT build) is not needed by gloo and is skipped.
    """
    if "WORLD_SIZE" not in os.environ:
        return False
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or "--deepspeed" in sys.argv:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from onmerge_megatron.deepspeed.compat import skip_shm_comm_op_build

        skip_shm_comm_op_build()
    PartialState(backend="gloo", cpu=True)
    return True


def to_trl_record(record: dict[str, Any], kind: str, chat: bool, where: str = "record") -> dict[str, Any]:
    """One record of the Megatron trainer's layouts (`kind` "pairs" or "unpaired") in TRL's
    layout: conversational (prompt messages, answers as one assistant message) when `chat`,
    plain strings otherwise. Raises DataError naming `where` and what is wrong, as the trainer does."""
    from onmerge_megatron.training.data import DataError, normalize_record

    prompt, answers, label = normalize_record(record, kind, where)
    if chat:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        answers = [[{"role": "assistant", "content": a}] for a in answers]
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: a message-list prompt needs the chat template (--use_chat_template true)")
    if kind == "pairs":
        return {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}
    return {"prompt": prompt, "completion": answers[0], "label": label}


def to_trl_dataset(dataset: Any, chat: bool, name: str) -> Any:
    """A datasets.Dataset of pairs or of KTO's unpaired records, in TRL's layout (to_trl_record);
    errors name `name` and the row."""
    kind = "unpaired" if "label" in dataset.column_names else "pairs"
    return dataset.map(lambda record, i: to_trl_record(record, kind, chat, f"{name}: row {i + 1}"), with_indices=True,
                       remove_columns=dataset.column_names)


def main() -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    from onmerge_megatron.deepspeed.hf import OnlineMergeArguments, with_online_merge

    script_args, merge_args, rest = HfArgumentParser((ScriptArguments, OnlineMergeArguments)).parse_args_into_dataclasses(
        return_remaining_strings=True
    )
    launched = script_args.cpu_gloo and _cpu_gloo_state()
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
    if launched:
        training_args.accelerator_config.use_configured_state = True

    path = script_args.dataset
    if path.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=path, split=script_args.dataset_split)
    elif path.endswith(".parquet"):
        dataset = load_dataset("parquet", data_files=path, split=script_args.dataset_split)
    else:
        dataset = load_dataset(path, split=script_args.dataset_split)

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = to_trl_dataset(dataset, script_args.use_chat_template and tokenizer.chat_template is not None, path)
    if script_args.trainer == "kto" and "label" not in dataset.column_names:
        from trl.data_utils import unpair_preference_dataset

        dataset = unpair_preference_dataset(dataset)
    elif script_args.trainer == "dpo" and "label" in dataset.column_names:
        raise SystemExit(f"{path}: unpaired records (prompt/completion/label) are for --trainer kto; DPO needs pairs")
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype=dtype)
    if not model.config.architectures:
        raise SystemExit(
            f"{script_args.model_name_or_path}/config.json has no 'architectures', from which TRL builds the reference "
            f"model; `onmerge export-hf` writes it (or add e.g. \"architectures\": [\"{type(model).__name__}\"])")

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
