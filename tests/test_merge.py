"""One merged step on one segment: against dense transcriptions, and invariant to sharding."""

import pytest
import torch

from onmerge_megatron.merging import DenseUpdate, OnlineMergeConfig, ReferenceDelta, ShardCoords, merge_segment, rng
from onmerge_megatron.merging.coords import Block

from onmerge_megatron.merging.select import Piece, tensor_thresholds
from onmerge_megatron.merging.sparsify import TensorTopK, top_k_count

from reference_impl import dare_mask, ties_consensus, top_k_mask

SHAPE = (300, 1000)
NAME = "decoder.layers.0.mlp.linear_fc1.weight"


def tensors(seed=0, delta_scale=5e-3):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(SHAPE, generator=gen) * 0.02
    update = torch.randn(SHAPE, generator=gen) * 1e-3
    delta = torch.randn(SHAPE, generator=gen) * delta_scale
    return param, update, delta


def whole_step(config, step=1, seed=0, delta_scale=5e-3):
    param, update, delta = tensors(seed, delta_scale)
    coords = ShardCoords.full(SHAPE)
    reference = ReferenceDelta.build(delta.view(-1), config, NAME, coords)
    flat = param.view(-1)
    merge_segment(flat, DenseUpdate(update.view(-1)), config, NAME, coords, step, reference)
    return param


# Large deltas put |tau| above 1 (after DARE's 1/p for OnDARE), where the default clamp matters.
@pytest.mark.parametrize("delta_scale", [5e-3, 0.2], ids=["small-tau", "tau-above-1"])
def test_ondare_matches_equation_3(delta_scale):
    """The reference code's ODAdamW clamps the rescaled, sparsified tau to [-1, 1]."""
    config = OnlineMergeConfig(method="dare", keep_rate=0.05, alpha=0.3)
    param, update, delta = tensors(delta_scale=delta_scale)
    n = param.numel()
    update_mask = dare_mask(0, NAME, 4, rng.STREAM_UPDATE, (n,), 0.05)
    reference_mask = dare_mask(0, NAME, 0, rng.STREAM_REFERENCE, (n,), 0.05)
    expected = param.view(-1).clone()
    expected += torch.where(update_mask, update.view(-1) / 0.05, 0.0) * 0.7
    expected += torch.where(reference_mask, delta.view(-1) / 0.05, 0.0).clamp(-1, 1) * 0.3
    assert torch.equal(whole_step(config, step=4, delta_scale=delta_scale).view(-1), expected)


def test_ondare_touches_only_kept_elements():
    config = OnlineMergeConfig(method="dare", keep_rate=0.01, alpha=0.0)
    param, _, _ = tensors()
    changed = whole_step(config, step=2) != param
    kept = dare_mask(0, NAME, 2, rng.STREAM_UPDATE, (param.numel(),), 0.01)
    assert torch.equal(changed.view(-1), kept)


@pytest.mark.parametrize("delta_scale", [5e-3, 2.0], ids=["small-tau", "tau-above-1"])
@pytest.mark.parametrize("weighted", [False, True])
def test_onties_matches_equations_5_to_7(weighted, delta_scale):
    """The reference code's OTAdamW does not clamp tau (only its ODAdamW does)."""
    config = OnlineMergeConfig(method="ties", keep_rate=0.002, alpha=0.3, sign_election="weighted" if weighted else "unweighted")
    param, update, delta = tensors(delta_scale=delta_scale)
    u = torch.where(top_k_mask(update, 0.002), update.view(-1), 0.0)
    r = torch.where(top_k_mask(delta, 0.002), delta.view(-1), 0.0)
    support = torch.nonzero((u != 0) | (r != 0)).squeeze(1)
    expected = param.view(-1).clone()
    expected[support] += ties_consensus(u[support], r[support], 0.3, weighted)
    assert torch.equal(whole_step(config, delta_scale=delta_scale).view(-1), expected)


def test_reference_clamp_is_an_option_for_both_methods():
    """An explicit clamp applies to OnTIES too; None disables it for OnDARE."""
    param, update, delta = tensors(delta_scale=2.0)
    coords = ShardCoords.full(SHAPE)
    for method, clamp, bound in (("ties", 1.0, 1.0), ("ties", "auto", None), ("dare", None, None), ("dare", "auto", 1.0)):
        config = OnlineMergeConfig(method=method, keep_rate=0.01, alpha=0.3, reference_clamp=clamp)
        largest = float(ReferenceDelta.build(delta.view(-1), config, NAME, coords).values.abs().max())
        if bound is None:
            assert largest > 1.0, (method, clamp, largest)
        else:
            assert largest == bound, (method, clamp, largest)


def test_l1_rescale_keeps_update_norm():
    config = OnlineMergeConfig(method="dare", keep_rate=0.1, alpha=0.0, l1_rescale=True)
    param, update, _ = tensors()
    merged = whole_step(config, step=3) - param
    assert merged.abs().sum().item() == pytest.approx(update.abs().sum().item(), rel=1e-5)


def test_resampled_reference_mask_changes_every_step():
    config = OnlineMergeConfig(method="dare", keep_rate=0.05, alpha=1.0, reference_mask="resampled")
    coords = ShardCoords.full(SHAPE)
    _, _, delta = tensors()
    reference = ReferenceDelta.build(delta.view(-1), config, NAME, coords)
    first, _ = reference.kept(config, NAME, coords, 1)
    second, _ = reference.kept(config, NAME, coords, 2)
    assert not torch.equal(first, second)
    fixed_config = OnlineMergeConfig(method="dare", keep_rate=0.05, alpha=1.0)
    fixed = ReferenceDelta.build(delta.view(-1), fixed_config, NAME, coords)
    assert torch.equal(fixed.kept(fixed_config, NAME, coords, 1)[0], fixed.kept(fixed_config, NAME, coords, 2)[0])


LAYOUTS = {
    "flat": [ShardCoords.flat_range(SHAPE, a, b) for a, b in [(0, 1), (1, 70_001), (70_001, 90_007), (90_007, 300_000)]],
    "tp_columns": [ShardCoords.block(SHAPE, (300, 500), (0, c), a, b) for c in (0, 500) for a, b in [(0, 77_777), (77_777, 150_000)]],
    "gated_fc1": [
        ShardCoords(SHAPE, (Block(0, (75, 1000), (75 * r, 0)), Block(75_000, (75, 1000), (150 + 75 * r, 0))), a, b)
        for r in (0, 1)
        for a, b in [(0, 100_000), (100_000, 150_000)]
    ],
}


def tensor_top_k(full, layout, keep_rate):
    """The whole tensor's threshold from its pieces: the batched select with every piece in one
    process (what the ranks' summed counts are)."""
    pieces = [Piece(0, lambda c=coords: c.gather(full).abs().reshape(-1), coords.global_index) for coords in LAYOUTS[layout]]
    numel = full.numel()
    (threshold,) = tensor_thresholds(pieces, [top_k_count(numel, keep_rate)], [numel], all_reduce=lambda *a, **k: None)
    return TensorTopK(threshold)


def sharded_step(config, layout, step=1, per_tensor=False):
    param, update, delta = tensors()
    result = param.clone().view(-1)
    update_top_k = tensor_top_k(update, layout, config.keep_rate) if per_tensor else None
    reference_top_k = tensor_top_k(delta, layout, config.keep_rate) if per_tensor else None

    for coords in LAYOUTS[layout]:
        shard = coords.gather(param).clone()
        reference = ReferenceDelta.build(coords.gather(delta), config, NAME, coords, reference_top_k)
        merge_segment(shard, DenseUpdate(coords.gather(update)), config, NAME, coords, step, reference, tensor_top_k=update_top_k)
        result[coords.global_index(torch.arange(coords.numel))] = shard
    return result.view(SHAPE)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ondare_shard_invariance_bitwise(layout):
    config = OnlineMergeConfig(method="dare", keep_rate=0.01, alpha=0.2)
    assert torch.equal(sharded_step(config, layout, step=7), whole_step(config, step=7))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_onties_per_tensor_shard_invariance_bitwise(layout):
    config = OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.2, ties_scope="tensor")
    assert torch.equal(sharded_step(config, layout, per_tensor=True), whole_step(config))


def test_onties_per_shard_is_top_p_of_each_piece():
    config = OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.2, ties_scope="shard")
    param, update, delta = tensors()
    expected = param.clone().view(-1)
    for coords in LAYOUTS["flat"]:
        g = coords.global_index(torch.arange(coords.numel))
        u_piece, r_piece = update.view(-1)[g], delta.view(-1)[g]
        u = torch.where(top_k_mask(u_piece, 0.01, g), u_piece, 0.0)
        r = torch.where(top_k_mask(r_piece, 0.01, g), r_piece, 0.0)
        support = torch.nonzero((u != 0) | (r != 0)).squeeze(1)
        expected[g[support]] += ties_consensus(u[support], r[support], 0.2, weighted=False)
    assert torch.equal(sharded_step(config, "flat").view(-1), expected)


def test_shard_without_group_refuses_per_tensor_scope():
    config = OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.2, ties_scope="tensor")
    coords = LAYOUTS["flat"][1]
    with pytest.raises(ValueError, match="ties_scope='tensor' on a shard needs the process group"):
        ReferenceDelta.build(torch.zeros(coords.numel), config, NAME, coords)
