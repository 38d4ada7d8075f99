"""The DeepSpeed version gate: the adapter reads DeepSpeed internals (see compat.py), so an untested
release is refused by name at install time and by the checkpoint converter, unless opted in."""

from __future__ import annotations

from pathlib import Path

import pytest

from onmerge_megatron.deepspeed import compat
from onmerge_megatron.deepspeed.checkpoint import add_merge_state_to_universal, to_universal
from onmerge_megatron.deepspeed.zero import install_online_merging

UNTESTED = "0.16.0"


@pytest.fixture
def untested_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    monkeypatch.setattr(deepspeed, "__version__", UNTESTED)
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)


def test_installed_deepspeed_is_a_tested_version() -> None:
    import deepspeed

    assert compat.check_deepspeed_version() == deepspeed.__version__
    assert deepspeed.__version__ in compat.TESTED_VERSIONS


def test_untested_version_is_refused_by_name_unless_opted_in(untested_deepspeed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(compat.DeepSpeedVersionError, match=r"tested on \['0\.19\.8'\], but deepspeed 0\.16\.0 is installed") as refused:
        compat.check_deepspeed_version()
    assert compat.ALLOW_UNTESTED_ENV in str(refused.value) and "allow_untested_version=True" in str(refused.value)
    assert compat.check_deepspeed_version(allow_untested=True) == UNTESTED
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    assert compat.check_deepspeed_version() == UNTESTED


def test_install_and_converter_refuse_untested_version_first(untested_deepspeed: None, tmp_path: Path) -> None:
    # Refused before anything is read: the engine argument is not even looked at.
    with pytest.raises(compat.DeepSpeedVersionError, match=r"deepspeed 0\.16\.0"):
        install_online_merging(None)
    with pytest.raises(compat.DeepSpeedVersionError, match=r"deepspeed 0\.16\.0"):
        to_universal(tmp_path / "ckpt", tmp_path / "universal")
    assert not (tmp_path / "universal").exists(), "DeepSpeed's converter ran although the version was refused"
    # Opted in, the converter gets past the gate to its own checks of the folders.
    with pytest.raises(FileNotFoundError, match="does not exist: run deepspeed.checkpoint.ds_to_universal first"):
        add_merge_state_to_universal(tmp_path / "ckpt", tmp_path / "universal", allow_untested_version=True)
