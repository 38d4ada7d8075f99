"""Faulty inputs are refused with a message naming the file, key or tensor (and both values), and
a refusal changes nothing: data files, base weights of another shape, refused merge installs,
and a Megatron base read by a single process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from onmerge_megatron.training.data import DataError, load_examples

GOOD = {"prompt": "Can you name a fruit?", "chosen": "apple", "rejected": "No."}


def write_lines(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


# --------------------------------------------------------------------------- data files


def test_undecodable_line_is_a_malformed_record(tmp_path, tiny_tokenizer):
    good = json.dumps(GOOD).encode()
    bad = b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}'  # Latin-1, not UTF-8
    path = write_lines(tmp_path / "latin1.jsonl", [good, bad, good])
    column = bad.index(b"\xe9")
    offset = len(good) + 1 + column
    with pytest.raises(DataError, match=rf"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column {column + 1}, byte offset {offset} of the file"):
        load_examples([path], tiny_tokenizer, "pairs", 64, 32)
    examples, stats = load_examples([path], tiny_tokenizer, "pairs", 64, 32, on_error="skip")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert stats.records == 3 and stats.skipped == 1
    assert stats.skipped_reasons[0].startswith(f"{path}:2: not valid UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_file_without_records_is_an_error(tmp_path, tiny_tokenizer, content, on_error):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(GOOD).encode()])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{empty}: no records"):
        load_examples([good, str(empty)], tiny_tokenizer, "pairs", 64, 32, on_error=on_error)


def test_parquet_without_rows_is_an_error(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "empty.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string()), ("completion", pa.string())])), path)
    with pytest.raises(DataError, match=rf"^{path}: no records"):
        load_examples([path], tiny_tokenizer, "sft", 64, 32)


def test_empty_and_identical_answers_are_kept_and_counted(tmp_path, tiny_tokenizer):
    conv = lambda a: [{"role": "user", "content": "Can you name a tree?"}, {"role": "assistant", "content": a}]  # noqa: E731
    rows = [
        GOOD,
        {"prompt": "a", "chosen": "", "rejected": "pear"},  # 2: empty chosen
        {"prompt": "a", "chosen": "plum", "rejected": "  "},  # 3: empty rejected
        {"prompt": "a", "chosen": "same", "rejected": "same"},  # 4: identical
        {"prompt": "Can you name a tree?", "chosen": conv("oak"), "rejected": conv("oak")},  # 5: identical
        {"prompt": "a", "chosen": "", "rejected": ""},  # 6: both
    ]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(r).encode() for r in rows])
    examples, stats = load_examples([path], tiny_tokenizer, "pairs", 64, 32)
    assert len(examples) == 6 and stats.skipped == 0
    assert stats.empty_answers == 3 and stats.identical_answers == 3
    assert stats.suspicious_reasons == [
        f"{path}:2: empty 'chosen'",
        f"{path}:3: empty 'rejected'",
        f"{path}:4: 'chosen' and 'rejected' are the same answer",
        f"{path}:5: 'chosen' and 'rejected' are the same answer",
        f"{path}:6: empty 'chosen'",
        f"{path}:6: empty 'rejected'",
        f"{path}:6: 'chosen' and 'rejected' are the same answer",
    ]
    sft = write_lines(tmp_path / "s.jsonl", [json.dumps(r).encode() for r in ({"prompt": "a", "completion": ""},
                                                                              {"prompt": "a", "completion": "b"})])
    examples, stats = load_examples([sft], tiny_tokenizer, "sft", 64, 32)
    assert len(examples) == 2 and (stats.empty_answers, stats.identical_answers) == (1, 0)
    assert stats.suspicious_reasons == [f"{sft}:1: empty 'completion'"]
    kto = write_lines(tmp_path / "k.jsonl", [json.dumps({"prompt": "a", "completion": " ", "label": True}).encode()])
    _, stats = load_examples([kto], tiny_tokenizer, "unpaired", 64, 32)
    assert stats.empty_answers == 1 and stats.suspicious_reasons == [f"{kto}:1: empty 'completion'"]


# --------------------------------------------------------------------------- base weights, installs


def save_llama_variant(src: str, out: Path, changes: dict, config_says_so: bool = True) -> str:
    """A random Llama like ``src``'s but for ``changes``; its config.json is the changed one, or
    (``config_says_so=False``) ``src``'s, so that only the tensors differ."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    shaped = LlamaConfig.from_pretrained(src, **changes)
    torch.manual_seed(3)
    model = LlamaForCausalLM(shaped)
    out.mkdir(parents=True)
    (shaped if config_says_so else LlamaConfig.from_pretrained(src)).save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.mark.slow
def test_hf_base_of_another_shape_is_refused_before_reading(tmp_path, tiny_base, tiny_other_base):
    """config.json fields, then every tensor's shape (from the safetensors headers), are compared
    with the model's before the first weight is read; the optimizer is left as it was."""
    pytest.importorskip("mbridge")
    import mcore_harness as h
    import mcore_jobs as jobs

    policy = json.loads(Path(tiny_base, "config.json").read_text())
    layers, ffn, vocab = policy["num_hidden_layers"], policy["intermediate_size"], policy["vocab_size"]
    bad = {
        "deeper": save_llama_variant(tiny_other_base, tmp_path / "deeper", {"num_hidden_layers": layers + 1}),
        "wider_ffn": save_llama_variant(tiny_other_base, tmp_path / "wider_ffn", {"intermediate_size": ffn + 24}),
        "smaller_vocab": save_llama_variant(tiny_other_base, tmp_path / "smaller_vocab", {"vocab_size": vocab - 64}),
        "ffn_tensors_only": save_llama_variant(tiny_other_base, tmp_path / "ffn_tensors", {"intermediate_size": ffn + 24}, config_says_so=False),
    }
    h.spawn(jobs.hf_base_refusals, 1, tmp_path, policy=tiny_base, good=tiny_other_base, bad=bad)
    results = torch.load(tmp_path / "hf_refusals_rank0.pt")
    expected = {
        "deeper": f"num_hidden_layers={layers + 1} in its config.json, num_layers={layers} in the model",
        "wider_ffn": f"intermediate_size={ffn + 24} in its config.json, ffn_hidden_size={ffn} in the model",
        "smaller_vocab": f"vocab_size={vocab - 64} in its config.json, vocab_size={vocab} in the model "
                         f"(vocabulary padding? pass make_vocab_size_divisible_by)",
        "ffn_tensors_only": f"'decoder.layers.0.mlp.linear_fc1.weight' is ({2 * (ffn + 24)}, {policy['hidden_size']}) in the "
                            f"Hugging Face base {bad['ffn_tensors_only']} (from model.layers.0.mlp.gate_proj.weight ({ffn + 24}, {policy['hidden_size']}), "
                            f"model.layers.0.mlp.up_proj.weight ({ffn + 24}, {policy['hidden_size']})) but "
                            f"({2 * ffn}, {policy['hidden_size']}) in the model (dimension 0: {2 * (ffn + 24)} in the base, "
                            f"{2 * ffn} in the model)",
    }
    for label, needle in expected.items():
        result = results[label]
        assert result["message"] is not None and result["message"].startswith("ValueError: online merge:"), label
        assert needle in result["message"], f"{label}: {result['message']}"
        assert bad[label] in result["message"], f"{label}: the base is not named in {result['message']}"
        if label != "smaller_vocab":
            assert "vocabulary" not in result["message"], f"{label}: wrong hint in {result['message']}"
        assert result["read"] == 0, f"{label}: {result['read']} tensors were read before the refusal"
        assert result["changes"] == [], f"{label}: the refused install changed the optimizer: {result['changes']}"
    assert results["good"]["message"] is None and results["good"]["read"] > 0


@pytest.mark.slow
def test_refused_install_changes_nothing_and_a_corrected_one_works(tmp_path):
    """DP 2: a merge without a reference source and base checkpoints of another shape (one layer
    more, a wider FFN) are refused with the optimizer left as it was (same inner Adam, param groups and
    moments); the corrected install then merges, with the moments carried over."""
    pytest.importorskip("megatron.core")
    import mcore_harness as h
    import mcore_jobs as jobs

    h.spawn(jobs.refused_install, 2, tmp_path)
    results = torch.load(tmp_path / "refused_install.pt")
    base = str(tmp_path / "base")
    expected = {
        "no_reference": r"^ValueError: online merge: method='ties' with alpha=0.3 needs a reference delta",
        "deeper_base": rf"^ValueError: online merge: tensor 'decoder\.layers\.[\w.]+' is \({h.NUM_LAYERS + 1}, [\d, ]+\) in the "
                       rf"base checkpoint {base}_deeper but \({h.NUM_LAYERS}, [\d, ]+\) in the model "
                       rf"\({h.NUM_LAYERS + 1} layers in the base, {h.NUM_LAYERS} in the model\)",
        "wider_ffn_base": rf"^ValueError: online merge: tensor 'decoder\.layers\.mlp\.linear_fc[12]\.weight' is "
                          rf"\({h.NUM_LAYERS}, \d+, \d+\) in the base checkpoint {base}_wider_ffn but \({h.NUM_LAYERS}, \d+, \d+\) "
                          r"in the model \(dimension [12]: (64 in the base, 48|32 in the base, 24) in the model\)",
    }
    for label, pattern in expected.items():
        message, changes = results[label]
        assert message is not None and re.search(pattern, message), f"{label}: {message}"
        assert changes == [], f"{label}: the refused install changed the optimizer: {changes}"
    assert results["retry"] == {"inner": ["OnlineMergingAdamW"], "moments_carried_over": True, "with_reference": True}


@pytest.mark.slow
def test_megatron_base_is_read_by_a_single_process(tmp_path):
    """World size 1: one layer of a layer-stacked key per read (what MegatronCheckpointBase
    requests) loads, and the delta equals init - base from megatron's whole-tensor reader."""
    pytest.importorskip("megatron.core")
    import mcore_harness as h
    import mcore_jobs as jobs

    h.spawn(jobs.megatron_base_delta, 1, tmp_path)
    result = torch.load(tmp_path / "megatron_base_rank0.pt")
    assert result["count"] >= 20
    assert result["worst"] == 0.0


@pytest.mark.slow
def test_converted_bases_are_read_by_a_single_process(tmp_path, tiny_base, tiny_other_base):
    """Bases saved by `onmerge convert-hf` at TP 1 and TP 2, read into a 1-process run of the
    trainer's model: the delta equals the policy minus the HF base (as mbridge loads it, and as
    the HF tensors themselves where Megatron keeps them unchanged)."""
    pytest.importorskip("mbridge")
    import mcore_harness as h
    import mcore_jobs as jobs
    from train_jobs import torchrun

    bases = []
    for tp in (1, 2):
        out = str(tmp_path / f"base_tp{tp}")
        torchrun(tp, ["-m", "onmerge_megatron.training.cli", "convert-hf", "--hf", tiny_other_base, "--out", out,
                      "--tensor-parallel", str(tp)])
        bases.append(out)
    h.spawn(jobs.converted_base_delta, 1, tmp_path, policy=tiny_base, base_hf=tiny_other_base, bases=bases)
    results = torch.load(tmp_path / "converted_rank0.pt")
    for base in bases:
        assert results[base]["count"] >= 10, base
        assert results[base]["worst"] == 0.0, f"{base}: delta differs from policy - HF base by {results[base]['worst']}"
        assert results[base]["worst_hf"] == 0.0, f"{base}: delta differs from the HF tensors' difference by {results[base]['worst_hf']}"
