"""Masking schedules alpha(t): the probability that a sub-token is still unmasked at time t.

Every schedule here has alpha(0) = 1 and alpha(1) = 0, so at t = 1 everything is masked and the continuous-time
NELBO needs no prior term. Each class gives ``mask_prob`` = 1 - alpha and ``weight`` = -alpha'/(1 - alpha) in
closed form: computing them as ``1 - alpha(t)`` loses every digit near t = 0, exactly where the weight is large.
The NELBO's value does not depend on the schedule (MD4, Shi et al. 2024); its Monte Carlo variance does.
"""

from __future__ import annotations

import math

import torch

from prime_scale.config import VALID_NAMES, DiffusionConfig


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


SCHEDULES = VALID_NAMES["diffusion.schedule"]


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    if cfg.schedule == "linear":
        return LinearSchedule()
    if cfg.schedule == "cosine":
        return CosineSchedule()
    if cfg.schedule == "polynomial":
        return PolynomialSchedule(cfg.schedule_power)
    if cfg.schedule == "loglinear":
        return LogLinearSchedule(cfg.schedule_eps)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
