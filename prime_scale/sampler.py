"""Ancestral sampling over sub-tokens, with the network output reused while a sequence's input is unchanged.

From time t to s < t every masked sub-token is revealed independently with probability (m_t - m_s) / m_t.
For each position a token value x is drawn from the carry-over distribution p(x | y_t) (so it agrees with every
observed digit and is a valid code), and the digits that are revealed take x's digits. That is the exact reverse
transition of the factorised model. A time-independent denoiser's output depends only on y_t, so a sequence whose
digits did not change keeps its cached output: NFE (network evaluations per sequence) is then below the number of
steps whenever steps exceed the number of sub-tokens.

Idle steps (``SampleResult.idle_steps``, per sequence; ``idle_ratio``, their mean fraction of ``steps``): a
predictor step, with its corrector moves, at which none of a sequence's digits changed. The steps after a
sequence is fully revealed count as idle too, so the denominator is always ``steps``. With the linear schedule,
the uniform grid and no prompt every digit's reveal step is uniform over the steps and independent of the others,
so a step is idle with probability (1 - 1/steps)**(l*N): about e**(-l) at steps = N. Partial masking (l > 1) wastes
fewer steps; with the output cache an idle step costs no network evaluation, so without correctors
NFE = steps - idle steps for every sequence (docs/sampling.md).

Options (docs/sampling.md), all off by default: a non-uniform grid of predictor times (``time_grid``), a
temperature on the allowed codes that may change linearly with t (``temperature_at``), and ReMDM-style corrector
moves that re-mask generated digits and re-reveal them at the same time level. ``sample_kwargs`` maps a
``SampleConfig`` onto ``sample``'s keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prime_scale.codec import SubtokenCodec
from prime_scale.config_schema import TEMPERATURE_SCHEDULES, TIME_SCHEDULES, SampleConfig
from prime_scale.diffusion import DEFAULT_CHUNK_MB, EXCLUDED, Denoiser, carry_over_log_probs, rows_per_chunk
from prime_scale.schedules import Schedule



@dataclass
class SampleResult:
    """What a sampler returns: the tokens and what they cost.

    ``idle_steps`` (B,) int64 counts, per sequence, the predictor steps (each with its corrector moves) after
    which the sequence's digits were exactly what they were before it: nothing revealed, or a corrector's
    re-masking redrawn to the same digits. It is measured by comparing the digits before and after each step, so
    it says how many steps were wasted on that sequence, whatever caused it. ``idle_ratio`` is its mean over the
    sequences as a fraction of ``steps``; ``idle_fractions`` is the per-sequence fraction (the i.i.d. units for
    a standard error).
    """

    tokens: torch.Tensor  # (B, N) token ids, every one < C
    nfe: float  # mean network evaluations per sequence, corrector moves included
    calls: int  # batched denoiser calls
    steps: int  # predictor steps
    idle_steps: torch.Tensor  # (B,) int64: steps at which none of the sequence's digits changed
    corrector_nfe: float = 0.0  # the part of nfe spent in corrector moves

    @property
    def idle_fractions(self) -> torch.Tensor:
        """(B,) float64: each sequence's idle steps over ``steps``."""
        return self.idle_steps.double() / self.steps

    @property
    def idle_ratio(self) -> float:
        """The mean fraction of the ``steps`` steps at which a sequence did not change."""
        return self.idle_fractions.mean().item()


def time_grid(
    steps: int, schedule: str = "uniform", power: float = 2.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The steps + 1 times 1 = t_0 > t_1 > ... > t_steps = 0 (float64) that the predictor steps walk.

    uniform: t_i = 1 - i/steps. cosine: t_i = cos(pi/2 * i/steps), steps shrink towards t = 1 (MaskGIT's cosine:
    few digits are revealed while almost everything is masked, many at the end). power: t_i = (1 - i/steps)**power,
    power > 1 shrinks the steps towards t = 0, where the last few masked digits are revealed, power < 1 towards t = 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "uniform":
        times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    elif schedule == "cosine":
        times = torch.cos(0.5 * math.pi * torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64))
    elif schedule == "power":
        if power <= 0:
            raise ValueError(f"time_power must be positive, got {power}")
        times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64) ** power
    else:
        raise ValueError(f"unknown time_schedule {schedule!r}; choose one of {', '.join(TIME_SCHEDULES)}")
    times[0], times[-1] = 1.0, 0.0  # exact ends: cos(pi/2) is 6e-17 in float64, not 0
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"the {schedule} time grid with {steps} steps (power {power}) is not strictly decreasing in "
                         "float64; use fewer steps or a power closer to 1")
    return times


def temperature_at(
    t: float, temperature: float = 1.0, schedule: str = "constant", temperature_end: float = 1.0
) -> float:
    """tau(t): constant ``temperature``, or linear from ``temperature`` at t = 1 to ``temperature_end`` at t = 0."""
    if schedule == "constant":
        return temperature
    if schedule == "linear":
        return temperature_end + (temperature - temperature_end) * float(t)
    raise ValueError(f"unknown temperature_schedule {schedule!r}; choose one of {', '.join(TEMPERATURE_SCHEDULES)}")


def draw_categorical(
    log_probs: torch.Tensor, generator: torch.Generator, float64: bool = True, temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Inverse-CDF draw over the last dim. In float64 by default: float32 draws (Gumbel-max or CDF) truncate the
    tail of the distribution, which acts like a lower temperature (Zheng et al. 2024). Zero-probability entries
    are never returned: the first index whose CDF exceeds u cannot sit on a flat step of the CDF.

    ``temperature`` divides the log-probs of the allowed entries only (those above EXCLUDED / 2): the excluded
    ones are set to -inf, since dividing EXCLUDED by a large temperature would give invalid codes real mass.
    ``top_p`` < 1 keeps the smallest set of most likely entries whose mass reaches top_p (nucleus sampling)."""
    dtype = torch.float64 if float64 else torch.float32
    x = log_probs.to(dtype)
    if temperature != 1.0:
        allowed = x > EXCLUDED / 2
        # the row maximum is always allowed; shifting by it keeps the scaled values finite for any temperature
        scaled = (x - x.amax(dim=-1, keepdim=True)) / temperature
        x = torch.where(allowed, scaled, torch.full_like(x, -math.inf))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True)
        before = ranked.cumsum(dim=-1) - ranked  # mass of the strictly more likely entries
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def sampler_row_bytes(num_codes: int, top_p: bool = False) -> int:
    """Bytes of temporaries per position of a draw chunk (``_Chain.draw``): the carry-over's float32 log-probs
    over the b**l codes (the float copy, the padding, one penalty sum at a time, the log-softmax: 4 buffers) and
    ``draw_categorical``'s float64 copy, softmax and CDF (3 buffers; with temperature, 2 more); ``top_p`` adds
    the sort's values and int64 indices, the cumulative mass and the kept copy. ``memory.py`` predicts with it."""
    return num_codes * (4 * 4 + 8 * (5 + (4 if top_p else 0)))


class _Chain:
    """The sampler's state: the digits, a cached network output per sequence and the evaluation counts.

    ``changed[i]`` says sequence i's digits changed since its cached output was computed, so the cache is used only
    for an input the network has seen. A time-conditioned network also depends on the mask rate, so then every
    sequence is evaluated at every step. The cache holds the network's logits (B, N, C) in its dtype; the
    carry-over distribution over the b**l codes is formed only for the positions drawn at a step, in row chunks
    of at most ``chunk_mb`` (``diffusion.rows_per_chunk``, ``sampler_row_bytes``).
    """

    def __init__(self, denoiser: Denoiser, codec: SubtokenCodec, digits: torch.Tensor, fixed: torch.Tensor,
                 generator: torch.Generator, float64: bool, time_conditioned: bool, top_p: float = 1.0,
                 chunk_mb: float = DEFAULT_CHUNK_MB):
        self.denoiser, self.codec, self.digits, self.fixed = denoiser, codec, digits, fixed
        self.generator, self.float64, self.time_conditioned, self.top_p = generator, float64, time_conditioned, top_p
        B = digits.shape[0]
        self.logits: torch.Tensor | None = None  # cached network output (B, N, C)
        self.chunk_rows = rows_per_chunk(B * digits.shape[1], sampler_row_bytes(codec.num_codes, top_p < 1.0),
                                         chunk_mb, digits.device)
        self.changed = torch.ones(B, dtype=torch.bool, device=digits.device)
        self.evaluations = torch.zeros(B, dtype=torch.long, device=digits.device)
        self.calls = 0

    def masked(self) -> torch.Tensor:
        return self.digits == self.codec.mask_id

    def evaluate(self, mask_rate: float) -> torch.Tensor:
        """Bring the cache up to date for every changed sequence that still has a masked digit (for every sequence
        when time-conditioned); returns the evaluations each sequence spent here."""
        if self.time_conditioned:
            need = torch.ones_like(self.changed)
        else:
            need = self.changed & self.masked().flatten(1).any(dim=1)
        before = self.evaluations.clone()
        if bool(need.any()):
            rows = need.nonzero().squeeze(1)
            B, N = len(rows), self.digits.shape[1]
            logits = self.denoiser(self.digits[rows], torch.full((B,), mask_rate, device=self.digits.device))
            if self.logits is None:  # our own buffer: a denoiser may return a view it keeps (or an expand)
                self.logits = logits.new_empty((len(self.digits), N, self.codec.vocab_size))
            self.logits.index_copy_(0, rows, logits)
            self.changed[rows] = False
            self.evaluations[rows] += 1
            self.calls += 1
        return self.evaluations - before

    def draw(self, where: tuple[torch.Tensor, torch.Tensor], temperature: float) -> torch.Tensor:
        """Carry-over draws (R, l) for the positions ``where`` = (sequence, position) indices: codes that agree
        with every observed digit and are valid, drawn chunk by chunk from the cached logits."""
        out = []
        for r0 in range(0, len(where[0]), self.chunk_rows):
            at = (where[0][r0:r0 + self.chunk_rows], where[1][r0:r0 + self.chunk_rows])
            joint = carry_over_log_probs(self.logits[at], self.digits[at], self.codec).flatten(1)
            code = draw_categorical(joint, self.generator, self.float64, temperature, self.top_p)
            out.append(self.codec.digit_table[code])
        return torch.cat(out) if out else self.digits.new_empty((0, self.codec.num_subtokens))

    def reveal(self, reveal_prob, temperature: float) -> None:
        """Reveal each masked digit with probability reveal_prob, taking the digits of a carry-over draw.
        ``reveal_prob`` is a number: the reveals are decided first and a code is drawn only for the positions
        with a revealed digit (the others' draws would be discarded). Or (state-dependent schedules) a function
        of the drawn digits (R, l): then every position with a masked digit is drawn first."""
        masked = self.masked()
        if callable(reveal_prob):
            where = masked.any(-1).nonzero(as_tuple=True)
            proposal = self.draw(where, temperature)
            u = torch.rand(masked.shape, generator=self.generator, device=masked.device)[where]
            reveal = masked[where] & (u < reveal_prob(proposal))
        else:
            chosen = masked & (torch.rand(masked.shape, generator=self.generator, device=masked.device) < reveal_prob)
            where = chosen.any(-1).nonzero(as_tuple=True)
            proposal = self.draw(where, temperature)
            reveal = chosen[where]
        self.digits[where] = torch.where(reveal, proposal, self.digits[where])
        self.changed[where[0][reveal.any(-1)]] = True

    def remask(self, prob: float) -> None:
        """Mask each unmasked generated (not prompt) digit with probability prob: the forward process, run on."""
        generated = ~self.masked() & ~self.fixed
        remask = generated & (torch.rand(generated.shape, generator=self.generator, device=generated.device) < prob)
        self.digits = self.digits.masked_fill(remask, self.codec.mask_id)
        self.changed |= remask.flatten(1).any(dim=1)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    codec: SubtokenCodec,
    schedule: Schedule,
    num_samples: int,
    seq_len: int,
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    prompt: torch.Tensor | None = None,
    float64: bool = True,
    time_conditioned: bool = False,
    *,
    time_schedule: str = "uniform",
    time_power: float = 2.0,
    temperature: float = 1.0,
    temperature_schedule: str = "constant",
    temperature_end: float = 1.0,
    corrector_steps: int = 0,
    remask_prob: float = 0.0,
    top_p: float = 1.0,
    chunk_mb: float = DEFAULT_CHUNK_MB,
) -> SampleResult:
    """Draw ``num_samples`` sequences of ``seq_len`` tokens. ``prompt`` (P,) or (B, P) token ids stay fixed.

    The keyword options are SampleConfig's (docs/sampling.md); their defaults are plain ancestral sampling.
    ``chunk_mb`` (``engine.loss_chunk_mb``) bounds the temporaries of a chunk of draws; the draws do not depend
    on it on CPU.
    ``schedule`` may be GenMD4's learned one: a masked digit is then revealed with the probability its drawn value
    has under its own exponent, and a time-conditioned network is fed t.
    """
    state_dependent = getattr(schedule, "state_dependent", False)
    if state_dependent and corrector_steps:
        raise ValueError("corrector moves assume one masking rate for every digit; the genmd4 schedule has one per "
                         "value: use corrector_steps=0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if temperature <= 0 or temperature_end <= 0:
        raise ValueError(f"temperatures must be positive, got temperature={temperature}, "
                         f"temperature_end={temperature_end}")
    if temperature_schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"unknown temperature_schedule {temperature_schedule!r}; "
                         f"choose one of {', '.join(TEMPERATURE_SCHEDULES)}")
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    if not 0.0 <= remask_prob < 1.0:
        raise ValueError(f"remask_prob must be in [0, 1), got {remask_prob}")
    if corrector_steps > 0 and remask_prob == 0.0:
        raise ValueError("corrector_steps > 0 needs remask_prob > 0, else every corrector move is a no-op")
    B, N, l = num_samples, seq_len, codec.num_subtokens
    digits = torch.full((B, N, l), codec.mask_id, dtype=torch.long, device=device)
    fixed = torch.zeros((B, N, l), dtype=torch.bool, device=device)  # prompt digits: never re-masked
    if prompt is not None:
        prompt = prompt.to(device).expand(B, -1) if prompt.dim() == 1 else prompt.to(device)
        if prompt.shape[0] != B or prompt.shape[1] >= N:
            raise ValueError(f"prompt of shape {tuple(prompt.shape)} must be shorter than seq_len={N} and match {B} samples")
        digits[:, : prompt.shape[1]] = codec.encode(prompt)
        fixed[:, : prompt.shape[1]] = True

    times = time_grid(steps, time_schedule, time_power, device)
    chain = _Chain(denoiser, codec, digits, fixed, generator, float64, time_conditioned, top_p, chunk_mb)
    corrector_evaluations = torch.zeros(B, dtype=torch.long, device=device)
    idle_steps = torch.zeros(B, dtype=torch.long, device=device)
    for i in range(steps):
        t, s = times[i], times[i + 1]
        before = chain.digits.clone()  # reveal writes in place: the step's start, for the idle-step count
        if bool(chain.masked().any()):
            tau = temperature_at(t, temperature, temperature_schedule, temperature_end)
            if state_dependent:
                chain.evaluate(float(t))
                chain.reveal(lambda proposal: schedule.reveal_prob(float(t), float(s), proposal), tau)
            else:
                m_t, m_s = schedule.mask_prob(t), schedule.mask_prob(s)
                chain.evaluate(float(m_t))
                chain.reveal(float((m_t - m_s) / m_t), tau)
        elif corrector_steps == 0:
            idle_steps += steps - i  # this step and every later one would leave every sequence unchanged
            break  # everything is revealed and nothing would be re-masked
        for _ in range(corrector_steps):
            # Re-masking each generated digit with probability p takes a state at level s to the forward marginal
            # at m_r = m_s + (1 - m_s) p; the exact reverse step back to s reveals with (m_r - m_s) / m_r. With an
            # exact denoiser the move leaves the marginal at s unchanged, so the output distribution is kept.
            chain.remask(remask_prob)
            m_s = schedule.mask_prob(s)
            m_r = m_s + (1.0 - m_s) * remask_prob
            if not bool(chain.masked().any()):
                continue  # nothing is masked: nothing to redraw
            corrector_evaluations += chain.evaluate(float(m_r))
            tau = temperature_at(s, temperature, temperature_schedule, temperature_end)
            chain.reveal(float((m_r - m_s) / m_r), tau)
        idle_steps += (chain.digits == before).flatten(1).all(dim=1)

    tokens = codec.decode(chain.digits)
    if not bool(codec.is_valid(tokens).all()):  # cannot happen with carry-over; guard the invariant anyway
        raise RuntimeError("sampler produced an invalid code; the carry-over restriction is broken")
    return SampleResult(
        tokens=tokens, nfe=chain.evaluations.double().mean().item(), calls=chain.calls, steps=steps,
        idle_steps=idle_steps, corrector_nfe=corrector_evaluations.double().mean().item(),
    )


def sample_kwargs(cfg: SampleConfig) -> dict:
    """``sample``'s keyword options from a SampleConfig: ``sample(..., **sample_kwargs(cfg.sample))``.

    Holds float64 and every option of docs/sampling.md; steps, num_samples and the prompt stay explicit arguments.
    """
    return {
        "float64": cfg.float64,
        "time_schedule": cfg.time_schedule,
        "time_power": cfg.time_power,
        "temperature": cfg.temperature,
        "temperature_schedule": cfg.temperature_schedule,
        "temperature_end": cfg.temperature_end,
        "corrector_steps": cfg.corrector_steps,
        "remask_prob": cfg.remask_prob,
        "top_p": cfg.top_p,
    }
