"""What a model is trained and scored on, chosen by model.objective: the diffusion NELBO (MDM, Prime, GenMD4)
or the AR model's exact NLL. The engine, the evaluation and the sampling tools all come through here, so every
family is trained and measured by the same code on the same data."""

from __future__ import annotations

import torch

from prime_scale.config import Config
from prime_scale.diffusion import NelboEstimate, nelbo
from prime_scale.schedules import make_schedule


def unwrap(model):
    """The network inside a DeepSpeed engine (or the network itself)."""
    return getattr(model, "module", model)


def schedule_of(model, cfg: Config):
    """The masking schedule: GenMD4's learned one is part of the model, the others come from the config."""
    if cfg.diffusion.schedule == "genmd4":
        return unwrap(model).schedule
    return make_schedule(cfg.diffusion)


def sequence_loss(model, tokens: torch.Tensor, cfg: Config, generator: torch.Generator, estimator: str = "continuous",
                  token_mask: torch.Tensor | None = None) -> NelboEstimate:
    """Nats of each sequence: one Monte Carlo draw of the NELBO, or the AR model's exact NLL (``estimator`` and
    ``generator`` unused then). ``model`` is the network or a DeepSpeed engine."""
    codec = unwrap(model).codec
    if cfg.model.objective == "ar":
        from prime_scale.autoregressive import autoregressive_nll

        return autoregressive_nll(model, tokens, codec, token_mask)
    return nelbo(model, tokens, codec, schedule_of(model, cfg), generator, estimator=estimator,
                 antithetic=cfg.diffusion.time_sampling == "antithetic", token_mask=token_mask,
                 loss_chunk_mb=cfg.engine.loss_chunk_mb)
