"""MarkovChain: exact entropies, the sampler's distribution, and determinism."""

from __future__ import annotations

import itertools
import math
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prime_scale.data.markov import DEFAULT_FLOOR, MarkovChain, load_markov_chain


@pytest.mark.parametrize("num_states,concentration,seed", [(2, 1.0, 0), (5, 0.3, 1), (64, 0.05, 2), (256, 0.05, 1234)])
def test_stationary_is_fixed_point(num_states: int, concentration: float, seed: int) -> None:
    chain = MarkovChain.from_seed(num_states, concentration, seed)
    pi = chain.stationary
    assert pi.shape == (num_states,)
    assert np.all(pi > 0)
    assert abs(pi.sum() - 1.0) < 1e-12
    assert np.max(np.abs(pi @ chain.transition - pi)) < 1e-12
    # Same answer as the left eigenvector of eigenvalue 1.
    vals, vecs = np.linalg.eig(chain.transition.T)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
    np.testing.assert_allclose(pi, v / v.sum(), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(num_states=st.integers(2, 40), concentration=st.floats(0.01, 5.0), seed=st.integers(0, 2**32 - 1))
def test_from_seed_rows_are_positive_distributions(num_states: int, concentration: float, seed: int) -> None:
    chain = MarkovChain.from_seed(num_states, concentration, seed)
    p = chain.transition
    assert p.dtype == np.float64 and p.shape == (num_states, num_states)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # The floor keeps every entry positive, so the chain is irreducible and pi is unique.
    assert p.min() >= DEFAULT_FLOOR / (1 + num_states * DEFAULT_FLOOR) * (1 - 1e-9)
    assert np.max(np.abs(chain.stationary @ p - chain.stationary)) < 1e-12


def test_floor_removes_exact_zeros() -> None:
    rng = np.random.default_rng(1234)
    raw = rng.dirichlet(np.full(256, 0.05), size=256)
    assert (raw == 0).any()  # the situation the floor exists for
    assert MarkovChain.from_seed(256, 0.05, 1234).transition.min() > 0


def test_two_state_chain_closed_form() -> None:
    a, b = 0.2, 0.7
    chain = MarkovChain(np.array([[1 - a, a], [b, 1 - b]]))
    np.testing.assert_allclose(chain.stationary, [b / (a + b), a / (a + b)], rtol=0, atol=1e-15)

    def h2(p: float) -> float:
        return -p * math.log(p) - (1 - p) * math.log(1 - p)

    rate = b / (a + b) * h2(a) + a / (a + b) * h2(b)
    assert chain.entropy_rate() == pytest.approx(rate, abs=1e-14)
    assert chain.stationary_entropy() == pytest.approx(h2(b / (a + b)), abs=1e-14)
    assert chain.sequence_entropy(10) == pytest.approx(h2(b / (a + b)) + 9 * rate, abs=1e-13)
    assert chain.sequence_entropy_per_token(10) == pytest.approx((h2(b / (a + b)) + 9 * rate) / 10, abs=1e-14)


def test_entropy_rate_matches_direct_sum() -> None:
    chain = MarkovChain.from_seed(16, 0.2, 7)
    p, pi = chain.transition, chain.stationary
    direct = 0.0
    for i in range(16):
        direct += pi[i] * -sum(p[i, j] * math.log(p[i, j]) for j in range(16))
    assert chain.entropy_rate() == pytest.approx(direct, rel=1e-12)
    assert chain.stationary_entropy() == pytest.approx(-sum(x * math.log(x) for x in pi), rel=1e-12)
    assert 0 < chain.entropy_rate() < math.log(16)


def test_sequence_entropy_by_enumeration() -> None:
    """Sum of -p log p over every length-4 sequence equals the closed form, and p sums to 1."""
    chain = MarkovChain.from_seed(3, 0.5, 3)
    seqs = np.array(list(itertools.product(range(3), repeat=4)))
    lp = chain.log_prob(seqs)
    p = np.exp(lp)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert -(p * lp).sum() == pytest.approx(chain.sequence_entropy(4), abs=1e-12)


def test_log_prob_by_hand() -> None:
    chain = MarkovChain.from_seed(4, 1.0, 11)
    seq = np.array([2, 0, 3, 3, 1])
    p, pi = chain.transition, chain.stationary
    expected = math.log(pi[2]) + math.log(p[2, 0]) + math.log(p[0, 3]) + math.log(p[3, 3]) + math.log(p[3, 1])
    assert chain.log_prob(seq) == pytest.approx(expected, abs=1e-13)
    batch = chain.log_prob(np.stack([seq, seq[::-1]]))
    assert batch.dtype == np.float64 and batch.shape == (2,)
    assert batch[0] == pytest.approx(expected, abs=1e-13)


def test_monte_carlo_nll_matches_entropy() -> None:
    chain = MarkovChain.from_seed(6, 0.5, 5)
    n = 12
    seqs = chain.sample(40000, n, np.random.default_rng(0))
    nll = -chain.log_prob(seqs) / n
    se = nll.std(ddof=1) / math.sqrt(len(nll))
    target = chain.sequence_entropy_per_token(n)
    assert abs(nll.mean() - target) < 4 * se, (nll.mean(), target, se)


def test_empirical_transitions_match_matrix() -> None:
    chain = MarkovChain.from_seed(5, 1.0, 9)
    seqs = chain.sample(400, 1000, np.random.default_rng(1))
    assert seqs.dtype == np.int64 and seqs.shape == (400, 1000)
    assert seqs.min() >= 0 and seqs.max() < 5
    counts = np.zeros((5, 5))
    np.add.at(counts, (seqs[:, :-1].ravel(), seqs[:, 1:].ravel()), 1)
    row_n = counts.sum(axis=1, keepdims=True)
    freq = counts / row_n
    p = chain.transition
    # Each frequency is a binomial proportion: allow 5 standard errors per entry (25 entries).
    tol = 5 * np.sqrt(p * (1 - p) / row_n) + 1e-12
    assert np.all(np.abs(freq - p) <= tol), np.max(np.abs(freq - p) / tol)
    # Pearson chi-square over the 5 rows (20 degrees of freedom): 99.9th percentile is ~45.3.
    expected = row_n * p
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45.3, chi2
    # First tokens are drawn from pi.
    first = np.bincount(seqs[:, 0], minlength=5) / 400
    assert np.all(np.abs(first - chain.stationary) <= 5 * np.sqrt(chain.stationary * (1 - chain.stationary) / 400))


def test_sampler_respects_near_deterministic_rows() -> None:
    """Rows with one dominant entry (the low-concentration regime) are followed almost surely."""
    p = np.full((3, 3), 1e-6)
    p[0, 1] = p[1, 2] = p[2, 0] = 1 - 2e-6
    chain = MarkovChain(p)
    seqs = chain.sample(200, 50, np.random.default_rng(2))
    follows = (seqs[:, 1:] == (seqs[:, :-1] + 1) % 3).mean()
    assert follows > 0.999


def test_sampling_is_deterministic() -> None:
    a = MarkovChain.from_seed(32, 0.1, 42)
    b = MarkovChain.from_seed(32, 0.1, 42)
    np.testing.assert_array_equal(a.transition, b.transition)
    s1 = a.sample(64, 33, np.random.default_rng(123))
    s2 = b.sample(64, 33, 123)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, a.sample(64, 33, 124))
    assert not np.array_equal(a.transition, MarkovChain.from_seed(32, 0.1, 43).transition)


def test_sample_edge_shapes() -> None:
    chain = MarkovChain.from_seed(4, 1.0, 0)
    assert chain.sample(0, 5, 0).shape == (0, 5)
    one = chain.sample(3, 1, 0)
    assert one.shape == (3, 1)
    assert chain.log_prob(one).shape == (3,)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_states"):
        MarkovChain.from_seed(1, 1.0, 0)
    with pytest.raises(ValueError, match="concentration"):
        MarkovChain.from_seed(4, 0.0, 0)
    with pytest.raises(ValueError, match="concentration"):
        MarkovChain.from_seed(4, -1.0, 0)
    chain = MarkovChain.from_seed(4, 1.0, 0)
    with pytest.raises(ValueError, match="seq_len"):
        chain.sample(2, 0, 0)
    with pytest.raises(ValueError, match="length"):
        chain.sequence_entropy(0)
    with pytest.raises(ValueError, match="tokens"):
        chain.log_prob(np.array([[0, 4]]))
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovChain(np.array([[0.5, 0.4], [0.5, 0.5]]))


@pytest.mark.parametrize("as_file", [False, True])
def test_save_and_load_round_trip(tmp_path, as_file: bool) -> None:
    chain = MarkovChain.from_seed(8, 0.3, 4)
    for root in (str(tmp_path), f"memory://markov-{uuid.uuid4().hex}"):
        chain.save(f"{root}/chain.npy")
        loaded = load_markov_chain(f"{root}/chain.npy" if as_file else root)
        np.testing.assert_array_equal(loaded.transition, chain.transition)
        np.testing.assert_array_equal(loaded.stationary, chain.stationary)
