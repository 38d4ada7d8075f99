"""OnlineMergingAdamW under faults: non-finite gradients, and state saved under other merge settings."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW
from onmerge_megatron.merging import MergeCheckpointError, check_compatible

from distributed import run_distributed

SHAPES = {"embed.weight": (40, 50), "layer.bias": (50,), "layer.weight": (30, 40)}
BAD = ("layer.weight", (3, 4))  # the element that gets a NaN

DARE = OnlineMergeConfig(method="dare", keep_rate=0.3, alpha=0.3)
TIES = OnlineMergeConfig(method="ties", keep_rate=0.1, alpha=0.3)
DARE_K2 = OnlineMergeConfig(method="dare", keep_rate=0.3, alpha=0.3, merge_every=2)


def make_params() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for n, s in SHAPES.items()}


def make_delta() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {n: torch.randn(s, generator=gen) * 0.05 for n, s in SHAPES.items()}


def grads_for(t: int, nan: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + t)
    grads = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    if nan:
        grads[BAD[0]][BAD[1]] = float("nan")
    return grads


def build(config: OnlineMergeConfig, cls: type = OnlineMergingAdamW, **kwargs) -> tuple[dict, OnlineMergingAdamW]:
    params = make_params()
    opt = cls(list(params.items()), lr=1e-2, weight_decay=0.0, merge=config, **kwargs)
    if config.needs_reference:
        opt.set_reference_delta(delta=make_delta())
    return params, opt


def step(opt: OnlineMergingAdamW, params: dict, grads: dict[str, torch.Tensor]) -> None:
    for n, g in grads.items():
        params[n].grad = g.clone()
    opt.step()


def snapshot(params: dict, opt: OnlineMergingAdamW) -> tuple[dict, dict]:
    return {n: p.detach().clone() for n, p in params.items()}, copy.deepcopy(opt.state_dict())


def assert_same(a, b, where: str = "") -> None:
    """Bit-identical nested state (tensors by bits, NaN included)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where  # NaN == NaN by bits
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ------------------------------------------------------------------ A. non-finite gradients
@pytest.mark.parametrize("config", [DARE, TIES, DARE_K2], ids=["dare", "ties", "dare-K2"])
def test_raise_names_the_parameter_and_changes_nothing(config):
    params, opt = build(config)
    step(opt, params, grads_for(1))
    before = snapshot(params, opt)
    with pytest.raises(FloatingPointError, match=r"'layer.weight' has 1 NaN/Inf element\(s\); 1 of 3 gradients"):
        step(opt, params, grads_for(2, nan=True))
    assert_same(snapshot(params, opt), before)


def test_raise_is_the_default_and_catches_inf():
    params, opt = build(DARE)
    assert opt.nonfinite == "raise"
    grads = grads_for(1)
    grads["layer.bias"][7] = -math.inf
    with pytest.raises(FloatingPointError, match="'layer.bias' has 1 NaN/Inf"):
        step(opt, params, grads)


def test_huge_finite_gradients_are_not_refused():
    """A sum of squares would overflow to inf here; the max-magnitude check does not."""
    params, opt = build(DARE)
    grads = {n: torch.full(s, 3e38) for n, s in SHAPES.items()}
    step(opt, params, grads)
    assert opt.state[params["embed.weight"]]["step"] == 1


@pytest.mark.parametrize("config", [DARE, TIES, DARE_K2], ids=["dare", "ties", "dare-K2-mid-cycle"])
def test_skip_equals_a_run_that_never_saw_the_step(config):
    """With K = 2 the NaN arrives after one plain step, while the accumulator holds it."""
    params, opt = build(config, nonfinite="skip")
    clean_params, clean = build(config, nonfinite="skip")
    step(opt, params, grads_for(1))
    with pytest.warns(RuntimeWarning, match="non-finite gradient .*'layer.weight'.*step skipped, 1 so far"):
        step(opt, params, grads_for(2, nan=True))
    for t in (3, 4, 5):
        step(opt, params, grads_for(t))
    for t in (1, 3, 4, 5):
        step(clean, clean_params, grads_for(t))
    assert opt.skipped_steps == 1 and clean.skipped_steps == 0
    saved = snapshot(params, opt)
    saved[1].pop("online_merge")
    expected = snapshot(clean_params, clean)
    expected[1].pop("online_merge")
    assert_same(saved, expected)


def test_skipped_steps_survive_a_checkpoint():
    params, opt = build(DARE, nonfinite="skip")
    with pytest.warns(RuntimeWarning):
        step(opt, params, grads_for(1, nan=True))
    again = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.0, merge=DARE, nonfinite="skip")
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert again.skipped_steps == 1


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_off_lets_one_nan_corrupt_the_run(method):
    """Why the check is on by default: the NaN stays in Adam's moments for good. OnDARE writes it into
    the weight at the first merge that keeps the element; OnTIES never selects it, so the element
    silently stops training (alpha = 0 here, so only the element's own update could move it)."""
    config = OnlineMergeConfig(method=method, keep_rate=0.3, alpha=0.0)
    params, opt = build(config, nonfinite="off")
    step(opt, params, grads_for(1, nan=True))
    name, index = BAD
    frozen = params[name].detach()[index].clone()
    for t in range(2, 12):
        step(opt, params, grads_for(t))
    assert torch.isnan(opt.state[params[name]]["exp_avg"][index])
    if method == "dare":
        assert torch.isnan(params[name].detach()[index])
    else:
        assert torch.equal(params[name].detach()[index], frozen)
        assert torch.isfinite(params[name]).all()


def test_nonfinite_check_needs_a_positive_eps():
    params = make_params()
    with pytest.raises(ValueError, match="eps=0 .*nonfinite='raise'"):
        OnlineMergingAdamW(list(params.items()), eps=0.0)
    with pytest.raises(ValueError, match="eps=0 \\(param group 1\\) with nonfinite='skip'"):
        OnlineMergingAdamW([{"params": [params["layer.bias"]]}, {"params": [params["layer.weight"]], "eps": 0.0}], nonfinite="skip")
    OnlineMergingAdamW(list(params.items()), eps=0.0, nonfinite="off")
    with pytest.raises(ValueError, match="nonfinite must be"):
        OnlineMergingAdamW(list(params.items()), nonfinite="warn")


def test_fused_class_checks_in_the_shared_step():
    """The check runs in step(), before the fused kernel or the engine path (kernel runs: tests/kernels)."""
    from onmerge_megatron.kernels import FusedOnlineMergingAdamW

    params, opt = build(TIES, cls=FusedOnlineMergingAdamW)
    step(opt, params, grads_for(1))
    before = snapshot(params, opt)
    with pytest.raises(FloatingPointError, match="'layer.weight' has 1 NaN/Inf"):
        step(opt, params, grads_for(2, nan=True))
    assert_same(snapshot(params, opt), before)
    params, opt = build(TIES, cls=FusedOnlineMergingAdamW, nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        step(opt, params, grads_for(1, nan=True))
    assert opt.skipped_steps == 1 and not opt.state[params["layer.weight"]].get("step")


def _fsdp_skip(rank, world):
    """NaN in the gradient of rank 0's shard only: both ranks must skip."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = OnlineMergingAdamW(model.named_parameters(), lr=1e-2, merge=OnlineMergeConfig(alpha=0.0), nonfinite="skip")
    model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    if rank == 0:
        model[0].weight.grad._local_tensor[0, 0] = float("nan")
    before = [p.detach().to_local().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    unchanged = all(torch.equal(b, p.detach().to_local()) for b, p in zip(before, model.parameters()))
    return opt.skipped_steps, unchanged, len(opt.state)


@pytest.mark.slow
def test_skip_decision_is_shared_over_the_device_mesh():
    for skipped, unchanged, states in run_distributed(_fsdp_skip, 2):
        assert (skipped, unchanged, states) == (1, True, 0)


# ------------------------------------------------------------------ B. state saved under other settings
def saved_state(config: OnlineMergeConfig, steps: int = 3) -> dict:
    params, opt = build(config)
    for t in range(1, steps + 1):
        step(opt, params, grads_for(t))
    return copy.deepcopy(opt.state_dict())


def load_into(config: OnlineMergeConfig, state: dict) -> tuple[dict, OnlineMergingAdamW]:
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.0, merge=config)
    opt.load_state_dict(state)
    return params, opt


@pytest.mark.parametrize(
    "saved,now,named",
    [
        (DARE, TIES, "method: 'dare' saved, 'ties' now"),
        (DARE, replace(DARE, keep_rate=0.1), "keep_rate: 0.3 saved, 0.1 now"),
        (DARE, replace(DARE, seed=1), "seed: 0 saved, 1 now"),
        (DARE, replace(DARE, reference_clamp=None), "reference_clamp: 1.0 saved, None now"),
        (DARE, replace(DARE, dare_rescale=False), "dare_rescale: True saved, False now"),
        (DARE, replace(DARE, reference_mask="resampled"), "reference_mask: 'fixed' saved, 'resampled' now"),
        (TIES, replace(TIES, ties_scope="tensor"), "ties_scope: 'shard' saved, 'tensor' now"),
        (TIES, replace(TIES, reference_clamp=1.0), "reference_clamp: None saved, 1.0 now"),
    ],
    ids=["method", "keep_rate", "seed", "reference_clamp", "dare_rescale", "reference_mask", "ties_scope", "ties-clamp"],
)
def test_load_refuses_another_reference_setting(saved, now, named):
    params = make_params()
    opt = OnlineMergingAdamW(list(params.items()), lr=1e-2, weight_decay=0.0, merge=now)
    if now.needs_reference:
        opt.set_reference_delta(delta=make_delta())
    before = snapshot(params, opt)
    with pytest.raises(MergeCheckpointError, match=named.replace("(", "\\(")):
        opt.load_state_dict(saved_state(saved))
    assert_same(snapshot(params, opt), before)


def test_resolved_clamp_is_compared():
    """'auto' and its resolved value are the same setting."""
    check_compatible(DARE, replace(DARE, reference_clamp=1.0))
    check_compatible(TIES, replace(TIES, reference_clamp=None))


@pytest.mark.parametrize(
    "now",
    [
        replace(DARE, alpha=0.5, sign_election="weighted", l1_rescale=True),
        replace(DARE, merge_every=2, weight_ema=1e-3),
    ],
    ids=["alpha-and-per-step-settings", "step-K-and-EMA-turned-on"],
)
def test_load_allows_settings_that_do_not_touch_the_reference(now):
    params, opt = load_into(now, saved_state(DARE))
    step(opt, params, grads_for(4))
    step(opt, params, grads_for(5))
    state = opt.state[params["layer.weight"]]
    assert int(state["step"]) == 5 and torch.isfinite(params["layer.weight"]).all()
    assert ("merge_accumulator" in state) == (now.merge_every > 1) and ("weight_ema" in state) == (now.weight_ema > 0)


def test_merge_every_may_drop_only_at_a_merge_step():
    """K = 2 -> 1: the plain updates accumulated since the last merge would never be merged."""
    with pytest.raises(MergeCheckpointError, match="merge_every: 2 saved, 1 now"):
        load_into(DARE, saved_state(DARE_K2, steps=3))
    _, opt = load_into(DARE, saved_state(DARE_K2, steps=4))  # saved right after a merge
    assert not any("merge_accumulator" in s for s in opt.state.values())


def test_unused_reference_is_dropped_and_cannot_be_misread_later():
    """alpha 0.3 -> 0 drops the reference delta, so a later resume under other settings cannot read it."""
    _, opt = load_into(replace(DARE, alpha=0.0), saved_state(DARE))
    assert not any("reference_values" in s for s in opt.state.values())
    params, resumed = load_into(replace(DARE, keep_rate=0.1), copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError, match="no reference delta for 'embed.weight'"):
        step(resumed, params, grads_for(4))


def test_state_without_a_merge_config_loads_with_a_warning():
    state = saved_state(DARE)
    state.pop("online_merge")
    with pytest.warns(UserWarning, match="holds merge state but no merge config"):
        load_into(DARE, state)
