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

The withdrawn objective (``diffusion.loss=token_joint``, ``token_joint_cross_entropy``): the MDM-Prime reference
code scores each position with w(t) * -log p(all its masked digits jointly | y_t), i.e. the carry-over probability
of the clean code. Its minimiser is also the true posterior, so it can train a model, but it is not a bound: the
NELBO above is the bound on the sequence of l*N independently masked sub-tokens, and replacing the sum of a
position's digit marginals by their joint drops the dependence between digits masked at the same time (for l = 2,
at the exact posterior of an i.i.d. source, its mean is H - I(d1; d2) / 2 per token; docs/method.md). It is
computed from the same log-sum-exps as the marginals and reported only under names that say it is not a bound.

GenMD4 (``GenMD4Schedule``: sub-token j with clean value v is masked with probability t ** w[j, v]) changes the
integrand to MD4's state-dependent form. With mu = the model's marginal of a masked digit,

    NELBO(y0) = E_t E_{y_t | y0} [ (1/t) sum_{masked j} ( w[j, y0_j] (-log mu_j(y0_j) - 1) + sum_v w[j, v] mu_j(v) ) ],

which is the formula above when all w are equal. The exponents get two gradients: the direct one, and the one
through the (discrete) choice of which digits are masked, estimated by REINFORCE whose baseline for a sequence is
the mean value of the *other sequences of the batch* (leave-one-out over the batch, one draw per sequence). That
is not MD4's estimator, which draws two masked copies of each sequence and uses each as the other's baseline (a
baseline for the same data, at twice the forward passes); ours is unbiased too (the masks are independent given
the times) but its baseline also carries the other sequences' data. The REINFORCE part enters as a term of value
zero, so the reported loss is the NELBO. Only the continuous estimator applies: the count estimator assumes one
masking rate for every sub-token. The network is conditioned on t itself (there is no single masking rate; a
time-conditioned network, ``model.time_conditioning``, is what can represent the exact posterior, which depends
on t because which digits are still masked at t says something about their values).

Evaluating GenMD4 (``time_power``): a digit with exponent w is masked with probability t ** w and then weighs
~ 1/t, so the continuous estimator's second moment near t = 0 is ~ the integral of t ** (w - 2): infinite for
w <= 1 (GenMD4 starts at w = 1), and a single evaluation's mean and standard error mean little. Evaluation draws
t = u ** p instead (u as above) and weights each draw by dt/du = p u ** (p - 1) (the integrand's 1/t becomes
p/u): the same NELBO in expectation, with a second moment ~ the integral of u ** (p w - 2), finite for p > 1/w.
``schedules.robust_time_power`` takes p = max(1, 2 / smallest exponent); ``evaluate_nelbo`` records both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from prime_scale.codec import SubtokenCodec
from prime_scale.config_schema import EngineConfig
from prime_scale.schedules import GenMD4Schedule, Schedule

# Log-probability given to excluded codes. Finite (not -inf) so that logsumexp's backward never meets -inf - -inf.
EXCLUDED = -1e9

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy digits (B,N,l), mask rate (B,)) -> logits (B,N,C)


def carry_over_log_probs(
    logits: torch.Tensor, noisy_digits: torch.Tensor, codec: SubtokenCodec, carry_over: bool = True
) -> torch.Tensor:
    """Logits over C token values -> normalised log-probs over all b**l codes, shaped (B, N, b, ..., b): the joint
    the sampler draws from (a chunk of positions at a time) and GenMD4's loss reads (in row chunks:
    ``chunked_digit_log_marginals``). (Training MDM/Prime needs only ``subtoken_cross_entropy``.)

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
    ``rows`` of (R, b, ..., b) log-probs: the fixed digits by value, the free ones as whole axes."""
    return (rows, *(digits[:, i] if subset >> i & 1 else slice(None) for i in range(l)))


# Row chunks. On CPU a chunk's temporaries stay within 64 MB, so each buffer stays below glibc's largest mmap
# threshold (32 MB) and is reused from the heap: full-size temporaries are each a fresh mmap, i.e. page faults on
# first touch (measured: 64 MB chunks as fast as the old full-buffer head, 256 MB and whole-budget ones slower).
# Elsewhere the budget alone decides.
CPU_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_MB = EngineConfig.loss_chunk_mb


def rows_per_chunk(rows: int, bytes_per_row: int, budget_mb: float, device: torch.device | str) -> int:
    """How many rows a chunk holds so that its temporaries (``bytes_per_row`` each) stay within ``budget_mb``
    (and, on CPU, within CPU_CHUNK_BYTES); at least 1. The loss head and the sampler's draws share this rule."""
    budget = budget_mb * (1 << 20)
    if torch.device(device).type == "cpu":
        budget = min(budget, CPU_CHUNK_BYTES)
    return max(1, min(rows, int(budget // bytes_per_row)))


def loss_head_row_bytes(vocab_size: int, base: int, num_subtokens: int, compact: bool = False) -> int:
    """Bytes of float32 temporaries per row of a loss-head chunk (``_SubsetLogSumExp``): the padded (b**l) buffer
    of log-probs, the log-sum-exp's (C) temporary, a float32 copy of bf16 logits (C), and the sets' gathers and
    softmaxes (every set of a row: (b+1)**l - b**l values; ``compact`` gathers only a row's own l + 1 sets, at
    most l * b**(l-1)). Sized for the worst of forward and backward; ``memory.py`` predicts with it."""
    b, l = base, num_subtokens
    sets = l * b ** (l - 1) if compact else (b + 1) ** l - b**l
    return 4 * (b**l + 2 * vocab_size + 2 * sets)


def _rows_needing(observed: torch.Tensor, subset: int, l: int, marginals: bool = True,
                  joint: bool = False) -> torch.Tensor:
    """The rows that read L(subset) (sorted; a host sync). The digit marginals of a row with observed set O read
    L(O) and L(O + {j}) for every masked digit j; the joint of its masked digits reads L(O) and L(all digits)."""
    full = 2**l - 1
    if joint and subset == full:
        return torch.arange(len(observed), device=observed.device)
    if not marginals:
        return (observed == subset).nonzero().squeeze(1)
    size = bin(subset).count("1")
    popcount = torch.tensor([bin(k).count("1") for k in range(subset + 1)], device=observed.device)
    inside = (observed & ~subset) == 0
    need = inside & (popcount[observed.clamp_max(subset)] >= size - 1)  # clamp: rows outside are dropped anyway
    return need.nonzero().squeeze(1)


def _chunk_plan(observed: torch.Tensor, l: int, compact: bool, step: int, marginals: bool = True,
                joint: bool = False) -> list[list[Optional[torch.Tensor]]]:
    """For every chunk of ``step`` rows and every subset 1 .. 2**l - 1: the chunk-local rows that read L(subset)
    (None: no row) for the digit marginals and/or the joint (``_rows_needing``). ``compact``: found once per
    subset for all rows (a nonzero and one host read of where the chunks cut it); else every row of the chunk
    (static shapes, no host sync)."""
    P = len(observed)
    starts = range(0, P, step)
    if not compact:
        local = torch.arange(min(step, P), device=observed.device)
        return [[local[: min(step, P - r0)]] * (2**l - 1) for r0 in starts]
    plan: list[list[Optional[torch.Tensor]]] = [[None] * (2**l - 1) for _ in starts]
    edges = torch.tensor([*starts, P], device=observed.device)
    for subset in range(1, 2**l):
        rows = _rows_needing(observed, subset, l, marginals, joint)
        cuts = torch.searchsorted(rows, edges).tolist()
        for k, r0 in enumerate(starts):
            if cuts[k + 1] > cuts[k]:
                plan[k][subset - 1] = rows[cuts[k]:cuts[k + 1]] - r0
    return plan


def _padded(buf: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``log_probs`` (R, C) copied into ``buf`` (R, b**l), -inf on the invalid codes (never alone in a set, which
    always holds the clean code); returns buf."""
    C = log_probs.shape[1]
    buf[:, :C] = log_probs
    buf[:, C:] = float("-inf")
    return buf


class _SubsetLogSumExp(torch.autograd.Function):
    """Logits (P, C), clean digits (P, l), observed digit sets (P,) -> (P, 2**l): for digit subsets K, the log of
    the probability (under the log-softmax over the C valid codes) of the codes that agree with the clean digits
    on K. Entry 0 (all codes) is 0; with ``compact`` only the entries the rows' scores read are filled (the
    others stay 0 and get no gradient): the digit marginals' (``marginals``) and/or the joint's (``joint``).

    Row chunk by row chunk (``step`` rows, sized by the caller's budget): the log-softmax is written into a
    (R, b**l) float32 buffer padded with -inf for the invalid codes, and the sets are read through its
    (R, b, ..., b) view. Only the logits (the input, alive anyway) and the per-row log-sum-exp are saved: the
    backward recomputes each chunk's log-probs, writes -p * (sum of incoming gradients) and adds each set's
    softmax times its gradient. For float32 logits the gradient is itself the padded buffer (its first C
    columns are returned), for other dtypes each chunk is cast into a (P, C) gradient of the logits' dtype. A set
    holds b**(l-1-|K|+1) codes; beyond one log-softmax and its backward (what MDM's cross-entropy costs) the work
    is at most (b+1)**l - b**l values per position, and with ``compact`` only the l + 1 sets a position reads.
    Nothing full-size is made but the gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, digits: torch.Tensor, observed: torch.Tensor, base: int,
                compact: bool, step: int, marginals: bool = True, joint: bool = False) -> torch.Tensor:
        (P, C), l = logits.shape, digits.shape[1]
        out = torch.zeros(P, 2**l, dtype=torch.float32, device=logits.device)
        lse = torch.empty(P, 1, dtype=torch.float32, device=logits.device)
        pad = base**l > C  # else the log-softmax itself is the (R, b, ..., b) grid
        buf = torch.empty(min(step, P), base**l, dtype=torch.float32, device=logits.device) if pad else None
        ctx.plan = _chunk_plan(observed, l, compact, step, marginals, joint)
        for r0, plan in zip(range(0, P, step), ctx.plan):
            r1 = min(P, r0 + step)
            x = logits[r0:r1]
            log_probs = torch.log_softmax(x.float(), dim=1)
            top, at = log_probs.max(dim=1, keepdim=True)  # lse = x - log p at the best code (|log p| <= log C)
            lse[r0:r1] = x.gather(1, at).float() - top
            if pad:
                log_probs = _padded(buf[: r1 - r0], log_probs)
            grid = log_probs.view(r1 - r0, *[base] * l)
            d, chunk_out = digits[r0:r1], out[r0:r1]
            for subset, rows in enumerate(plan, 1):
                if rows is None:
                    continue
                values = grid[_set_index(rows, d[rows], subset, l)].reshape(len(rows), -1)
                chunk_out[rows, subset] = torch.logsumexp(values, 1)
        ctx.save_for_backward(logits, digits, out, lse)
        ctx.base, ctx.step = base, step
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, digits, out, lse = ctx.saved_tensors
        (P, C), l, base, step = logits.shape, digits.shape[1], ctx.base, ctx.step
        total = grad_out[:, 1:].sum(1, keepdim=True)  # each set's softmax sums to 1 (entry 0 is constant)
        direct = logits.dtype == torch.float32  # the padded buffer is the gradient; else a chunk buffer, cast
        grad = torch.empty(P, base**l if direct else C, dtype=torch.float32 if direct else logits.dtype,
                           device=logits.device)
        buf = None if direct else torch.empty(min(step, P), base**l, dtype=torch.float32, device=logits.device)
        for r0, plan in zip(range(0, P, step), ctx.plan):
            r1 = min(P, r0 + step)
            g = grad[r0:r1] if direct else buf[: r1 - r0]
            torch.sub(logits[r0:r1], lse[r0:r1], out=g[:, :C])  # the forward's log-probs again
            g[:, C:] = float("-inf")
            grid = g.view(r1 - r0, *[base] * l)
            d, chunk_out, chunk_grad = digits[r0:r1], out[r0:r1], grad_out[r0:r1]
            terms = []  # each set's softmax times its gradient, taken from the log-probs before they become -p
            for subset, rows in enumerate(plan, 1):
                if rows is None:
                    continue
                index = _set_index(rows, d[rows], subset, l)
                values = grid[index]
                shape = (len(rows),) + (1,) * (values.dim() - 1)
                lse_set, g_set = chunk_out[rows, subset].view(shape), chunk_grad[rows, subset].view(shape)
                terms.append((index, torch.exp(values - lse_set).mul_(g_set)))
            g.exp_().mul_(-total[r0:r1])  # the log-softmax's part: -p * sum of gradients
            for index, term in terms:  # a row's sets are distinct, so += never collides
                grid[index] += term
            if not direct:
                grad[r0:r1] = g[:, :C]
        return grad[:, :C] if direct else grad, None, None, None, None, None, None, None


def subtoken_cross_entropy(
    logits: torch.Tensor, noisy_digits: torch.Tensor, clean_digits: torch.Tensor, codec: SubtokenCodec,
    carry_over: bool = True, compact: Optional[bool] = None, *, chunk_mb: float = DEFAULT_CHUNK_MB,
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
    host sync per set and chunk, cheap on CPU, where the gathers are what costs. On a GPU (default off) every
    position gets every set: static shapes, no sync, and gathers are cheap there.

    ``chunk_mb`` (``engine.loss_chunk_mb``) bounds the float32 temporaries of a row chunk (``rows_per_chunk``,
    ``loss_head_row_bytes``); the values do not depend on it.
    """
    return subtoken_scores(logits, noisy_digits, clean_digits, codec, carry_over, compact, chunk_mb=chunk_mb)[0]


def token_joint_cross_entropy(
    logits: torch.Tensor, noisy_digits: torch.Tensor, clean_digits: torch.Tensor, codec: SubtokenCodec,
    compact: Optional[bool] = None, *, chunk_mb: float = DEFAULT_CHUNK_MB,
) -> torch.Tensor:
    """-log p(all masked digits of a position jointly | y_t) under carry-over, (B, N): the MDM-Prime reference
    code's per-token score, L(O) - L(all digits) = -log of the carry-over probability of the clean code (0 where
    nothing is masked). NOT a term of a bound (docs/method.md "Two objectives"); ``subtoken_cross_entropy``'s
    marginals are. Same arguments and cost model as that function."""
    return subtoken_scores(logits, noisy_digits, clean_digits, codec, True, compact, chunk_mb=chunk_mb,
                           marginals=False, joint=True)[1]


def subtoken_scores(
    logits: torch.Tensor, noisy_digits: torch.Tensor, clean_digits: torch.Tensor, codec: SubtokenCodec,
    carry_over: bool = True, compact: Optional[bool] = None, *, chunk_mb: float = DEFAULT_CHUNK_MB,
    marginals: bool = True, joint: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(``subtoken_cross_entropy`` (B, N, l) if ``marginals``, ``token_joint_cross_entropy`` (B, N) if ``joint``)
    from one pass over the logits: both read the same log-sum-exps L(K), so an evaluation reports the withdrawn
    objective next to the NELBO for the price of one gather per position. The joint needs carry-over (it is the
    reference code's loss, which has it)."""
    if joint and not carry_over:
        raise ValueError("the token_joint score is defined with carry-over (the MDM-Prime code's loss)")
    l = codec.num_subtokens
    lead = logits.shape[:-1]
    bits = 1 << torch.arange(l, device=logits.device)
    observed = noisy_digits.reshape(-1, l) != codec.mask_id
    if not carry_over:
        observed = torch.zeros_like(observed)
    given = (observed.long() * bits).sum(-1)  # (P,) subset id of O
    compact = logits.device.type == "cpu" if compact is None else compact
    flat = logits.reshape(-1, codec.vocab_size)
    step = rows_per_chunk(len(flat), loss_head_row_bytes(codec.vocab_size, codec.base, l, compact), chunk_mb,
                          logits.device)
    set_lse = _SubsetLogSumExp.apply(flat, clean_digits.reshape(-1, l).long(), given, codec.base, compact,
                                     step, marginals, joint)  # (P, 2**l)
    at_given = set_lse.gather(1, given[:, None])
    ce = token = None
    if marginals:
        # a -log p >= 0; float32 rounding of the difference can land ~1e-7 below 0 where p is within 1e-7 of 1
        ce = (at_given - set_lse.gather(1, given[:, None] | bits)).clamp_min(0.0)
        ce = torch.where(observed, torch.zeros_like(ce), ce).reshape(*lead, l)
    if joint:
        token = (at_given.squeeze(1) - set_lse[:, 2**l - 1]).clamp_min(0.0).reshape(lead)  # 0 where O is all
    return ce, token


def stratified_uniform(batch: int, generator: torch.Generator, device, antithetic: bool) -> torch.Tensor:
    """Uniforms in [0, 1): one shared offset spread evenly over the batch (MD4's antithetic sampling), or i.i.d."""
    if antithetic:
        u0 = torch.rand((), generator=generator, device=device)
        return torch.remainder(u0 + torch.arange(batch, device=device) / batch, 1.0)
    return torch.rand(batch, generator=generator, device=device)


@dataclass
class NelboEstimate:
    per_sequence: Optional[torch.Tensor]  # (B,) NELBO estimate of each sequence, nats (None: ``nelbo(bound=False)``)
    tokens: torch.Tensor  # (B,) tokens counted in each sequence
    # (B,) the same draw scored with the withdrawn token_joint objective (``nelbo(token_joint=True)``), else None
    token_joint: Optional[torch.Tensor] = None

    @property
    def per_token(self) -> torch.Tensor:
        """The training loss: total nats / total tokens."""
        if self.per_sequence is None:
            raise ValueError("this estimate was drawn without the NELBO (nelbo(..., bound=False): token_joint only)")
        return self.per_sequence.sum() / self.tokens.sum()

    @property
    def token_joint_per_token(self) -> torch.Tensor:
        """token_joint's total / total tokens: what a run with ``diffusion.loss=token_joint`` trains on. Not a
        bound on -log p(x) (docs/method.md "Two objectives")."""
        if self.token_joint is None:
            raise ValueError("this estimate was drawn without the token_joint score (nelbo(..., token_joint=True))")
        return self.token_joint.sum() / self.tokens.sum()


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
    *,
    loss_chunk_mb: float = DEFAULT_CHUNK_MB,
    token_joint: bool = False,
    bound: bool = True,
    time_power: float = 1.0,
) -> NelboEstimate:
    """One Monte Carlo estimate of the NELBO of each sequence in ``tokens`` (B, N); see the module docstring.

    ``token_mask`` (B, N) marks real tokens (padding is never masked, never scored, never counted).
    ``loss_chunk_mb`` (``engine.loss_chunk_mb``) bounds the loss head's temporaries per row chunk.
    ``token_joint``: also score the same draw (same t, masks and network output) with the withdrawn objective,
    w(t) * sum over positions with a masked digit of -log p(its masked digits jointly | y_t), into
    ``NelboEstimate.token_joint``; with the count estimator the weight is n/k, as for the NELBO (the mixture of
    Binomial(n, m(t)) under w(t) dt is the same whatever the masked sub-tokens are scored with).
    ``bound=False`` (with ``token_joint``): skip the NELBO's digit marginals, whose log-sum-exps the joint does not
    read (a run trained on token_joint); ``per_sequence`` is then None.
    ``time_power`` p (GenMD4 only; evaluation's ``schedules.robust_time_power``): draw t = u ** p, u as above,
    and weight each draw by dt/du = p u**(p-1): the same NELBO in expectation, with a finite variance when
    p > 1 / (the smallest exponent). Training keeps p = 1 (the REINFORCE term is valid for any p).
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

    if not (bound or token_joint):
        raise ValueError("nothing to score: bound=False needs token_joint=True")
    if isinstance(schedule, GenMD4Schedule):
        if token_joint:
            raise ValueError("the token_joint score assumes one masking rate per token (the MDM-Prime code's loss); "
                             "the genmd4 schedule has one per digit value")
        if estimator != "continuous":
            raise ValueError("the genmd4 schedule masks each sub-token at a rate of its own: only the 'continuous' "
                             "estimator applies (diffusion.eval_estimator=continuous)")
        return _genmd4_nelbo(denoiser, clean, keys, 1.0 - u, valid, valid_sub, codec, schedule, carry_over,
                             loss_chunk_mb, time_power)
    if time_power != 1.0:
        raise ValueError("time_power (t = u ** p, reweighted) is GenMD4's robust evaluation; the other schedules "
                         "evaluate with the count estimator, whose variance is bounded")
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
    ce, joint = subtoken_scores(logits, noisy, clean, codec, carry_over, chunk_mb=loss_chunk_mb, marginals=bound,
                                joint=token_joint)
    weight = weight.to((joint if ce is None else ce).dtype)  # float32, the loss head's
    return NelboEstimate(
        per_sequence=None if ce is None else weight * torch.where(masked, ce, torch.zeros_like(ce)).sum(dim=(1, 2)),
        tokens=valid.sum(dim=1), token_joint=None if joint is None else weight * joint.sum(dim=1))


def genmd4_row_bytes(vocab_size: int, num_codes: int) -> int:
    """Bytes of float32 temporaries per row of a chunk of ``chunked_digit_log_marginals``: the float copy of the
    logits, the padded codes, the penalty sums, the log-softmax, a marginal's log-sum-exp, and their gradients in
    the backward's recomputation (8 buffers of b**l in all)."""
    return 4 * (vocab_size + 8 * num_codes)


def chunked_digit_log_marginals(logits: torch.Tensor, noisy_digits: torch.Tensor, codec: SubtokenCodec,
                                carry_over: bool = True, chunk_mb: float = DEFAULT_CHUNK_MB) -> torch.Tensor:
    """``digit_log_marginals(carry_over_log_probs(...))`` (B, N, l, b), row chunk by row chunk: each chunk's
    joint is recomputed in the backward (``torch.utils.checkpoint``), so one chunk's joint is alive at a time."""
    from torch.utils.checkpoint import checkpoint

    l = codec.num_subtokens
    lead = logits.shape[:-1]
    flat, digits = logits.reshape(-1, codec.vocab_size), noisy_digits.reshape(-1, l)
    step = rows_per_chunk(len(flat), genmd4_row_bytes(codec.vocab_size, codec.num_codes), chunk_mb, logits.device)
    marginals = lambda x, d: digit_log_marginals(carry_over_log_probs(x, d, codec, carry_over), l)  # noqa: E731
    parts = [checkpoint(marginals, flat[r0:r0 + step], digits[r0:r0 + step], use_reentrant=False)
             for r0 in range(0, len(flat), step)]
    return torch.cat(parts).reshape(*lead, l, codec.base)


def _genmd4_nelbo(denoiser: Denoiser, clean: torch.Tensor, keys: torch.Tensor, u: torch.Tensor, valid: torch.Tensor,
                  valid_sub: torch.Tensor, codec: SubtokenCodec, schedule: GenMD4Schedule,
                  carry_over: bool, chunk_mb: float = DEFAULT_CHUNK_MB, time_power: float = 1.0) -> NelboEstimate:
    """GenMD4's NELBO (module docstring) for clean digits (B, N, l) at times t = u ** time_power, u (B,) in (0, 1].

    The integrand's 1/t times the change of variables' dt/du = p u**(p-1) is p/u, so each draw is weighted by
    p/u (for p = 1 the plain 1/t). log t = p log u is formed directly, so the masking probabilities
    exp(w log t) never meet an underflowed t; only the network's input t is clamped to the smallest normal float
    (where it is that small, essentially no digit is masked)."""
    B = clean.shape[0]
    log_t = time_power * u.log()
    t = u if time_power == 1.0 else log_t.exp().clamp_min(torch.finfo(u.dtype).tiny)
    log_t = log_t.view(B, 1, 1)
    powers = schedule()  # (l, b)
    w = schedule.digit_powers(powers, clean)  # (B, N, l) exponent of each clean digit
    masked = valid_sub & (keys < torch.exp(w.detach() * log_t))
    noisy = torch.where(masked, torch.full_like(clean, codec.mask_id), clean)
    logits = denoiser(noisy, t)
    marginals = chunked_digit_log_marginals(logits, noisy, codec, carry_over, chunk_mb)
    ce = -marginals.gather(-1, clean.unsqueeze(-1)).squeeze(-1)
    expected_w = (marginals.exp() * powers).sum(-1)  # sum_v w[j, v] mu_j(v)
    integrand = (w * (ce - 1.0) + expected_w) * time_power / u.view(B, 1, 1)
    value = torch.where(masked, integrand, torch.zeros_like(integrand)).sum(dim=(1, 2))
    # REINFORCE for the masking choice: log q(mask | y0, t) = sum of w log t (masked) or log(1 - t**w) (not)
    wlog = w * log_t
    log_unmasked = torch.log(-torch.expm1(wlog.clamp_max(-1e-7)))  # t = 1 masks everything: never selected then
    log_q = torch.where(masked, wlog, torch.where(valid_sub, log_unmasked, torch.zeros_like(wlog))).sum(dim=(1, 2))
    f = value.detach()
    baseline = (f.sum() - f) / (B - 1) if B > 1 else torch.zeros_like(f)
    score = (f - baseline) * log_q
    return NelboEstimate(per_sequence=value + (score - score.detach()), tokens=valid.sum(dim=1))
