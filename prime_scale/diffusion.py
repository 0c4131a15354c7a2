"""The MDM-Prime objective: carry-over, the continuous-time NELBO over sub-tokens, reported per *token*.

Notation: a sequence of N tokens becomes n = N*l sub-tokens y0. Each sub-token is masked independently with
probability m(t) = 1 - alpha(t). The denoiser sees y_t and returns logits over the C token values of every
position. Its distribution over a position's token, restricted to the values that agree with the observed digits
(carry-over), induces a marginal over each masked digit. The continuous-time NELBO (MD4/MDLM, at sub-token level) is

    NELBO(y0) = E_{t ~ U(0,1]} [ w(t) * sum_{masked j} -log p(y0_j | y_t) ],   w(t) = -alpha'(t) / (1 - alpha(t)).

It is a bound on -log p(x0) of the *tokens* (the codec is a bijection onto valid codes), so it is divided by the
number of tokens N, never by the number of sub-tokens.

Two unbiased estimators of the same number:
- ``continuous``: draw t (antithetic/stratified over the batch) and the Bernoulli masks; what we train on.
- ``count``: draw the number k of masked sub-tokens uniformly in 1..n and a uniform k-subset; the estimate is
  n/k * sum_{masked} CE. Integrating w(t) against Binomial(n, m) gives exactly this (the any-order
  autoregressive form), and its variance is bounded, whereas the continuous one has a log-divergent second
  moment near t = 0. Used for evaluation. The masking rate fed to a time-conditioned model is the k-th smallest
  of n uniforms (Beta(k, n-k+1)), which is the conditional law of m given k.

GenMD4 (``GenMD4Schedule``: sub-token j with clean value v is masked with probability t ** w[j, v]) changes the
integrand to MD4's state-dependent form. With mu = the model's marginal of a masked digit,

    NELBO(y0) = E_t E_{y_t | y0} [ (1/t) sum_{masked j} ( w[j, y0_j] (-log mu_j(y0_j) - 1) + sum_v w[j, v] mu_j(v) ) ],

which is the formula above when all w are equal. The exponents get two gradients: the direct one, and the one
through the (discrete) choice of which digits are masked, estimated by REINFORCE with a leave-one-out baseline over
the batch (MD4's estimator). The second enters as a term of value zero, so the reported loss is the NELBO.
Only the continuous estimator applies: the count estimator assumes one masking rate for every sub-token. The
network is conditioned on t itself (there is no single masking rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from prime_scale.codec import SubtokenCodec
from prime_scale.schedules import GenMD4Schedule, Schedule

# Log-probability given to excluded codes. Finite (not -inf) so that logsumexp's backward never meets -inf - -inf.
EXCLUDED = -1e9

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy digits (B,N,l), mask rate (B,)) -> logits (B,N,C)


def carry_over_log_probs(
    logits: torch.Tensor, noisy_digits: torch.Tensor, codec: SubtokenCodec, carry_over: bool = True
) -> torch.Tensor:
    """Logits over C token values -> normalised log-probs over all b**l codes, shaped (B, N, b, ..., b): the joint
    the sampler draws from and GenMD4's loss reads. (Training MDM/Prime needs only ``subtoken_cross_entropy``.)

    Invalid codes (>= C) always get EXCLUDED. With carry_over, so does every code that disagrees with an
    observed digit of its position. The restriction is added per digit axis as a broadcast (b,) penalty, so no
    (B, N, b**l) boolean mask is ever built.
    """
    b, l = codec.base, codec.num_subtokens
    lead = logits.shape[:-1]
    x = logits.float()
    pad = codec.num_codes - codec.vocab_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=EXCLUDED)
    x = x.reshape(*lead, *([b] * l))
    if carry_over:
        values = torch.arange(b, device=logits.device)
        for j in range(l):
            d = noisy_digits[..., j]
            conflict = (d != codec.mask_id).unsqueeze(-1) & (values != d.unsqueeze(-1))  # (..., b)
            shape = list(lead) + [1] * l
            shape[len(lead) + j] = b
            x = x + (conflict.to(x.dtype) * EXCLUDED).reshape(shape)
    flat = x.reshape(*lead, codec.num_codes)
    return torch.log_softmax(flat, dim=-1).reshape(x.shape)


def digit_log_marginals(joint_log_probs: torch.Tensor, num_subtokens: int) -> torch.Tensor:
    """(B, N, b, ..., b) joint log-probs -> (B, N, l, b): log p(digit j = v | y_t) for every j and v."""
    l = num_subtokens
    lead = joint_log_probs.dim() - l
    marginals = []
    for j in range(l):
        others = [lead + i for i in range(l) if i != j]
        marginals.append(torch.logsumexp(joint_log_probs, dim=others) if others else joint_log_probs)
    return torch.stack(marginals, dim=-2)


def _set_index(rows: torch.Tensor, digits: torch.Tensor, subset: int, l: int) -> tuple:
    """Index of the codes that agree with ``digits`` (R, l) on the digit subset (bit i = digit i), into the rows
    ``rows`` of (P, b, ..., b) log-probs: the fixed digits by value, the free ones as whole axes."""
    return (rows, *(digits[:, i] if subset >> i & 1 else slice(None) for i in range(l)))


def _rows_per_chunk(rows: int, codes: int, device: torch.device) -> int:
    # CPU: chunks of ~4 M floats stay in cache, and full-size temporaries (each a fresh mmap on glibc, i.e.
    # page faults on first touch) are never made. GPU: one chunk, the caching allocator has no such cost.
    return rows if device.type != "cpu" else max(1, min(rows, (1 << 22) // codes))


def _rows_needing(observed: torch.Tensor, subset: int, compact: bool) -> torch.Tensor:
    """The rows whose cross-entropies read L(subset): those with observed set O such that subset = O, or O plus
    one digit. ``compact=False``: every row (static shapes, no host sync)."""
    if not compact:
        return torch.arange(len(observed), device=observed.device)
    size = bin(subset).count("1")
    popcount = torch.tensor([bin(k).count("1") for k in range(subset + 1)], device=observed.device)
    inside = (observed & ~subset) == 0
    need = inside & (popcount[observed.clamp_max(subset)] >= size - 1)  # clamp: rows outside are dropped anyway
    return need.nonzero().squeeze(1)


class _SubsetLogSumExp(torch.autograd.Function):
    """Logits (P, C), clean digits (P, l), observed digit sets (P,) -> (P, 2**l): for digit subsets K, the log of
    the probability (under the log-softmax over the C valid codes) of the codes that agree with the clean digits
    on K. Entry 0 (all codes) is 0; with ``compact`` only the entries the rows' cross-entropies read are filled
    (the others stay 0 and get no gradient).

    The log-softmax is written row chunk by row chunk into a (P, b**l) buffer padded with -inf for the invalid
    codes; the sets are then read through its (P, b, ..., b) view. The backward writes -p * (sum of incoming
    gradients) chunk by chunk, then adds each set's softmax times its gradient. A set holds b**(l-|K|) codes;
    beyond one log-softmax and its backward (what MDM's cross-entropy costs) the work is at most
    (b+1)**l - b**l values per position, and with ``compact`` only the l + 1 sets a position reads, at most
    l * b**(l-1) values and far fewer once digits are observed. No full-size temporary, penalty or (P, C)
    boolean mask is made."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, digits: torch.Tensor, observed: torch.Tensor, base: int,
                compact: bool) -> torch.Tensor:
        (P, C), l = logits.shape, digits.shape[1]
        log_probs = torch.empty(P, base**l, dtype=torch.float32, device=logits.device)
        step = _rows_per_chunk(P, base**l, logits.device)
        for r0 in range(0, P, step):
            chunk = log_probs[r0:r0 + step]
            chunk[:, :C] = torch.log_softmax(logits[r0:r0 + step].float(), dim=-1)
            chunk[:, C:] = float("-inf")  # invalid codes; never alone in a set, which always holds the clean code
        grid, out = log_probs.view(P, *[base] * l), log_probs.new_zeros(P, 2**l)
        for subset in range(1, 2**l):
            rows = _rows_needing(observed, subset, compact)
            if not len(rows):
                continue
            values = grid[_set_index(rows, digits[rows], subset, l)].reshape(len(rows), -1)
            out[rows, subset] = torch.logsumexp(values, 1)
        ctx.save_for_backward(log_probs, digits, observed, out)
        ctx.base, ctx.vocab, ctx.dtype, ctx.compact = base, C, logits.dtype, compact
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        log_probs, digits, observed, out = ctx.saved_tensors
        P, l, base = log_probs.shape[0], digits.shape[1], ctx.base
        grad = torch.empty_like(log_probs)
        total = grad_out[:, 1:].sum(1, keepdim=True)  # each set's softmax sums to 1 (entry 0 is constant)
        step = _rows_per_chunk(P, base**l, log_probs.device)
        for r0 in range(0, P, step):  # the log-softmax's part: -p * sum of gradients
            torch.exp(log_probs[r0:r0 + step], out=grad[r0:r0 + step]).mul_(-total[r0:r0 + step])
        grid, g_grid = log_probs.view(P, *[base] * l), grad.view(P, *[base] * l)
        for subset in range(1, 2**l):
            rows = _rows_needing(observed, subset, ctx.compact)
            if not len(rows):
                continue
            index = _set_index(rows, digits[rows], subset, l)
            values = grid[index]
            shape = (len(rows),) + (1,) * (values.dim() - 1)
            # d logsumexp / d x = softmax over the set; each row's set is distinct, so += never collides
            g_grid[index] += grad_out[rows, subset].view(shape) * torch.exp(values - out[rows, subset].view(shape))
        return grad[:, :ctx.vocab].to(ctx.dtype), None, None, None, None


def subtoken_cross_entropy(
    logits: torch.Tensor, noisy_digits: torch.Tensor, clean_digits: torch.Tensor, codec: SubtokenCodec,
    carry_over: bool = True, compact: Optional[bool] = None,
) -> torch.Tensor:
    """-log p(y0_j | y_t) for every sub-token, (B, N, l); the caller keeps the masked ones.

    The same numbers as the marginals of ``carry_over_log_probs`` (tested against it), without its cost: with
    O the observed digits of a position and L(K) = log of the probability, under the unrestricted softmax over
    the C valid codes, of the codes that agree with y0 on the digits K,

        -log p(y0_j | y_t) = L(O) - L(O + {j})        (carry-over: p restricted to the codes that agree on O)

    so one log-softmax (as MDM's cross-entropy) plus log-sum-exps over sets of b**(l-|K|) codes suffice; no
    (B, N, b**l) penalty or joint is formed. Observed digits get 0 under carry-over (their marginal is 1); without
    carry-over O is empty for every position and every digit gets its cross-entropy.

    ``compact`` (default: on CPU) computes each L(K) only for the positions that read it; finding them costs a
    host sync per set, cheap on CPU, where the gathers are what costs. On a GPU (default off) every position gets
    every set: static shapes, no sync, and gathers are cheap there.
    """
    l = codec.num_subtokens
    lead = logits.shape[:-1]
    bits = 1 << torch.arange(l, device=logits.device)
    observed = noisy_digits.reshape(-1, l) != codec.mask_id
    if not carry_over:
        observed = torch.zeros_like(observed)
    given = (observed.long() * bits).sum(-1)  # (P,) subset id of O
    compact = logits.device.type == "cpu" if compact is None else compact
    set_lse = _SubsetLogSumExp.apply(logits.reshape(-1, codec.vocab_size), clean_digits.reshape(-1, l).long(),
                                     given, codec.base, compact)  # (P, 2**l)
    ce = set_lse.gather(1, given[:, None]) - set_lse.gather(1, given[:, None] | bits)
    return torch.where(observed, torch.zeros_like(ce), ce).reshape(*lead, l)


def stratified_uniform(batch: int, generator: torch.Generator, device, antithetic: bool) -> torch.Tensor:
    """Uniforms in [0, 1): one shared offset spread evenly over the batch (MD4's antithetic sampling), or i.i.d."""
    if antithetic:
        u0 = torch.rand((), generator=generator, device=device)
        return torch.remainder(u0 + torch.arange(batch, device=device) / batch, 1.0)
    return torch.rand(batch, generator=generator, device=device)


@dataclass
class NelboEstimate:
    per_sequence: torch.Tensor  # (B,) NELBO estimate of each sequence, nats
    tokens: torch.Tensor  # (B,) tokens counted in each sequence

    @property
    def per_token(self) -> torch.Tensor:
        """The training loss: total nats / total tokens."""
        return self.per_sequence.sum() / self.tokens.sum()


def nelbo(
    denoiser: Denoiser,
    tokens: torch.Tensor,
    codec: SubtokenCodec,
    schedule: Schedule,
    generator: torch.Generator,
    estimator: str = "continuous",
    antithetic: bool = True,
    token_mask: Optional[torch.Tensor] = None,
    carry_over: bool = True,
) -> NelboEstimate:
    """One Monte Carlo estimate of the NELBO of each sequence in ``tokens`` (B, N); see the module docstring.

    ``token_mask`` (B, N) marks real tokens (padding is never masked, never scored, never counted).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
    B, N = tokens.shape
    if N < 1:
        raise ValueError("sequences must hold at least one token")
    device = tokens.device
    l = codec.num_subtokens
    clean = codec.encode(tokens)  # (B, N, l)
    valid = torch.ones(B, N, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
    valid_sub = valid.unsqueeze(-1).expand(B, N, l)
    n = valid_sub.sum(dim=(1, 2))  # sub-tokens per sequence
    if token_mask is not None and bool((n == 0).any()):  # (only padding can empty a sequence: no sync otherwise)
        raise ValueError("a sequence has no real tokens to score (empty or fully padded)")
    keys = torch.rand(B, N, l, generator=generator, device=device)
    keys = torch.where(valid_sub, keys, torch.full_like(keys, 2.0))  # padding sorts last and is never masked
    u = stratified_uniform(B, generator, device, antithetic)

    if isinstance(schedule, GenMD4Schedule):
        if estimator != "continuous":
            raise ValueError("the genmd4 schedule masks each sub-token at a rate of its own: only the 'continuous' "
                             "estimator applies (diffusion.eval_estimator=continuous)")
        return _genmd4_nelbo(denoiser, clean, keys, 1.0 - u, valid, valid_sub, codec, schedule, carry_over)
    if estimator == "continuous":
        t = 1.0 - u  # in (0, 1]: the weight 1/(1 - alpha) is finite
        mask_rate = schedule.mask_prob(t)
        masked = keys < mask_rate.view(B, 1, 1)
        weight = schedule.weight(t)
    elif estimator == "count":
        k = torch.minimum((u * n).long() + 1, n)  # uniform on 1..n
        kth = keys.view(B, -1).sort(dim=1).values.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
        masked = keys <= kth.view(B, 1, 1)
        mask_rate = kth
        weight = n / k
    else:
        raise ValueError(f"unknown NELBO estimator {estimator!r}; choose 'continuous' or 'count'")

    noisy = torch.where(masked, torch.full_like(clean, codec.mask_id), clean)
    logits = denoiser(noisy, mask_rate)
    ce = subtoken_cross_entropy(logits, noisy, clean, codec, carry_over)
    masked_ce = torch.where(masked, ce, torch.zeros_like(ce)).sum(dim=(1, 2))
    return NelboEstimate(per_sequence=weight.to(masked_ce.dtype) * masked_ce, tokens=valid.sum(dim=1))


def _genmd4_nelbo(denoiser: Denoiser, clean: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, valid: torch.Tensor,
                  valid_sub: torch.Tensor, codec: SubtokenCodec, schedule: GenMD4Schedule,
                  carry_over: bool) -> NelboEstimate:
    """GenMD4's NELBO (module docstring) for clean digits (B, N, l) at times t (B,) in (0, 1]."""
    B = clean.shape[0]
    log_t = t.log().view(B, 1, 1)
    powers = schedule()  # (l, b)
    w = schedule.digit_powers(powers, clean)  # (B, N, l) exponent of each clean digit
    masked = valid_sub & (keys < torch.exp(w.detach() * log_t))
    noisy = torch.where(masked, torch.full_like(clean, codec.mask_id), clean)
    logits = denoiser(noisy, t)
    marginals = digit_log_marginals(carry_over_log_probs(logits, noisy, codec, carry_over), codec.num_subtokens)
    ce = -marginals.gather(-1, clean.unsqueeze(-1)).squeeze(-1)
    expected_w = (marginals.exp() * powers).sum(-1)  # sum_v w[j, v] mu_j(v)
    integrand = (w * (ce - 1.0) + expected_w) / t.view(B, 1, 1)
    value = torch.where(masked, integrand, torch.zeros_like(integrand)).sum(dim=(1, 2))
    # REINFORCE for the masking choice: log q(mask | y0, t) = sum of w log t (masked) or log(1 - t**w) (not)
    wlog = w * log_t
    log_unmasked = torch.log(-torch.expm1(wlog.clamp_max(-1e-7)))  # t = 1 masks everything: never selected then
    log_q = torch.where(masked, wlog, torch.where(valid_sub, log_unmasked, torch.zeros_like(wlog))).sum(dim=(1, 2))
    f = value.detach()
    baseline = (f.sum() - f) / (B - 1) if B > 1 else torch.zeros_like(f)
    score = (f - baseline) * log_q
    return NelboEstimate(per_sequence=value + (score - score.detach()), tokens=valid.sum(dim=1))
