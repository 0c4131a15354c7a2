"""A synthetic first-order Markov-chain source whose entropy is known exactly.

Training on it gives a ground truth for the likelihood bounds: a perfect model's negative
log-likelihood per token equals ``sequence_entropy_per_token(seq_len)``, so the gap between a
model's bound and this number is measurable rather than guessed.
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import numpy as np

from prime_scale.storage import atomic_write_bytes

# Probability mass mixed uniformly into every transition row.  Dirichlet draws with a small
# concentration underflow to exact zeros (21 of 65536 entries for C=256, alpha=0.05), which can make
# the chain reducible (the stationary distribution is then not unique) and gives log(0) = -inf
# likelihoods.  A floor keeps every entry positive -- irreducible and aperiodic, so pi is unique --
# while changing the entropy rate by a negligible amount.
DEFAULT_FLOOR = 1e-6

CHAIN_FILENAME = "chain.npy"

RngLike = np.random.Generator | int | None


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` with the convention 0 log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(np.where(p > 0, p * np.log(safe), 0.0), axis=axis)


class MarkovChain:
    """A stationary first-order Markov chain over ``num_states`` token values."""

    def __init__(self, transition: np.ndarray) -> None:
        transition = np.asarray(transition, dtype=np.float64)
        if transition.ndim != 2 or transition.shape[0] != transition.shape[1]:
            raise ValueError(f"transition must be a square matrix, got shape {transition.shape}")
        if transition.shape[0] < 2:
            raise ValueError(f"num_states must be >= 2, got {transition.shape[0]}")
        if not np.all(np.isfinite(transition)) or np.any(transition < 0):
            raise ValueError("transition entries must be finite and non-negative")
        if not np.allclose(transition.sum(axis=1), 1.0, rtol=0, atol=1e-9):
            raise ValueError("every transition row must sum to 1")
        self.transition = transition
        self.stationary = self._solve_stationary(transition)
        # Inverse-CDF tables; the last column is pinned to 1 so round-off never lets u fall off the end.
        self._cdf = np.cumsum(transition, axis=1)
        self._cdf[:, -1] = 1.0
        self._pi_cdf = np.cumsum(self.stationary)
        self._pi_cdf[-1] = 1.0

    @classmethod
    def from_seed(
        cls, num_states: int, concentration: float, seed: int, floor: float = DEFAULT_FLOOR
    ) -> MarkovChain:
        """Rows ~ symmetric Dirichlet(concentration), plus a uniform ``floor`` (see DEFAULT_FLOOR)."""
        if num_states < 2:
            raise ValueError(f"num_states must be >= 2, got {num_states}")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        if floor < 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        rng = np.random.default_rng(seed)
        rows = rng.dirichlet(np.full(num_states, float(concentration)), size=num_states)
        rows = rows + floor
        rows /= rows.sum(axis=1, keepdims=True)
        return cls(rows)

    @staticmethod
    def _solve_stationary(transition: np.ndarray) -> np.ndarray:
        """Solve pi (P - I) = 0 with sum(pi) = 1 (one balance equation replaced by normalisation)."""
        c = transition.shape[0]
        a = transition.T - np.eye(c)
        a[-1, :] = 1.0
        b = np.zeros(c)
        b[-1] = 1.0
        try:
            pi = np.linalg.solve(a, b)
        except np.linalg.LinAlgError as exc:
            raise ValueError("chain has no unique stationary distribution (reducible)") from exc
        pi = np.clip(pi, 0.0, None)
        pi /= pi.sum()
        # A few power steps polish the solver's round-off; a no-op on an exact fixed point.
        for _ in range(3):
            pi = pi @ transition
            pi /= pi.sum()
        residual = np.max(np.abs(pi @ transition - pi))
        if not residual < 1e-10:
            raise ValueError(f"stationary distribution did not converge (residual {residual:.3g})")
        return pi

    @property
    def num_states(self) -> int:
        return self.transition.shape[0]

    def stationary_entropy(self) -> float:
        """H(pi) in nats: the entropy of the first token."""
        return float(_entropy(self.stationary))

    def entropy_rate(self) -> float:
        """sum_i pi_i H(P_i) in nats: the entropy of each token after the first."""
        return float(self.stationary @ _entropy(self.transition, axis=1))

    def sequence_entropy(self, n: int) -> float:
        """Exact entropy (nats) of a length-n sequence started from pi."""
        if n < 1:
            raise ValueError(f"sequence length must be >= 1, got {n}")
        return self.stationary_entropy() + (n - 1) * self.entropy_rate()

    def sequence_entropy_per_token(self, n: int) -> float:
        """The best achievable NLL per token on length-n sequences (nats)."""
        return self.sequence_entropy(n) / n

    @staticmethod
    def _inverse_cdf(cdf_rows: np.ndarray, state: np.ndarray | None, u: np.ndarray) -> np.ndarray:
        """Smallest j with cdf[state, j] > u, by a binary search vectorised over the batch.

        Exact (no offset tricks that cost float precision) and O(batch * log C) per step.
        """
        n = u.shape[0]
        lo = np.zeros(n, dtype=np.int64)
        hi = np.full(n, cdf_rows.shape[-1] - 1, dtype=np.int64)
        for _ in range(int(np.ceil(np.log2(cdf_rows.shape[-1]))) + 1):
            mid = (lo + hi) // 2
            values = cdf_rows[mid] if state is None else cdf_rows[state, mid]
            right = values <= u
            lo = np.where(right, mid + 1, lo)
            hi = np.where(right, hi, mid)
        return lo

    def sample(self, num_sequences: int, seq_len: int, rng: RngLike = None) -> np.ndarray:
        """Draw (num_sequences, seq_len) int64 tokens; first token from pi, then the chain."""
        if num_sequences < 0:
            raise ValueError(f"num_sequences must be >= 0, got {num_sequences}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        rng = np.random.default_rng(rng)
        out = np.empty((num_sequences, seq_len), dtype=np.int64)
        if num_sequences == 0:
            return out
        u = rng.random((seq_len, num_sequences))
        out[:, 0] = self._inverse_cdf(self._pi_cdf, None, u[0])
        for t in range(1, seq_len):
            out[:, t] = self._inverse_cdf(self._cdf, out[:, t - 1], u[t])
        return out

    def log_prob(self, seqs: np.ndarray) -> np.ndarray:
        """Exact log-likelihood (nats, float64) of each sequence; a 1-D input is one sequence."""
        seqs = np.asarray(seqs)
        single = seqs.ndim == 1
        seqs = np.atleast_2d(seqs)
        if seqs.ndim != 2 or seqs.shape[1] < 1:
            raise ValueError(f"expected (num_sequences, seq_len>=1) tokens, got shape {seqs.shape}")
        if not np.issubdtype(seqs.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got {seqs.dtype}")
        if seqs.size and (seqs.min() < 0 or seqs.max() >= self.num_states):
            raise ValueError(f"tokens must lie in [0, {self.num_states})")
        with np.errstate(divide="ignore"):
            log_pi = np.log(self.stationary)
            log_p = np.log(self.transition)
        lp = log_pi[seqs[:, 0]] + log_p[seqs[:, :-1], seqs[:, 1:]].sum(axis=1)
        return lp[0] if single else lp

    def save(self, url: str) -> None:
        """Write the transition matrix as .npy through fsspec (temp name, then move into place; durable on a local
        disk: ``storage.atomic_write_bytes``)."""
        fs, path = fsspec.core.url_to_fs(url)
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, self.transition)
        atomic_write_bytes(fs, path, buf.getvalue())


def load_markov_chain(url: str) -> MarkovChain:
    """Load a chain from a data directory holding ``chain.npy`` (or from the .npy file itself)."""
    if not url.endswith(".npy"):
        url = url.rstrip("/") + "/" + CHAIN_FILENAME
    with fsspec.open(url, "rb") as f:
        transition = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return MarkovChain(transition)
