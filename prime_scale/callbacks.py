"""What a training run does besides stepping: each periodic action is a callback of ``Trainer.fit``.

A callback has four hooks, all called on every rank (several actions are collectives: evaluation shards its
sequences over the ranks, a ZeRO-3 forward needs every rank, a checkpoint save is written by all):

- ``pre_train(trainer)``: once, before the first step (after a resume: at the restored position);
- ``pre_step(trainer)``: before every optimizer step;
- ``post_step(trainer, result)``: after every optimizer step, with its ``trainer.StepResult``;
- ``post_train(trainer)``: once, after the last step or a stop.

``engine.build_trainer`` hands them to the Trainer in the order they run after a step: ``EMAUpdate``,
``MetricsLogger``, ``Evaluator``, ``SampleWriter``, ``Checkpointer`` (so evaluation and samples see this step's
average, and a checkpoint holds it). A new periodic action is a new class here, not an edit of the loop.
"""

from __future__ import annotations

import json
import time
import zlib

import torch

from prime_scale.evaluate import evaluate_nelbo
from prime_scale.image_metrics import save_sample_grid
from prime_scale.metrics import Throughput, flops_per_token, format_eta
from prime_scale.objective import loss_name
from prime_scale.run_context import agree_sum
from prime_scale.objective import sample_with_config
from prime_scale.trainer import StepResult, Trainer, due


class Callback:
    def pre_train(self, trainer: Trainer) -> None:
        pass

    def pre_step(self, trainer: Trainer) -> None:
        pass

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def post_train(self, trainer: Trainer) -> None:
        pass


class EMAUpdate(Callback):
    """The exponential moving average of the weights (engine.ema_decay) takes every optimizer step."""

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        trainer.ema.update()


class MetricsLogger(Callback):
    """Every train.log_every steps (and at the last): the mean training loss over the interval's micro-batches on
    all ranks, the learning rate, the gradient norm, tokens/s, MFU and ETA, the epoch, the dropped batches and a
    CRC of the interval's token ids on all ranks (for audits: a resumed run's batches are the same ones). The loss
    is summed on the device; the one host sync is the all-reduce of a logged step."""

    def pre_train(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
        self.loss_n, self.batch_crc = 0, 0
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.speed = Throughput(flops_per_token(trainer.model, cfg.data.seq_len),
                                cfg.engine.peak_tflops * 1e12 * trainer.geo.world_size, cfg.train.steps,
                                trainer.progress.step)

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        self.loss_sum = self.loss_sum + result.loss_sum
        self.loss_n += len(result.batches)
        for tokens in result.batches:
            self.batch_crc = zlib.crc32(tokens.numpy().tobytes(), self.batch_crc)
        step, cfg = trainer.progress.step, trainer.cfg
        if not trainer.logs_at(step):
            return
        world_size = trainer.geo.world_size
        mean_loss, crc_sum = agree_sum([self.loss_sum.item() / self.loss_n / world_size, float(self.batch_crc)],
                                       trainer.device)
        grad_norm = result.grad_norm if result.grad_norm is not None else trainer.engine.get_global_grad_norm()
        record = {"step": step, loss_name(cfg): mean_loss, "lr": trainer.scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm or 0),
                  **self.speed.interval(step, self.tokens_per_step),
                  "epoch": trainer.progress.micro_step // trainer.plan.steps_per_epoch,
                  "dropped_batches": trainer.progress.dropped_batches,
                  "batch_crc": int(crc_sum)}
        mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
        trainer.log.write(record, f"[prime_scale] step {step}/{cfg.train.steps} {loss_name(cfg)} {mean_loss:.4f} "
                                  f"lr {record['lr']:.2e} grad {record['grad_norm']:.3f} "
                                  f"{record['tokens_per_s']:,.0f} tok/s{mfu} ETA {format_eta(record['eta_s'])}")
        self.loss_sum, self.loss_n, self.batch_crc = torch.zeros_like(self.loss_sum), 0, 0


class Evaluator(Callback):
    """The validation NELBO (``evaluate.evaluate_nelbo``, sharded over the ranks) every train.eval_every steps and
    at the last, with the EMA weights when the run keeps them. ``val``: the blocks it scores."""

    def __init__(self, val: torch.Tensor):
        self.val = val

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        step, cfg = trainer.progress.step, trainer.cfg
        if not (due(step, cfg.train.eval_every) or step == cfg.train.steps):
            return
        with trainer.averaged_weights():
            out = evaluate_nelbo(trainer.engine, self.val, cfg, seed=cfg.train.seed, rank=trainer.geo.rank,
                                 world_size=trainer.geo.world_size)
        ema = trainer.ema is not None
        record = {"step": step, "ema": ema, **{f"val/{k}": v for k, v in out.as_dict().items()}}
        joint = (f"; token_joint (not a bound) {out.token_joint_not_a_bound:.4f}"
                 if out.token_joint_not_a_bound is not None and cfg.prime.num_subtokens > 1 else "")
        trainer.log.write(record, f"[prime_scale] step {step}: val NELBO {out.nelbo_per_token:.4f} ± "
                                  f"{out.stderr:.4f} nats/token, PPL {out.ppl:.3f}, {out.bits_per_dim:.4f} bits/dim"
                                  f"{joint}{' (EMA weights)' if ema else ''}")


class SampleWriter(Callback):
    """Samples every sample.every_steps steps, with the configured sampler. Every rank samples with the same seed
    (ZeRO-3 needs all of them in every forward); rank 0 writes the grid (pixel data) or the token ids (other data)
    under the run's ``samples/``. ``manifest``: the dataset's, which says whether tokens are pixels."""

    def __init__(self, manifest: dict):
        self.manifest = manifest

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        step, cfg = trainer.progress.step, trainer.cfg
        if not due(step, cfg.sample.every_steps):
            return
        trainer.engine.eval()
        with trainer.averaged_weights():
            out = sample_with_config(cfg, trainer.engine, trainer.codec, cfg.sample.num_samples,
                                     cfg.train.seed + step, trainer.device)
        trainer.engine.train()
        if trainer.geo.rank != 0:
            return
        folder = trainer.paths.samples
        folder.mkdir(exist_ok=True)
        grid = save_sample_grid(self.manifest, out.tokens.cpu(), folder / f"step_{step:08d}.png")
        if grid is None:
            path = folder / f"step_{step:08d}.json"
            path.write_text(json.dumps(out.tokens.tolist()))
            trainer.log.write({"step": step, "samples": str(path), "sample_nfe": out.nfe})
        else:
            trainer.log.image(step, grid, f"step {step}, {cfg.sample.steps} steps, NFE {out.nfe:.1f}")


class Checkpointer(Callback):
    """A checkpoint every ckpt.every_steps steps, every ckpt.every_minutes minutes (rank 0's clock, read before each
    step and agreed by all ranks in that step's all-reduce), when a stop signal was agreed, and at the last step."""

    def pre_train(self, trainer: Trainer) -> None:
        self.last_save = time.monotonic()

    def pre_step(self, trainer: Trainer) -> None:
        minutes = trainer.cfg.ckpt.every_minutes
        trainer.save_requested = (trainer.geo.rank == 0 and minutes > 0
                                  and time.monotonic() - self.last_save > 60 * minutes)

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        step, cfg = trainer.progress.step, trainer.cfg
        if (trainer.stop_signal or trainer.save_agreed or due(step, cfg.ckpt.every_steps)
                or step == cfg.train.steps):
            trainer.save()
            self.last_save = time.monotonic()
