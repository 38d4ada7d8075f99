"""Sequence packing: the packing function, and packed runs against unpacked ones (the reference).

Packed micro-batches must give every sequence the log-prob it has alone in a row: the per-sequence
sums, the cached reference log-probs, the DPO and KTO losses (and their gradients) are compared
with the unpacked run of the same examples and weights, on CPU in fp32 (megatron-core's local
layer spec: block-diagonal causal mask, RoPE positions restarting per sequence) at TP=1 and TP=2.
The THD path (Transformer Engine's cu_seqlens) needs a GPU with TE and is tested there only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
from functools import partial

import pytest
import torch

from distributed import run_distributed
from onmerge_megatron.training.config import ConfigError, config_from_dict, validate
from onmerge_megatron.training.data import (
    DataError,
    Example,
    batch_sequences,
    collate,
    collate_packed,
    epoch_microbatches,
    first_fit_decreasing,
    pack_sequences,
    sequence_sums,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "tiny")
# fp32 on CPU: a sequence's summed log-prob, packed vs unpacked (summation order differs only).
REL = 1e-5


# --------------------------------------------------------------------------- the packing function


def random_examples(n: int, seed: int, kind: str = "pairs", prompt: tuple[int, int] = (3, 30),
                    answer: tuple[int, int] = (2, 40)) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(5, 100) for _ in range(rng.randint(*prompt))]
        sides = 2 if kind == "pairs" else 1
        comps = [[rng.randrange(5, 100) for _ in range(rng.randint(*answer))] for _ in range(sides)]
        out.append(Example(i, p, comps, label=(i % 3 != 0) if kind == "unpaired" else None, source=f"data.jsonl:{i + 1}"))
    return out


def test_first_fit_decreasing_places_every_sequence_once_within_capacity():
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 25))]
        capacity = rng.randint(60, 200)
        for rows in (first_fit_decreasing(lengths, capacity), pack_sequences(lengths, capacity)):
            assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        # The balanced width keeps FFD's row count at the full capacity.
        assert len(pack_sequences(lengths, capacity)) == len(first_fit_decreasing(lengths, capacity))


def test_pack_sequences_balances_rows():
    # FFD at 100 fills [60, 40] and leaves [30, 30, 20] at 80; the balanced width is 90: [60, 30] and [40, 30, 20].
    lengths = [60, 40, 30, 30, 20]
    assert first_fit_decreasing(lengths, 100) == [[0, 1], [2, 3, 4]]
    rows = pack_sequences(lengths, 100)
    assert len(rows) == 2
    assert max(sum(lengths[i] for i in row) for row in rows) == 90


@pytest.mark.parametrize("kind,with_kl", [("pairs", False), ("unpaired", True)])
def test_packed_rows_hold_each_sequence_whole_with_restarted_positions(kind, with_kl):
    examples = random_examples(12, seed=1, kind=kind)
    ids = [3, 0, 7, 5, 11]
    flat = collate(examples, ids, kind, pad_id=0, max_length=80, with_kl=with_kl)
    packed = collate_packed(examples, ids, kind, pad_id=0, max_length=80, pack_length=160, with_kl=with_kl, multiple=8)
    seqs = batch_sequences(examples, ids, kind, 80, with_kl)
    assert packed.num_sequences == flat.num_sequences == len(seqs) == len(ids) * 2
    assert packed.input_ids.shape[0] < len(seqs)  # several sequences share a row
    assert packed.input_ids.shape[1] % 8 == 0
    assert torch.equal(packed.example_ids, flat.example_ids)
    if kind == "unpaired":
        assert torch.equal(packed.labels_desirable, flat.labels_desirable)
    starts_after_zero = 0
    for s, (p, c) in enumerate(seqs):
        where = (packed.sequence_index == s).nonzero()
        rows = where[:, 0].unique()
        assert len(rows) == 1, f"sequence {s} is split across rows"
        cols = where[:, 1]
        n = len(p) + len(c) - 1
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + n))  # one contiguous block
        r, start = int(rows[0]), int(cols[0])
        starts_after_zero += start > 0
        # Same tokens, targets, mask as the sequence's own unpacked row; positions from 0.
        assert torch.equal(packed.input_ids[r, start : start + n], flat.input_ids[s, :n])
        assert torch.equal(packed.labels[r, start : start + n], flat.labels[s, :n])
        assert torch.equal(packed.loss_mask[r, start : start + n], flat.loss_mask[s, :n])
        assert packed.position_ids[r, start : start + n].tolist() == list(range(n))
    assert starts_after_zero > 0  # the test covers sequences that do not start a row
    padding = packed.sequence_index < 0
    assert packed.loss_mask[padding].sum() == 0
    assert packed.pad_tokens == int(padding.sum()) and packed.row_tokens == packed.sequence_index.numel()


def test_packing_is_a_pure_function_of_the_examples():
    examples = random_examples(40, seed=2)
    for seed in (0, 1):
        mbs = epoch_microbatches(examples, 4, 4, seed=seed, epoch=0)
        assert mbs == epoch_microbatches(examples, 4, 4, seed=seed, epoch=0)
        for ids in mbs[:5]:
            a = collate_packed(examples, ids, "pairs", 0, 80, 160)
            b = collate_packed(list(examples), list(ids), "pairs", 0, 80, 160)
            for field in ("input_ids", "labels", "loss_mask", "position_ids", "sequence_index"):
                assert torch.equal(getattr(a, field), getattr(b, field))


def test_a_sequence_longer_than_pack_length_is_refused_by_name():
    examples = random_examples(4, seed=3, prompt=(30, 30), answer=(10, 10))
    examples[2].completions[1] = [7] * 40  # the rejected side of the third record is too long
    collate_packed(examples, [0, 1], "pairs", 0, 80, pack_length=50)
    with pytest.raises(DataError, match=r"data.jsonl:3 \(rejected\): 69 positions do not fit data.pack_length=50"):
        collate_packed(examples, [2], "pairs", 0, 80, pack_length=50)
    with pytest.raises(DataError, match="sequence 1: 9 positions"):
        pack_sequences([3, 9], 8)


def test_sequence_sums_of_packed_rows_match_a_loop_over_positions():
    examples = random_examples(10, seed=4, kind="unpaired")
    batch = collate_packed(examples, list(range(10)), "unpaired", 0, 80, 120, with_kl=True)
    values = torch.randn(batch.input_ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values.requires_grad_(True)
    sums = sequence_sums(values, batch)
    expected = torch.zeros(batch.num_sequences, dtype=torch.float64)
    for r, t in torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])).tolist():
        if batch.sequence_index[r, t] >= 0:
            expected[batch.sequence_index[r, t]] += values[r, t].item()
    torch.testing.assert_close(sums.detach(), expected, rtol=1e-12, atol=1e-12)
    weights = torch.arange(1.0, batch.num_sequences + 1, dtype=torch.float64)
    (sums * weights).sum().backward()
    # Each position's gradient is its sequence's weight; padding gets none.
    index = batch.sequence_index
    assert torch.equal(values.grad, torch.where(index >= 0, weights[index.clamp(min=0)], torch.zeros((), dtype=torch.float64)))


def test_thd_segments_cut_at_every_sequence_and_padding_tail():
    """The rows laid end to end as THD: a segment for each sequence (its slot rounded up to
    2 x CP positions under context parallelism) and each row's padding tail."""
    from onmerge_megatron.training.forward_backward import flatten_rows, thd_boundaries

    examples = random_examples(6, seed=5)
    for sequence_multiple in (1, 4):
        batch = collate_packed(examples, list(range(6)), "pairs", 0, 80, 90, multiple=8, sequence_multiple=sequence_multiple)
        flat = flatten_rows(batch)
        assert flat.input_ids.shape == (1, batch.input_ids.numel())
        cu, padded, max_seqlen = thd_boundaries(batch.segments)
        assert cu.dtype == padded.dtype == torch.int32
        assert int(padded[-1]) == flat.input_ids.shape[1]
        assert ((padded[1:] - padded[:-1]) % sequence_multiple == 0).all()
        assert max_seqlen == int((padded[1:] - padded[:-1]).max())
        index = flat.sequence_index[0]
        for k in range(len(cu) - 1):
            length, start = int(cu[k + 1] - cu[k]), int(padded[k])
            slot = index[start : int(padded[k + 1])]
            if slot[0] >= 0:  # a sequence: its positions first, then the slot's padding
                assert (slot[:length] == slot[0]).all() and (slot[length:] < 0).all()
                assert int((index == slot[0]).sum()) == length
            else:  # a row's padding tail
                assert (slot < 0).all() and length == len(slot)
        assert sorted(int(i) for i in index.unique() if i >= 0) == list(range(12))


def test_reference_cache_fingerprint_ignores_packing(tmp_path):
    """The cached reference log-probs are the same packed or not, so one cache serves both."""
    from onmerge_megatron.training.reference_logps import fingerprint

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = config_from_dict({"model": {"hf_path": str(tmp_path)}, "data": {"train_files": [str(data)]}})
    packed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pack_sequences=True, pack_length=4096))
    assert fingerprint(cfg, "train", [str(data)], 1, False) == fingerprint(packed, "train", [str(data)], 1, False)


# --------------------------------------------------------------------------- validation


def _cfg(**sections):
    tree = {"model": {"hf_path": "m"}, "data": {"train_files": ["t.jsonl"], "max_length": 64, "max_prompt_length": 32},
            "parallel": {"global_batch_size": 8}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return config_from_dict(tree)


@pytest.mark.parametrize("sections,message", [
    ({"data": {"pack_sequences": True, "pack_length": 40}}, r"'data.pack_length' \(40\) must be >= 64 \(data.max_length 64\)"),
    ({"data": {"pack_sequences": True, "pack_length": 62, "max_length": 61}, "parallel": {"context_parallel": 4},
      "model": {"transformer_impl": "transformer_engine"}},
     r"'data.pack_length' \(62\) must be >= 64 \(data.max_length 61, slots of a multiple of 2 x parallel.context_parallel = 8\)"),
    ({"data": {"pack_length": 256}}, r"'data.pack_length' \(256\) applies with data.pack_sequences true only"),
    ({"data": {"pack_sequences": True, "pack_length": -1}}, r"'data.pack_length' must be >= 0"),
    ({"data": {"pack_sequences": True}, "parallel": {"pipeline_parallel": 2}},
     r"'data.pack_sequences' is true but parallel.pipeline_parallel is 2"),
])
def test_packing_validation_names_the_key(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(**sections), check_paths=False)


def test_packing_validation_accepts_good_settings():
    validate(_cfg(data={"pack_sequences": True}), world_size=2, check_paths=False)
    validate(_cfg(data={"pack_sequences": True, "pack_length": 64}), world_size=1, check_paths=False)
    validate(_cfg(data={"pack_sequences": True, "pack_length": 64}, parallel={"context_parallel": 2},
                  model={"transformer_impl": "transformer_engine"}), world_size=2, check_paths=False)


# --------------------------------------------------------------------------- padding


def ultrafeedback_like(n: int, seed: int, max_length: int = 2048, max_prompt_length: int = 1024) -> list[Example]:
    """Lengths drawn like UltraFeedback-binarized's (Llama-3 tokenizer): log-normal prompt
    (median 150 tokens, sigma 0.9) and responses (median 250, sigma 0.7, chosen and rejected
    independent), truncated by the data rules (prompt to max_prompt_length, responses to what
    is left of max_length). Token ids do not matter for packing."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = min(max_prompt_length, max(1, round(rng.lognormvariate(math.log(150), 0.9))))
        room = max_length - prompt
        sides = [min(room, max(1, round(rng.lognormvariate(math.log(250), 0.7)))) for _ in range(2)]
        out.append(Example(i, [1] * prompt, [[2] * s for s in sides]))
    return out


def padding_of(examples, micro_batch_size: int, packed: bool, max_length: int = 2048, bucket_size: int = 64) -> float:
    pad = total = 0
    for ids in epoch_microbatches(examples, micro_batch_size, bucket_size, seed=0, epoch=0):
        if packed:
            batch = collate_packed(examples, ids, "pairs", 0, max_length, 2 * max_length)
        else:
            batch = collate(examples, ids, "pairs", 0, max_length)
        pad, total = pad + batch.pad_tokens, total + batch.row_tokens
    return pad / total


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4, 8, 16])
def test_packing_padding_on_ultrafeedback_like_lengths(micro_batch_size):
    """The numbers docs/megatron.md quotes: padding <= 5% packed (default pack_length), well
    below the unpacked, length-bucketed batches."""
    examples = ultrafeedback_like(1024, seed=0)
    packed = padding_of(examples, micro_batch_size, packed=True)
    unpacked = padding_of(examples, micro_batch_size, packed=False)
    print(f"micro_batch_size {micro_batch_size}: padding packed {packed:.4f}, unpacked {unpacked:.4f}")
    assert packed <= 0.05
    assert packed < unpacked


# --------------------------------------------------------------------------- packed vs unpacked runs


def _compare_packed_and_unpacked(rank: int, world_size: int, hf_path: str, tp: int, loss_type: str,
                                 impl: str = "local") -> dict:
    """On every rank: the same examples and weights through the unpacked and the packed batches;
    per-sequence reference log-probs (the cache's table), losses, metric sums and gradients."""
    from transformers import AutoTokenizer

    from onmerge_megatron.training.data import load_examples
    from onmerge_megatron.training.forward_backward import ForwardBackward
    from onmerge_megatron.training.model import LayerSettings, build_model, load_hf_weights, make_bridge
    from onmerge_megatron.training.parallel import init_distributed, quiet_library_warnings
    from onmerge_megatron.training.reference_logps import compute_reference_logps

    quiet_library_warnings()
    fmt, files = ("unpaired", "kto_train.jsonl") if loss_type == "kto" else ("pairs", "train.jsonl")
    tree = {"model": {"hf_path": hf_path, "transformer_impl": impl},
            "data": {"train_files": [os.path.join(DATA, files)], "format": fmt, "max_length": 64, "max_prompt_length": 32},
            "loss": {"type": loss_type, "beta": 0.1, "sft_weight": 0.5 if loss_type == "dpo" else 0.0},
            "parallel": {"tensor_parallel": tp, "micro_batch_size": 4, "global_batch_size": 4 * world_size // tp}}
    cfg = config_from_dict(tree)
    cfg_packed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pack_sequences=True))
    init_distributed(cfg)
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    examples, _ = load_examples(cfg.data.train_files, tokenizer, fmt, 64, 32)
    examples = examples[:24]
    layers = LayerSettings.from_config(cfg)
    bridge = make_bridge(hf_path, torch.float32, layers)
    model = build_model(bridge, 64, transformer_engine=layers.transformer_engine)
    load_hf_weights(bridge, model, hf_path)
    pad = tokenizer.pad_token_id
    out: dict = {"tables": {}, "losses": {}, "sums": {}, "grads": {}, "layout": {}, "padding": {}}
    if impl == "local":
        out["rope"] = _rope_follows_position_ids(model[0])
    runs = {name: ForwardBackward(c, model, pad) for name, c in (("unpacked", cfg), ("packed", cfg_packed))}
    columns = 1 if loss_type == "sft" else 2
    for name, fb in runs.items():
        make = partial(fb.make_batch, examples, split=None)
        out["tables"][name] = compute_reference_logps(fb.forward_step, make, model, len(examples), 4, columns)
    for name, fb in runs.items():
        # A reference away from the policy (here the same weights): rewards, and so the accuracy
        # metric, are then not ties decided by rounding.
        offsets = torch.rand(out["tables"]["unpacked"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        fb.reference_logps["train"] = out["tables"]["unpacked"] - 4 * offsets
        model[0].train()
        losses, sums, grads = [], [], []
        for ids in ([0, 5, 9, 13], [2, 3, 17, 21]):
            batch = fb.make_batch(examples, ids, "train")
            out["padding"][name] = out["padding"].get(name, 0) + batch.pad_tokens
            if name == "packed":
                out["layout"].setdefault("rows", []).append(batch.input_ids.shape[0])
                out["layout"].setdefault("sequences", []).append(batch.num_sequences)
            model[0].zero_grad(set_to_none=True)
            output, loss_fn = fb.forward_step(partial(fb.loss, True), iter([batch]), model[0])
            loss, metric = loss_fn(output)
            loss.backward()
            losses.append(loss.item())
            sums.append(metric["sums"])
            grads.append({n: p.grad.detach().clone() for n, p in model[0].named_parameters() if p.grad is not None})
        out["losses"][name], out["sums"][name], out["grads"][name] = losses, sums, grads
    return out


def _rope_follows_position_ids(gpt: torch.nn.Module) -> bool:
    """Within rope_at_positions the model's rotary angles of row b, position t are exactly those
    of position position_ids[b, t]; outside it, megatron's own (0..s-1 for every row)."""
    from onmerge_megatron.megatron import compat

    width = 12
    positions = torch.stack([torch.arange(width), torch.cat([torch.arange(5), torch.arange(7)])])
    plain = gpt.rotary_pos_emb(width)  # [s, 1, 1, d]
    with compat.rope_at_positions(gpt, positions):
        moved = gpt.rotary_pos_emb(width)
    expected = torch.stack([plain[positions[b], 0, 0] for b in range(2)], dim=1).unsqueeze(2)
    return moved.shape == (width, 2, 1, plain.shape[-1]) and torch.equal(moved, expected) and torch.equal(
        gpt.rotary_pos_emb(width), plain)


def _check_packed_run(results: list[dict], loss_type: str, rel_tol: float = REL) -> None:
    for out in results:
        rows, seqs = out["layout"]["rows"], out["layout"]["sequences"]
        assert all(r < s for r, s in zip(rows, seqs))  # packing did put several sequences in a row
        assert out.get("rope", True)
        unpacked, packed = out["tables"]["unpacked"], out["tables"]["packed"]
        assert (unpacked != 0).all() and (unpacked < 0).all()
        rel = ((packed - unpacked).abs() / unpacked.abs()).max().item()
        print(f"{loss_type}: max relative difference of cached sequence log-probs {rel:.2e}")
        assert rel <= rel_tol
        for a, b in zip(out["losses"]["unpacked"], out["losses"]["packed"]):
            assert b == pytest.approx(a, rel=rel_tol, abs=1e-7)
        for a, b in zip(out["sums"]["unpacked"], out["sums"]["packed"]):
            # The metric sums (loss() leaves the padding counts, the last two, to run()).
            torch.testing.assert_close(b[:-2], a[:-2], rtol=rel_tol, atol=1e-6)
        assert out["padding"]["packed"] < out["padding"]["unpacked"]
        for a, b in zip(out["grads"]["unpacked"], out["grads"]["packed"]):
            assert a.keys() == b.keys() and a
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=10 * rel_tol, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dpo", "kto"])
def test_packed_equals_unpacked_tp1(tiny_base, loss_type):
    _check_packed_run(run_distributed(_compare_packed_and_unpacked, 1, tiny_base, 1, loss_type), loss_type)


@pytest.mark.slow
def test_packed_equals_unpacked_tp2(tiny_base):
    results = run_distributed(_compare_packed_and_unpacked, 2, tiny_base, 2, "dpo")
    _check_packed_run(results, "dpo")
    torch.testing.assert_close(results[0]["tables"]["packed"], results[1]["tables"]["packed"], rtol=0, atol=0)


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")),
                    reason="THD packing runs Transformer Engine's attention: needs a GPU and transformer_engine")
def test_thd_packed_equals_unpacked_on_gpu(tiny_base):
    """With the TE layer spec the packed rows go to TE's attention as THD sequences (cu_seqlens);
    the unpacked reference runs TE's BSHD attention, a different kernel: fp32, looser tolerance."""
    _check_packed_run(run_distributed(_compare_packed_and_unpacked, 1, tiny_base, 1, "dpo", "transformer_engine"), "dpo", 2e-4)
