"""Masking schedules alpha(t): the probability that a sub-token is still unmasked at time t.

Every schedule here has alpha(0) = 1 and alpha(1) = 0, so at t = 1 everything is masked and the continuous-time
NELBO needs no prior term. Each class gives ``mask_prob`` = 1 - alpha and ``weight`` = -alpha'/(1 - alpha) in
closed form: computing them as ``1 - alpha(t)`` loses every digit near t = 0, exactly where the weight is large.
The NELBO's value does not depend on the schedule (MD4, Shi et al. 2024); its Monte Carlo variance does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prime_scale.config_schema import SCHEDULES, ConfigError, DiffusionConfig


class Schedule:
    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.mask_prob(t)

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), the NELBO's weight on the masked cross-entropies at time t."""
        return -self.dalpha(t) / self.mask_prob(t)

    def t_from_mask_prob(self, m: torch.Tensor) -> torch.Tensor:
        """Inverse of mask_prob, for estimators that draw the masking rate first."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """alpha(t) = 1 - t (MD4's linear)."""

    name = "linear"

    def mask_prob(self, t):
        return t

    def dalpha(self, t):
        return -torch.ones_like(t)

    def weight(self, t):
        return 1.0 / t

    def t_from_mask_prob(self, m):
        return m


class CosineSchedule(Schedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)) (MD4's cosine); 1 - alpha = sin(pi t / 2)."""

    name = "cosine"

    def mask_prob(self, t):
        return torch.sin(0.5 * math.pi * t)

    def dalpha(self, t):
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def weight(self, t):
        # clamp: cos(pi/2) rounds to a tiny negative number in float32
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t).clamp_min(0.0) / torch.sin(0.5 * math.pi * t)

    def t_from_mask_prob(self, m):
        return torch.asin(m.clamp(0.0, 1.0)) * (2.0 / math.pi)


class PolynomialSchedule(Schedule):
    """alpha(t) = 1 - t**w; w > 1 keeps tokens longer, w < 1 masks them early."""

    name = "polynomial"

    def __init__(self, power: float):
        if power <= 0:
            raise ValueError(f"polynomial schedule needs power > 0, got {power}")
        self.power = power

    def mask_prob(self, t):
        return t**self.power

    def dalpha(self, t):
        return -self.power * t ** (self.power - 1.0)

    def weight(self, t):
        return self.power / t

    def t_from_mask_prob(self, m):
        return m ** (1.0 / self.power)

    def __repr__(self) -> str:
        return f"PolynomialSchedule(power={self.power})"


class LogLinearSchedule(Schedule):
    """MDLM's log-linear noise: sigma(t) = -log(1 - (1 - eps) t), alpha = exp(-sigma) = 1 - (1 - eps) t.

    MDLM's eps only keeps sigma finite at t = 1; we never form sigma, and eps > 0 would leave alpha(1) = eps,
    i.e. sub-tokens that are never masked and whose cost the bound would silently omit. So eps must be 0 here,
    which makes this schedule equal to the linear one; it exists so that MDLM configs read as they are written.
    """

    name = "loglinear"

    def __init__(self, eps: float = 0.0):
        if eps != 0.0:
            raise ValueError(
                "loglinear eps > 0 leaves alpha(1) = eps: some sub-tokens are never masked and the NELBO would miss "
                "the cost of generating them. Use eps = 0 (MDLM's eps only guards sigma(t), which we never form)."
            )
        self.eps = eps

    def mask_prob(self, t):
        return (1.0 - self.eps) * t

    def dalpha(self, t):
        return -(1.0 - self.eps) * torch.ones_like(t)

    def weight(self, t):
        return 1.0 / t

    def t_from_mask_prob(self, m):
        return m / (1.0 - self.eps)


class GenMD4Schedule(nn.Module):
    """GenMD4's state-dependent schedule (Shi et al. 2024), at sub-token level: a sub-token at digit position j
    whose clean value is v is masked at time t with probability t ** w[j, v], w > 0 learned with the model.

    With l = 1 this is GenMD4 itself (one exponent per token value). With l > 1 every digit position has b
    exponents; the mathematics carries over unchanged because the NELBO is a bound on the sequence of l * N
    independently masked sub-tokens, and the sub-token sequence determines the tokens (docs/method.md). The
    exponents are stored as log w so that w stays positive; they are parameters of the model (``model.schedule``),
    so DeepSpeed optimises, shards and checkpoints them with everything else.
    """

    name = "genmd4"
    state_dependent = True

    def __init__(self, num_subtokens: int, base: int, init_power: float = 1.0):
        super().__init__()
        if init_power <= 0:
            raise ValueError(f"genmd4 needs a positive initial exponent, got {init_power}")
        self.log_power = nn.Parameter(torch.full((num_subtokens, base), math.log(init_power)))

    def forward(self) -> torch.Tensor:
        """(l, b) exponents w[j, v]. Read them by calling the module: under ZeRO-3 the call is what gathers the
        partitioned parameter (the loss uses it outside the network's forward). Always float32: under bf16
        training the parameter is stored in bf16, and t ** w in bf16 would keep three significant digits."""
        return self.log_power.float().exp()

    @staticmethod
    def digit_powers(powers: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """(l, b) exponents and (..., l) digit values in 0..b-1 -> (..., l) the exponent of each digit."""
        return powers[torch.arange(powers.shape[0], device=digits.device), digits]

    @torch.no_grad()
    def reveal_prob(self, t: float, s: float, digits: torch.Tensor) -> torch.Tensor:
        """P(unmasked at s | masked at t, clean digits) = 1 - (s / t) ** w, per digit; s = 0 reveals everything."""
        w = self.digit_powers(self(), digits).double()
        return -torch.expm1(w * math.log(s / t)) if s > 0 else torch.ones_like(w)

    @torch.no_grad()
    def smallest_exponent(self, codec) -> float:
        """The smallest exponent of a digit value that some valid code has (``codec``: the model's SubtokenCodec).
        It decides the robust evaluation's time power (``robust_time_power``). Values no valid code has (the
        leading digit's top values when b**l > C) are never the clean value of a digit, so their exponents never
        set a masking rate and are left out."""
        powers = self()
        table = codec.digit_table[: codec.vocab_size].to(powers.device)  # (C, l) digits of the valid codes
        used = torch.zeros(powers.shape, dtype=torch.bool, device=powers.device)
        used[torch.arange(powers.shape[0], device=powers.device).expand_as(table), table] = True
        return float(powers[used].min())

    def extra_repr(self) -> str:
        return f"l={self.log_power.shape[0]}, b={self.log_power.shape[1]}"


def robust_time_power(min_exponent: float) -> float:
    """The time power p of GenMD4's robust evaluation: t = u ** p, each draw weighted by dt/du = p u**(p-1).

    A digit with exponent w is masked with probability t**w and then weighs ~ 1/t, so the plain estimator's
    second moment near t = 0 is ~ the integral of t**(w-2) dt: infinite for w <= 1. After the change of
    variables it is ~ p**2 times the integral of u**(p w - 2) du, finite for p w > 1 but growing like
    1 / (p w - 1) as p w comes down to 1; p = 2 / min w keeps u**(p w - 2) bounded near u = 0 for every
    exponent. p = 1 (the plain estimator) when every exponent is already >= 2."""
    if not min_exponent > 0:
        raise ValueError(f"genmd4 exponents are positive; got a smallest exponent of {min_exponent}")
    return max(1.0, 2.0 / min_exponent)




def make_schedule(cfg: DiffusionConfig) -> Schedule:
    if cfg.schedule == "linear":
        return LinearSchedule()
    if cfg.schedule == "cosine":
        return CosineSchedule()
    if cfg.schedule == "polynomial":
        return PolynomialSchedule(cfg.schedule_power)
    if cfg.schedule == "loglinear":
        return LogLinearSchedule(cfg.schedule_eps)
    if cfg.schedule == "genmd4":
        raise ConfigError("the genmd4 schedule is learned: it lives in the model (model.schedule), not in the config; "
                          "use prime_scale.objective.schedule_of(model, cfg)")
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
