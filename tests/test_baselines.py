"""The other model families on the same code: the AR baseline's exact NLL, GenMD4's learned state-dependent
schedule (oracle, gradients, sampling) and index shuffling."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from prime_scale.autoregressive import autoregressive_nll, autoregressive_sample, shifted_inputs
from prime_scale.codec import SubtokenCodec
from prime_scale.config import Config, ConfigError, ModelConfig, PrimeConfig, load_config, validate
from prime_scale.diffusion import nelbo
from prime_scale.evaluate import evaluate_nelbo
from prime_scale.model import PrimeTransformer
from prime_scale.objective import sample_with_config, schedule_of, sequence_loss
from prime_scale.optim import build_optimizer
from prime_scale.sampler import draw_categorical, sample
from prime_scale.schedules import GenMD4Schedule, PolynomialSchedule, robust_time_power

SMALL = ModelConfig(n_layer=2, d_model=32, n_head=2)


def iid_source(C, seed):
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(C, generator=g, dtype=torch.float64))
    pi = (e**2) / (e**2).sum()
    return pi, g


# ---------------------------------------------------------------------------------------------- autoregressive


def ar_model(C=12, seed=0):
    torch.manual_seed(seed)
    return PrimeTransformer(SMALL, C).eval()


def test_ar_nll_equals_the_sum_of_next_token_cross_entropies_computed_prefix_by_prefix():
    """Each prefix is run through the network on its own (no shift trick, nothing after it exists): the summed
    cross-entropies of the next tokens must equal the one-pass exact NLL, which also proves the mask is causal."""
    C, B, N = 12, 3, 9
    model = ar_model(C)
    tokens = torch.randint(0, C, (B, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = autoregressive_nll(model, tokens, model.codec)
        direct = torch.zeros(B, dtype=torch.float64)
        for i in range(N):
            prefix = torch.cat([torch.full((B, 1), C), tokens[:, :i]], dim=1).unsqueeze(-1)  # BOS = MASK id C
            logits = model(prefix, None, causal=True)[:, -1]
            direct += F.cross_entropy(logits.double(), tokens[:, i], reduction="none")
    assert torch.allclose(exact.per_sequence.double(), direct, rtol=1e-5, atol=1e-5)
    assert exact.tokens.tolist() == [N] * B
    # the evaluation reports the same number per token, with one pass (no Monte Carlo repeats)
    cfg = replace(Config(), model=replace(SMALL, objective="ar"), data=replace(Config().data, vocab_size=C, seq_len=N))
    result = evaluate_nelbo(model, tokens, cfg)
    assert result.estimator == "exact"
    assert result.nelbo_per_token == pytest.approx(direct.sum().item() / (B * N), rel=1e-5)


def test_ar_padding_is_neither_scored_nor_seen():
    C, N = 12, 8
    model = ar_model(C)
    tokens = torch.randint(0, C, (2, N), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 5:] = False
    other = tokens.clone()
    other[:, 5:] = (other[:, 5:] + 1) % C  # different padding content
    with torch.no_grad():
        a = autoregressive_nll(model, tokens, model.codec, mask)
        b = autoregressive_nll(model, other, model.codec, mask)
        short = autoregressive_nll(model, tokens[:, :5], model.codec)
    assert torch.allclose(a.per_sequence, b.per_sequence) and torch.allclose(a.per_sequence, short.per_sequence, atol=1e-5)
    assert a.tokens.tolist() == [5, 5]


def test_ar_sampler_keeps_the_prompt_and_draws_from_the_model():
    """A 'network' that ignores its input and always says pi: every generated token is then an independent draw
    from pi, which the empirical frequencies must match; NFE is one call per generated token."""
    C, N, B, P = 6, 5, 4000, 2
    pi, _ = iid_source(C, 3)

    def constant(inputs, mask_rate, causal):
        assert causal and mask_rate is None
        return pi.log().float().expand(inputs.shape[0], inputs.shape[1], C)

    constant.codec = SubtokenCodec(C, 1)
    prompt = torch.tensor([4, 1])
    out = autoregressive_sample(constant, constant.codec, B, N, torch.Generator().manual_seed(0), prompt=prompt)
    assert out.nfe == N - P and out.calls == N - P
    assert (out.tokens[:, :P] == prompt).all()
    freq = torch.bincount(out.tokens[:, P:].flatten(), minlength=C).double() / (B * (N - P))
    se = (pi * (1 - pi) / (B * (N - P))).sqrt()
    assert ((freq - pi).abs() < 4 * se).all(), (freq, pi)


def test_top_p_keeps_the_smallest_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)).expand(20000, 4)
    draws = draw_categorical(logp, torch.Generator().manual_seed(0), top_p=0.7)  # 0.5 < 0.7 <= 0.8: keep {0, 1}
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0].item() == pytest.approx(0.5 / 0.8, abs=0.02)
    assert (draw_categorical(logp, torch.Generator().manual_seed(0), top_p=1e-9) == 0).all()  # argmax


def test_ar_config_rules():
    for overrides, message in [
        (["model.objective=ar", "prime.num_subtokens=2"], "needs prime.num_subtokens=1"),
        (["model.objective=ar", "prime.num_subtokens=1", "model.time_conditioning=true"], "no masking rate"),
        (["model.objective=ar", "prime.num_subtokens=1", "model.tokens_per_position=2"], "tokens_per_position=1"),
        (["model.objective=causal"], "must be one of diffusion, ar"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(["config=tiny", *overrides])


def test_ar_trains_through_the_shared_loss():
    """A few optimizer steps on one batch lower the exact NLL: the loss the engine calls reaches the causal model."""
    cfg = load_config(["config=tiny", "model.objective=ar", "prime.num_subtokens=1"])
    torch.manual_seed(0)
    model = PrimeTransformer.from_config(cfg)
    tokens = torch.randint(0, cfg.data.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    opt = build_optimizer(model, replace(cfg.train, lr=1e-2))
    first = None
    for _ in range(20):
        loss = sequence_loss(model, tokens, cfg, torch.Generator().manual_seed(0)).per_token
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


# ---------------------------------------------------------------------------------------------- GenMD4


def genmd4(l, base, seed, low=0.4, high=2.5):
    schedule = GenMD4Schedule(l, base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        schedule.log_power.copy_(torch.empty(l, base).uniform_(math.log(low), math.log(high), generator=g))
    return schedule


def genmd4_oracle(pi, codec, powers, exact=True):
    """The exact posterior of an i.i.d. source under GenMD4's masking, time-conditioned: a masked digit j is
    masked at time t with probability t ** w[j, v], so p(x | y_t) is proportional to pi(x) * prod over the masked
    digits of t ** w[j, x_j], restricted (by the carry-over) to the codes that agree with the observed digits.
    ``exact=False`` drops the t-factor: the posterior of a state-independent schedule, wrong here."""
    C, l = codec.vocab_size, codec.num_subtokens
    code_powers = powers.detach().double()[torch.arange(l), codec.digit_table]  # (codes, l)

    def denoise(noisy, t):
        masked = (noisy == codec.mask_id).double()
        tilt = torch.einsum("bnl,cl->bnc", masked, code_powers[:C]) * t.double().log().view(-1, 1, 1)
        return (pi.log() + tilt * float(exact)).float()

    return denoise


@pytest.mark.parametrize("l", [1, 2, 3])
def test_genmd4_oracle_nelbo_equals_minus_log_p(l):
    """With the exact posterior the state-dependent NELBO is tight for every sequence: E[NELBO(x)] = -log p(x).
    The posterior of a state-independent schedule, used with these unequal exponents, pays more (compared on the
    same draws of time and masks). Exponents above 1 keep the estimator's variance finite (t ** (w - 2) is
    integrable), so the standard errors mean what they say."""
    C, N, B = 10, 8, 2048
    pi, g = iid_source(C, seed=l)
    tokens = torch.multinomial(pi, B * N, replacement=True, generator=g).view(B, N)
    codec = SubtokenCodec(C, l)
    schedule = genmd4(l, codec.base, seed=l, low=1.2, high=3.5)
    draws = {}
    for exact in (True, False):
        gen = torch.Generator().manual_seed(7)
        draws[exact] = torch.stack([nelbo(genmd4_oracle(pi, codec, schedule(), exact), tokens, codec,
                                          schedule, gen).per_sequence.detach().double() for _ in range(8)]).mean(0)
    gap = draws[True] - (-pi.log()[tokens].sum(1))
    mean, se = gap.mean().item(), gap.std().item() / math.sqrt(B)
    assert se < 0.01 * N * math.log(C), "the test must have power"
    assert abs(mean) < 3 * se, (mean, se)
    excess = draws[False] - draws[True]
    assert excess.mean() > 5 * excess.std() / math.sqrt(B), (excess.mean(), excess.std())


def top_share(draws: torch.Tensor, fraction: float = 1e-3) -> float:
    """The share of the draws' sum of squared deviations carried by their largest ``fraction``. For draws of
    finite variance it shrinks as the draws grow in number; for draws of infinite variance it stays of order 1
    (the largest few dominate the sum of squares whatever their number)."""
    d2 = (draws - draws.mean()) ** 2
    return (d2.topk(max(1, int(fraction * len(d2)))).values.sum() / d2.sum()).item()


def test_genmd4_robust_evaluation_matches_the_exact_value_with_an_exponent_below_1():
    """Exponents in 0.4..2.5 (smallest 0.42): the plain continuous draws have infinite variance (a digit with
    exponent w is masked with probability t**w and weighs 1/t: P(draw > x) ~ x**-(1 + w)), the robust ones
    (t = u**p, p = 2 / min w, weighted by p u**(p-1)) finite. With the exact posterior the NELBO is -log p(x), so
    the robust mean must land within 3 SE of it, and the SE must be small. The tails, measured: the largest 0.1%
    of the 8192 plain draws carry 18% of their sum of squares here (18-90% over 12 seeds tried), of the robust
    draws 1.7% (1.4-4.2%; a Gaussian's would be about 1%). The digit value no valid code has must not set p."""
    C, N, B, reps, l = 10, 8, 1024, 8, 2
    pi, g = iid_source(C, seed=1)
    tokens = torch.multinomial(pi, B * N, replacement=True, generator=g).view(B, N)
    codec = SubtokenCodec(C, l)  # b = 4, codes 0..9 valid: the leading digit is never 3
    schedule = genmd4(l, codec.base, seed=1, low=0.4, high=2.5)
    with torch.no_grad():
        schedule.log_power[0, 3] = math.log(0.05)  # never a clean value: never sets a masking rate
    powers = schedule().detach()
    min_w = schedule.smallest_exponent(codec)
    assert min_w == pytest.approx(min(powers[0, :3].min().item(), powers[1].min().item()))
    assert 0.4 < min_w < 0.45
    p = robust_time_power(min_w)
    assert p == pytest.approx(2 / min_w)
    denoise = genmd4_oracle(pi, codec, schedule())
    exact = -pi.log()[tokens].sum(1)  # the oracle's NELBO is tight (test_genmd4_oracle_nelbo_equals_minus_log_p)
    gaps = {}
    for name, power in (("plain", 1.0), ("robust", p)):
        gen = torch.Generator().manual_seed(101)
        with torch.no_grad():
            draws = torch.stack([nelbo(denoise, tokens, codec, schedule, gen, time_power=power).per_sequence.double()
                                 for _ in range(reps)])
        gaps[name] = draws - exact  # (reps, B)
    robust = gaps["robust"].mean(0)  # each sequence's mean over its draws: the sequences are the units
    mean, se = robust.mean().item(), robust.std().item() / math.sqrt(B)
    assert abs(mean) < 3 * se, (mean, se)
    assert se / N < 0.05, se  # nats per token, against an entropy of 1.76 nats per token
    assert top_share(gaps["plain"].flatten()) > 0.1, top_share(gaps["plain"].flatten())
    assert top_share(gaps["robust"].flatten()) < 0.06, top_share(gaps["robust"].flatten())


def test_genmd4_time_conditioned_model_trains_evaluates_and_samples():
    """prime_scale/configs/text_genmd4.yaml's network at tiny size: conditioned on t (with value-dependent masking, which
    digits are still masked at t says something about their values). It trains (the adaLN layers, which start
    at zero, get gradients and make the output depend on t), its evaluation records the smallest exponent and
    the time power it drew t with, and it samples valid tokens. The other families record neither."""
    assert load_config(["config=text_genmd4"]).model.time_conditioning
    cfg = load_config(["config=tiny", "diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous",
                       "model.time_conditioning=true", "eval.repeats=1", "sample.steps=8"])
    torch.manual_seed(0)
    model = PrimeTransformer.from_config(cfg)
    opt = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, cfg.data.vocab_size, (8, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        loss = sequence_loss(model, tokens, cfg, torch.Generator().manual_seed(step)).per_token
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert model.blocks[0].ada.weight.grad.abs().sum() > 0 and model.schedule.log_power.grad.abs().sum() > 0
        opt.step()
    model.eval()
    masked = torch.full((1, cfg.data.seq_len, model.codec.num_subtokens), model.codec.mask_id)
    with torch.no_grad():
        early, late = (model(masked, torch.tensor([t])) for t in (0.1, 0.9))
    assert (early - late).abs().max() > 1e-4  # the network reads t

    with torch.no_grad():  # exponents 0.5 .. 2 (tiny: C = 64 = 8**2 codes, every digit value is used)
        model.schedule.log_power.copy_(torch.linspace(math.log(0.5), math.log(2.0), 16).view(2, 8))
    result = evaluate_nelbo(model, tokens, cfg)
    assert result.min_exponent == pytest.approx(0.5) and result.time_power == pytest.approx(4.0)
    assert result.as_dict()["min_exponent"] == result.min_exponent and result.as_dict()["time_power"] == 4.0
    assert math.isfinite(result.nelbo_per_token) and result.estimator == "continuous"
    out = sample_with_config(cfg, model, model.codec, 2, seed=0, device="cpu")
    assert out.tokens.shape == (2, cfg.data.seq_len) and model.codec.is_valid(out.tokens).all()
    assert out.nfe == cfg.sample.steps  # time-conditioned: every step evaluates the network

    mdm_cfg = load_config(["config=tiny", "eval.repeats=1"])
    mdm = evaluate_nelbo(PrimeTransformer.from_config(mdm_cfg), tokens, mdm_cfg)
    assert mdm.min_exponent is None and mdm.time_power is None


def test_genmd4_with_equal_exponents_is_the_polynomial_schedule_draw_for_draw():
    C, N, B, w = 10, 6, 64, 1.7
    torch.manual_seed(0)
    model = PrimeTransformer(SMALL, C, 2)
    codec = model.codec
    tokens = torch.randint(0, C, (B, N), generator=torch.Generator().manual_seed(1))
    learned = GenMD4Schedule(2, codec.base, init_power=w)
    a = nelbo(model, tokens, codec, learned, torch.Generator().manual_seed(5))
    b = nelbo(model, tokens, codec, PolynomialSchedule(w), torch.Generator().manual_seed(5))
    assert torch.allclose(a.per_sequence, b.per_sequence, rtol=1e-5, atol=1e-4)


def mean_exponent_gradient(l, exact, reps=60, C=6, N=4, B=512):
    pi, g = iid_source(C, seed=1)
    codec = SubtokenCodec(C, l)
    schedule = genmd4(l, codec.base, seed=4, low=1.2, high=3.5)  # w > 1: finite variance (see the oracle test)
    denoise = genmd4_oracle(pi, codec, schedule(), exact)
    gen, grads = torch.Generator().manual_seed(11), []
    for _ in range(reps):
        tokens = torch.multinomial(pi, B * N, replacement=True, generator=gen).view(B, N)
        schedule.zero_grad()
        nelbo(denoise, tokens, codec, schedule, gen).per_token.backward()
        grads.append(schedule.log_power.grad.flatten().clone())
    G = torch.stack(grads).double()
    used = G.abs().sum(0) > 0  # digit values no valid code has never get a gradient
    return G.mean(0)[used] / (G.std(0)[used] / math.sqrt(reps))


def test_genmd4_exponent_gradient_vanishes_at_the_exact_posterior_only():
    """The exponents' gradient (direct part + REINFORCE with a leave-one-out baseline). With the denoiser fixed to
    the exact posterior for exponents w0, the bound is >= -log p for every w and equal at w0: w0 is a minimum, so
    the expected gradient there is zero. With a wrong posterior it is clearly not. z-scores over 60 independent
    batches; exponents above 1 keep the estimator's variance finite, so the z-scores are meaningful."""
    z_exact = mean_exponent_gradient(1, exact=True)
    z_wrong = mean_exponent_gradient(1, exact=False)
    assert z_exact.abs().max() < 4.0, z_exact
    assert z_wrong.abs().max() > 8.0, z_wrong


def test_genmd4_exponents_get_gradients_and_learn_in_a_model():
    cfg = load_config(["config=tiny", "diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous",
                       "prime.num_subtokens=2"])
    torch.manual_seed(0)
    model = PrimeTransformer.from_config(cfg)
    assert schedule_of(model, cfg) is model.schedule
    assert torch.allclose(model.schedule(), torch.ones(2, model.codec.base))  # schedule_power = 1 at start
    opt = build_optimizer(model, cfg.train)
    groups = {id(p): grp["weight_decay"] for grp in opt.param_groups for p in grp["params"]}
    assert groups[id(model.schedule.log_power)] == 0.0  # never decayed towards w = 1
    tokens = torch.randint(0, cfg.data.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    loss = sequence_loss(model, tokens, cfg, torch.Generator().manual_seed(0)).per_token
    loss.backward()
    grad = model.schedule.log_power.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    before = model.schedule.log_power.detach().clone()
    opt.step()
    assert not torch.equal(before, model.schedule.log_power.detach())
    assert "schedule.log_power" in model.state_dict()


def test_genmd4_sampler_reproduces_the_source_with_the_exact_posterior():
    """Revealing a masked digit with its own value's probability 1 - (s/t)**w is the exact reverse step: with the
    exact time-conditioned posterior the samples follow the source. A sampler that revealed every digit at one
    rate would favour the values masked late."""
    C, N, B = 6, 3, 6000
    pi, _ = iid_source(C, 4)
    codec = SubtokenCodec(C, 1)
    schedule = genmd4(1, C, seed=4, low=0.3, high=3.0)
    out = sample(genmd4_oracle(pi, codec, schedule()), codec, schedule, B, N, 16,
                 torch.Generator().manual_seed(0), time_conditioned=True)
    freq = torch.bincount(out.tokens.flatten(), minlength=C).double() / (B * N)
    se = (pi * (1 - pi) / (B * N)).sqrt()
    assert ((freq - pi).abs() < 4 * se).all(), (freq, pi)
    with pytest.raises(ValueError, match="corrector"):
        sample(genmd4_oracle(pi, codec, schedule()), codec, schedule, 2, N, 4, torch.Generator(),
               corrector_steps=1, remask_prob=0.1)


def test_genmd4_config_rules():
    with pytest.raises(ConfigError, match="eval_estimator=continuous"):
        load_config(["config=tiny", "diffusion.schedule=genmd4"])
    cfg = load_config(["config=tiny", "diffusion.schedule=genmd4", "diffusion.eval_estimator=continuous"])
    with pytest.raises(ConfigError, match="lives in the model"):
        from prime_scale.schedules import make_schedule

        make_schedule(cfg.diffusion)


# ---------------------------------------------------------------------------------------------- index shuffling


def test_shuffling_round_trips_every_token_and_moves_ids_between_leading_digits():
    C = 1000
    plain, shuffled = SubtokenCodec(C, 2), SubtokenCodec(C, 2, shuffle_seed=3)
    tokens = torch.arange(C)
    assert torch.equal(shuffled.decode(shuffled.encode(tokens)), tokens)
    assert sorted(shuffled.permutation.tolist()) == list(range(C))
    assert not torch.equal(shuffled.encode(tokens), plain.encode(tokens))
    # neighbours in id order no longer share their leading digit as a rule
    lead = shuffled.encode(tokens)[:, 0]
    assert (lead[:-1] == lead[1:]).float().mean() < 0.2 < (plain.encode(tokens)[:-1, 0] == plain.encode(tokens)[1:, 0]).float().mean()
    assert torch.equal(SubtokenCodec(C, 2, shuffle_seed=3).permutation, shuffled.permutation)  # fixed by the seed
    assert not torch.equal(SubtokenCodec(C, 2, shuffle_seed=4).permutation, shuffled.permutation)
    invalid = torch.tensor([[31, 31]])  # code 1023 >= C: still reported as invalid after the inverse permutation
    assert not shuffled.is_valid(shuffled.decode(invalid)).any()


def test_the_permutation_travels_with_the_weights():
    cfg = Config(model=SMALL, prime=PrimeConfig(num_subtokens=2, shuffle_tokens=True, shuffle_seed=5))
    validate(cfg)
    trained = PrimeTransformer.from_config(cfg)
    state = trained.state_dict()
    assert "codec.permutation" in state
    other = PrimeTransformer.from_config(replace(cfg, prime=replace(cfg.prime, shuffle_seed=6)))
    other.load_state_dict(state)
    tokens = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(other.codec.encode(tokens), trained.codec.encode(tokens))
    assert torch.equal(other.codec.decode(trained.codec.encode(tokens)), tokens)
    with pytest.raises(ConfigError, match="num_subtokens > 1"):
        validate(replace(cfg, prime=PrimeConfig(num_subtokens=1, shuffle_tokens=True)))


def test_shuffled_samples_decode_to_token_ids():
    """The sampler draws codes; decode must map them back through the inverse permutation. A denoiser that puts
    all mass on the code of token 7 must produce token 7, not code 7."""
    C, N = 50, 6
    codec = SubtokenCodec(C, 2, shuffle_seed=1)
    code = int(codec.permutation[7])
    logits = torch.full((C,), -30.0)
    logits[code] = 0.0

    def denoise(noisy, rate):
        return logits.expand(noisy.shape[0], noisy.shape[1], C)

    out = sample(denoise, codec, PolynomialSchedule(1.0), 3, N, 8, torch.Generator().manual_seed(0))
    assert (out.tokens == 7).all()
    assert (shifted_inputs(out.tokens[:, :2], SubtokenCodec(C, 1))[:, 0, 0] == C).all()  # AR's BOS is the MASK id


def test_training_loss_is_the_nelbo_in_code_space_with_shuffling():
    """The NELBO of a shuffled model is the NELBO of the renamed tokens: same number as an unshuffled model fed
    perm[x] (with its logits read as codes)."""
    C, N = 40, 8
    torch.manual_seed(0)
    shuffled = PrimeTransformer(SMALL, C, 2, shuffle_seed=9)
    plain = PrimeTransformer(SMALL, C, 2)
    plain.load_state_dict({k: v for k, v in shuffled.state_dict().items() if k != "codec.permutation"})
    tokens = torch.randint(0, C, (16, N), generator=torch.Generator().manual_seed(2))
    a = nelbo(shuffled, tokens, shuffled.codec, PolynomialSchedule(1.0), torch.Generator().manual_seed(3))
    b = nelbo(plain, shuffled.codec.permutation[tokens], plain.codec, PolynomialSchedule(1.0),
              torch.Generator().manual_seed(3))
    assert torch.allclose(a.per_sequence, b.per_sequence)

