"""OnlineMergingAdamW: exact AdamW when off, Algorithm 2 when on, resumable, strict about input."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW, Segment, ShardCoords
from onmerge_megatron.optim import TensorGroup

from distributed import run_distributed
from reference_impl import Algorithm2

SHAPES = {"embed.weight": (40, 50), "layer.bias": (50,), "layer.weight": (30, 40), "head.weight": (7, 30)}


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for n, s in SHAPES.items()}


def make_delta(seed=1, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * scale for n, s in SHAPES.items()}


def grads_for(step, seed=2):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def run(optimizer, params, steps, first=1):
    for t in range(first, first + steps):
        for n, g in grads_for(t).items():
            params[n].grad = g.clone()
        optimizer.step()


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 20, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(self.emb(x)))).mean(1)


@pytest.mark.parametrize("foreach", [None, False, True])
def test_method_none_is_torch_adamw_bit_for_bit(foreach):
    torch.manual_seed(0)
    a = TinyModel()
    b = copy.deepcopy(a)
    groups = lambda m: [  # noqa: E731
        {"params": [m.emb.weight, m.out.weight], "lr": 3e-3, "weight_decay": 0.1},
        {"params": [m.lin.weight, m.lin.bias], "lr": 1e-3, "weight_decay": 0.0, "maximize": True},
    ]
    torch_opt = torch.optim.AdamW(groups(a), betas=(0.8, 0.95), eps=1e-6, foreach=foreach)
    ours = OnlineMergingAdamW(groups(b), betas=(0.8, 0.95), eps=1e-6, merge=OnlineMergeConfig(method="none"))
    for step in range(6):
        x = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, torch_opt), (b, ours)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(torch_opt.state[a.emb.weight]["exp_avg_sq"], ours.state[b.emb.weight]["exp_avg_sq"])


@pytest.mark.parametrize("method", ["dare", "ties"])
@pytest.mark.parametrize("merge_every", [1, 3])
@pytest.mark.parametrize("delta_scale", [0.05, 3.0], ids=["small-tau", "tau-above-1"])
def test_matches_algorithm_2(method, merge_every, delta_scale):
    """With |tau| > 1 the default clamp matters: the reference code clamps OnDARE's tau, not OnTIES'."""
    params = make_params()
    delta = make_delta(scale=delta_scale)
    kwargs = dict(method=method, keep_rate=0.1, alpha=0.3, merge_every=merge_every)
    reference = Algorithm2(params, delta, lr=1e-2, weight_decay=0.05, **kwargs)
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.05, merge=OnlineMergeConfig(**kwargs))
    opt.set_reference_delta(delta=delta)
    for t in range(1, 8):
        run(opt, params, 1, first=t)
        reference.step(grads_for(t))
        for n in SHAPES:
            assert torch.equal(params[n].detach(), reference.params[n]), (n, t)


def test_gradient_dropout_needs_no_reference():
    params = make_params()
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.0, merge=OnlineMergeConfig(method="dare", keep_rate=0.2, alpha=0.0))
    run(opt, params, 1)
    changed = sum(int((params[n] != before[n]).sum()) for n in SHAPES)
    total = sum(p.numel() for p in params.values())
    assert 0.1 * total < changed < 0.3 * total


def resume_case(config, tmp_path, weight_ema=False):
    """Run 8 steps straight, and 4 + save to a file + load into fresh objects + 4."""
    delta = make_delta()
    straight = make_params()
    opt = OnlineMergingAdamW(list(straight.items()), lr=1e-2, merge=config)
    opt.set_reference_delta(delta=delta)
    run(opt, straight, 8)

    first = make_params()
    opt1 = OnlineMergingAdamW(list(first.items()), lr=1e-2, merge=config)
    opt1.set_reference_delta(delta=delta)
    run(opt1, first, 4)
    path = tmp_path / "ckpt.pt"
    torch.save({"params": {n: p.detach() for n, p in first.items()}, "optimizer": opt1.state_dict()}, path)

    saved = torch.load(path, weights_only=True)
    resumed = {n: torch.nn.Parameter(t.clone()) for n, t in saved["params"].items()}
    opt2 = OnlineMergingAdamW(list(resumed.items()), lr=1e-2, merge=config)
    opt2.load_state_dict(saved["optimizer"])  # the reference delta comes back with the state
    run(opt2, resumed, 4, first=5)
    for n in SHAPES:
        assert torch.equal(resumed[n], straight[n]), n
    return opt, opt2


@pytest.mark.parametrize(
    "config",
    [
        OnlineMergeConfig(method="dare", keep_rate=0.1, alpha=0.3, merge_every=3, weight_ema=1e-3),
        OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, merge_every=3),
        OnlineMergeConfig(method="dare", keep_rate=0.1, alpha=0.3, reference_mask="resampled"),
    ],
    ids=["dare-K3-ema", "ties-K3", "dare-resampled"],
)
def test_resume_is_bit_identical(config, tmp_path):
    straight, resumed = resume_case(config, tmp_path)
    for (p, s), (q, r) in zip(straight.state.items(), resumed.state.items()):
        for key in s:
            assert torch.equal(s[key], r[key]), key


def test_load_keeps_merge_state_dtypes():
    """torch would cast every state tensor to the parameter's dtype (here bf16)."""
    param = torch.nn.Parameter(torch.zeros(1 << 12, dtype=torch.bfloat16))
    config = OnlineMergeConfig(method="ties", keep_rate=0.1, merge_every=2)
    opt = OnlineMergingAdamW([("w", param)], merge=config)
    opt.set_reference_delta(delta={"w": torch.randn(1 << 12)})
    param.grad = torch.ones_like(param)
    opt.step()
    again = OnlineMergingAdamW([("w", param)], merge=config)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("reference_values", "reference_positions", "merge_accumulator"):
        assert again.state[param][key].dtype == opt.state[param][key].dtype, key
        assert torch.equal(again.state[param][key], opt.state[param][key]), key


def test_reference_delta_is_held_sparse():
    n = 1 << 20
    param = torch.nn.Parameter(torch.zeros(n))
    for method, limit in (("dare", 0.0105), ("ties", 0.0205)):
        opt = OnlineMergingAdamW([("w", param)], merge=OnlineMergeConfig(method=method, keep_rate=0.01))
        opt.set_reference_delta(delta={"w": torch.randn(n)})
        assert opt.reference_nbytes() <= limit * 4 * n, method


def test_weight_ema_follows_its_definition():
    params = make_params()
    ema = {n: p.detach().clone() for n, p in params.items()}
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, merge=OnlineMergeConfig(method="none", weight_ema=0.1))
    for t in range(1, 5):
        run(opt, params, 1, first=t)
        for n in SHAPES:
            ema[n] = ema[n].lerp(params[n].detach(), 0.1)
    live = {n: p.detach().clone() for n, p in params.items()}
    with opt.weight_ema_applied():
        for n in SHAPES:
            assert torch.allclose(params[n], ema[n], rtol=0, atol=1e-7)
    for n in SHAPES:
        assert torch.equal(params[n], live[n])


def test_merge_stats():
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, merge=OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3))
    opt.set_reference_delta(delta=make_delta())
    opt.track_update_norm = True
    run(opt, params, 2)
    stats = opt.merge_stats()
    total = sum(math.prod(s) for s in SHAPES.values())
    kept = sum(int(math.prod(s) * 0.1) for s in SHAPES.values())
    assert stats["kept_fraction"] == pytest.approx(kept / total)
    assert 0 < stats["merged_norm"] and 0 < stats["update_norm"]
    assert 0 <= stats["sign_conflict_rate"] <= 1
    assert opt.merge_stats()["kept_fraction"] == 0.0  # reset


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keep_rate=0.0), "keep_rate must be in \\(0, 1\\]"),
        (dict(keep_rate=1.5), "keep_rate must be in \\(0, 1\\]"),
        (dict(alpha=-0.1), "alpha must be in \\[0, 1\\]"),
        (dict(alpha=2.0), "alpha must be in \\[0, 1\\]"),
        (dict(merge_every=0), "merge_every must be an integer >= 1"),
        (dict(merge_every=2.5), "merge_every must be an integer >= 1"),
        (dict(method="slerp"), "method must be one of"),
        (dict(method="ties", reference_mask="resampled"), "no meaning with method='ties'"),
        (dict(reference_clamp=0.0), "reference_clamp must be a positive number, 'auto' or None"),
        (dict(reference_clamp="on"), "reference_clamp must be a positive number, 'auto' or None"),
        (dict(reference_clamp=True), "reference_clamp must be a positive number, 'auto' or None"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineMergeConfig(**kwargs)


def test_reference_clamp_default_follows_the_method():
    """'auto' stays in the config and is resolved per method, so replace() and dict round trips follow the method."""
    dare = OnlineMergeConfig(method="dare")
    assert dare.reference_clamp == "auto" and dare.resolved_reference_clamp == 1.0
    ties = dataclasses.replace(dare, method="ties")
    assert ties.resolved_reference_clamp is None
    assert OnlineMergeConfig.from_dict(ties.to_dict()) == ties
    assert OnlineMergeConfig(method="ties", reference_clamp=2).resolved_reference_clamp == 2
    assert OnlineMergeConfig(method="dare", reference_clamp=None).resolved_reference_clamp is None


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['reserve_p'\\]"):
        OnlineMergeConfig.from_dict({"reserve_p": 0.1})


def fresh():
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), merge=OnlineMergeConfig(method="dare", alpha=0.1))
    return params, opt


def test_missing_reference_entry_is_named():
    params, opt = fresh()
    reference = {n: p.detach().clone() for n, p in params.items()}
    base = dict(reference)
    del base["layer.bias"]
    with pytest.raises(ValueError, match="'layer.bias' has no entry in the base"):
        opt.set_reference_delta(reference=reference, base=base)
    assert not any("reference_values" in s for s in opt.state.values())  # nothing half-stored


def test_shape_and_dtype_mismatch_are_named():
    params, opt = fresh()
    reference = {n: p.detach().clone() for n, p in params.items()}
    base = dict(reference, **{"head.weight": torch.zeros(7, 31)})
    with pytest.raises(ValueError, match="'head.weight' has shape \\(7, 30\\) in the reference but \\(7, 31\\) in the base"):
        opt.set_reference_delta(reference=reference, base=base)
    base = dict(reference, **{"head.weight": torch.zeros(7, 30, dtype=torch.float64)})
    with pytest.raises(ValueError, match="'head.weight' has dtype torch.float32 in the reference but torch.float64"):
        opt.set_reference_delta(reference=reference, base=base)


def test_non_finite_delta_is_refused():
    params, opt = fresh()
    delta = make_delta()
    delta["layer.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="'layer.weight' has 1 NaN/Inf"):
        opt.set_reference_delta(delta=delta)


def test_step_without_reference_fails_before_changing_anything():
    params, opt = fresh()
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(RuntimeError, match="no reference delta for 'embed.weight'"):
        run(opt, params, 1)
    for n in SHAPES:
        assert torch.equal(params[n], before[n])


# ------------------------------------------------------------------ sharded, 2 gloo processes
def _uneven_split(numel, rank, world):
    cut = [0, (numel * 2) // 5, numel]  # 40% / 60%: pieces of unequal size
    return cut[rank], cut[rank + 1]


def _sharded_run(rank, world, config_dicts, steps):
    results = []
    for config_dict in config_dicts:
        config = OnlineMergeConfig(**config_dict)
        full = make_params()
        group = TensorGroup(dist.group.WORLD, {n: p.numel() for n, p in full.items()})
        shards, segments = {}, {}
        for n, p in full.items():
            a, b = _uneven_split(p.numel(), rank, world)
            shards[n] = torch.nn.Parameter(p.detach().reshape(-1)[a:b].clone())
            segments[n] = [Segment(n, ShardCoords.flat_range(tuple(p.shape), a, b), 0, group)]
        opt = OnlineMergingAdamW(list(shards.items()), lr=1e-2, weight_decay=0.05, merge=config)
        for n, s in shards.items():
            opt.set_segments(s, segments[n])
        opt.set_reference_delta(delta=make_delta())
        for t in range(1, steps + 1):
            for n, g in grads_for(t).items():
                a, b = _uneven_split(g.numel(), rank, world)
                shards[n].grad = g.reshape(-1)[a:b].clone()
            opt.step()
        results.append({n: s.detach() for n, s in shards.items()})
    return results


def _single_run(config, steps, split_segments):
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.05, merge=config)
    if split_segments:  # the same pieces as the sharded run, held by one process
        for n, p in params.items():
            cuts = [_uneven_split(p.numel(), r, 2) for r in range(2)]
            opt.set_segments(p, [Segment(n, ShardCoords.flat_range(tuple(p.shape), a, b), a) for a, b in cuts])
    opt.set_reference_delta(delta=make_delta())
    run(opt, params, steps)
    return params


SHARDED_CASES = {
    "dare-K2": (OnlineMergeConfig(method="dare", keep_rate=0.1, alpha=0.3, merge_every=2), False),
    "ties-per-tensor": (OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, ties_scope="tensor"), False),
    "ties-per-tensor-K2": (OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, ties_scope="tensor", merge_every=2), False),
    "ties-per-shard-K2": (OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, ties_scope="shard", merge_every=2), True),
}
STEPS = 5


@pytest.fixture(scope="module")
def sharded_results():
    """One pair of gloo processes runs every case (process start-up dominates)."""
    per_rank = run_distributed(_sharded_run, 2, [c.to_dict() for c, _ in SHARDED_CASES.values()], STEPS)
    return {case: (per_rank[0][i], per_rank[1][i]) for i, case in enumerate(SHARDED_CASES)}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_two_gloo_ranks_equal_single_process_bitwise(case, sharded_results):
    config, split_segments = SHARDED_CASES[case]
    rank0, rank1 = sharded_results[case]
    single = _single_run(config, STEPS, split_segments)
    for n, p in single.items():
        assert torch.equal(torch.cat([rank0[n], rank1[n]]), p.detach().reshape(-1)), n


def test_parameter_without_segments_and_empty_segments():
    """A rank may hold nothing of a tensor (ZeRO-3 padding, tiny weights): still valid, never touched."""
    param = torch.nn.Parameter(torch.ones(8))
    other = torch.nn.Parameter(torch.ones(4))
    opt = OnlineMergingAdamW([("a", param), ("b", other)], merge=OnlineMergeConfig(method="ties", keep_rate=0.5, alpha=0.5))
    opt.set_segments(param, [])
    opt.set_segments(other, [Segment("b", ShardCoords.flat_range((10,), 3, 3)), Segment("b2", ShardCoords.full((4,)))])
    opt.set_reference_delta(delta={"b": torch.ones(10), "b2": torch.ones(4)})
    param.grad, other.grad = torch.ones(8), torch.ones(4)
    opt.step()
    assert torch.equal(param, torch.ones(8) * (1 - 1e-3 * 1e-2))  # weight decay only
    assert opt.state[param]["reference_values"].numel() == 0


def _replicated_ties(rank, world):
    """Every rank holds the whole tensor, rank 0 counts it (a replicated DTensor)."""
    config = OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, ties_scope="tensor")
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.05, merge=config)
    group = TensorGroup(dist.group.WORLD, {n: p.numel() for n, p in params.items()})
    for n, p in params.items():
        opt.set_segments(p, [Segment(n, ShardCoords.full(tuple(p.shape)), 0, group, counted=rank == 0)])
    opt.set_reference_delta(delta=make_delta())
    run(opt, params, 3)
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.slow
def test_replicas_selecting_per_tensor_equal_single_process():
    results = run_distributed(_replicated_ties, 2)
    single = _single_run(OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3, ties_scope="tensor"), 3, False)
    for rank_result in results:
        for n, p in single.items():
            assert torch.equal(rank_result[n], p.detach()), n


@pytest.mark.slow
@pytest.mark.parametrize("eps", [1e-8, 3e-3], ids=["eps-small", "eps-dominant"])
@pytest.mark.parametrize("search", ["dense_pass", "update"])
def test_ties_candidates_of_large_segments_match_algorithm_2(eps, search, monkeypatch):
    """Segments above 4 x SAMPLE elements find OnTIES' top-k among candidates bounded without
    computing the magnitude (found by the CPU dense pass while it updates the moments, or by
    AdamUpdate.top_k_candidates as on a GPU); the kept set must still be the exact top-k of the
    reference code's dense update, at Adam's all-tied first step (where the candidates decline),
    with eps dominating many denominators, and with step-K."""
    from onmerge_megatron import optim as optim_module

    offered = []
    if search == "update":
        monkeypatch.setattr(optim_module.OnlineMergingAdamW, "_candidate_searches", lambda self, *args: {})
        original = optim_module.AdamUpdate.top_k_candidates
    else:
        original = optim_module._Offered.top_k_candidates

    def counting(self, k):
        found = original(self, k)
        offered.append(found is not None)
        return found

    monkeypatch.setattr(optim_module.AdamUpdate if search == "update" else optim_module._Offered, "top_k_candidates", counting)
    shapes = {"big.weight": (300, 400), "vector": (70_000,)}
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for n, s in shapes.items()}
    delta = {n: torch.randn(s, generator=gen) * 0.05 for n, s in shapes.items()}
    for merge_every in (1, 2):
        kwargs = dict(method="ties", keep_rate=0.01, alpha=0.3, merge_every=merge_every)
        run_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
        reference = Algorithm2(run_params, delta, lr=1e-2, eps=eps, weight_decay=0.01, **kwargs)
        opt = OnlineMergingAdamW(list(run_params.items()), lr=1e-2, eps=eps, weight_decay=0.01, merge=OnlineMergeConfig(**kwargs))
        opt.set_reference_delta(delta=delta)
        for t in range(1, 6):
            grads = {n: torch.randn(s, generator=gen) * (10.0 ** -(t % 3)) for n, s in shapes.items()}
            for n, g in grads.items():
                run_params[n].grad = g.clone()
            opt.step()
            reference.step(grads)
            for n in shapes:
                assert torch.equal(run_params[n].detach(), reference.params[n]), (merge_every, n, t)
    assert any(offered), "the candidate path never ran"
    assert not all(offered), "the first step's ties should be selected over the whole segment"


@pytest.mark.parametrize("scale,serves", [(0.05, False), (0.9, True), (1.0, True), (1.5, False)])
def test_ties_predicted_cut_never_changes_the_kept_set(scale, serves, monkeypatch):
    """The CPU search looks above the cut its previous merge predicted; a cut far too low (the
    search is called off), low (more candidates), right, or too high (the k-th largest offered
    is below the cut: refused) must all leave the bits of the whole-segment selection, which the
    Algorithm 2 tests pin; only the path differs."""
    from onmerge_megatron import optim as optim_module

    gen = torch.Generator().manual_seed(5)
    start = torch.randn(200, 400, generator=gen) * 0.1
    delta = {"w": torch.randn(200, 400, generator=gen) * 0.05}
    grads = [torch.randn(200, 400, generator=gen) * 1e-3 for _ in range(6)]

    def run() -> torch.Tensor:
        param = torch.nn.Parameter(start.clone())
        opt = OnlineMergingAdamW([("w", param)], lr=1e-2, merge=OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.3))
        opt.set_reference_delta(delta=delta)
        for g in grads:
            param.grad = g.clone()
            opt.step()
        return param.detach()

    with monkeypatch.context() as patch:
        patch.setattr(optim_module.OnlineMergingAdamW, "_candidate_searches", lambda self, *args: {})
        expected = run()
    predict = optim_module.next_cut
    monkeypatch.setattr(optim_module, "next_cut", lambda magnitude, k: predict(magnitude, k) * scale)
    used = []
    selected = optim_module._Offered.top_k_selected
    monkeypatch.setattr(
        optim_module._Offered, "top_k_selected", lambda self, magnitude, k, from_candidates: used.append(from_candidates) or selected(self, magnitude, k, from_candidates)
    )
    assert torch.equal(run(), expected)
    # Adam's all-tied first two steps select over the whole segment (the third too, with a
    # cut from the second step's spread of magnitudes lowered 10%).
    assert used[:2] == [False, False] and used[3:] == [serves] * 3, used


@pytest.mark.slow
def test_ties_candidates_on_a_flat_buffer_of_large_pieces(monkeypatch):
    """A ZeRO-like flat parameter holding large pieces of two weights (each above 4 x SAMPLE, one
    cut across two chunks of the candidate pass, 300 elements no segment covers), per-shard
    OnTIES: the search in the CPU dense pass, the one in AdamUpdate (as on a GPU) and the
    whole-segment selection (neither) leave bit-identical parameters and moments over 4 steps."""
    from onmerge_megatron import optim as optim_module

    shapes = {"a": (700, 1000), "b": (900, 800)}
    pieces = [("a", 100_000, 650_123), ("b", 20_000, 700_000)]  # 550,123 and 680,000 elements
    gen = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=gen) * 0.05 for n, s in shapes.items()}
    delta = {n: torch.randn(s, generator=gen) * 1e-2 for n, s in shapes.items()}
    grads = [torch.randn(sum(b - a for _, a, b in pieces) + 300, generator=gen) * 1e-3 for _ in range(4)]
    config = OnlineMergeConfig(method="ties", keep_rate=0.01, alpha=0.3)

    def run(search: str) -> tuple[torch.Tensor, dict]:
        with monkeypatch.context() as patch:
            if search != "dense_pass":
                patch.setattr(optim_module.OnlineMergingAdamW, "_candidate_searches", lambda self, *args: {})
            if search == "none":
                patch.setattr(optim_module.AdamUpdate, "top_k_candidates", lambda self, k: None)
            flat = torch.nn.Parameter(torch.cat([base[n].reshape(-1)[a:b] for n, a, b in pieces] + [torch.zeros(300)]))
            opt = OnlineMergingAdamW([("flat", flat)], lr=1e-3, weight_decay=0.01, merge=config)
            segments, offset = [], 0
            for n, a, b in pieces:
                segments.append(Segment(n, ShardCoords.flat_range(shapes[n], a, b), offset))
                offset += b - a
            opt.set_segments(flat, segments)
            opt.set_reference_delta(delta=delta)
            offered = []
            original = optim_module._Offered.top_k_candidates
            patch.setattr(optim_module._Offered, "top_k_candidates", lambda self, k: offered.append(original(self, k)) or offered[-1])
            for g in grads:
                flat.grad = g.clone()
                opt.step()
            if search == "dense_pass":
                # Both pieces select over the whole segment at the first merge (no predicted cut)
                # and the second (the cut from Adam's all-tied first step offers too many), then
                # from the dense pass's candidates.
                assert [c is not None for c in offered] == [False] * 4 + [True] * 2 * (len(grads) - 2)
            return flat.detach().clone(), {k: t.clone() for k, t in opt.state[flat].items() if torch.is_tensor(t)}

    fused, state = run("dense_pass")
    for other in ("update", "none"):
        params, other_state = run(other)
        assert torch.equal(fused, params), other
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], other_state[key]), (other, key)
