"""Generate the small preference dataset shipped under data/tiny/.

    python -m onmerge_megatron.training.data_gen --out data/tiny

Three kinds of prompts a tiny model can learn in minutes on a CPU, each with a preferred and
a dispreferred answer: adding two small numbers (right vs wrong sum), reversing three words
(reversed vs copied), and a request answered helpfully vs refused. Files:
- sft.jsonl:   {"prompt": str, "completion": str}                       (SFT stage)
- train.jsonl, eval.jsonl: UltraFeedback-binarized style pairs
               {"prompt": str, "chosen": [messages], "rejected": [messages]}
- kto_train.jsonl, kto_eval.jsonl: {"prompt": str, "completion": str, "label": bool}
The output is a pure function of --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen".split()
WORDS = "apple river stone cloud green tiger bread music light house paper winter garden silver ocean candle".split()
TOPICS = ["fruit", "color", "animal", "city", "song", "tree", "tool", "game"]
ANSWERS = {
    "fruit": ["apple", "pear", "plum"], "color": ["green", "blue", "red"], "animal": ["tiger", "horse", "owl"],
    "city": ["paris", "rome", "oslo"], "song": ["music", "hymn", "ballad"], "tree": ["oak", "pine", "birch"],
    "tool": ["hammer", "saw", "drill"], "game": ["chess", "go", "cards"],
}


def make_example(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(9)
        right = a + b
        wrong = rng.choice([x for x in range(len(NUMBER_WORDS)) if x != right])
        prompt = f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?"
        return prompt, f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[right]}.", \
            f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[wrong]}."
    if kind == 1:
        words = rng.sample(WORDS, 3)
        prompt = "Reverse the words: " + " ".join(words)
        return prompt, " ".join(reversed(words)), " ".join(words)
    topic = rng.choice(TOPICS)
    prompt = f"Can you name a {topic}?"
    good = f"Of course! A {topic} I like is {rng.choice(ANSWERS[topic])}."
    bad = rng.choice(["No. Ask someone else.", "I will not answer that.", "No."])
    return prompt, good, bad


def as_messages(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate(out_dir: str, seed: int = 0, n_sft: int = 1024, n_train: int = 1024, n_eval: int = 128) -> None:
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    sft = [make_example(rng) for _ in range(n_sft)]
    write_jsonl(os.path.join(out_dir, "sft.jsonl"), [{"prompt": p, "completion": c} for p, c, _ in sft])
    for split, n in (("train", n_train), ("eval", n_eval)):
        pairs = [make_example(rng) for _ in range(n)]
        write_jsonl(
            os.path.join(out_dir, f"{split}.jsonl"),
            [{"prompt": p, "chosen": as_messages(p, c), "rejected": as_messages(p, r)} for p, c, r in pairs],
        )
        # KTO: each pair becomes one desirable and one undesirable example, unpaired by shuffling.
        unpaired = [{"prompt": p, "completion": c, "label": True} for p, c, _ in pairs]
        unpaired += [{"prompt": p, "completion": r, "label": False} for p, _, r in pairs]
        rng.shuffle(unpaired)
        write_jsonl(os.path.join(out_dir, f"kto_{split}.jsonl"), unpaired)


def pairs_to_unpaired(src: str, dst: str) -> int:
    """KTO data from preference pairs (e.g. UltraFeedback-binarized): each pair gives a desirable
    (prompt, chosen) and an undesirable (prompt, rejected) example. Returns the number written."""
    from .data import DataError, read_records

    rows = []
    for where, record in read_records(src):
        if isinstance(record, DataError):
            raise record
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        for key, label in (("chosen", True), ("rejected", False)):
            answer = record[key]
            # A whole conversation keeps its turns; the completion is the assistant's last message.
            prompt = answer[:-1] if isinstance(answer, list) and len(answer) > 1 else record["prompt"]
            completion = answer[-1]["content"] if isinstance(answer, list) else answer
            rows.append({"prompt": prompt, "completion": completion, "label": label})
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    write_jsonl(dst, rows)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="generate data/tiny, or convert preference pairs to KTO's unpaired format")
    parser.add_argument("--out", default="data/tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--to-unpaired", nargs=2, metavar=("PAIRS", "OUT_JSONL"),
                        help="convert a pairs file (JSONL or Parquet) to unpaired JSONL for KTO, and exit")
    args = parser.parse_args()
    if args.to_unpaired:
        n = pairs_to_unpaired(*args.to_unpaired)
        print(f"wrote {n} unpaired examples to {args.to_unpaired[1]}")
        return
    generate(args.out, args.seed)
    print(f"wrote {args.out}/{{sft,train,eval,kto_train,kto_eval}}.jsonl")


if __name__ == "__main__":
    main()
