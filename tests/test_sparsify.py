"""TIES top-k (exact count, deterministic ties, sampled bracketing, per-tensor threshold over
pieces) and the two sign-consensus rules against hand-computed cases."""

import pytest
import torch

from onmerge_megatron.merging import consensus
from onmerge_megatron.merging.coords import ShardCoords
from onmerge_megatron.merging.sparsify import top_k_count, top_k_positions

from reference_impl import ties_consensus, top_k_mask


def identity(pos):
    return pos


def kept_mask(n, positions):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    return mask


@pytest.mark.parametrize("n,keep_rate", [(1000, 0.01), (1000, 0.0999), (777, 0.3), (100, 0.29), (50, 0.01), (1 << 20, 0.01)])
def test_top_k_keeps_exactly_floor_pn(n, keep_rate):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    positions = top_k_positions(x.abs(), top_k_count(n, keep_rate), identity)
    k = int(n * keep_rate)
    assert positions.numel() == (k if k >= 1 else n)
    assert torch.equal(kept_mask(n, positions), top_k_mask(x, keep_rate))


def test_ties_go_to_lower_global_index():
    # Adam's first step: every |update| equals lr.
    magnitude = torch.full((1000,), 1e-5)
    assert torch.equal(top_k_positions(magnitude, 10, identity), torch.arange(10))
    # Global indices that do not follow local order (a shard of a column block).
    coords = ShardCoords.block((10, 100), (10, 50), (0, 50))
    positions = top_k_positions(torch.full((500,), 2.0), 7, coords.global_index)
    assert sorted(coords.global_index(positions).tolist()) == [50 + i for i in range(50)][:7]


def test_partial_ties_at_the_threshold():
    magnitude = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.5, 3.0, 3.0, 4.0])
    # k = 4: 5 and 4 are above; two of the four 3s, the lowest indices (2, 3).
    assert top_k_positions(magnitude, 4, identity).tolist() == [0, 2, 3, 7]


def test_nothing_masked_when_k_below_one():
    assert top_k_positions(torch.rand(50), top_k_count(50, 0.01), identity).tolist() == list(range(50))


@pytest.mark.parametrize(
    "make",
    [
        lambda n: torch.arange(n, dtype=torch.float32),  # sorted: the strided sample sees a ramp
        lambda n: torch.arange(n, 0, -1, dtype=torch.float32),
        lambda n: (torch.arange(n) % 3).float(),  # massive ties at the threshold
        lambda n: torch.where(torch.arange(n) % 256 == 0, 0.0, 1.0),  # the sample sees only the small values
        lambda n: torch.randn(n, generator=torch.Generator().manual_seed(0)).abs() ** 8,
    ],
)
def test_sampled_bracketing_is_exact_on_adversarial_inputs(make):
    n = 1 << 19
    magnitude = make(n)
    positions = top_k_positions(magnitude, top_k_count(n, 0.01), identity)
    assert torch.equal(kept_mask(n, positions), top_k_mask(magnitude, 0.01))


# Hand-computed consensus cases: (u, r, alpha, unweighted result, weighted result).
CASES = [
    (2.0, 1.0, 0.5, 1.5, 1.5),  # agree: (1-a) u + a r either way
    (2.0, -1.0, 0.5, 1.0, 1.0),  # unweighted: 2 - 1 > 0 elects +, r dropped; weighted: |1| > |-0.5|
    (2.0, -3.0, 0.5, -1.5, -1.5),  # r wins either way
    (1.0, -3.0, 0.8, -2.4, -2.4),  # weighted: a = 0.2, b = -2.4 -> b
    (3.0, -1.0, 0.9, 0.3, -0.9),  # unweighted: + elected, keeps (1-a) u = 0.3; weighted: |b| = 0.9 > |a| = 0.3
    # The paper's regime: unweighted, an update against the SFT direction is cancelled; weighted
    # (Eq. 7), alpha * r = -1e-10 is far smaller than the update, which survives.
    (1e-6, -1e-3, 1e-7, -1e-10, 1e-6 * (1 - 1e-7)),
    (0.0, 2.0, 0.5, 1.0, 1.0),  # only r kept
    (-2.0, 0.0, 0.5, -1.0, -1.0),  # only u kept
    (1.0, -1.0, 0.5, 0.5, 0.0),  # exact tie: unweighted sum 0 elects +; weighted equal magnitudes sum to 0
]


@pytest.mark.parametrize("u,r,alpha,unweighted,weighted", CASES)
def test_sign_consensus_hand_cases(u, r, alpha, unweighted, weighted):
    u_t, r_t = torch.tensor([u], dtype=torch.float64), torch.tensor([r], dtype=torch.float64)
    assert consensus.sign_unweighted(u_t, r_t, alpha).item() == pytest.approx(unweighted, rel=1e-12, abs=1e-20)
    assert consensus.sign_weighted(u_t, r_t, alpha).item() == pytest.approx(weighted, rel=1e-12, abs=1e-20)


@pytest.mark.parametrize("weighted", [False, True])
def test_sign_consensus_matches_elementwise_transcription(weighted):
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(500, generator=gen) * (torch.rand(500, generator=gen) < 0.5)
    r = torch.randn(500, generator=gen) * (torch.rand(500, generator=gen) < 0.5)
    rule = consensus.sign_weighted if weighted else consensus.sign_unweighted
    assert torch.equal(rule(u, r, 0.3), ties_consensus(u, r, 0.3, weighted))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_alone_is_either_election_with_no_update(dtype):
    """Bit for bit, signed zeros included: -0, +0, values whose alpha r underflows, both signs."""
    tiny = torch.finfo(dtype).tiny
    gen = torch.Generator().manual_seed(4)
    r = torch.cat([torch.tensor([-0.0, 0.0, tiny, -tiny, tiny * 1e-3, -1.0, 1.0], dtype=dtype), torch.randn(500, generator=gen, dtype=dtype)])
    zero = torch.zeros_like(r)
    for alpha in (0.3, 1e-7, 1.0):
        alone = consensus.reference_alone(r, alpha)
        for rule in (consensus.sign_unweighted, consensus.sign_weighted):
            elected = rule(zero, r, alpha)
            assert torch.equal(alone, elected) and torch.equal(alone.signbit(), elected.signbit()), (rule.__name__, alpha)


def test_sign_conflicts_counts_opposing_kept_pairs():
    u = torch.tensor([1.0, -1.0, 0.0, 2.0])
    r = torch.tensor([-1.0, -2.0, 5.0, -0.5])
    assert consensus.sign_conflicts(u, r) == 2
