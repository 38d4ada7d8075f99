"""The trainer reads HuggingFaceH4/ultrafeedback_binarized's preference files as they are published:
Parquet with prompt (str), prompt_id (str), chosen/rejected/messages (lists of {content, role}
structs, the user turn included) and score_chosen/score_rejected (float64)."""

import pyarrow as pa
import pyarrow.parquet as pq

from onmerge_megatron.training.data import load_examples, normalize_record, read_records

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                    ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                    ("score_rejected", pa.float64())])

ROWS = [("What is two plus two?", "two plus two is four.", "five."),
        ("Reverse: red green blue", "blue green red", "red green blue")]


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]


def write_prefs(path: str) -> None:
    table = pa.table({
        "prompt": [p for p, _, _ in ROWS],
        "prompt_id": ["a1" * 32, "b2" * 32],
        "chosen": [conversation(p, c) for p, c, _ in ROWS],
        "rejected": [conversation(p, r) for p, _, r in ROWS],
        "messages": [conversation(p, c) for p, c, _ in ROWS],
        "score_chosen": [9.0, 8.5],
        "score_rejected": [2.0, 3.0],
    }, schema=SCHEMA)
    pq.write_table(table, path)


def test_ultrafeedback_prefs_parquet_is_read_as_it_is(tmp_path, tiny_tokenizer):
    path = str(tmp_path / "train_prefs-00000-of-00001.parquet")
    write_prefs(path)
    assert pq.read_schema(path).equals(SCHEMA)

    records = list(read_records(path))
    assert [where for where, _ in records] == [f"{path}:row 1", f"{path}:row 2"]
    for (where, record), (prompt, chosen, rejected) in zip(records, ROWS):
        # The prompt is the user turn of the conversations; the answers are their last messages.
        assert normalize_record(record, "pairs", where) == (
            [{"content": prompt, "role": "user"}], [chosen, rejected], None)

    examples, stats = load_examples([path], tiny_tokenizer, "pairs", max_length=64, max_prompt_length=32)
    assert stats.records == 2 and stats.skipped == 0 and len(examples) == 2
    tok = tiny_tokenizer
    for ex, (prompt, chosen, rejected) in zip(examples, ROWS):
        # Independent reference: the chat template rendered as text, then tokenized.
        def ids(messages, **kw):
            return tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]

        user = [{"role": "user", "content": prompt}]
        assert ex.prompt_ids == ids(user, add_generation_prompt=True)
        assert ex.prompt_ids + ex.completions[0] == ids(conversation(prompt, chosen))
        assert ex.prompt_ids + ex.completions[1] == ids(conversation(prompt, rejected))
        assert tok.decode(ex.completions[0]).replace(" ", "") == chosen.replace(" ", "") + "<|end|>"
