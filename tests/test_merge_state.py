"""The engine's merge state in global coordinates: exported by one layout, imported by another.

An optimizer holding whole tensors exports its merge state; an optimizer holding each tensor as
two flat segments imports it, and the two then continue bit for bit alike (OnDARE's masks are a
function of global indices, so the layout cannot change a step).
"""

import pytest
import torch

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW, Segment, ShardCoords
from onmerge_megatron.merging.config import MergeCheckpointError
from onmerge_megatron.merging.sources import weight_source

from test_optim import SHAPES, grads_for, make_delta, make_params, run


def two_segments(opt, params):
    """Each tensor as flat pieces [0, cut) and [cut, n) of its own name (a rank's two shards)."""
    for name, p in params.items():
        n, cut = p.numel(), p.numel() // 3
        opt.set_segments(p, [Segment(name, ShardCoords.flat_range(p.shape, 0, cut)), Segment(name, ShardCoords.flat_range(p.shape, cut, n), cut)])


def assemble(opt, params):
    """Full flat vectors per (tensor, exported key), from any layout's segments."""
    full = {}
    for name, p in params.items():
        for seg, piece in zip(opt.segments(p), opt.export_merge_state(p)):
            assert set(piece) == set(opt.merge_state_keys())
            for key, values in piece.items():
                lo, _ = seg.coords.global_span()
                full.setdefault((name, key), torch.full((p.numel(),), float("nan")))[lo : lo + seg.coords.numel] = values
    return full


def import_into(opt, params, full, step):
    for name, p in params.items():
        pieces = []
        for seg in opt.segments(p):
            lo, _ = seg.coords.global_span()
            pieces.append({key: full[(name, key)][lo : lo + seg.coords.numel] for key in opt.merge_state_keys()})
        opt.import_merge_state(p, pieces, step=step)


def adam_state(opt, params):
    return {name: {k: opt.state[p][k].clone() for k in ("step", "exp_avg", "exp_avg_sq")} for name, p in params.items()}


CONFIGS = {
    "dare-fixed-stepK-ema": OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3, merge_every=3, weight_ema=0.1),
    "dare-resampled": OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3, reference_mask="resampled"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_another_layout_continues_bit_for_bit(name):
    config = CONFIGS[name]
    params_a = make_params()
    opt_a = OnlineMergingAdamW(list(params_a.items()), lr=1e-2, merge=config)
    opt_a.set_reference_delta(delta=make_delta())
    run(opt_a, params_a, 4)  # step 4: between merges, so the accumulator holds plain updates

    params_b = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params_a.items()}
    opt_b = OnlineMergingAdamW(list(params_b.items()), lr=1e-2, merge=config)
    two_segments(opt_b, params_b)
    import_into(opt_b, params_b, assemble(opt_a, params_a), step=opt_a.steps_taken())
    for name_, p in params_b.items():  # Adam's keys travel the framework's own way; copied here
        opt_b.state[p].update(adam_state(opt_a, params_a)[name_])

    run(opt_a, params_a, 5, first=5)
    run(opt_b, params_b, 5, first=5)
    for n in SHAPES:
        assert torch.equal(params_a[n], params_b[n]), n
    assert opt_b.steps_taken() == 9
    final_a, final_b = assemble(opt_a, params_a), assemble(opt_b, params_b)
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)  # accumulator, EMA, reference


def test_ties_keeps_the_saved_kept_set_in_another_layout():
    config = OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3)
    params_a = make_params()
    opt_a = OnlineMergingAdamW(list(params_a.items()), merge=config)
    opt_a.set_reference_delta(delta=make_delta())
    full = assemble(opt_a, params_a)
    # Per tensor: k = floor(p n) kept elements, the largest |tau| (what a whole-tensor run chose).
    for n, delta in make_delta().items():
        mask = full[(n, "reference_mask")]
        k = int(delta.numel() * 0.1)
        assert int(mask.sum()) == k
        assert torch.equal(mask.nonzero().squeeze(1), delta.reshape(-1).abs().topk(k).indices.sort().values)
        assert torch.equal(full[(n, "reference")][mask > 0], delta.reshape(-1)[mask > 0])

    params_b = make_params()
    opt_b = OnlineMergingAdamW(list(params_b.items()), merge=config)
    two_segments(opt_b, params_b)
    import_into(opt_b, params_b, full, step=None)
    # Re-exported from the other layout: the same vectors (no shard-local top-p was taken again).
    again = assemble(opt_b, params_b)
    assert all(torch.equal(again[key], full[key]) for key in full)


def test_dare_refuses_a_mask_it_would_not_draw():
    config = OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3)
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), merge=config)
    opt.set_reference_delta(delta=make_delta())
    full = assemble(opt, params)
    other = OnlineMergingAdamW(list(make_params().items()), merge=OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3, seed=1))
    with pytest.raises(MergeCheckpointError, match="is not the one this run draws"):
        import_into(other, dict(zip(SHAPES, [p for g in other.param_groups for p in g["params"]])), full, step=None)


def test_export_before_the_first_step_and_without_a_reference():
    config = OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3, merge_every=2, weight_ema=0.5)
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), merge=config)
    with pytest.raises(MergeCheckpointError, match="no reference delta set for 'embed.weight'"):
        opt.export_merge_state(params["embed.weight"])
    assert opt.missing_reference_delta() == list(SHAPES)
    opt.set_reference_delta(delta=make_delta())
    assert opt.missing_reference_delta() == []
    piece = opt.export_merge_state(params["layer.bias"])[0]
    # As the first step would create them: no plain update accumulated, the EMA at the weights.
    assert torch.equal(piece["merge_accumulator"], torch.zeros(50))
    assert torch.equal(piece["weight_ema"], params["layer.bias"].detach())


def test_adam_state_only_hides_and_restores_merge_state():
    config = OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, merge_every=2)
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), merge=config)
    opt.set_reference_delta(delta=make_delta())
    before = {n: dict(opt.state[p]) for n, p in params.items()}
    with opt.adam_state_only():
        for p in params.values():  # torch AdamW's keys only; unstepped params get a fresh Adam state
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
            assert float(opt.state[p]["step"]) == 0.0
    for n, p in params.items():
        assert set(opt.state[p]) == set(before[n])  # placeholders taken back out, merge keys back
        assert all(opt.state[p][k] is v for k, v in before[n].items())


def test_reference_from_held_weights_and_files(tmp_path):
    """base alone: tau = the weights the optimizer holds now - base; the same from safetensors files."""
    from safetensors.torch import save_file

    config = OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3)
    params = make_params()
    base = {n: p.detach() - d for (n, p), d in zip(params.items(), make_delta().values())}
    save_file({n: t.contiguous() for n, t in base.items()}, str(tmp_path / "model.safetensors"))
    held = OnlineMergingAdamW(list(params.items()), merge=config)
    held.set_reference_delta(base=tmp_path)
    explicit = OnlineMergingAdamW(list(params.items()), merge=config)
    explicit.set_reference_delta(reference={n: p.detach() for n, p in params.items()}, base=weight_source(base, "base"))
    for p in params.values():
        assert torch.equal(held.state[p]["reference_values"], explicit.state[p]["reference_values"])


def test_keeps_restored_reference_before_and_after_steps():
    """Taking tau against the held weights is right before the first step, is skipped after a
    resume that restored tau, and refused after steps without it."""
    config = OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.3)
    params = make_params()
    fresh = OnlineMergingAdamW(list(params.items()), merge=config)
    assert fresh.keeps_restored_reference("hint") is False
    fresh.set_reference_delta(delta=make_delta())
    run(fresh, params, 1)
    resumed = OnlineMergingAdamW(list(params.items()), merge=config)
    resumed.load_state_dict(fresh.state_dict())
    assert resumed.keeps_restored_reference("hint") is True

    plain = OnlineMergingAdamW(list(params.items()), merge=OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.0))
    run(plain, params, 1)
    without = OnlineMergingAdamW(list(params.items()), merge=config)
    without.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="already stepped, so its weights are no longer the SFT weights; pass them"):
        without.keeps_restored_reference("pass them")
