"""TRL DPOTrainer / KTOTrainer with OnlineMergingAdamW under DeepSpeed ZeRO, 2 gloo processes, tiny Llama.

Runs launch/trl_dpo.py for a few steps and checks from the saved weights that the merge really
ran on ZeRO's partitions with global masks: with no weight decay, an element may move only if
OnDARE kept it at some step (update masks) or it is in the reference delta's fixed mask.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from distributed import torchrun_command
from reference_impl import moves_outside_dare_masks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
KEEP = 0.2


def _tiny_models(tmp: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the a cat dog sat ran on mat fast slow good bad yes no why how".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )
    sft = LlamaForCausalLM(config)
    sft_dir, base_dir = tmp / "sft", tmp / "base"
    sft.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    with torch.no_grad():
        for p in sft.parameters():
            p.sub_(0.05 * torch.randn_like(p))
    sft.save_pretrained(base_dir)
    return sft_dir, base_dir


def _dataset(tmp: Path) -> Path:
    rows = [
        {"prompt": "the cat sat on", "chosen": " the mat", "rejected": " the dog"},
        {"prompt": "why the dog ran", "chosen": " fast", "rejected": " slow"},
        {"prompt": "a good cat", "chosen": " yes", "rejected": " no"},
        {"prompt": "how the dog sat", "chosen": " good", "rejected": " bad"},
    ] * 4
    path = tmp / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("trainer,stage", [("dpo", 2), ("dpo", 3), ("kto", 2)])
def test_trl_under_deepspeed_merges_with_global_masks(tmp_path: Path, trainer: str, stage: int) -> None:
    from safetensors.torch import load_file

    sft_dir, base_dir = _tiny_models(tmp_path)
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": "auto",
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    out = tmp_path / "out"
    cmd, env = torchrun_command(2, [
        str(ROOT / "launch" / "trl_dpo.py"), "--cpu_gloo", "--trainer", trainer,
        "--model_name_or_path", str(sft_dir), "--dataset", str(_dataset(tmp_path)),
        "--merge_base_model", str(base_dir), "--merge_method", "dare", "--merge_keep_rate", str(KEEP), "--merge_alpha", "0.5",
        "--deepspeed", str(tmp_path / "ds.json"), "--output_dir", str(out), "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--weight_decay", "0.0",
        "--max_length", "32", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--dataloader_num_workers", "0", "--gradient_checkpointing", "false",
    ])
    env["TOKENIZERS_PARALLELISM"] = "false"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
    assert "online_merge/kept_fraction" in done.stdout + done.stderr

    before, after = load_file(sft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    outside, moved_total = moves_outside_dare_masks(before, after, KEEP, STEPS)
    assert not outside, f"elements outside the merge masks moved in {outside}"
    assert moved_total > 0.05 * sum(t.numel() for t in before.values())
