"""`onmerge export-hf`: any checkpoint of a run, in Hugging Face format, on one process.

The slow tests train a tiny DPO run with TP=2 on 2 processes, export its mid-run checkpoint with
one process, and check the export against the trainer: per-sequence log-probs of the exported
model under transformers equal those megatron-core computes from the same checkpoint (TP=2), and
the export of the run's last checkpoint equals the run's own end-of-run export bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_jobs import DATA, ROOT, dpo_config, train
from onmerge_megatron.training import checkpoints as ckpt
from onmerge_megatron.training.export import (
    ExportError,
    checkpoint_to_export,
    complete_hf_export,
    export_layer_spec,
    run_export_command,
)

N_PAIRS = 16


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`onmerge ...` as a user runs it: one process, no launcher."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "onmerge_megatron.training.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _head(src: str, dst: str, n: int) -> str:
    with open(src) as f:
        lines = [line for line in f if line.strip()][:n]
    with open(dst, "w") as f:
        f.writelines(lines)
    return dst


def _source_model(tiny_base: str, out: str) -> str:
    """The tiny base as older tiny models were written (no `architectures`, no dtype in
    config.json), with a generation config listing two end tokens as Llama-3-Instruct does."""
    from transformers import AutoTokenizer, GenerationConfig

    shutil.copytree(tiny_base, out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    for key in ("architectures", "dtype", "torch_dtype"):
        config.pop(key, None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok = AutoTokenizer.from_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("</s>")],
                     pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_base):
    """Run A: DPO, TP=2 on 2 processes, 4 steps, checkpoints at steps 2 and 4, end-of-run export.
    Run B: the step-2 checkpoint as starting weights (TP=2): its cached reference log-probs are the
    trainer's log-probs of the step-2 weights. Exports (one process): step 2, and run A's dir."""
    tmp = tmp_path_factory.mktemp("export_hf")
    source = _source_model(tiny_base, str(tmp / "source"))
    train_file = _head(f"{DATA}/train.jsonl", str(tmp / "train.jsonl"), N_PAIRS)
    eval_file = _head(f"{DATA}/eval.jsonl", str(tmp / "eval.jsonl"), 8)
    data = {"train_files": [train_file], "eval_files": [eval_file]}
    run_a, run_b = str(tmp / "run_a"), str(tmp / "run_b")
    train(2, dpo_config(source, run_a, steps=4, tp=2, micro=4, global_batch=8, data=data,
                        run={"save_every": 2, "save_final": True, "export_hf": True}), tmp)
    step2 = os.path.join(run_a, "checkpoints", ckpt.step_name(2))
    train(2, dpo_config(source, run_b, steps=1, tp=2, micro=4, global_batch=8, data=data,
                        model={"load_format": "megatron", "megatron_load": step2}, optim={"warmup_steps": 0}), tmp)
    out_step2, out_latest = str(tmp / "hf_step2"), str(tmp / "hf_latest")
    _cli("export-hf", "--checkpoint", step2, "--out", out_step2)
    proc = _cli("export-hf", "--checkpoint", run_a, "--out", out_latest)
    assert f"loading {os.path.join(run_a, 'checkpoints', ckpt.step_name(4))} (step 4)" in proc.stdout
    return {"tmp": tmp, "source": source, "run_a": run_a, "run_b": run_b, "step2": step2, "train_file": train_file,
            "hf_step2": out_step2, "hf_latest": out_latest}


def _sequence_logps(model, examples) -> torch.Tensor:
    """[n, 2] summed log-probs of the chosen and rejected completions, as the trainer scores them."""
    rows = []
    with torch.no_grad():
        for example in examples:
            row = []
            for completion in example.completions:
                seq = torch.tensor([example.prompt_ids + completion])
                logits = model(seq[:, :-1]).logits
                logps = torch.log_softmax(logits.double(), -1).gather(-1, seq[:, 1:, None])[0, :, 0]
                row.append(logps[len(example.prompt_ids) - 1:].sum().item())
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.slow
def test_mid_run_checkpoint_export_matches_trainer_logps(exported):
    """The step-2 checkpoint (saved at TP=2), exported on one process and loaded with transformers,
    gives the trainer's per-sequence log-probs of those weights (megatron-core, TP=2) within 1e-5;
    generate runs with the source's generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onmerge_megatron.training.data import load_examples

    tokenizer = AutoTokenizer.from_pretrained(exported["hf_step2"])
    examples, _ = load_examples([exported["train_file"]], tokenizer, "pairs", max_length=64, max_prompt_length=32)
    assert len(examples) == N_PAIRS
    model = AutoModelForCausalLM.from_pretrained(exported["hf_step2"]).eval()
    assert model.dtype == torch.float32
    ours = _sequence_logps(model, examples)
    trainer_step2 = torch.load(os.path.join(exported["run_b"], "reference_logps", "train.pt"))["logps"]
    trainer_initial = torch.load(os.path.join(exported["run_a"], "reference_logps", "train.pt"))["logps"]
    assert (trainer_step2 - trainer_initial).abs().max() > 1e-3  # two steps moved the log-probs
    assert (ours - trainer_step2).abs().max().item() <= 1e-5

    assert model.generation_config.eos_token_id == json.load(open(os.path.join(exported["source"], "generation_config.json")))["eos_token_id"]
    prompt = torch.tensor([examples[0].prompt_ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 4
    assert torch.equal(out[0, :prompt.shape[1]], prompt[0])


@pytest.mark.slow
def test_export_directory_contents(exported):
    """config.json states the architecture and dtype the source lacked; the generation config and
    the tokenizer are the source's; nothing is left half-written."""
    from transformers import AutoTokenizer

    directory = exported["hf_step2"]
    config = json.load(open(os.path.join(directory, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    with open(os.path.join(exported["source"], "generation_config.json"), "rb") as a, \
            open(os.path.join(directory, "generation_config.json"), "rb") as b:
        assert a.read() == b.read()
    text = "What is three plus four?"
    assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == AutoTokenizer.from_pretrained(exported["source"])(text)["input_ids"]
    assert not [n for n in os.listdir(exported["tmp"]) if n.endswith((ckpt.PARTIAL_SUFFIX, ".old"))]


@pytest.mark.slow
def test_run_dir_export_equals_end_of_run_export(exported):
    """A run's output_dir means its latest checkpoint (step 4); exported on one process it is, bit
    for bit, the export the TP=2 run wrote at its end (one exporter, exact TP resharding)."""
    a = load_file(os.path.join(exported["hf_latest"], "model.safetensors"))
    b = load_file(os.path.join(exported["run_a"], "hf", "model.safetensors"))
    step2 = load_file(os.path.join(exported["hf_step2"], "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], step2[k]) for k in a)
    assert json.load(open(os.path.join(exported["hf_latest"], "config.json"))) == \
        json.load(open(os.path.join(exported["run_a"], "hf", "config.json")))


def _damage(directory: str) -> str:
    name = sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))[0]
    path = os.path.join(directory, name)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    return name


@pytest.mark.slow
def test_refusals_and_fallback_with_real_checkpoints(exported, tmp_path, capsys):
    """A damaged checkpoint is refused by name and nothing is written; in a run directory whose
    latest checkpoint is damaged, the newest intact one is exported and nothing is moved; an --out
    that holds other files, or lies inside the checkpoint, is refused and left as it was."""
    damaged = str(tmp_path / "step")
    shutil.copytree(exported["step2"], damaged)
    name = _damage(damaged)
    out = str(tmp_path / "out")
    assert run_export_command(damaged, out, None, False) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and name in err and damaged in err
    assert not os.path.exists(out) and not os.path.exists(out + ckpt.PARTIAL_SUFFIX)

    run = tmp_path / "run"
    shutil.copytree(os.path.join(exported["run_a"], "checkpoints"), run / "checkpoints")
    latest = str(run / "checkpoints" / ckpt.step_name(4))
    _damage(latest)
    assert checkpoint_to_export(str(run)) == str(run / "checkpoints" / ckpt.step_name(2))
    assert "newest intact" in capsys.readouterr().out
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", ckpt.step_name(2), ckpt.step_name(4)]

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    for overwrite, expected in ((False, "pass --overwrite"), (True, "not an earlier export")):
        assert run_export_command(exported["step2"], str(taken), None, overwrite) == 2
        assert expected in capsys.readouterr().err
    assert os.listdir(taken) == ["notes.txt"]
    inside = os.path.join(exported["step2"], "hf")
    assert run_export_command(exported["step2"], inside, None, False) == 2
    assert "inside the checkpoint" in capsys.readouterr().err and not os.path.exists(inside)


@pytest.mark.slow
def test_model_only_checkpoint_round_trip_needs_hf(tmp_path, tiny_base, capsys):
    """A model-only checkpoint (`onmerge convert-hf`) does not say which model it holds: refused
    without --hf; with it, HF -> megatron -> HF gives the original weights bit for bit."""
    converted, out = str(tmp_path / "converted"), str(tmp_path / "out")
    _cli("convert-hf", "--hf", tiny_base, "--out", converted)
    assert run_export_command(converted, out, None, False) == 2
    assert "pass --hf DIR" in capsys.readouterr().err and not os.path.exists(out)
    _cli("export-hf", "--checkpoint", converted, "--out", out, "--hf", tiny_base)
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(tiny_base, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    """Missing paths, unknown directories and a run whose `latest` names nothing: refused, naming
    the path, before any process group or file is made."""
    out = str(tmp_path / "out")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("not a checkpoint")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000007\n")
    cases = [(str(tmp_path / "missing"), "is not a directory"),
             (str(unknown), "neither a megatron dist checkpoint"),
             (str(run), "step_0000007, which does not exist")]
    for path, expected in cases:
        assert run_export_command(path, out, None, False) == 2
        err = capsys.readouterr().err
        assert expected in err and path in err, err
    assert not os.path.exists(out)
    assert not torch.distributed.is_initialized()


def _staged_export(directory, tiny_base: str, dtype: torch.dtype) -> str:
    os.makedirs(directory)
    config = json.load(open(os.path.join(tiny_base, "config.json")))
    config.pop("architectures", None)
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    weights = load_file(os.path.join(tiny_base, "model.safetensors"))
    save_file({k: v.to(dtype) for k, v in weights.items()}, os.path.join(directory, "model.safetensors"))
    return str(directory)


def test_complete_hf_export_states_architecture_dtype_and_copies_generation_config(tmp_path, tiny_base):
    staged = _staged_export(tmp_path / "bf16", tiny_base, torch.bfloat16)
    source = tmp_path / "source"
    shutil.copytree(tiny_base, source)
    (source / "generation_config.json").write_text('{"eos_token_id": [7, 2]}\n')
    complete_hf_export(staged, str(source))
    config = json.load(open(os.path.join(staged, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "generation_config.json").read_text() == '{"eos_token_id": [7, 2]}\n'

    plain = _staged_export(tmp_path / "fp32", tiny_base, torch.float32)
    complete_hf_export(plain, tiny_base)  # the tiny base has no generation config: none is made
    assert json.load(open(os.path.join(plain, "config.json")))["torch_dtype"] == "float32"
    assert not os.path.exists(os.path.join(plain, "generation_config.json"))


def test_complete_hf_export_refuses_missing_shards(tmp_path, tiny_base):
    staged = _staged_export(tmp_path / "x", tiny_base, torch.float32)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    json.dump(index, open(os.path.join(staged, "model.safetensors.index.json"), "w"))
    before = open(os.path.join(staged, "config.json")).read()
    with pytest.raises(ExportError, match="model-00002-of-00002.safetensors"):
        complete_hf_export(staged, tiny_base)
    assert open(os.path.join(staged, "config.json")).read() == before


def test_export_builds_the_layer_spec_the_checkpoint_was_trained_with(monkeypatch):
    from onmerge_megatron.training import export

    assert export_layer_spec({"transformer_impl": "local"}, "ckpt") is False
    assert export_layer_spec({}, "ckpt") is False  # a model-only checkpoint
    monkeypatch.setattr(export, "transformer_engine_available", lambda: False)
    with pytest.raises(ExportError, match="model.transformer_impl 'transformer_engine'.*does not import"):
        export_layer_spec({"transformer_impl": "transformer_engine"}, "ckpt")
    monkeypatch.setattr(export, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(export, "on_gpu", lambda: False)
    with pytest.raises(ExportError, match="needs a GPU"):
        export_layer_spec({"transformer_impl": "transformer_engine"}, "ckpt")
    monkeypatch.setattr(export, "on_gpu", lambda: True)
    assert export_layer_spec({"transformer_impl": "transformer_engine"}, "ckpt") is True
