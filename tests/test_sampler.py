from dataclasses import fields, replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prime_scale.codec import SubtokenCodec
from prime_scale.config import Config, ConfigError, DiffusionConfig, SampleConfig, validate
from prime_scale.diffusion import carry_over_log_probs, rows_per_chunk
from prime_scale.sampler import (TIME_SCHEDULES, draw_categorical, sample, sample_kwargs, sampler_row_bytes,
                                 temperature_at, time_grid)
from prime_scale.schedules import make_schedule

LINEAR = make_schedule(DiffusionConfig(schedule="linear"))


def random_denoiser(C, N, seed):
    """A denoiser whose output depends on its input, so that stale caches would show."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(64, C, generator=g) * 3

    def denoise(noisy, m):
        key = noisy.sum(-1) % 64
        return table[key]

    return denoise


@pytest.mark.parametrize("C,l", [(10, 2), (10, 3), (50, 2), (7, 1)])
def test_no_invalid_code_in_10k_draws_and_nfe_below_steps(C, l):
    codec = SubtokenCodec(C, l)
    N = 4
    steps = 64  # > N * l digits
    calls = []

    def denoise(noisy, m):
        calls.append(len(noisy))
        return random_denoiser(C, N, 0)(noisy, m)

    out = sample(denoise, codec, LINEAR, num_samples=2500, seq_len=N, steps=steps,
                 generator=torch.Generator().manual_seed(1))
    assert out.tokens.shape == (2500, N)
    assert out.tokens.numel() == 10_000
    assert int(out.tokens.max()) < C and int(out.tokens.min()) >= 0
    assert out.nfe <= N * l < steps  # a sequence is re-evaluated only after one of its digits changed
    assert len(calls) == out.calls and out.calls <= steps


def test_cache_is_exact_a_time_independent_model_cannot_tell():
    """With caching the sampler draws from the same distribution as without: the cached output is what the
    network would return for the unchanged input. We check by comparing to a time-conditioned run (no cache)
    driven by the same random stream: identical tokens."""
    C, l, N = 12, 2, 5
    codec = SubtokenCodec(C, l)
    den = random_denoiser(C, N, 3)
    a = sample(den, codec, LINEAR, 64, N, 40, torch.Generator().manual_seed(5))
    b = sample(den, codec, LINEAR, 64, N, 40, torch.Generator().manual_seed(5), time_conditioned=True)
    assert torch.equal(a.tokens, b.tokens)
    assert a.nfe < b.nfe == 40


def test_sampler_matches_the_iid_source_distribution():
    """An exact denoiser of an i.i.d. source must reproduce the source: chi-square on 20k tokens."""
    C, l, N = 10, 2, 4
    g = torch.Generator().manual_seed(0)
    pi = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    pi /= pi.sum()
    codec = SubtokenCodec(C, l)
    def den(noisy, m):
        return pi.log().float().expand(noisy.shape[0], N, C)
    out = sample(den, codec, LINEAR, 5000, N, 16, torch.Generator().manual_seed(1))
    counts = torch.bincount(out.tokens.flatten(), minlength=C).double()
    expected = pi * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # 99.9% quantile of chi-square with 9 degrees of freedom


def test_prompt_stays_fixed_and_bad_prompt_is_refused():
    C, l, N = 20, 2, 8
    codec = SubtokenCodec(C, l)
    prompt = torch.tensor([3, 19, 0])
    out = sample(random_denoiser(C, N, 1), codec, LINEAR, 6, N, 32, torch.Generator().manual_seed(0), prompt=prompt)
    assert torch.equal(out.tokens[:, :3], prompt.expand(6, 3))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        sample(random_denoiser(C, N, 1), codec, LINEAR, 6, N, 8, torch.Generator(), prompt=torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="steps"):
        sample(random_denoiser(C, N, 1), codec, LINEAR, 6, N, 0, torch.Generator())


def test_float64_draws_keep_the_tail_that_float32_loses():
    """A token with probability 1e-9 must come out at its rate in float64; float32 rounds it away."""
    logp = torch.log(torch.tensor([1 - 1e-9, 1e-9], dtype=torch.float64)).float()
    assert draw_categorical(logp.expand(1000, 2), torch.Generator().manual_seed(0)).sum() == 0
    # over 2e8 effective trials would be needed to see it; instead check the CDF split is exact in float64
    probs64 = torch.softmax(logp.double(), -1)
    probs32 = torch.softmax(logp.float(), -1)
    assert probs64[1].item() == pytest.approx(1e-9, rel=1e-3)
    assert probs32.cumsum(-1)[0].item() == 1.0  # float32: the first entry's CDF already reaches 1, the tail is gone


def test_draw_never_returns_zero_probability_entries():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 16, generator=g)
    codec = SubtokenCodec(10, 2)  # b = 4, codes 10..15 invalid
    noisy = torch.full((2000, 1, 2), codec.mask_id)
    noisy[:1000, 0, 0] = 2  # only codes 8, 9 are allowed there
    joint = carry_over_log_probs(logits[:, None, :10], noisy, codec).reshape(2000, 1, 16)
    for float64 in (True, False):
        x = draw_categorical(joint, torch.Generator().manual_seed(1), float64).squeeze(1)
        assert int(x.max()) < 10
        assert set(x[:1000].tolist()) <= {8, 9}


# --------------------------------------------------------------------------------------------------
# Sampler options: defaults, time grids, temperature, corrector moves.

IID_C, IID_L, IID_N = 10, 2, 4  # C = 10 is no power of b = 4: codes 10..15 are invalid


def iid_source():
    """An i.i.d. source pi over C = 10 values and its exact posterior denoiser (carry-over restricts it)."""
    g = torch.Generator().manual_seed(0)
    pi = torch.rand(IID_C, generator=g, dtype=torch.float64) + 0.1
    pi /= pi.sum()
    return pi, lambda noisy, m: pi.log().float().expand(noisy.shape[0], IID_N, IID_C)


def chi_square(tokens, pi):
    counts = torch.bincount(tokens.flatten(), minlength=len(pi)).double()
    expected = pi * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


def entropy(tokens, C):
    p = torch.bincount(tokens.flatten(), minlength=C).double()
    p = p[p > 0] / p.sum()
    return -(p * p.log()).sum().item()


def digest(tokens):
    """A position-weighted checksum: equal digests mean equal tokens for these tests' purposes."""
    return int((tokens * torch.arange(1, tokens.numel() + 1).reshape(tokens.shape)).sum())


# Captured (same seeds, same denoisers) when the sampler began to decide the reveals before drawing, and to draw a
# code only where a digit is revealed: that consumes the random stream in another order than the sampler the options
# were added to, so its draws differ; the distribution tests above and below are unchanged. (C, l, N, B, steps,
# seed, extra arguments) -> (digest of the tokens, NFE, batched calls).
BEFORE_OPTIONS = [
    ((10, 2, 6, 4, 16, 7, {}), (1152, 9.25, 15)),
    ((10, 2, 6, 4, 16, 7, {"prompt": torch.tensor([3, 9])}), (1427, 6.5, 13)),
    ((12, 2, 5, 64, 40, 5, {}), (365815, 8.890625, 40)),
    ((12, 2, 5, 64, 40, 5, {"time_conditioned": True}), (365815, 40.0, 40)),
    ((50, 3, 8, 128, 100, 2, {"float64": False}), (11269439, 21.6015625, 100)),
    ((7, 1, 8, 128, 5, 3, {}), (131005, 4.15625, 5)),
]


@pytest.mark.parametrize("case,before", BEFORE_OPTIONS)
def test_defaults_reproduce_the_sampler_before_the_options_bit_for_bit(case, before):
    C, l, N, B, steps, seed, extra = case
    def run(**kw):
        return sample(random_denoiser(C, N, seed), SubtokenCodec(C, l), LINEAR, B, N, steps,
                      torch.Generator().manual_seed(seed), **extra, **kw)
    out = run()
    assert (digest(out.tokens), out.nfe, out.calls) == before
    assert out.corrector_nfe == 0.0
    # The config's defaults, passed through the helper, are the same sampler.
    kw = sample_kwargs(SampleConfig())
    kw.pop("float64")
    assert torch.equal(run(**kw).tokens, out.tokens)


def test_defaults_reproduce_the_tokens_before_the_options():
    out = sample(random_denoiser(10, 6, 7), SubtokenCodec(10, 2), LINEAR, 4, 6, 16, torch.Generator().manual_seed(7))
    assert out.tokens.tolist() == [[2, 6, 6, 6, 6, 2], [6, 2, 6, 6, 2, 2], [2, 6, 6, 2, 6, 2], [2, 3, 2, 2, 6, 6]]


@pytest.mark.parametrize("name", TIME_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 256, 4096])
def test_every_time_grid_runs_from_exactly_one_to_exactly_zero_strictly_decreasing(name, steps):
    t = time_grid(steps, name, power=3.0)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert t[0].item() == 1.0 and t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())


def test_time_grids_put_their_steps_where_documented():
    steps = 100
    uniform = time_grid(steps, "uniform")
    assert torch.equal(uniform, torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))  # as before the options
    def dt(t):
        return (t[:-1] - t[1:])
    def above_half(t):
        return int((t > 0.5).sum())
    cosine = time_grid(steps, "cosine")  # cos(pi/2 u) > 1/2 for u < 2/3: two thirds of the grid above t = 1/2
    assert above_half(uniform) == 50 and above_half(cosine) == 67
    assert dt(cosine)[0] < 0.001 and dt(cosine)[-1] > 0.015  # fine near t = 1, coarse near t = 0
    power2 = time_grid(steps, "power", power=2.0)  # (1 - u)^2 > 1/2 for u < 0.293: most of the grid below 1/2
    assert above_half(power2) == 30
    assert dt(power2)[-1] == pytest.approx(1e-4) and dt(power2)[0] == pytest.approx(0.0199)  # fine near t = 0
    power_half = time_grid(steps, "power", power=0.5)  # p < 1: fine near t = 1 instead
    assert above_half(power_half) == 75 and dt(power_half)[0] < dt(power_half)[-1]
    assert torch.equal(time_grid(steps, "power", power=1.0), uniform)


def test_bad_time_grids_are_refused():
    with pytest.raises(ValueError, match="unknown time_schedule"):
        time_grid(8, "linear")
    with pytest.raises(ValueError, match="not strictly decreasing"):
        time_grid(256, "power", power=1000.0)  # (1/256)**1000 underflows to 0 = the last time
    with pytest.raises(ValueError, match="positive"):
        time_grid(8, "power", power=0.0)


def test_non_uniform_grids_keep_the_source_distribution():
    pi, den = iid_source()
    codec = SubtokenCodec(IID_C, IID_L)
    for name in ("cosine", "power"):
        out = sample(den, codec, LINEAR, 2500, IID_N, 16, torch.Generator().manual_seed(2), time_schedule=name)
        assert chi_square(out.tokens, pi) < 27.9  # 99.9% quantile of chi-square with 9 degrees of freedom


def test_temperature_sharpens_below_one_and_flattens_above_one():
    pi, den = iid_source()
    codec = SubtokenCodec(IID_C, IID_L)
    def run(**kw):
        return sample(den, codec, LINEAR, 2500, IID_N, 16, torch.Generator().manual_seed(1), **kw).tokens
    h = {tau: entropy(run(temperature=tau), IID_C) for tau in (0.5, 1.0, 2.0)}
    # 10k tokens: the entropy estimate's standard error is about 0.005 nats; H(pi) = 2.231
    assert h[1.0] == pytest.approx(2.231, abs=0.015)
    assert h[0.5] < h[1.0] - 0.1 and h[2.0] > h[1.0] + 0.03
    # tau -> 0 is the argmax: every revealed digit is a digit of argmax pi, so every token is argmax pi
    assert bool((run(temperature=1e-3) == pi.argmax()).all())
    # a linear schedule with equal ends is the constant one; from 1 to 1 it is the default sampler
    assert torch.equal(run(temperature=0.5, temperature_schedule="linear", temperature_end=0.5), run(temperature=0.5))
    assert torch.equal(run(temperature_schedule="linear"), run())
    # sharper early than late: between the constant 0.5 and the constant 1
    h_linear = entropy(run(temperature=0.5, temperature_schedule="linear", temperature_end=1.0), IID_C)
    assert h[0.5] + 0.02 < h_linear < h[1.0] - 0.02


def test_temperature_at_is_constant_or_linear_in_t():
    assert temperature_at(0.3, 0.7) == 0.7
    assert temperature_at(1.0, 0.5, "linear", 2.0) == 0.5
    assert temperature_at(0.0, 0.5, "linear", 2.0) == 2.0
    assert temperature_at(0.25, 0.5, "linear", 2.0) == pytest.approx(1.625)
    with pytest.raises(ValueError, match="unknown temperature_schedule"):
        temperature_at(0.5, 1.0, "cosine")


def test_temperature_acts_on_the_allowed_codes_only():
    """Even a huge temperature gives invalid or inconsistent codes no mass: they stay excluded, and the allowed
    ones become uniform. (Dividing every log-prob by 1e12 would lift the excluded -1e9 to -1e-3.)"""
    g = torch.Generator().manual_seed(0)
    codec = SubtokenCodec(10, 2)  # b = 4, codes 10..15 invalid
    noisy = torch.full((4000, 1, 2), codec.mask_id)
    noisy[:2000, 0, 0] = 2  # only codes 8, 9 are allowed there
    joint = carry_over_log_probs(torch.randn(4000, 1, 10, generator=g) * 3, noisy, codec).reshape(4000, 1, 16)
    for float64 in (True, False):
        x = draw_categorical(joint, torch.Generator().manual_seed(1), float64, temperature=1e12).squeeze(1)
        assert set(x[:2000].tolist()) == {8, 9}
        assert abs((x[:2000] == 8).double().mean().item() - 0.5) < 0.05
        counts = torch.bincount(x[2000:], minlength=16)
        assert int(counts[10:].sum()) == 0 and int(counts[:10].min()) > 150  # about 200 each
        sharp = draw_categorical(joint, torch.Generator().manual_seed(1), float64, temperature=1e-6).squeeze(1)
        assert torch.equal(sharp, joint.squeeze(1).argmax(-1))


@pytest.mark.parametrize("corrector_steps,remask_prob,steps,grid", [(1, 0.3, 16, "uniform"), (3, 0.9, 4, "cosine")])
def test_correctors_keep_the_source_distribution(corrector_steps, remask_prob, steps, grid):
    """With the exact denoiser a corrector move leaves the marginal at its time level unchanged, so the output
    still follows pi: chi-square on 20k tokens, as without correctors."""
    pi, den = iid_source()
    codec = SubtokenCodec(IID_C, IID_L)
    kw = {"time_schedule": grid, "corrector_steps": corrector_steps, "remask_prob": remask_prob}
    out = sample(den, codec, LINEAR, 5000, IID_N, steps, torch.Generator().manual_seed(1), **kw)
    assert chi_square(out.tokens, pi) < 27.9
    plain = sample(den, codec, LINEAR, 5000, IID_N, steps, torch.Generator().manual_seed(1), time_schedule=grid)
    assert chi_square(plain.tokens, pi) < 27.9
    assert out.corrector_nfe > 0 and out.nfe > plain.nfe


@pytest.mark.parametrize("C,l", [(10, 2), (10, 3)])
def test_correctors_never_draw_an_invalid_code_and_count_every_evaluation(C, l):
    codec = SubtokenCodec(C, l)
    N, B, steps = 4, 2500, 16
    rows = []

    def denoise(noisy, m):
        rows.append(len(noisy))
        return random_denoiser(C, N, 0)(noisy, m)

    out = sample(denoise, codec, LINEAR, B, N, steps, torch.Generator().manual_seed(1), corrector_steps=2,
                 remask_prob=0.5)
    plain = sample(random_denoiser(C, N, 0), codec, LINEAR, B, N, steps, torch.Generator().manual_seed(1))
    assert out.tokens.numel() == 10_000
    assert int(out.tokens.max()) < C and int(out.tokens.min()) >= 0
    assert sum(rows) / B == pytest.approx(out.nfe) and len(rows) == out.calls  # NFE counts every evaluation
    # re-masked digits must be revealed again, so the predictor is no longer bounded by N * l, only by steps
    assert out.nfe - out.corrector_nfe <= steps and out.corrector_nfe <= 2 * steps
    assert out.nfe > plain.nfe + 10 and out.corrector_nfe > 10


def test_correctors_invalidate_the_cache():
    """A time-conditioned run evaluates every sequence at every step; the cached run must draw the same tokens,
    which fails if a re-masked sequence were served its output from before the re-masking."""
    C, l, N = 12, 2, 5
    codec = SubtokenCodec(C, l)
    den = random_denoiser(C, N, 3)
    kw = {"corrector_steps": 2, "remask_prob": 0.4}
    a = sample(den, codec, LINEAR, 64, N, 20, torch.Generator().manual_seed(5), **kw)
    b = sample(den, codec, LINEAR, 64, N, 20, torch.Generator().manual_seed(5), time_conditioned=True, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert a.nfe < b.nfe == 20 * 3


def test_corrector_evaluations_see_the_mask_rate_they_are_told():
    """Re-masking with p moves level s to m_r = m_s + (1 - m_s) p; the reveal of (m_r - m_s) / m_r brings it back
    to m_s. So the fraction of masked digits at every evaluation must match the rate handed to the network."""
    C, l, N, B = 10, 2, 8, 4000
    codec = SubtokenCodec(C, l)
    seen = []

    def denoise(noisy, m):
        seen.append(((noisy == codec.mask_id).double().mean().item(), m[0].item()))
        return torch.zeros(len(noisy), N, C)

    sample(denoise, codec, LINEAR, B, N, 6, torch.Generator().manual_seed(0), time_conditioned=True,
           corrector_steps=2, remask_prob=0.3)
    assert len(seen) == 6 * 3
    rates = [m for _, m in seen]
    assert rates[:3] == pytest.approx([1.0, 5 / 6 + 1 / 6 * 0.3, 5 / 6 + 1 / 6 * 0.3])
    assert rates[-1] == pytest.approx(0.3)  # at s = 0 a move re-masks 30% and redraws all of it
    for fraction, m in seen:  # 64k digits: the standard error of a fraction is at most 0.002
        assert fraction == pytest.approx(m, abs=0.01)


def test_prompt_digits_never_change_or_get_masked_under_correctors():
    C, l, N = 20, 2, 8
    codec = SubtokenCodec(C, l)
    prompt = torch.tensor([[3, 19, 0], [5, 5, 12]]).repeat(50, 1)
    encoded = codec.encode(prompt)

    def denoise(noisy, m):
        assert torch.equal(noisy[:, :3], encoded[: len(noisy)]) or bool((noisy[:, :3] != codec.mask_id).all())
        return random_denoiser(C, N, 1)(noisy, m)

    for time_conditioned in (False, True):
        out = sample(denoise, codec, LINEAR, 100, N, 12, torch.Generator().manual_seed(0), prompt=prompt,
                     time_conditioned=time_conditioned, corrector_steps=3, remask_prob=0.8)
        assert torch.equal(out.tokens[:, :3], prompt)
        assert out.corrector_nfe > 0


def test_bad_options_are_refused_by_sample_and_by_the_config():
    C, N = 10, 4
    codec = SubtokenCodec(C, 2)
    def run(**kw):
        return sample(random_denoiser(C, N, 0), codec, LINEAR, 2, N, 4, torch.Generator(), **kw)
    for kw, message in [
        ({"temperature": 0.0}, "temperatures must be positive"),
        ({"temperature_end": -1.0, "temperature_schedule": "linear"}, "temperatures must be positive"),
        ({"temperature_schedule": "cosine"}, "unknown temperature_schedule"),
        ({"corrector_steps": -1}, "corrector_steps"),
        ({"remask_prob": 1.0}, r"remask_prob must be in \[0, 1\)"),
        ({"corrector_steps": 1}, "needs remask_prob > 0"),
        ({"time_schedule": "exp"}, "unknown time_schedule"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(**kw)
    for section, message in [
        ({"temperature": 0.0}, "sample.temperature must be positive"),
        ({"temperature_end": -0.5}, "sample.temperature_end must be positive"),
        ({"time_power": 0.0}, "sample.time_power must be positive"),
        ({"corrector_steps": -2}, "sample.corrector_steps must be non-negative"),
        ({"remask_prob": 1.0}, r"sample.remask_prob must be in \[0, 1\)"),
        ({"corrector_steps": 1}, "sample.corrector_steps > 0 needs sample.remask_prob > 0"),
        ({"time_schedule": "cosin"}, "did you mean 'cosine'"),
        ({"temperature_schedule": "linar"}, "did you mean 'linear'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(replace(Config(), sample=replace(SampleConfig(), **section)))
    validate(replace(Config(), sample=replace(SampleConfig(), corrector_steps=2, remask_prob=0.05,
                                              time_schedule="power", time_power=0.5, temperature=0.9,
                                              temperature_schedule="linear", temperature_end=1.1)))


def test_sample_kwargs_carries_every_option_of_the_config():
    cfg = SampleConfig(float64=False, time_schedule="cosine", time_power=3.0, temperature=0.8,
                       temperature_schedule="linear", temperature_end=1.2, corrector_steps=2, remask_prob=0.1,
                       top_p=0.9)
    kw = sample_kwargs(cfg)
    assert kw == {"float64": False, "time_schedule": "cosine", "time_power": 3.0, "temperature": 0.8,
                  "temperature_schedule": "linear", "temperature_end": 1.2, "corrector_steps": 2, "remask_prob": 0.1,
                  "top_p": 0.9}
    options = {f.name for f in fields(SampleConfig)} - {"num_samples", "steps", "prompt_len", "every_steps"}  # when, not how
    assert set(kw) == options  # a new SampleConfig field must reach the sampler
    C, N = 10, 4
    out = sample(random_denoiser(C, N, 0), SubtokenCodec(C, 2), LINEAR, 8, N, 8, torch.Generator().manual_seed(0), **kw)
    assert out.corrector_nfe > 0 and int(out.tokens.max()) < C


# --------------------------------------------------------------------------------------------------
# Memory: the cache holds logits, the carry-over joint is formed only for the positions drawn, in row chunks.

class _LargestTensors(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns, per dtype."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def test_sampler_never_forms_a_joint_over_all_positions():
    """B x N positions x b**l codes is never allocated, in any dtype; float64 tensors hold one chunk of draws."""
    C, l, N, B = 1000, 2, 32, 16  # b = 32: b**l = 1024 > C, so the (B, N, C) logits cache is smaller than a joint
    codec = SubtokenCodec(C, l)
    chunk_mb = 2.0
    for kw in ({}, {"top_p": 0.9, "temperature": 0.8}, {"corrector_steps": 1, "remask_prob": 0.3}):
        rows = rows_per_chunk(B * N, sampler_row_bytes(codec.num_codes, top_p="top_p" in kw), chunk_mb, "cpu")
        assert 1 < rows < B * N // 8
        with _LargestTensors() as seen:
            out = sample(random_denoiser(C, N, 0), codec, LINEAR, B, N, 4, torch.Generator().manual_seed(0),
                         chunk_mb=chunk_mb, **kw)
        assert int(out.tokens.max()) < C
        assert max(seen.largest.values()) < B * N * codec.num_codes, (kw, seen.largest)
        assert seen.largest[torch.float64] <= rows * codec.num_codes, (kw, seen.largest)


def test_codes_are_drawn_only_where_a_digit_is_revealed(monkeypatch):
    """Many more steps than digits: drawing at every masked position would draw about steps x B x N / 2 codes;
    a draw only where a digit is revealed draws at most one per digit."""
    import prime_scale.sampler as sampler

    C, l, N, B, steps = 10, 2, 6, 32, 200
    drawn = []
    real = sampler.draw_categorical
    monkeypatch.setattr(sampler, "draw_categorical", lambda x, *a, **k: drawn.append(len(x)) or real(x, *a, **k))
    out = sample(random_denoiser(C, N, 0), SubtokenCodec(C, l), LINEAR, B, N, steps, torch.Generator().manual_seed(0))
    assert int(out.tokens.max()) < C
    assert B * N <= sum(drawn) <= B * N * l  # every position once at least, every digit once at most


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.8, "temperature": 1.3, "float64": False},
                                {"corrector_steps": 2, "remask_prob": 0.4, "time_conditioned": True},
                                {"prompt": torch.tensor([1, 2])}, {"genmd4": True}])
def test_draws_do_not_depend_on_the_chunk_size(kw):
    """Chunks of one position give the same tokens and NFE as one chunk (the CPU generator is sequential); the
    state-dependent GenMD4 schedule draws every masked position, in chunks all the same."""
    from prime_scale.schedules import GenMD4Schedule

    C, l, N, B = 50, 3, 8, 32
    codec = SubtokenCodec(C, l)
    kw = dict(kw)
    schedule = GenMD4Schedule(l, codec.base, 1.0) if kw.pop("genmd4", False) else LINEAR
    if schedule is not LINEAR:
        with torch.no_grad():
            schedule.log_power.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    def run(chunk_mb):
        return sample(random_denoiser(C, N, 4), codec, schedule, B, N, 12,
                      torch.Generator().manual_seed(3), chunk_mb=chunk_mb, **kw)
    whole, single = run(1e4), run(1e-6)
    assert torch.equal(whole.tokens, single.tokens) and whole.nfe == single.nfe
    assert int(whole.tokens.max()) < C


# --------------------------------------------------------------------------------------------------
# Idle steps: steps at which none of a sequence's digits changed.

@pytest.fixture
def one_thread():
    """Sampling on one thread: these tests' many small ops crawl on 2 threads of a busy 2-core machine (15x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_idle_step_ratio_matches_its_exact_value():
    """Linear schedule, uniform grid, no prompt: a masked digit is revealed at step i with probability
    1 / (S - i), so its reveal step is uniform over the S steps, independently of every other digit, and a step
    is idle for a sequence of N tokens x l digits with probability (1 - 1/S)**(l N). At S = N this is about
    e**(-l) (the MDM-Prime paper's 36.8%, 13.5%, 1.8% for l = 1, 2, 4). The per-sequence idle fractions are
    i.i.d., so their mean is within a few standard errors of the exact value; which digits are revealed when
    does not depend on the network, so uniform logits do."""
    C, N, B = 16, 16, 4000  # b = 16, 4, 2 for l = 1, 2, 4
    exact, measured = {}, {}
    for l in (1, 2, 4):
        out = sample(lambda noisy, m: torch.zeros(len(noisy), N, C), SubtokenCodec(C, l), LINEAR, B, N, N,
                     torch.Generator().manual_seed(l))
        fractions = out.idle_fractions
        assert out.idle_steps.shape == (B,) and out.idle_steps.dtype == torch.long
        assert out.idle_ratio == pytest.approx(fractions.mean().item())
        mean, se = fractions.mean().item(), (fractions.std() / B ** 0.5).item()
        exact[l], measured[l] = (1 - 1 / N) ** (l * N), (mean, se)
        assert abs(mean - exact[l]) < 4 * se, (l, mean, se, exact[l])
        # Every non-idle step costs exactly one evaluation (the first one, and one after each change that leaves
        # a digit masked), and an idle step none: NFE = steps - idle steps.
        assert out.nfe == pytest.approx(N - out.idle_steps.double().mean().item(), abs=1e-9)
    assert exact[1] == pytest.approx(0.3561, abs=1e-4) and exact[4] == pytest.approx(0.0161, abs=1e-4)
    # power: the standard errors are far below the gaps between the exact values of l = 1, 2, 4
    for a, b in ((1, 2), (2, 4)):
        assert exact[a] - exact[b] > 20 * (measured[a][1] + measured[b][1])


@pytest.mark.usefixtures("one_thread")
def test_idle_steps_are_at_least_the_steps_no_digit_needs():
    """Each non-idle step reveals at least one digit, so with more steps than digits at least steps - l N
    (steps - l (N - P) with a P-token prompt, whose digits never change) are idle, for every sequence; the steps
    after the early stop count. Time conditioning changes the evaluations, not the reveals."""
    C, l, N, steps = 10, 2, 6, 200
    codec = SubtokenCodec(C, l)
    out = sample(random_denoiser(C, N, 0), codec, LINEAR, 64, N, steps, torch.Generator().manual_seed(0))
    assert bool((out.idle_steps >= steps - l * N).all()) and bool((out.idle_steps < steps).all())
    assert out.idle_ratio >= 1 - l * N / steps
    conditioned = sample(random_denoiser(C, N, 0), codec, LINEAR, 64, N, steps, torch.Generator().manual_seed(0),
                         time_conditioned=True)
    assert torch.equal(conditioned.idle_steps, out.idle_steps) and conditioned.nfe == steps
    prompt = torch.tensor([1, 2, 3, 4])
    prompted = sample(random_denoiser(C, N, 0), codec, LINEAR, 64, N, steps, torch.Generator().manual_seed(0),
                      prompt=prompt)
    assert bool((prompted.idle_steps >= steps - l * (N - len(prompt))).all())
    # one step reveals everything: it is the only step and it is not idle
    single = sample(random_denoiser(C, N, 0), codec, LINEAR, 8, N, 1, torch.Generator().manual_seed(0))
    assert single.idle_steps.tolist() == [0] * 8 and single.idle_ratio == 0.0


@pytest.mark.usefixtures("one_thread")
def test_idle_steps_count_corrector_moves():
    """A step whose corrector moves re-mask and redraw digits is not idle unless the digits come back as they
    were: with strong re-masking at every step almost no step is idle, while without correctors most are."""
    C, l, N, steps = 10, 2, 4, 64
    codec = SubtokenCodec(C, l)
    def run(**kw):
        return sample(random_denoiser(C, N, 0), codec, LINEAR, 256, N, steps,
                      torch.Generator().manual_seed(0), **kw)
    plain, corrected = run(), run(corrector_steps=2, remask_prob=0.9)
    assert plain.idle_ratio >= 1 - l * N / steps
    assert corrected.idle_ratio < 0.2 and bool((corrected.idle_steps <= steps).all())


def test_idle_steps_of_the_ar_sampler_are_zero():
    """Left to right, every step generates a token: no step is idle."""
    from prime_scale.autoregressive import autoregressive_sample

    C, N = 7, 5
    def model(inputs, t, causal):
        return torch.zeros(inputs.shape[0], inputs.shape[1], C)
    out = autoregressive_sample(model, SubtokenCodec(C, 1), 3, N, torch.Generator().manual_seed(0),
                                prompt=torch.tensor([2, 3]))
    assert out.steps == 3 and out.idle_steps.tolist() == [0, 0, 0] and out.idle_ratio == 0.0


@pytest.mark.usefixtures("one_thread")
def test_idle_steps_do_not_depend_on_the_network():
    """Which digits are revealed when is drawn from the generator in the same order whatever the network says
    (the codes drawn differ, the reveals do not), so two time-independent denoisers driven by the same seed have
    the same idle steps and NFE: bench/sampling.py measures idle ratios and matches NFE with a free stand-in."""
    C, l, N, B, steps = 50, 3, 8, 64, 24
    codec = SubtokenCodec(C, l)
    uniform = sample(lambda noisy, m: torch.zeros(len(noisy), N, C), codec, LINEAR, B, N, steps,
                     torch.Generator().manual_seed(9))
    peaked = sample(random_denoiser(C, N, 2), codec, LINEAR, B, N, steps, torch.Generator().manual_seed(9))
    assert not torch.equal(uniform.tokens, peaked.tokens)
    assert torch.equal(uniform.idle_steps, peaked.idle_steps) and uniform.nfe == peaked.nfe
