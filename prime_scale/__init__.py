"""prime_scale: pretraining pipeline for masked discrete diffusion (MDM-Prime and baselines)."""

__version__ = "0.1.0"


def from_pretrained(folder: str, device: str = "cpu"):
    """Load an export (``python -m prime_scale.export ckpt=URL out=DIR``) without DeepSpeed: see
    prime_scale.export.Pretrained. Imported lazily so that ``import prime_scale`` stays light."""
    from prime_scale.export import from_pretrained as load

    return load(folder, device)
