"""Tokenization masks exactly the prompt tokens; truncation; malformed records; batching order."""

import json

import pytest
import torch

from onmerge_megatron.training.data import (
    DataError,
    StepSampler,
    collate,
    load_examples,
)


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_mask_covers_exactly_the_completion_tokens(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    conv = lambda a: [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": a}]  # noqa: E731
    path = write(tmp_path, "p.jsonl", [{"prompt": "What is two plus two?", "chosen": conv("two plus two is four."),
                                        "rejected": conv("No.")}])
    (ex,), _ = load_examples([path], tok, "pairs", max_length=64, max_prompt_length=32)
    # Independent reference: the chat template rendered as text, tokenized by the tokenizer itself.
    prompt_text = tok.apply_chat_template(conv("x")[:1], tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(conv("two plus two is four."), tokenize=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tok(full_text, add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids == prompt_ids
    assert ex.prompt_ids + ex.completions[0] == full_ids
    assert tok.decode(ex.completions[0]) .replace(" ", "") == "twoplustwoisfour.<|end|>"

    batch = collate([ex], [0], "pairs", tok.pad_token_id, 64)
    assert batch.input_ids.shape[0] == 2  # chosen, then rejected
    for row, completion in enumerate(ex.completions):
        n_prompt, n = len(ex.prompt_ids), len(ex.prompt_ids) + len(completion)
        mask = batch.loss_mask[row]
        # Predicting token t+1 at position t: masked exactly for the targets that are prompt tokens.
        assert mask[: n_prompt - 1].sum() == 0
        assert mask[n_prompt - 1 : n - 1].tolist() == [1.0] * len(completion)
        assert mask[n - 1 :].sum() == 0
        assert batch.labels[row, n_prompt - 1 : n - 1].tolist() == completion
        assert batch.input_ids[row, : n - 1].tolist() == (ex.prompt_ids + completion)[:-1]


def test_plain_text_without_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = write(tmp_path, "p.jsonl", [{"prompt": "hello there", "chosen": "plum", "rejected": "pear"}])
    (ex,), _ = load_examples([path], tok, "pairs", 64, 32, use_chat_template=False)
    assert ex.prompt_ids == [tok.bos_token_id] + tok("hello there", add_special_tokens=False)["input_ids"]
    assert ex.completions[0] == tok("plum", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_truncation_rules(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt = " ".join(["apple river stone"] * 20)
    long_answer = " ".join(["green tiger bread"] * 20)
    path = write(tmp_path, "p.jsonl", [{"prompt": long_prompt, "completion": long_answer}])
    (ex,), stats = load_examples([path], tok, "sft", max_length=40, max_prompt_length=16)
    full_prompt = tok.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=True, add_generation_prompt=True)
    assert ex.prompt_ids == list(full_prompt)[-16:]  # the prompt keeps its end
    assert len(ex.prompt_ids) + len(ex.completions[0]) == 40  # the completion keeps its start
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1


def test_malformed_records_name_file_and_line(tmp_path, tiny_tokenizer):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write(tmp_path, "bad.jsonl", [good, "{not json", {"prompt": "a", "chosen": "b"}, good,
                                         {"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "c"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_examples([path], tiny_tokenizer, "pairs", 64, 32)
    examples, stats = load_examples([path], tiny_tokenizer, "pairs", 64, 32, on_error="skip")
    assert len(examples) == 2 and stats.skipped == 3 and stats.records == 5
    assert any("bad.jsonl:3: missing key(s) ['rejected']" in r for r in stats.skipped_reasons)
    assert any("bad.jsonl:5:" in r and "assistant" in r for r in stats.skipped_reasons)
    kto = write(tmp_path, "kto.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}])
    with pytest.raises(DataError, match=r"kto\.jsonl:1: 'label' must be true or false"):
        load_examples([kto], tiny_tokenizer, "unpaired", 64, 32)


def test_parquet_and_jsonl_give_the_same_examples(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Can you name a fruit {i}?", "chosen": "apple", "rejected": "No."} for i in range(5)]
    jsonl = write(tmp_path, "d.jsonl", rows)
    parquet = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    a, _ = load_examples([jsonl], tiny_tokenizer, "pairs", 64, 32)
    b, _ = load_examples([parquet], tiny_tokenizer, "pairs", 64, 32)
    assert [(x.prompt_ids, x.completions) for x in a] == [(x.prompt_ids, x.completions) for x in b]
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "chosen": "b"}]), bad)
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: missing key"):
        load_examples([bad], tiny_tokenizer, "pairs", 64, 32)


def test_sampler_is_deterministic_disjoint_and_bucketed(tmp_path, tiny_tokenizer):
    from onmerge_megatron.training.data_gen import make_example
    import random

    rng = random.Random(1)
    rows = []
    for _ in range(256):
        p, c, r = make_example(rng)
        rows.append({"prompt": p, "chosen": c, "rejected": r})
    examples, _ = load_examples([write(tmp_path, "d.jsonl", rows)], tiny_tokenizer, "pairs", 64, 32)
    s1 = StepSampler(examples, micro_batch_size=4, num_microbatches=2, dp_size=2, bucket_size=8, seed=3)
    s2 = StepSampler(examples, micro_batch_size=4, num_microbatches=2, dp_size=2, bucket_size=8, seed=3)
    assert s1.steps_per_epoch == 256 // 16
    seen = []
    for step in range(s1.steps_per_epoch):
        for rank in range(2):
            mbs = s1.microbatches(step, rank)
            assert mbs == s2.microbatches(step, rank)  # a resumed run sees the same batches
            seen += [i for mb in mbs for i in mb]
    assert sorted(seen) == list(range(256))  # one epoch covers every example once
    # Bucketing: padding inside micro-batches is smaller than with random batches.
    def padding(batches):
        return sum(max(len(examples[i].prompt_ids) + max(map(len, examples[i].completions)) for i in mb) * len(mb)
                   - sum(len(examples[i].prompt_ids) + max(map(len, examples[i].completions)) for i in mb) for mb in batches)
    bucketed = [mb for step in range(s1.steps_per_epoch) for r in range(2) for mb in s1.microbatches(step, r)]
    random_batches = [list(range(i, i + 4)) for i in range(0, 256, 4)]
    assert padding(bucketed) < padding(random_batches)
    # Next epoch: a different order.
    assert s1.microbatches(s1.steps_per_epoch, 0) != s1.microbatches(0, 0)


def test_shipped_dataset_is_what_the_script_generates(tmp_path):
    import filecmp
    import os

    from onmerge_megatron.training.data_gen import generate

    from train_jobs import DATA

    generate(str(tmp_path))
    for name in ("sft.jsonl", "train.jsonl", "eval.jsonl", "kto_train.jsonl", "kto_eval.jsonl"):
        assert filecmp.cmp(os.path.join(DATA, name), str(tmp_path / name), shallow=False), name


def test_pairs_to_unpaired_keeps_prompts_and_labels(tmp_path, tiny_tokenizer):
    from onmerge_megatron.training.data_gen import pairs_to_unpaired

    conv = lambda a: [{"role": "user", "content": "Can you name a tree?"}, {"role": "assistant", "content": a}]  # noqa: E731
    src = write(tmp_path, "p.jsonl", [{"prompt": "Can you name a tree?", "chosen": conv("oak"), "rejected": conv("No.")}])
    assert pairs_to_unpaired(src, str(tmp_path / "u.jsonl")) == 2
    (good, bad), _ = load_examples([str(tmp_path / "u.jsonl")], tiny_tokenizer, "unpaired", 64, 32)
    (pair,), _ = load_examples([src], tiny_tokenizer, "pairs", 64, 32)
    assert good.label is True and bad.label is False
    assert good.prompt_ids == bad.prompt_ids == pair.prompt_ids
    assert [good.completions[0], bad.completions[0]] == pair.completions
