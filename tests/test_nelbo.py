"""The mathematics of the bound: oracle, carry-over, per-token reporting and the l = 1 reduction."""

import math

import pytest
import torch
import torch.nn.functional as F

from prime_scale.codec import SubtokenCodec
from prime_scale.config import DiffusionConfig, ModelConfig
from prime_scale.diffusion import carry_over_log_probs, digit_log_marginals, nelbo
from prime_scale.model import PrimeTransformer
from prime_scale.schedules import make_schedule

from helpers import mean_and_se, oracle_denoiser

SCHEDULES = {
    "linear": DiffusionConfig(schedule="linear"),
    "cosine": DiffusionConfig(schedule="cosine"),
    "polynomial": DiffusionConfig(schedule="polynomial", schedule_power=2.0),
    "loglinear": DiffusionConfig(schedule="loglinear"),
}


def iid_source(C, seed):
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(C, generator=g, dtype=torch.float64))
    pi = (e**2) / (e**2).sum()  # uneven, every value possible
    entropy = -(pi * pi.log()).sum().item()
    return pi, entropy, g


def per_sequence_nelbo(denoise, tokens, codec, schedule, seed, estimator, carry_over=True, repeats=8):
    """NELBO of each sequence, averaged over ``repeats`` independent (time, mask) draws."""
    g = torch.Generator().manual_seed(seed)
    draws = [
        nelbo(denoise, tokens, codec, schedule, g, estimator=estimator, carry_over=carry_over).per_sequence
        for _ in range(repeats)
    ]
    return torch.stack(draws).double().mean(0)


def mc_nelbo(*args, **kwargs):
    return mean_and_se(per_sequence_nelbo(*args, **kwargs))


@pytest.mark.parametrize("l", [1, 2, 3])
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("estimator", ["continuous", "count"])
def test_oracle_nelbo_equals_entropy_and_carry_over_matters(l, schedule_name, estimator):
    C, N, B = 10, 8, 2048  # C = 10 is no power of b for l = 2 (b=4) or l = 3 (b=3): invalid codes exist
    pi, H, g = iid_source(C, seed=l)
    tokens = torch.multinomial(pi, B * N, replacement=True, generator=g).view(B, N)
    codec = SubtokenCodec(C, l)
    schedule = make_schedule(SCHEDULES[schedule_name])
    denoise = oracle_denoiser(pi, N)

    per_seq = per_sequence_nelbo(denoise, tokens, codec, schedule, seed=7, estimator=estimator)
    mean, se = mean_and_se(per_seq)
    assert se < 0.02 * N * H, "the test must have power"
    assert abs(mean - N * H) < 3 * se, (mean, se, N * H)
    # sharper, paired with the exact -log p of each drawn sequence: only the diffusion estimator's noise remains
    gap, gap_se = mean_and_se(per_seq - (-pi.log()[tokens].sum(1)))
    assert abs(gap) < 3 * gap_se, (gap, gap_se)

    mean_nc, se_nc = mc_nelbo(denoise, tokens, codec, schedule, seed=7, estimator=estimator, carry_over=False)
    if l == 1:  # a masked token has no observed digit: carry-over changes nothing
        assert mean_nc == pytest.approx(mean, rel=1e-6)
    else:
        assert mean_nc - mean > 3 * math.hypot(se, se_nc), (mean_nc, mean)


@pytest.mark.parametrize("l", [1, 2, 4, 8])
def test_oracle_for_pixels_c256(l):
    """Pixels as tokens: C = 256 with l in {1, 2, 4, 8} (b = 256, 16, 4, 2): the exact posterior reaches L H(pi)."""
    C, N, B = 256, 4, 1024
    pi, H, g = iid_source(C, seed=100 + l)
    tokens = torch.multinomial(pi, B * N, replacement=True, generator=g).view(B, N)
    codec = SubtokenCodec(C, l)
    assert codec.base == {1: 256, 2: 16, 4: 4, 8: 2}[l]
    per_seq = per_sequence_nelbo(oracle_denoiser(pi, N), tokens, codec, make_schedule(SCHEDULES["linear"]), seed=3,
                                 estimator="count", repeats=4)
    gap, gap_se = mean_and_se(per_seq - (-pi.log()[tokens].sum(1)))
    assert abs(gap) < 3 * gap_se + 1e-9, (l, gap, gap_se)
    mean, se = mean_and_se(per_seq)
    assert abs(mean - N * H) < 3 * se
    if l > 1:  # without carry-over the same exact denoiser pays for digits it already knows
        mean_nc, se_nc = mc_nelbo(oracle_denoiser(pi, N), tokens, codec, make_schedule(SCHEDULES["linear"]), seed=3,
                                  estimator="count", carry_over=False, repeats=4)
        assert mean_nc - mean > 3 * math.hypot(se, se_nc), (l, mean_nc, mean)


def test_uniform_denoiser_costs_exactly_log_C_per_token_not_per_subtoken():
    """Zero logits = uniform over the C values. The bound is then log C per *token* whatever l is; computing it
    per sub-token (log C / l) or leaving mass on the b**l - C invalid codes would both show up here."""
    N, B = 16, 1024
    for C, l in [(10, 2), (10, 3), (100, 2), (256, 4)]:
        codec = SubtokenCodec(C, l)
        tokens = torch.randint(0, C, (B, N), generator=torch.Generator().manual_seed(C + l))
        def zero(noisy, m):
            return torch.zeros(noisy.shape[0], N, C)
        g = torch.Generator().manual_seed(0)
        est = nelbo(zero, tokens, codec, make_schedule(SCHEDULES["linear"]), g, estimator="count")
        per_token = est.per_sequence / N
        se = per_token.std().item() / math.sqrt(B)
        assert est.tokens.tolist() == [N] * B
        assert abs(est.per_token.item() - math.log(C)) < 3 * se + 1e-6, (C, l, est.per_token.item(), math.log(C))


def test_carry_over_gives_zero_probability_to_inconsistent_and_invalid_codes():
    C, l = 10, 2  # b = 4: codes 10..15 invalid
    codec = SubtokenCodec(C, l)
    logits = torch.randn(1, 3, C, generator=torch.Generator().manual_seed(0))
    m = codec.mask_id
    noisy = torch.tensor([[[m, m], [2, m], [m, 1]]])
    probs = carry_over_log_probs(logits, noisy, codec).exp().reshape(3, 16)
    codes = torch.arange(16)
    d0, d1 = codes // 4, codes % 4
    allowed = [codes < C, (codes < C) & (d0 == 2), (codes < C) & (d1 == 1)]
    for pos in range(3):
        assert torch.all(probs[pos][~allowed[pos]] == 0)
        assert probs[pos].sum().item() == pytest.approx(1.0, abs=1e-6)
        expected = torch.softmax(logits[0, pos][codes[allowed[pos]]], 0)
        assert torch.allclose(probs[pos][allowed[pos]], expected, atol=1e-6)
    # position 1 observed d0 = 2: only codes 8 and 9 remain, so digit 1 is 0 or 1
    marg = digit_log_marginals(carry_over_log_probs(logits, noisy, codec), l).exp()
    assert torch.all(marg[0, 1, 1, 2:] == 0)


def test_gradients_are_finite_through_excluded_codes():
    codec = SubtokenCodec(14, 3)  # b = 3: codes 14..26 invalid
    logits = torch.randn(2, 5, 14, requires_grad=True)
    noisy = torch.full((2, 5, 3), codec.mask_id)
    noisy[:, :, 0] = 1  # leaves codes 9..17, of which 14..17 invalid: whole slices of the joint are excluded
    clean = codec.encode(torch.full((2, 5), 10))
    from prime_scale.diffusion import subtoken_cross_entropy

    ce = subtoken_cross_entropy(logits, noisy, clean, codec)
    ce[:, :, 1:].sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def _joint_cross_entropy(logits, noisy, clean, codec, carry_over):
    """The reference: every digit's marginal from the full carry-over joint over the b**l codes."""
    marginals = digit_log_marginals(carry_over_log_probs(logits, noisy, codec, carry_over), codec.num_subtokens)
    return -marginals.gather(-1, clean.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("C,l,N", [(10, 1, 300), (10, 2, 300), (10, 3, 300), (14, 3, 300), (256, 4, 300),
                                   (37, 3, 300), (50257, 2, 100), (50257, 4, 50)])
@pytest.mark.parametrize("carry_over", [True, False])
@pytest.mark.parametrize("compact", [True, False])
def test_subtoken_cross_entropy_equals_the_joint_marginals(C, l, N, carry_over, compact):
    """The training loss's set log-sum-exps against the full joint, values and gradients, with each set computed
    for the positions that read it (compact, the CPU default) or for all (the GPU default). At C = 50257 the
    log-softmax runs in several row chunks (the last one partial)."""
    from prime_scale.diffusion import subtoken_cross_entropy

    g = torch.Generator().manual_seed(C + l)
    codec = SubtokenCodec(C, l)
    logits = (torch.randn(4, N, C, generator=g) * 3).requires_grad_()
    clean = codec.encode(torch.randint(0, C, (4, N), generator=g))
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, codec.mask_id, clean)
    ce = subtoken_cross_entropy(logits, noisy, clean, codec, carry_over, compact=compact)
    ref = _joint_cross_entropy(logits, noisy, clean, codec, carry_over)
    scored = (noisy == codec.mask_id) if carry_over else torch.ones_like(noisy, dtype=torch.bool)
    assert torch.allclose(ce[scored], ref[scored], atol=1e-5, rtol=1e-6)
    assert torch.all(ce[~scored] == 0)  # observed digits: marginal 1 under carry-over
    assert ce[scored].min() >= 0  # 0 where the observed digits leave one valid code
    w = torch.randn(ce.shape, generator=g) * scored  # what the bound does: a weighted sum of the scored ones
    (grad,) = torch.autograd.grad((ce * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), logits)
    assert torch.allclose(grad, ref_grad, atol=2e-6)
    assert grad.abs().sum() > 0


def test_subtoken_cross_entropy_is_stable_far_below_the_maximum():
    """A clean token 800 nats below the best code: a softmax over all codes underflows to 0 there, the set
    log-sum-exps do not (each set is reduced with its own maximum)."""
    from prime_scale.diffusion import subtoken_cross_entropy

    codec = SubtokenCodec(100, 2)  # b = 10
    logits = torch.zeros(1, 2, 100)
    logits[..., 0] = 800.0  # code 0 = digits (0, 0); the clean token is 99 = (9, 9)
    logits.requires_grad_()
    clean = codec.encode(torch.tensor([[99, 99]]))
    m = codec.mask_id
    noisy = torch.tensor([[[m, m], [9, m]]])  # fully masked; first digit seen
    ce = subtoken_cross_entropy(logits, noisy, clean, codec)
    # fully masked: -log p(d0 = 9) = 800 + log(1 + 99 e^-800) - log(10 e^0 / ...) ~ 800 - log 10; -log p(d1 = 9) alike
    assert ce[0, 0, 0].item() == pytest.approx(800 - math.log(10), abs=1e-3)
    assert ce[0, 0, 1].item() == pytest.approx(800 - math.log(10), abs=1e-3)
    # d0 = 9 seen: the 10 codes 90..99 all have logit 0, so -log p(d1 = 9) = log 10
    # (a difference of two log-probs near -800, where float32's spacing is 6e-5)
    assert ce[0, 1, 1].item() == pytest.approx(math.log(10), abs=2e-4) and ce[0, 1, 0].item() == 0
    ce.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_subtoken_cross_entropy_keeps_the_logits_dtype_for_the_gradient():
    from prime_scale.diffusion import subtoken_cross_entropy

    g = torch.Generator().manual_seed(0)
    codec = SubtokenCodec(1000, 2)
    logits = torch.randn(2, 64, 1000, generator=g)
    clean = codec.encode(torch.randint(0, 1000, (2, 64), generator=g))
    noisy = torch.full_like(clean, codec.mask_id)
    half = logits.bfloat16().requires_grad_()
    ce = subtoken_cross_entropy(half, noisy, clean, codec)
    ce.sum().backward()
    assert half.grad.dtype == torch.bfloat16
    # computed in float32 from the bf16 values: equal to the float32 computation on the same (rounded) values
    ref = _joint_cross_entropy(half.detach().float(), noisy, clean, codec, True)
    assert ce.dtype == torch.float32 and torch.allclose(ce, ref, atol=1e-5)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_l1_is_plain_masked_diffusion_loss(schedule_name):
    """l = 1 against a direct MD4 computation: w(t) * sum over masked tokens of cross_entropy(logits, x0), with
    w from autograd of alpha and t recovered from the masking rate the model was handed."""
    torch.manual_seed(0)
    C, N, B = 37, 12, 16
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, time_conditioning=True)
    model = PrimeTransformer(cfg, vocab_size=C, num_subtokens=1)
    for p in model.parameters():  # adaLN-Zero starts at zero; perturb so time actually matters
        torch.nn.init.normal_(p, std=0.1)
    schedule = make_schedule(SCHEDULES[schedule_name])
    tokens = torch.randint(0, C, (B, N), generator=torch.Generator().manual_seed(1))
    seen = {}

    def denoise(noisy, m):
        seen["noisy"], seen["m"] = noisy, m
        seen["logits"] = model(noisy, m)
        return seen["logits"]

    est = nelbo(denoise, tokens, model.codec, schedule, torch.Generator().manual_seed(2), estimator="continuous")
    masked = seen["noisy"][..., 0] == C  # MASK id = b = C when l = 1
    t = schedule.t_from_mask_prob(seen["m"].double()).requires_grad_(True)
    alpha = 1 - (torch.sin(0.5 * math.pi * t) if schedule_name == "cosine" else t)
    (dalpha,) = torch.autograd.grad(alpha.sum(), t)
    weight = (-dalpha / (1 - alpha)).detach()
    ce = F.cross_entropy(seen["logits"].reshape(-1, C).double(), tokens.reshape(-1), reduction="none").view(B, N)
    direct = weight * (ce * masked).sum(1)
    assert masked.any() and (~masked).any()
    assert torch.allclose(est.per_sequence.double(), direct, rtol=1e-4, atol=1e-4)


def test_estimators_agree_on_a_network():
    torch.manual_seed(0)
    C, N, B = 20, 10, 512
    model = PrimeTransformer(ModelConfig(n_layer=1, d_model=32, n_head=2), vocab_size=C, num_subtokens=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(0, C, (B, N), generator=torch.Generator().manual_seed(3))
    schedule = make_schedule(SCHEDULES["linear"])
    with torch.no_grad():
        a = mc_nelbo(model, tokens, model.codec, schedule, 1, "continuous", repeats=8)
        b = mc_nelbo(model, tokens, model.codec, schedule, 2, "count", repeats=8)
    assert abs(a[0] - b[0]) < 3 * math.hypot(a[1], b[1]), (a, b)
    assert b[1] < a[1]  # the count estimator is the low-variance one


def test_padding_is_neither_masked_nor_counted():
    C, N = 12, 6
    codec = SubtokenCodec(C, 2)
    tokens = torch.randint(0, C, (4, N), generator=torch.Generator().manual_seed(0))
    token_mask = torch.ones(4, N, dtype=torch.bool)
    token_mask[:, 4:] = False
    seen = []

    def denoise(noisy, m):
        seen.append(noisy)
        return torch.zeros(noisy.shape[0], N, C)

    for estimator in ("continuous", "count"):
        est = nelbo(denoise, tokens, codec, make_schedule(SCHEDULES["linear"]), torch.Generator().manual_seed(1),
                    estimator=estimator, token_mask=token_mask)
        assert est.tokens.tolist() == [4] * 4
        assert not (seen[-1][:, 4:] == codec.mask_id).any()
    with pytest.raises(ValueError, match="no real tokens"):
        nelbo(denoise, tokens, codec, make_schedule(SCHEDULES["linear"]), torch.Generator(),
              token_mask=torch.zeros(4, N, dtype=torch.bool))


@pytest.mark.parametrize("C,l,rows", [(37, 3, 7), (10, 1, 5), (50257, 2, 3), (256, 4, 11)])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_head_in_row_chunks_equals_one_chunk(C, l, rows, compact, dtype):
    """A budget of a few rows per chunk (the last chunk partial, a boundary inside every sequence) gives the same
    values and gradients as one chunk, on both paths and for float32 and bf16 logits; both match the joint."""
    from prime_scale.diffusion import loss_head_row_bytes, rows_per_chunk, subtoken_cross_entropy

    g = torch.Generator().manual_seed(C + l)
    codec = SubtokenCodec(C, l)
    B, N = 3, 25 if C > 1000 else 40  # 75 or 120 positions: never a multiple of the chunk
    budget = rows * loss_head_row_bytes(C, codec.base, l, compact) / 2**20
    assert rows_per_chunk(B * N, loss_head_row_bytes(C, codec.base, l, compact), budget, "cpu") == rows
    logits = (torch.randn(B, N, C, generator=g) * 3).to(dtype).requires_grad_()
    clean = codec.encode(torch.randint(0, C, (B, N), generator=g))
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, codec.mask_id, clean)
    w = torch.randn(clean.shape, generator=g) * (noisy == codec.mask_id)
    results = []
    for chunk_mb in (budget, 1e6):
        ce = subtoken_cross_entropy(logits, noisy, clean, codec, compact=compact, chunk_mb=chunk_mb)
        (grad,) = torch.autograd.grad((ce * w).sum(), logits)
        results.append((ce, grad))
    (ce, grad), (one_ce, one_grad) = results
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.allclose(ce, one_ce, atol=1e-6) and torch.allclose(grad.float(), one_grad.float(), atol=1e-7)
    ref = _joint_cross_entropy(logits.detach().float().requires_grad_(), noisy, clean, codec, True)
    scored = noisy == codec.mask_id
    assert torch.allclose(ce[scored], ref[scored], atol=1e-5, rtol=1e-6)


def test_genmd4_marginals_in_row_chunks_equal_the_whole_joint():
    """GenMD4's loss reads every masked digit's marginal: in chunks of 5 rows (recomputed in the backward) the
    values and gradients are those of the joint over all positions."""
    from prime_scale.diffusion import chunked_digit_log_marginals, genmd4_row_bytes

    g = torch.Generator().manual_seed(0)
    C, l, B, N = 37, 3, 2, 31
    codec = SubtokenCodec(C, l)
    logits = (torch.randn(B, N, C, generator=g) * 3).requires_grad_()
    noisy = torch.where(torch.rand(B, N, l, generator=g) < 0.5, codec.mask_id,
                        codec.encode(torch.randint(0, C, (B, N), generator=g)))
    w = torch.randn(B, N, l, codec.base, generator=g)
    chunked = chunked_digit_log_marginals(logits, noisy, codec, chunk_mb=5 * genmd4_row_bytes(C, codec.num_codes) / 2**20)
    whole = digit_log_marginals(carry_over_log_probs(logits, noisy, codec), l)
    assert torch.allclose(chunked, whole, atol=1e-6)
    (a,) = torch.autograd.grad((chunked.clamp_min(-50) * w).sum(), logits)
    (b,) = torch.autograd.grad((whole.clamp_min(-50) * w).sum(), logits)
    assert torch.allclose(a, b, atol=1e-6) and a.abs().sum() > 0
