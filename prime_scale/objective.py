"""What a model is trained and scored on, chosen by model.objective: the diffusion NELBO (MDM, Prime, GenMD4)
or the AR model's exact NLL; and, as a diagnostic or a surrogate to train on (``diffusion.loss``), the withdrawn
token_joint objective of the MDM-Prime code, never reported as a bound; and how a model of each family samples
(``sample_with_config``). The engine, the evaluation and the sampling tools all come through here, so every family
is trained, measured and sampled by the same code on the same data."""

from __future__ import annotations

import torch

from prime_scale.autoregressive import autoregressive_nll, autoregressive_sample
from prime_scale.codec import SubtokenCodec
from prime_scale.config import Config
from prime_scale.diffusion import Denoiser, NelboEstimate, nelbo
from prime_scale.sampler import SampleResult, sample, sample_kwargs
from prime_scale.schedules import make_schedule


def unwrap(model):
    """The network inside a DeepSpeed engine (or the network itself)."""
    return getattr(model, "module", model)


def schedule_of(model, cfg: Config):
    """The masking schedule: GenMD4's learned one is part of the model, the others come from the config."""
    if cfg.diffusion.schedule == "genmd4":
        return unwrap(model).schedule
    return make_schedule(cfg.diffusion)


def has_token_joint(cfg: Config) -> bool:
    """Whether the withdrawn token_joint objective is defined for this model: masked diffusion with one masking
    rate per token (not AR, not GenMD4's per-value rates). For l = 1 it equals the NELBO."""
    return cfg.model.objective == "diffusion" and cfg.diffusion.schedule != "genmd4"


# The names a training loss is logged under (metrics.jsonl, wandb): a bound (the NELBO, the AR model's NLL) is
# ``loss``; the withdrawn objective (``diffusion.loss=token_joint``) gets a name that says it is not one.
TRAINING_LOSS_NAMES = ("loss", "loss_token_joint_not_a_bound")


def loss_name(cfg: Config) -> str:
    """The name this run's training loss is logged under (one of TRAINING_LOSS_NAMES)."""
    return TRAINING_LOSS_NAMES[1] if cfg.diffusion.loss == "token_joint" else TRAINING_LOSS_NAMES[0]


def sequence_loss(model, tokens: torch.Tensor, cfg: Config, generator: torch.Generator, estimator: str = "continuous",
                  token_mask: torch.Tensor | None = None, token_joint: bool = False, bound: bool = True,
                  time_power: float = 1.0) -> NelboEstimate:
    """Nats of each sequence: one Monte Carlo draw of the NELBO, or the AR model's exact NLL (``estimator`` and
    ``generator`` unused then). ``model`` is the network or a DeepSpeed engine. ``token_joint`` also scores the
    draw with the withdrawn objective (``NelboEstimate.token_joint``; only where ``has_token_joint``), and
    ``bound=False`` leaves the NELBO out (``diffusion.nelbo``).
    ``time_power``: GenMD4's robust evaluation draws t = u ** time_power (``diffusion.nelbo``); 1 = plain."""
    codec = unwrap(model).codec
    if cfg.model.objective == "ar":
        return autoregressive_nll(model, tokens, codec, token_mask)
    return nelbo(model, tokens, codec, schedule_of(model, cfg), generator, estimator=estimator,
                 antithetic=cfg.diffusion.time_sampling == "antithetic", token_mask=token_mask,
                 loss_chunk_mb=cfg.engine.loss_chunk_mb, token_joint=token_joint, bound=bound, time_power=time_power)


def training_loss(model, tokens: torch.Tensor, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """The scalar a training step minimises, per token: the NELBO's continuous estimator (or the AR NLL), or with
    ``diffusion.loss=token_joint`` the withdrawn objective on the same kind of draw (logged as ``loss_name``)."""
    if cfg.diffusion.loss == "token_joint":
        return sequence_loss(model, tokens, cfg, generator, token_joint=True, bound=False).token_joint_per_token
    return sequence_loss(model, tokens, cfg, generator).per_token


def sample_with_config(cfg: Config, denoiser: Denoiser, codec: SubtokenCodec, num_samples: int, seed: int,
                       device: torch.device | str, prompt: torch.Tensor | None = None) -> SampleResult:
    """``sample`` with everything a run's config says: schedule, length, steps, time conditioning and every
    option of cfg.sample; for model.objective=ar, left-to-right sampling with its temperature and top_p.
    ``denoiser`` is the model or a DeepSpeed engine."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if cfg.model.objective == "ar":
        s = cfg.sample
        return autoregressive_sample(denoiser, codec, num_samples, cfg.data.seq_len, generator, device, prompt,
                                     s.float64, s.temperature, s.top_p)
    return sample(denoiser, codec, schedule_of(denoiser, cfg), num_samples, cfg.data.seq_len, cfg.sample.steps,
                  generator, device=device, prompt=prompt, time_conditioned=cfg.model.time_conditioning,
                  chunk_mb=cfg.engine.loss_chunk_mb, **sample_kwargs(cfg.sample))