"""prime_scale: pretraining pipeline for masked discrete diffusion (MDM-Prime and baselines)."""

__version__ = "0.1.0"
