"""Run under torchrun: megatron GPTModel built by training/model.py vs the HF model, same weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/model_check.py HF_DIR OUT_DIR TP
Prints MAX_ABS_DIFF=<float> (per-token log-probs) and EXPORT_EXACT=<bool> on rank 0.
"""

import os
import sys

import torch
import torch.distributed as dist

hf_dir, out_dir, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])

from onmerge_megatron.training.parallel import quiet_library_warnings  # noqa: E402

quiet_library_warnings()
from onmerge_megatron.training.config import config_from_dict  # noqa: E402
from onmerge_megatron.training.parallel import init_distributed  # noqa: E402
from onmerge_megatron.training.model import build_model, causal_attention_mask, export_hf, load_hf_weights, make_bridge  # noqa: E402

cfg = config_from_dict({"model": {"hf_path": hf_dir}, "data": {"train_files": ["x.jsonl"]},
                        "parallel": {"tensor_parallel": tp, "global_batch_size": 2}})
init_distributed(cfg)
bridge = make_bridge(hf_dir, torch.float32)
chunks = build_model(bridge, 64)
load_hf_weights(bridge, chunks, hf_dir)
model = chunks[0].eval()

torch.manual_seed(0)
vocab = bridge.hf_config.vocab_size
tokens = torch.randint(0, vocab, (3, 17))
inputs, labels = tokens[:, :-1], tokens[:, 1:]
positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
with torch.no_grad():
    mega = -model(inputs, positions, causal_attention_mask(inputs.shape[1], torch.device("cpu")), labels=labels)

from transformers import AutoModelForCausalLM  # noqa: E402

hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = hf(inputs).logits.float()
ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
diff = (mega - ref).abs().max().item()

export_hf(bridge, chunks, out_dir)
if dist.get_rank() == 0:
    from safetensors.torch import load_file

    def load_dir(d):
        out = {}
        for name in os.listdir(d):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, name)))
        return out

    a, b = load_dir(hf_dir), load_dir(out_dir)
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"MAX_ABS_DIFF={diff:.3e}")
    print(f"EXPORT_EXACT={exact}")
dist.barrier()
dist.destroy_process_group()
