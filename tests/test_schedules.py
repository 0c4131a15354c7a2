import pytest
import torch

from prime_scale.config import DiffusionConfig
from prime_scale.schedules import make_schedule

SCHEDULE_CONFIGS = [
    DiffusionConfig(schedule="linear"),
    DiffusionConfig(schedule="cosine"),
    DiffusionConfig(schedule="polynomial", schedule_power=2.0),
    DiffusionConfig(schedule="polynomial", schedule_power=0.5),
    DiffusionConfig(schedule="loglinear"),
]


@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS, ids=lambda c: f"{c.schedule}-{c.schedule_power}")
def test_endpoints_derivative_weight_inverse(cfg):
    s = make_schedule(cfg)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    alpha = s.alpha(t)
    (grad,) = torch.autograd.grad(alpha.sum(), t)
    t = t.detach()
    assert torch.allclose(s.dalpha(t), grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(s.weight(t), -grad / (1 - alpha.detach()), rtol=1e-9)
    assert torch.all(grad < 0)  # alpha strictly decreasing
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(s.alpha(ends), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.t_from_mask_prob(s.mask_prob(t)), t, atol=1e-9)


@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS, ids=lambda c: f"{c.schedule}-{c.schedule_power}")
def test_weight_is_finite_and_accurate_near_zero(cfg):
    s = make_schedule(cfg)
    t = torch.tensor([1e-7, 1e-5], dtype=torch.float32)
    w = s.weight(t)
    assert torch.isfinite(w).all() and (w > 0).all()
    # the closed form keeps its digits where 1 - alpha(t) in float32 would not
    w64 = s.weight(t.double())
    assert torch.allclose(w.double(), w64, rtol=1e-4)
    assert s.weight(torch.tensor([1.0])).item() >= 0


def test_loglinear_eps_is_refused_with_reason():
    with pytest.raises(ValueError, match="never masked"):
        make_schedule(DiffusionConfig(schedule="loglinear", schedule_eps=1e-3))
