"""The megatron model built from an HF config computes the HF model's log-probs, and exports back exactly."""

import json
import os

import pytest
import torch

from train_jobs import ROOT, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, tiny_base):
    """A tiny Qwen2 (QKV bias, GQA, tied embeddings) with random weights, sharing the tiny tokenizer."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = str(tmp_path_factory.mktemp("qwen2"))
    with open(os.path.join(tiny_base, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rope_theta=1e6)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero biases, so a bias mapping error would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tp2_model_matches_hf_and_exports_exactly(tmp_path, tiny_base, tiny_qwen2, family):
    hf_dir = tiny_base if family == "llama" else tiny_qwen2
    proc = torchrun(2, [os.path.join(ROOT, "tests", "training", "model_check.py"), hf_dir, str(tmp_path / "export"), "2"])
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith(("MAX_ABS_DIFF=", "EXPORT_EXACT=")))
    assert float(values["MAX_ABS_DIFF"]) < 1e-4
    assert values["EXPORT_EXACT"] == "True"
