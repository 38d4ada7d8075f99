"""Synthetic skills, corpora and exact scorers for the alignment-tax study.

Two skills whose answers can be checked exactly:
- ``add``: two integers in [0, 50), answer their sum ("23+41" -> "64");
- ``rev``: four letters from a-h, answer them reversed ("rev abcd" -> "dcba").

Three data sets are built from them:
- the pre-training corpus: raw lines ("23+41=64;") packed into fixed-length windows;
- SFT examples in an instruction format (prompt "Q:23+41\\nA:", completion "64" + EOS);
- preference pairs on the same prompts whose *chosen* side carries the rule-based property (the
  answer closed by an exclamation mark, "64!") and whose rejected side does not. The preference label is
  about style only: each side's content is the correct answer with probability
  ``PreferenceSettings.content_accuracy`` and a near miss otherwise, drawn independently, so the
  pairs carry no signal about correctness. That is the situation in which preference training
  may erode a capability it never looks at (the alignment tax).

Every problem whose hash falls in the held-out bucket is kept out of all training data; the
evaluation set is drawn from those problems only, so accuracy measures the skill, not recall.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

import torch

SKILLS = ("add", "rev")
LETTERS = "abcdefgh"
ADD_LIMIT = 50
REV_LENGTH = 4
HELD_OUT_BUCKETS = 10  # one problem in HELD_OUT_BUCKETS is held out for evaluation


# ----------------------------------------------------------------------------- vocabulary
class CharVocab:
    """Character-level vocabulary with PAD, BOS and EOS ids 0, 1, 2."""

    PAD, BOS, EOS = 0, 1, 2
    CHARS = "0123456789+=;:\nQA! rev" + LETTERS

    def __init__(self) -> None:
        chars = sorted(set(self.CHARS))
        self.itos = ["<pad>", "<bos>", "<eos>"] + chars
        self.stoi = {c: i + 3 for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the study vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        """Text up to the first EOS (special tokens dropped)."""
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i >= 3:
                out.append(self.itos[i])
        return "".join(out)


VOCAB = CharVocab()


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    skill: str
    body: str  # "23+41" or "rev abcd"
    answer: str  # "64" or "dcba"

    @property
    def raw_line(self) -> str:
        """Pre-training form."""
        return f"{self.body}={self.answer};"

    @property
    def prompt(self) -> str:
        """Instruction (SFT / preference / evaluation) form; the completion follows."""
        return f"Q:{self.body}\nA:"


def _is_held_out(problem_body: str) -> bool:
    return zlib.crc32(problem_body.encode()) % HELD_OUT_BUCKETS == 0


def random_problem(skill: str, rng: random.Random) -> Problem:
    if skill == "add":
        a, b = rng.randrange(ADD_LIMIT), rng.randrange(ADD_LIMIT)
        return Problem("add", f"{a}+{b}", str(a + b))
    if skill == "rev":
        word = "".join(rng.choice(LETTERS) for _ in range(REV_LENGTH))
        return Problem("rev", f"rev {word}", word[::-1])
    raise ValueError(f"unknown skill {skill!r}; known: {SKILLS}")


def sample_problems(n: int, rng: random.Random, held_out: bool) -> list[Problem]:
    """n problems, skills alternating, from the training pool or from the held-out pool."""
    out: list[Problem] = []
    while len(out) < n:
        p = random_problem(SKILLS[len(out) % len(SKILLS)], rng)
        if _is_held_out(p.body) == held_out:
            out.append(p)
    return out


def near_miss(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: the sum off by a small amount, or two letters swapped/changed."""
    if problem.skill == "add":
        wrong = int(problem.answer) + rng.choice([-10, -2, -1, 1, 2, 10])
        return str(abs(wrong) if wrong != int(problem.answer) else wrong + 1)
    letters = list(problem.answer)
    i = rng.randrange(len(letters))
    letters[i] = rng.choice([c for c in LETTERS if c != letters[i]])
    return "".join(letters)


# ----------------------------------------------------------------------------- the rule-based property
# A suffix, not a prefix: a prefix would shift the answer by one position, and a 2-layer model's
# reversal skill does not survive that shift, so the "tax" would measure the shift, not the training.
STYLE_MARK = "!"
_STYLE = re.compile(r"^[^!]+!$")


def styled(answer: str) -> str:
    return f"{answer}{STYLE_MARK}"


def has_style(output: str) -> bool:
    """The preference property: a non-empty answer closed by exactly one "!" at the end."""
    return bool(_STYLE.match(output))


def is_correct(problem: Problem, output: str) -> bool:
    """Exact skill score, blind to the style: the answer with or without the style mark."""
    return output == problem.answer or output == styled(problem.answer)


# ----------------------------------------------------------------------------- data sets
@dataclass(frozen=True)
class CorpusSettings:
    window: int = 48  # tokens per packed pre-training sequence
    train_windows: int = 20000
    heldout_windows: int = 200


def packed_windows(n_windows: int, window: int, rng: random.Random, held_out: bool) -> torch.Tensor:
    """[n_windows, window] token ids: raw problem lines concatenated and cut into windows."""
    need = n_windows * window + 1
    ids: list[int] = []
    while len(ids) < need:
        for p in sample_problems(256, rng, held_out):
            ids.extend(VOCAB.encode(p.raw_line))
    return torch.tensor(ids[: n_windows * window], dtype=torch.long).view(n_windows, window)


@dataclass
class CompletionBatch:
    """Prompt + completion sequences, right-padded; ``completion_mask`` marks the tokens scored."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T], 1 where the token at t is a completion token

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "CompletionBatch":
        return CompletionBatch(self.input_ids[index], self.attention_mask[index], self.completion_mask[index])


def completion_batch(pairs: list[tuple[str, str]]) -> CompletionBatch:
    """Encode (prompt, completion) text pairs: BOS + prompt + completion + EOS."""
    seqs, masks = [], []
    for prompt, completion in pairs:
        p = [VOCAB.BOS] + VOCAB.encode(prompt)
        c = VOCAB.encode(completion) + [VOCAB.EOS]
        seqs.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), VOCAB.PAD, dtype=torch.long)
    att = torch.zeros((len(seqs), length), dtype=torch.long)
    comp = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        comp[i, : len(m)] = torch.tensor(m)
    return CompletionBatch(ids, att, comp)


@dataclass(frozen=True)
class SFTSettings:
    examples: int = 8000
    styled_fraction: float = 0.25  # the style is in the SFT distribution (a minority, so greedy SFT output lacks it)


def sft_data(settings: SFTSettings, rng: random.Random) -> CompletionBatch:
    pairs = []
    for p in sample_problems(settings.examples, rng, held_out=False):
        answer = styled(p.answer) if rng.random() < settings.styled_fraction else p.answer
        pairs.append((p.prompt, answer))
    return completion_batch(pairs)


@dataclass(frozen=True)
class PreferenceSettings:
    pairs: int = 2000
    content_accuracy: float = 0.75  # chance that each side's answer is correct, independently


@dataclass
class PreferenceData:
    chosen: CompletionBatch
    rejected: CompletionBatch


def preference_records(n: int, content_accuracy: float, rng: random.Random, held_out: bool) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts: chosen carries the style, contents drawn independently."""
    records = []
    for p in sample_problems(n, rng, held_out=held_out):
        good = p.answer if rng.random() < content_accuracy else near_miss(p, rng)
        plain = p.answer if rng.random() < content_accuracy else near_miss(p, rng)
        records.append((p.prompt, styled(good), plain))
    return records


def preference_data(settings: PreferenceSettings, rng: random.Random) -> PreferenceData:
    records = preference_records(settings.pairs, settings.content_accuracy, rng, held_out=False)
    chosen = [(prompt, c) for prompt, c, _ in records]
    rejected = [(prompt, r) for prompt, _, r in records]
    # Pad both sides to one length so that a step can run them as one batch.
    both = completion_batch(chosen + rejected)
    n = len(chosen)
    return PreferenceData(both.select(torch.arange(n)), both.select(torch.arange(n, 2 * n)))


def eval_problems(n_per_skill: int, seed: int) -> list[Problem]:
    """Held-out evaluation problems, the same for every method of a seed."""
    return sample_problems(n_per_skill * len(SKILLS), random.Random(10_000 + seed), held_out=True)
