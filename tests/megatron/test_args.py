"""Megatron-style flags, the settings dataclass and the wrapped optimizer factory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

import mcore_harness as h
import mcore_jobs as jobs
from onmerge_megatron import OnlineMergeConfig
from onmerge_megatron.megatron.args import OnlineMergeSettings, add_online_merge_args, combine_extra_args_providers


def parse(*argv: str) -> argparse.Namespace:
    return add_online_merge_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_are_off_and_match_the_engine() -> None:
    settings = OnlineMergeSettings.from_args(parse())
    assert not settings.enabled
    assert settings == OnlineMergeSettings()
    defaults = OnlineMergeConfig()
    assert settings.merge_config() == OnlineMergeConfig(method="none", keep_rate=defaults.keep_rate, alpha=defaults.alpha)


def test_flags_reach_the_merge_config() -> None:
    args = parse(
        "--online-merge", "ties", "--online-merge-keep-rate", "0.05", "--online-merge-alpha", "5e-7",
        "--online-merge-every", "4", "--online-merge-base", "/ckpt/base", "--online-merge-seed", "3",
        "--online-merge-ties-scope", "tensor", "--online-merge-sign-election", "weighted",
        "--online-merge-reference-clamp", "none", "--online-merge-no-dare-rescale", "--online-merge-l1-rescale",
    )
    settings = OnlineMergeSettings.from_args(args)
    assert settings.merge_config() == OnlineMergeConfig(
        method="ties", keep_rate=0.05, alpha=5e-7, merge_every=4, seed=3, ties_scope="tensor",
        sign_election="weighted", reference_clamp=None, dare_rescale=False, l1_rescale=True,
    )
    assert settings.reference_source().path == "/ckpt/base"


def test_reference_clamp_flag() -> None:
    """Default 'auto' follows the reference code per method; a number or 'none' overrides it."""
    assert OnlineMergeSettings.from_args(parse()).reference_clamp == "auto"
    assert OnlineMergeSettings.from_args(parse("--online-merge", "ties")).merge_config().resolved_reference_clamp is None
    assert OnlineMergeSettings.from_args(parse("--online-merge", "dare")).merge_config().resolved_reference_clamp == 1.0
    assert OnlineMergeSettings.from_args(parse("--online-merge-reference-clamp", "2.5")).reference_clamp == 2.5
    assert OnlineMergeSettings.from_args(parse("--online-merge-reference-clamp", "AUTO")).reference_clamp == "auto"


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="keep_rate"):
        OnlineMergeSettings.from_args(parse("--online-merge", "dare", "--online-merge-keep-rate", "0"))
    with pytest.raises(ValueError, match="not both"):
        OnlineMergeSettings(method="dare", base="a", base_hf="b")
    with pytest.raises(SystemExit):
        parse("--online-merge", "magic")


def test_combined_extra_args_providers() -> None:
    def own(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--my-flag", type=int, default=1)
        return parser

    parser = combine_extra_args_providers(own, add_online_merge_args)(argparse.ArgumentParser())
    args = parser.parse_args(["--my-flag", "2", "--online-merge", "dare"])
    assert args.my_flag == 2 and args.online_merge == "dare"


def test_every_engine_field_has_a_flag_defaulting_to_the_engine() -> None:
    """One ``--online-merge-<field>`` per OnlineMergeConfig field; each default is the engine's, but
    the method, which is 'none' in every front-end (the flags alone change nothing)."""
    args, engine = parse(), OnlineMergeConfig()
    for f in dataclasses.fields(OnlineMergeConfig):
        dest = "online_merge" if f.name == "method" else "online_merge_" + f.name.removeprefix("merge_")
        assert getattr(args, dest) == ("none" if f.name == "method" else getattr(engine, f.name)), f.name


# For each field: its flag with a value other than the default, and the value the engine must get.
FLAG_VALUES = {
    "method": (["--online-merge-method", "ties"], "ties"),
    "keep_rate": (["--online-merge-keep-rate", "0.25"], 0.25),
    "alpha": (["--online-merge-alpha", "0.5"], 0.5),
    "merge_every": (["--online-merge-every", "3"], 3),
    "dare_rescale": (["--online-merge-no-dare-rescale"], False),
    "l1_rescale": (["--online-merge-l1-rescale"], True),
    "reference_clamp": (["--online-merge-reference-clamp", "2.5"], 2.5),
    "reference_mask": (["--online-merge-reference-mask", "resampled"], "resampled"),
    "sign_election": (["--online-merge-sign-election", "weighted"], "weighted"),
    "ties_scope": (["--online-merge-ties-scope", "tensor"], "tensor"),
    "seed": (["--online-merge-seed", "7"], 7),
    "weight_ema": (["--online-merge-weight-ema", "0.001"], 0.001),
}


def test_each_flag_reaches_its_field() -> None:
    assert sorted(FLAG_VALUES) == sorted(f.name for f in dataclasses.fields(OnlineMergeConfig))
    for name, (argv, value) in FLAG_VALUES.items():
        method = [] if name == "method" else ["--online-merge", "dare"]
        config = OnlineMergeSettings.from_args(parse(*method, *argv)).merge_config()
        assert config == dataclasses.replace(OnlineMergeConfig(), **{name: value}), name
    assert parse("--online-merge-dare-rescale").online_merge_dare_rescale is True
    assert parse("--online-merge-l1-rescale", "--online-merge-no-l1-rescale").online_merge_l1_rescale is False


def test_wrapped_factory_builds_reference_at_first_step(megatron_workdir: Path) -> None:
    """The optimizer is created on random weights, the SFT weights are loaded afterwards (as in
    Megatron-LM's pretrain); the run must equal the single-process one started from the SFT weights."""
    tmp_path = megatron_workdir
    h.spawn(jobs.wrapped_factory, 2, tmp_path)
    assert torch.load(tmp_path / "factory.pt")["inner"] == "OnlineMergingAdamW"
    ref, run = h.plain_tensors(tmp_path / "ref_dare"), h.plain_tensors(tmp_path / "factory_dare")
    diff = max(float((ref[k] - run[k]).abs().max()) for k in ref)
    assert diff <= 2e-5, diff
