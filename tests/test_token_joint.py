"""The withdrawn MDM-Prime objective (``diffusion.loss=token_joint``): the reference code's per-token joint of the
masked digits, tested like the NELBO (brute force, values and gradients), and the erratum shown with numbers: at
the exact posterior of a source of known distribution the NELBO is its entropy H while token_joint is
H - I(d1; d2) / 2 for l = 2 (docs/method.md "Two objectives")."""

import itertools
import math

import numpy as np
import pytest
import torch

from prime_scale.codec import SubtokenCodec
from prime_scale.data.markov import MarkovChain
from prime_scale.diffusion import (carry_over_log_probs, nelbo, subtoken_cross_entropy, subtoken_scores,
                                   token_joint_cross_entropy)
from prime_scale.schedules import LinearSchedule

from helpers import mean_and_se, oracle_denoiser


@pytest.mark.parametrize("C,l,shuffle", [(10, 1, False), (10, 2, False), (10, 2, True), (14, 3, False),
                                         (256, 4, True), (50257, 2, False)])
@pytest.mark.parametrize("compact", [True, False])
def test_token_joint_equals_brute_force_values_and_gradients(C, l, shuffle, compact):
    """Against -log of the clean code's probability under the full carry-over joint over the b**l codes: values,
    gradients, 0 where nothing is masked, and the NELBO's marginals unchanged when both come from one pass."""
    g = torch.Generator().manual_seed(C + 10 * l)
    codec = SubtokenCodec(C, l, shuffle_seed=3 if shuffle else None)
    N = 40 if C > 1000 else 200
    logits = (torch.randn(3, N, C, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, C, (3, N), generator=g)
    clean = codec.encode(tokens)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, codec.mask_id, clean)
    got = token_joint_cross_entropy(logits, noisy, clean, codec, compact=compact)
    joint = carry_over_log_probs(logits, noisy, codec).flatten(2)
    ref = -joint.gather(-1, codec.token_to_code(tokens).unsqueeze(-1)).squeeze(-1)
    any_masked = (noisy == codec.mask_id).any(-1)
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-6)
    assert torch.all(got[~any_masked] == 0) and got[any_masked].min() >= 0
    w = torch.randn(got.shape, generator=g)
    (grad,) = torch.autograd.grad((got * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), logits)
    assert torch.allclose(grad, ref_grad, atol=2e-6) and grad.abs().sum() > 0
    ce, both = subtoken_scores(logits, noisy, clean, codec, compact=compact, joint=True)
    assert torch.equal(both, got)
    assert torch.equal(ce, subtoken_cross_entropy(logits, noisy, clean, codec, compact=compact))
    if l == 1:  # one digit: its joint is its marginal
        assert torch.allclose(got, ce.squeeze(-1), atol=1e-6)
    else:  # the joint is the sum of the chain rule's conditionals, not of the marginals: they differ
        assert (got - ce.sum(-1)).abs().max() > 1e-2


@pytest.mark.parametrize("estimator", ["continuous", "count"])
def test_token_joint_is_the_nelbo_for_l1(estimator):
    """l = 1 (MDM): a masked token has one digit, so the two objectives are the same number, draw for draw."""
    C, N = 12, 16
    codec = SubtokenCodec(C, 1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, generator=g)
    tokens = torch.randint(0, C, (64, N), generator=g)
    est = nelbo(lambda noisy, rate: logits.expand(len(noisy), N, C), tokens, codec, LinearSchedule(),
                torch.Generator().manual_seed(1), estimator=estimator, token_joint=True)
    assert torch.allclose(est.token_joint, est.per_sequence, rtol=1e-6)
    assert est.token_joint_per_token == pytest.approx(est.per_token.item(), rel=1e-6)


def correlated_digit_source(b: int, stay: float, seed: int) -> torch.Tensor:
    """A distribution over C = b * b tokens whose two base-b digits are strongly dependent: the first digit from
    an uneven law, the second equal to it with probability ``stay``, else uniform."""
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(b, generator=g, dtype=torch.float64) + 0.2
    first /= first.sum()
    second = torch.full((b, b), (1 - stay) / b, dtype=torch.float64) + stay * torch.eye(b, dtype=torch.float64)
    return (first[:, None] * second).flatten()


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def code_law(pi: torch.Tensor, codec: SubtokenCodec) -> torch.Tensor:
    """The law of the code (the digits' joint, (b,)*l) when tokens follow pi; invalid codes get 0."""
    law = torch.zeros(codec.num_codes, dtype=torch.float64)
    law[codec.token_to_code(torch.arange(codec.vocab_size))] = pi
    return law.view(*[codec.base] * codec.num_subtokens)


def token_joint_exact(pi: torch.Tensor, codec: SubtokenCodec) -> float:
    """E of token_joint per token at the exact posterior of an i.i.d. source: the masked digit set S of a token
    has P(S | t) = m^|S| (1-m)^(l-|S|) and w(t) = m'/m, so it gets the weight int m^(|S|-1) (1-m)^(l-|S|) dm =
    (|S|-1)! (l-|S|)! / l! (any schedule), and its score's mean is H(d_S | d_not S)."""
    l, law = codec.num_subtokens, code_law(pi, codec)
    total = 0.0
    for size in range(1, l + 1):
        weight = math.factorial(size - 1) * math.factorial(l - size) / math.factorial(l)
        for S in itertools.combinations(range(l), size):
            rest = [j for j in range(l) if j not in S]
            observed = law.sum(dim=tuple(S)) if rest else torch.ones(())
            total += weight * (entropy(law.flatten()) - entropy(observed.flatten()))
    return total


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("estimator", ["continuous", "count"])
def test_token_joint_oracle_is_entropy_minus_half_mutual_information(shuffle, estimator):
    """The erratum in numbers. With the exact posterior of an i.i.d. source (l = 2, b = 4), over many (time, mask)
    draws: the NELBO equals H, and token_joint equals H - I(d1; d2) / 2 with I computed exactly from pi (on the
    codes: index shuffling changes I), far below H."""
    b, N, B = 4, 8, 4096
    pi = correlated_digit_source(b, stay=0.8, seed=1)
    codec = SubtokenCodec(b * b, 2, shuffle_seed=5 if shuffle else None)
    law = code_law(pi, codec)
    H = entropy(pi)
    I = entropy(law.sum(1)) + entropy(law.sum(0)) - H
    assert I > 0.1, "the source must have dependent digits"
    assert token_joint_exact(pi, codec) == pytest.approx(H - I / 2, abs=1e-12)
    g = torch.Generator().manual_seed(11)
    tokens = torch.multinomial(pi, B * N, replacement=True, generator=g).view(B, N)
    oracle = oracle_denoiser(law.flatten(), N)  # the network's C logits are over codes (perm[x] when shuffled)
    draws = [nelbo(oracle, tokens, codec, LinearSchedule(), g, estimator=estimator, token_joint=True)
             for _ in range(4)]
    bound, bound_se = mean_and_se(torch.stack([d.per_sequence for d in draws]).double().mean(0) / N)
    joint, joint_se = mean_and_se(torch.stack([d.token_joint for d in draws]).double().mean(0) / N)
    assert abs(bound - H) < 3 * bound_se, (bound, bound_se, H)
    assert abs(joint - (H - I / 2)) < 3 * joint_se, (joint, joint_se, H - I / 2)
    assert H - joint > 10 * joint_se, "the test must tell the withdrawn objective from the bound"


def test_token_joint_oracle_for_three_digits_follows_the_subset_weights():
    """l = 3 (C = 27): the exact posterior's token_joint matches the enumeration over masked digit sets
    (``token_joint_exact``), which for l > 2 is no longer H - I/2, and still lies below H; the NELBO is H."""
    C, N, B = 27, 6, 4096
    g = torch.Generator().manual_seed(2)
    base = torch.rand(3, 3, 3, generator=g, dtype=torch.float64)
    pi = (base + 4 * torch.eye(3, dtype=torch.float64)[:, :, None] * torch.eye(3, dtype=torch.float64)).flatten()
    pi /= pi.sum()
    codec = SubtokenCodec(C, 3)
    H, exact = entropy(pi), token_joint_exact(pi, codec)
    tokens = torch.multinomial(pi, B * N, replacement=True, generator=g).view(B, N)
    draws = [nelbo(oracle_denoiser(pi, N), tokens, codec, LinearSchedule(), g, estimator="count", token_joint=True)
             for _ in range(4)]
    bound, bound_se = mean_and_se(torch.stack([d.per_sequence for d in draws]).double().mean(0) / N)
    joint, joint_se = mean_and_se(torch.stack([d.token_joint for d in draws]).double().mean(0) / N)
    assert abs(bound - H) < 3 * bound_se
    assert abs(joint - exact) < 3 * joint_se, (joint, joint_se, exact)
    assert H - exact > 10 * joint_se


def diagonal_chain(seed: int) -> MarkovChain:
    """A first-order Markov chain over C = 16 tokens whose mass sits on the 4 tokens with equal base-4 digits
    (0, 5, 10, 15): given anything, a token's second digit is its first, so the digits' mutual information is
    the token's whole entropy and the withdrawn objective's deficit is large next to a small model's excess."""
    rng = np.random.default_rng(seed)
    rows = np.full((16, 16), 1e-6)
    rows[:, [0, 5, 10, 15]] += rng.dirichlet(np.ones(4), size=16)
    return MarkovChain(rows / rows.sum(1, keepdims=True))


def test_trained_model_token_joint_falls_below_the_entropy_while_its_nelbo_stays_above():
    """The erratum on a trained network: a small Prime (l = 2) model trained (on the NELBO, by the engine's own
    loss function) on a Markov source of known entropy rate, then scored by ``evaluate_nelbo``. Its NELBO is
    above the exact entropy per token H (within 3 SE), as every bound must be; the same draws scored with
    token_joint are below H by more than 3 SE, which no bound can be."""
    from prime_scale.config import load_config
    from prime_scale.evaluate import evaluate_nelbo
    from prime_scale.model import PrimeTransformer
    from prime_scale.objective import training_loss

    torch.manual_seed(0)
    chain = diagonal_chain(seed=0)
    cfg = load_config(["config=tiny", "data.vocab_size=16", "prime.num_subtokens=2", "data.seq_len=32",
                       "model.d_model=64", "model.n_layer=2", "eval.max_sequences=512", "eval.repeats=4"])
    train = torch.from_numpy(chain.sample(120 * 32, cfg.data.seq_len, rng=1))
    val = torch.from_numpy(chain.sample(512, cfg.data.seq_len, rng=2))
    model = PrimeTransformer.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    noise = torch.Generator().manual_seed(3)
    for batch in train.split(32):
        loss = training_loss(model, batch, cfg, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    H = chain.sequence_entropy_per_token(cfg.data.seq_len)
    result = evaluate_nelbo(model, val, cfg, seed=4)
    assert result.nelbo_per_token >= H - 3 * result.stderr, (result, H)
    assert result.nelbo_per_token < chain.stationary_entropy() - 0.1  # it learned the transitions
    assert result.token_joint_not_a_bound <= H - 3 * result.token_joint_stderr, (result, H)


@pytest.mark.parametrize("l", [1, 2, 3])
def test_token_joint_training_loss_without_the_marginals_is_the_same_loss_and_gradient(l):
    """objective.training_loss for diffusion.loss=token_joint draws with nelbo(bound=False): the loss head skips
    the digit marginals, and the loss and every gradient are those of the pass that computes both."""
    from prime_scale.config import load_config
    from prime_scale.model import PrimeTransformer
    from prime_scale.objective import sequence_loss, training_loss

    cfg = load_config(["config=tiny", f"prime.num_subtokens={l}", "diffusion.loss=token_joint"])
    torch.manual_seed(0)
    model = PrimeTransformer.from_config(cfg)
    tokens = torch.randint(0, cfg.data.vocab_size, (4, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
    results = []
    for both in (True, False):
        model.zero_grad()
        if both:
            estimate = sequence_loss(model, tokens, cfg, torch.Generator().manual_seed(3), token_joint=True)
            assert estimate.per_sequence is not None
            loss = estimate.token_joint_per_token
        else:
            loss = training_loss(model, tokens, cfg, torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, full_grads), (joint_only, grads) = results
    assert torch.equal(full, joint_only) and len(grads) == len(full_grads)
    assert all(torch.equal(a, b) for a, b in zip(full_grads, grads))
    with pytest.raises(ValueError, match="without the NELBO"):
        _ = sequence_loss(model, tokens, cfg, torch.Generator(), token_joint=True, bound=False).per_token
