"""Exponential moving average of the weights, as each rank holds them.

Under ZeRO 0-2 every rank holds whole parameters, so the average is of whole tensors and rank 0's copy is what is
saved. Under ZeRO-3 a rank holds only its partition of each parameter (``param.ds_tensor``), and it averages and
saves just that. ``swapped()`` puts the averaged weights in place for evaluation or sampling and restores the
trained ones afterwards; with ZeRO-3 the partitions are swapped and DeepSpeed gathers them as usual. Parameters
that are gathered whole at that moment stay so: DeepSpeed keeps small ones ("persistent", fewer elements than
``stage3_param_persistence_threshold``: every norm and bias, the whole of a tiny model) gathered between steps
and would not gather them again, so their whole tensors are rebuilt from the swapped partitions of all ranks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _held(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = list(module.parameters())
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [_held(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_held(p).float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        trained = [_held(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                _held(p).copy_(s)
            self._regather_whole()
        try:
            yield
        finally:
            with torch.no_grad():
                for t, p in zip(trained, self.params):
                    _held(p).copy_(t)
                self._regather_whole()

    def _regather_whole(self) -> None:
        """ZeRO-3: every parameter held whole right now takes the values of its partitions (one all-gather each; the
        same parameters on every rank, as all ranks are at the same point of the same step)."""
        import torch.distributed as dist

        for p in self.params:
            if self.partitioned and p.data.numel() == p.ds_numel > 0:
                parts = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, p.ds_tensor.contiguous())
                p.data.copy_(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "partitioned": self.partitioned, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["partitioned"] != self.partitioned or len(state["shadow"]) != len(self.shadow):
            raise ValueError("the saved EMA does not match this model's parameters or ZeRO partitioning")
        for s, saved in zip(self.shadow, state["shadow"]):
            if s.shape != saved.shape:
                raise ValueError(f"the saved EMA holds a tensor of shape {tuple(saved.shape)} where this run "
                                 f"holds {tuple(s.shape)} (another world size under ZeRO-3?)")
            s.copy_(saved)
