"""Coordinates, refusals and the CPU layer's version gate (real megatron-core, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mcore_harness as h
import mcore_jobs as jobs


def test_coords_place_every_tp2_element_where_megatron_loads_it(megatron_workdir: Path) -> None:
    """At TP=2 the adapter's global index of every local element (fused GQA QKV, gated fc1 as two
    blocks, row/column splits, replicated norms and biases) points at the element of the TP=1
    checkpoint that megatron's own loader put there, and the TP ranks tile each tensor."""
    tmp_path = megatron_workdir
    h.spawn(jobs.coords_dump, 2, tmp_path, tp=2)
    full = h.plain_tensors(tmp_path / "init")
    ranks = [torch.load(tmp_path / f"coords_tp2_pp1_rank{r}.pt") for r in range(2)]
    split = 0
    for name in ranks[0]:
        key, shape, _, _ = ranks[0][name]
        checkpoint_key, _, layer = key.rstrip("]").partition("[")
        tensor = full[checkpoint_key][int(layer)] if layer else full[checkpoint_key]
        assert tuple(tensor.shape) == tuple(shape), name
        flat = tensor.reshape(-1)
        seen = []
        for rank_dump in ranks:
            _, _, index, values = rank_dump[name]
            assert torch.equal(flat[index], values), f"{name}: coordinates do not match the checkpoint's layout"
            seen.append(index)
        if torch.equal(seen[0], seen[1]):  # replicated over TP
            assert torch.equal(torch.sort(seen[0]).values, torch.arange(flat.numel()))
        else:
            split += 1
            assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(flat.numel())), f"{name}: TP pieces do not tile the tensor"
    assert split >= 6, "expected QKV, proj, fc1, fc2, embedding and output to be TP-split"


def test_refusals_name_the_setting(tmp_path: Path) -> None:
    h.spawn(jobs.refusals, 2, tmp_path)
    messages = torch.load(tmp_path / "refusals.pt")
    expected = {
        "precision_aware": "use_precision_aware_optimizer",
        "optimizer_cuda_graph": "optimizer_cuda_graph",
        "cpu_offload": "optimizer_cpu_offload",
        "sgd": "optimizer='sgd'",
        "coupled_weight_decay": "decoupled_weight_decay=False",
        "twice": "already called",
        "no_reference": "reference_delta_source",
        "resume_without_state": "no checkpoint with online-merge state was loaded",
    }
    for label, needle in expected.items():
        assert messages[label] is not None, f"{label} was accepted"
        assert needle in messages[label], f"{label}: {messages[label]}"
    assert messages["accepted"] is None


def test_untested_megatron_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core import package_info

    from onmerge_megatron.megatron import compat

    assert compat.check_megatron_version() == package_info.__version__
    monkeypatch.setattr(package_info, "__version__", "0.13.0")
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(compat.MegatronVersionError, match=r"tested on \['0\.16\.1'\], but megatron-core 0\.13\.0"):
        compat.check_megatron_version()
    assert compat.check_megatron_version(allow_untested=True) == "0.13.0"
    # The install checks the version before it looks at the optimizer.
    from onmerge_megatron import OnlineMergeConfig
    from onmerge_megatron.megatron import install_online_merging

    with pytest.raises(compat.MegatronVersionError, match=r"but megatron-core 0\.13\.0 is installed"):
        install_online_merging(object(), [], OnlineMergeConfig(method="dare", alpha=0.0))


def test_hf_base_through_mbridge_matches_mbridge_load_weights(tmp_path: Path) -> None:
    pytest.importorskip("mbridge")
    jobs.make_hf_checkpoints(str(tmp_path))
    h.spawn(jobs.hf_reference_delta, 2, tmp_path, tp=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"hf_rank{rank}.pt")
        assert result["count"] >= 10
        assert result["worst"] == 0.0, f"rank {rank}: streamed delta differs by {result['worst']}"
        done, total = result["progress"][-1]
        assert done == total == len(result["progress"]), "progress was not reported tensor by tensor"
