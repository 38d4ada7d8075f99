"""Preference, unpaired (KTO) and SFT data: reading, tokenization with prompt masking, batching.

Records
-------
- pairs:    {"prompt", "chosen", "rejected"}. Each field is a string or a list of chat messages
            ({"role", "content"}), as in UltraFeedback-binarized where chosen/rejected are whole
            conversations ending with the assistant's answer and sharing the prompt turns.
- unpaired: {"prompt", "completion", "label"} with a boolean label (True = desirable), as in
            TRL's KTO format.
- sft:      {"prompt", "completion"}; preference pairs are also accepted (the chosen side is used).

Files are UTF-8 JSONL (one object a line) or Parquet. A record that cannot be used (bad bytes,
bad JSON, missing keys) is a DataError naming file and line, raised or skipped (`on_error`); a
file without records is always an error. Empty answers and pairs whose chosen and rejected
answers are the same text are kept but counted in DataStats, as likely data bugs.

Tokenization and masking
------------------------
The prompt is rendered with the tokenizer's chat template (generation prompt included); the
completion's tokens are what the full conversation adds after it, so they end with the
template's end-of-turn token. With `use_chat_template: false` and plain strings, the prompt is
`bos + prompt` and the completion is `completion + eos`. Only completion tokens are scored:
a sequence is `prompt + completion`, the model reads `seq[:-1]` and predicts `seq[1:]`, and the
loss mask is 1 exactly where the predicted token is a completion token.

Truncation rules
----------------
1. A prompt longer than `max_prompt_length` keeps its last `max_prompt_length` tokens (the end
   of the prompt is what the answer follows; the BOS token is lost).
2. Each completion is cut to `max_length - len(prompt)` tokens, keeping its start.
Both are counted and reported.

Batching
--------
A micro-batch of B pairs is 2B sequences: the B chosen ones, then the B rejected ones, padded to
the longest in the micro-batch (to `max_length` under pipeline parallelism, whose stages
exchange fixed shapes). Length bucketing keeps padding small: each epoch's permutation is cut
into windows of `bucket_size` micro-batches, each window is sorted by length and cut into
micro-batches, and the micro-batches are shuffled again. The order is a pure function of (seed,
epoch), so a resumed run sees the same batches.

Packing
-------
With `pack_sequences`, the same micro-batches (same examples, same order) are packed instead:
their sequences (chosen, rejected, KTO's mismatched ones) go into rows of at most `pack_length`
positions, first-fit-decreasing, no sequence split across rows. `Batch.sequence_index` says which
sequence each position belongs to; attention stays within a sequence (a block-diagonal causal
mask, or Transformer Engine's THD cu_seqlens) and positions restart at 0 for each sequence, so
every sequence's log-prob is the one it has alone in a row. The row width is the smallest that
keeps the number of rows FFD needs at `pack_length`, which leaves little padding.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch


class DataError(ValueError):
    """A malformed record; the message names the file and line (or Parquet row)."""


@dataclass
class Example:
    """One tokenized record. `completions` holds [chosen, rejected] for pairs, one entry otherwise."""

    index: int
    prompt_ids: list[int]
    completions: list[list[int]]
    label: bool | None = None
    source: str = ""


@dataclass
class DataStats:
    records: int = 0
    skipped: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    # Kept, but likely a data bug: the first few locations are in `suspicious_reasons`.
    empty_answers: int = 0
    """Records whose chosen, rejected or completion text is empty (or only whitespace)."""
    identical_answers: int = 0
    """Pairs whose chosen and rejected answers are the same text (no preference to learn)."""
    suspicious_reasons: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def read_records(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield (location, record) for every record; unparseable lines yield a DataError. A file
    without any record raises a DataError."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        if not rows:
            raise DataError(f"{path}: no records (the Parquet file has no rows)")
        for i, row in enumerate(rows):
            yield f"{path}:row {i + 1}", row
        return
    found = False
    offset = 0
    # Bytes, decoded line by line: an undecodable line is then one malformed record.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                found = True
                yield where, DataError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}, "
                    f"byte offset {start + exc.start} of the file: {exc.reason})"
                )
                continue
            if not line.strip():
                continue
            found = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{where}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                yield where, DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record
    if not found:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")


def _check_messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty string or list of messages")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: '{key}'[{i}] must be a message {{'role': str, 'content': str}}, got {message!r}")
    return value


def _split_conversation(prompt: Any, answer: Any, key: str, where: str) -> tuple[Any, str]:
    """Return (prompt as str or messages, assistant answer text) for one side of a record."""
    if isinstance(answer, str):
        if isinstance(prompt, str) or isinstance(prompt, list):
            if isinstance(prompt, list):
                _check_messages(prompt, "prompt", where)
            return prompt, answer
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    messages = _check_messages(answer, key, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message of '{key}' must be the assistant's answer, got role {messages[-1]['role']!r}")
    if len(messages) > 1:
        return messages[:-1], messages[-1]["content"]  # the conversation carries its own prompt
    if prompt is None:
        raise DataError(f"{where}: '{key}' holds only the answer and 'prompt' is missing")
    if isinstance(prompt, list):
        _check_messages(prompt, "prompt", where)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
    return prompt, messages[-1]["content"]


def normalize_record(record: dict[str, Any], fmt: str, where: str) -> tuple[Any, list[str], bool | None]:
    """(prompt, [answers], label) from a raw record, or DataError naming what is wrong."""
    if fmt == "pairs" or (fmt == "sft" and "chosen" in record):
        keys = ("chosen", "rejected") if fmt == "pairs" else ("chosen",)
        missing = [k for k in keys if k not in record]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} (pairs need prompt, chosen, rejected)")
        sides = [_split_conversation(record.get("prompt"), record[k], k, where) for k in keys]
        prompts = [s[0] for s in sides]
        if any(p != prompts[0] for p in prompts[1:]):
            raise DataError(f"{where}: 'chosen' and 'rejected' conversations have different prompt turns")
        return prompts[0], [s[1] for s in sides], None
    missing = [k for k in ("prompt", "completion") + (("label",) if fmt == "unpaired" else ()) if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    prompt, answer = _split_conversation(record["prompt"], record["completion"], "completion", where)
    label = None
    if fmt == "unpaired":
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true or false, got {label!r}")
    return prompt, [answer], label


# --------------------------------------------------------------------------- tokenizing


class PromptCompletionTokenizer:
    """Turns (prompt, answer) into (prompt_ids, completion_ids) with a HF tokenizer."""

    def __init__(self, tokenizer: Any, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template and getattr(tokenizer, "chat_template", None) is not None

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some versions
            ids = ids["input_ids"]
        return list(ids)

    def __call__(self, prompt: Any, answer: str, where: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if isinstance(prompt, list) and not self.use_chat_template:
            raise DataError(f"{where}: a message-list prompt needs a tokenizer with a chat template")
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            prompt_ids = self._render(messages, generation_prompt=True)
            full_ids = self._render(messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
            if full_ids[: len(prompt_ids)] != prompt_ids:
                # Templates that rewrite earlier turns: fall back to tokenizing the answer alone.
                completion_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            else:
                completion_ids = full_ids[len(prompt_ids):]
        else:
            prompt_ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return prompt_ids, completion_ids


def load_examples(
    files: Sequence[str],
    tokenizer: Any,
    fmt: str,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool = True,
    on_error: str = "raise",
) -> tuple[list[Example], DataStats]:
    """Read and tokenize every record of `files` (in order), applying the truncation rules."""
    encode = PromptCompletionTokenizer(tokenizer, use_chat_template)
    examples: list[Example] = []
    stats = DataStats()
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        for where, record in read_records(path):
            stats.records += 1
            try:
                if isinstance(record, DataError):
                    raise record
                prompt, answers, label = normalize_record(record, fmt, where)
                tokenized = [encode(prompt, a, where) for a in answers]
                prompt_ids = tokenized[0][0]
                completions = [c for _, c in tokenized]
                if any(not c for c in completions):
                    raise DataError(f"{where}: empty completion after tokenization")
            except DataError as exc:
                if on_error == "raise":
                    raise
                stats.skipped += 1
                if len(stats.skipped_reasons) < 20:
                    stats.skipped_reasons.append(str(exc))
                continue
            _count_suspicious(stats, where, answers, paired=fmt == "pairs" or (fmt == "sft" and "chosen" in record))
            if len(prompt_ids) > max_prompt_length:
                prompt_ids = prompt_ids[-max_prompt_length:]
                stats.prompt_truncated += 1
            room = max_length - len(prompt_ids)
            if any(len(c) > room for c in completions):
                stats.completion_truncated += 1
                completions = [c[:room] for c in completions]
            examples.append(Example(len(examples), prompt_ids, completions, label, where))
    return examples, stats


def _count_suspicious(stats: DataStats, where: str, answers: list[str], paired: bool) -> None:
    """Count (and keep the first locations of) legal records that are likely data bugs."""
    keys = ("chosen", "rejected") if paired else ("completion",)
    reasons = [f"{where}: empty '{key}'" for key, answer in zip(keys, answers) if not answer.strip()]
    stats.empty_answers += bool(reasons)
    if len(answers) == 2 and answers[0] == answers[1]:
        stats.identical_answers += 1
        reasons.append(f"{where}: 'chosen' and 'rejected' are the same answer")
    stats.suspicious_reasons.extend(reasons[: max(0, 20 - len(stats.suspicious_reasons))])


def split_holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random `fraction` of examples; indices are renumbered within each split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(examples) * fraction))
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])

    def renumber(idx: list[int]) -> list[Example]:
        return [Example(i, examples[j].prompt_ids, examples[j].completions, examples[j].label, examples[j].source) for i, j in enumerate(idx)]

    return renumber(kept), renumber(held)


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """One micro-batch. Sequences: for pairs, B chosen then B rejected; otherwise B examples
    (and, for KTO with a KL estimate, B mismatched prompt/completion sequences after them)."""

    input_ids: torch.Tensor  # [S, T] long
    labels: torch.Tensor  # [S, T] long (next tokens; pad where masked)
    loss_mask: torch.Tensor  # [S, T] float, 1 on completion tokens
    position_ids: torch.Tensor  # [S, T]
    example_ids: torch.Tensor  # [B] indices into the dataset (for cached reference log-probs)
    labels_desirable: torch.Tensor | None = None  # [B] bool, KTO only
    reference_logps: torch.Tensor | None = None  # [S] filled from the cache when available
    # Packed rows ([R, T], R <= S): the sequence (in the order above) of each position, -1 on
    # padding. None: row i is sequence i.
    sequence_index: torch.Tensor | None = None
    packed_sequences: int = 0  # S when packed
    # Packed: [K, 2] (length, padded length) of the rows' THD segments, the rows laid end to end:
    # every sequence (its slot padded to a multiple of 2 x CP under context parallelism), and
    # every row's padding tail.
    segments: torch.Tensor | None = None
    pad_tokens: int = 0  # positions of the rows holding no sequence (padding), before any split
    row_tokens: int = 0  # all positions of the rows (R x T), before any split

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0] if self.sequence_index is None else self.packed_sequences


def sequences_for(example: Example, kind: str, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """The (prompt, completion) token lists a micro-batch holds for one example."""
    if kind == "pairs":
        return [(example.prompt_ids, example.completions[0]), (example.prompt_ids, example.completions[1])]
    return [(example.prompt_ids, example.completions[0])]


def kl_partner(index: int, n: int) -> int:
    """KTO's mismatched pair: the prompt of example i with the completion of example i+1 (mod n).
    Fixed per example, so its reference log-prob can be cached like the others."""
    return (index + 1) % n


def batch_sequences(examples: Sequence[Example], ids: Sequence[int], kind: str, max_length: int,
                    with_kl: bool = False) -> list[tuple[list[int], list[int]]]:
    """The (prompt, completion) sequences of a micro-batch, in Batch order: every example's first
    sequence (chosen), then the rejected ones, then KTO's mismatched ones."""
    chosen_seqs: list[tuple[list[int], list[int]]] = []
    rejected_seqs: list[tuple[list[int], list[int]]] = []
    kl_seqs: list[tuple[list[int], list[int]]] = []
    for i in ids:
        ex = examples[i]
        seqs = sequences_for(ex, kind, examples)
        chosen_seqs.append(seqs[0])
        if kind == "pairs":
            rejected_seqs.append(seqs[1])
        if with_kl:
            partner = examples[kl_partner(i, len(examples))]
            room = max_length - len(ex.prompt_ids)
            kl_seqs.append((ex.prompt_ids, partner.completions[0][:room]))
    return chosen_seqs + rejected_seqs + kl_seqs


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _fill_row(input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, row: int, start: int,
              prompt: list[int], completion: list[int]) -> int:
    """Write one sequence at [row, start:]; return the positions it takes (its length - 1)."""
    seq = torch.tensor(prompt + completion, dtype=torch.long)
    length = len(seq) - 1
    input_ids[row, start : start + length] = seq[:-1]
    labels[row, start : start + length] = seq[1:]
    # Position t predicts token t+1; it is a completion token iff t+1 >= len(prompt).
    loss_mask[row, start + len(prompt) - 1 : start + length] = 1.0
    return length


def _desirable(examples: Sequence[Example], ids: Sequence[int], kind: str) -> torch.Tensor | None:
    if kind != "unpaired":
        return None
    return torch.tensor([bool(examples[i].label) for i in ids], dtype=torch.bool)


def collate(
    examples: Sequence[Example],
    ids: Sequence[int],
    kind: str,
    pad_id: int,
    max_length: int,
    pad_to: int | None = None,
    with_kl: bool = False,
    multiple: int = 1,
) -> Batch:
    """Build a micro-batch for the examples `ids`, one sequence a row (see Batch for the order).
    The width is rounded up to a multiple of `multiple` (sequence / context parallel splits)."""
    seqs = batch_sequences(examples, ids, kind, max_length, with_kl)
    # The model reads seq[:-1] and predicts seq[1:], so T = longest sequence - 1.
    width = max(len(p) + len(c) for p, c in seqs) - 1
    if pad_to is not None:
        width = max(width, pad_to - 1)
    width = _round_up(width, multiple)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    used = sum(_fill_row(input_ids, labels, loss_mask, row, 0, p, c) for row, (p, c) in enumerate(seqs))
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(n, width).contiguous()
    return Batch(input_ids, labels, loss_mask, position_ids, torch.tensor(list(ids), dtype=torch.long),
                 _desirable(examples, ids, kind), pad_tokens=n * width - used, row_tokens=n * width)


# --------------------------------------------------------------------------- packing


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` per row: longest first, each into the first row it fits (ties by
    index, so the result is a pure function of the lengths). Rows keep their indices sorted."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def pack_sequences(lengths: Sequence[int], pack_length: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Rows of sequence indices for sequences of `lengths` positions in rows of at most
    `pack_length`: as few rows as first-fit-decreasing needs at `pack_length`, then the smallest
    row width that still packs into that many rows (so the rows come out evenly filled and the
    padding to the longest row is small). A sequence longer than `pack_length` is a DataError
    naming it (`names[i]`)."""
    for i, n in enumerate(lengths):
        if n > pack_length:
            what = names[i] if names is not None else f"sequence {i}"
            raise DataError(f"{what}: {n} positions do not fit data.pack_length={pack_length}")
    if not lengths:
        return []
    rows = first_fit_decreasing(lengths, pack_length)
    # FFD's row count is not monotone in the width, so bisect for a width that reaches it and
    # keep the smallest one found; pack_length always does.
    best, lo, hi = rows, max(max(lengths), -(-sum(lengths) // len(rows))), pack_length
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = first_fit_decreasing(lengths, mid)
        if len(candidate) <= len(rows):
            best, hi = candidate, mid
        else:
            lo = mid + 1
    return best


def collate_packed(
    examples: Sequence[Example],
    ids: Sequence[int],
    kind: str,
    pad_id: int,
    max_length: int,
    pack_length: int,
    with_kl: bool = False,
    multiple: int = 1,
    sequence_multiple: int = 1,
) -> Batch:
    """The micro-batch of `collate`, its sequences packed into rows (see Packing above): the same
    sequences in the same order, told apart by `sequence_index`; positions restart at 0 for
    each. Each sequence takes a slot of its length rounded up to `sequence_multiple` (context
    parallelism splits every THD sequence into 2 x CP equal chunks); the width is the longest
    row, rounded up to a multiple of `multiple`."""
    seqs = batch_sequences(examples, ids, kind, max_length, with_kl)
    lengths = [len(p) + len(c) - 1 for p, c in seqs]
    slots = [_round_up(n, sequence_multiple) for n in lengths]
    names = _sequence_names(examples, ids, kind) if max(slots) > pack_length else None  # only for the error
    rows = pack_sequences(slots, pack_length, names)
    width = _round_up(max(sum(slots[i] for i in row) for row in rows), multiple)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    sequence_index = torch.full((n, width), -1, dtype=torch.long)
    segments: list[tuple[int, int]] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            length = _fill_row(input_ids, labels, loss_mask, r, start, *seqs[i])
            position_ids[r, start : start + length] = torch.arange(length)
            sequence_index[r, start : start + length] = i
            segments.append((length, slots[i]))
            start += slots[i]
        if start < width:
            segments.append((width - start, width - start))
    used = sum(lengths)
    return Batch(input_ids, labels, loss_mask, position_ids, torch.tensor(list(ids), dtype=torch.long),
                 _desirable(examples, ids, kind), sequence_index=sequence_index, packed_sequences=len(seqs),
                 segments=torch.tensor(segments, dtype=torch.long), pad_tokens=n * width - used, row_tokens=n * width)


def _sequence_names(examples: Sequence[Example], ids: Sequence[int], kind: str) -> list[str]:
    """Names of a micro-batch's sequences in Batch order, for errors."""
    sides = ("chosen", "rejected") if kind == "pairs" else ("completion", "mismatched completion of the KL estimate")
    return [f"{examples[i].source or f'example {i}'} ({side})" for side in sides for i in ids]


def sequence_sums(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[S] per-sequence sums of per-position `values` [R, T] (e.g. token log-probs times the
    loss mask), in Batch order, for packed rows as for one sequence a row.

    Packed: a gather, not a scatter-add (whose CUDA atomics would add in a varying order): every
    sequence lies within one row, so an [S, T] table of its positions (padded with an extra zero)
    holds it, in position order."""
    if batch.sequence_index is None:
        return values.sum(-1)
    index = batch.sequence_index.to(values.device).reshape(-1)
    n, width, device = index.numel(), values.shape[-1], values.device
    order = torch.argsort(index, stable=True)  # padding (-1) first, then each sequence's positions in order
    counts = torch.bincount(index + 1, minlength=batch.num_sequences + 1)
    starts = torch.cumsum(counts, 0)[:-1]  # where sequence s begins in `order`
    slot = torch.arange(width, device=device)
    table = torch.where(slot < counts[1:, None], order[(starts[:, None] + slot).clamp(max=n - 1)], n)
    flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
    return flat[table].sum(-1)


def example_length(example: Example) -> int:
    return len(example.prompt_ids) + max(len(c) for c in example.completions)


def epoch_microbatches(
    examples: Sequence[Example], micro_batch_size: int, bucket_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Micro-batches (lists of example ids) of one epoch, length-bucketed; incomplete tail dropped."""
    order = list(range(len(examples)))
    rng = random.Random(f"{seed}-{epoch}")
    if shuffle:
        rng.shuffle(order)
    window = max(1, bucket_size) * micro_batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (example_length(examples[i]), i))
        for b in range(0, len(chunk) - micro_batch_size + 1, micro_batch_size):
            batches.append(chunk[b : b + micro_batch_size])
    if shuffle:
        rng.shuffle(batches)  # keep steps from seeing all short, then all long sequences
    return batches


class StepSampler:
    """Deterministic micro-batch schedule: step s, data-parallel rank r -> its micro-batches.

    Every optimizer step consumes `num_microbatches x dp_size` micro-batches of one epoch's list;
    rank r takes a contiguous block of them. An epoch ends when too few remain for a whole step.
    """

    def __init__(self, examples: Sequence[Example], micro_batch_size: int, num_microbatches: int, dp_size: int,
                 bucket_size: int, seed: int, shuffle: bool = True):
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.dp_size = dp_size
        self.bucket_size = bucket_size
        self.seed = seed
        self.shuffle = shuffle
        per_epoch = len(epoch_microbatches(examples, micro_batch_size, bucket_size, seed, 0, shuffle))
        self.steps_per_epoch = per_epoch // (num_microbatches * dp_size)
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{len(examples)} examples are fewer than one global batch "
                f"({micro_batch_size} x {num_microbatches} micro-batches x {dp_size} data-parallel ranks)"
            )
        self._cache: tuple[int, list[list[int]]] | None = None

    def microbatches(self, step: int, dp_rank: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_microbatches(self.examples, self.micro_batch_size, self.bucket_size, self.seed, epoch, self.shuffle))
        per_step = self.num_microbatches * self.dp_size
        block = self._cache[1][within * per_step : (within + 1) * per_step]
        return block[dp_rank * self.num_microbatches : (dp_rank + 1) * self.num_microbatches]


def eval_microbatches(n_examples: int, micro_batch_size: int, dp_size: int, dp_rank: int,
                      drop_last: bool = False) -> list[list[int]]:
    """All examples in order, micro-batches dealt round-robin to data-parallel ranks. The last
    micro-batch may be short unless `drop_last` (pipeline stages exchange fixed shapes)."""
    ids = list(range(n_examples))
    batches = [ids[i : i + micro_batch_size] for i in range(0, n_examples, micro_batch_size)]
    if drop_last and batches and len(batches[-1]) < micro_batch_size:
        batches.pop()
    return batches[dp_rank::dp_size]
