"""How much memory a rank needs: a model of what prime_scale allocates in a training step, an evaluation batch
and a sampling step, by component, for a Config, a world size, a micro-batch, a device kind and a ZeRO stage.

    estimate(cfg, world_size=8, micro_batch=64, device="cuda").table()   # bytes per component, readable
    largest_micro_batch(cfg, world_size=8, budget_bytes=80 * GB)          # the largest micro-batch that fits
    eval_batch_size(cfg, "cuda")                                          # eval.batch_size=0's batch

Every component is counted from the code it models (docs/performance.md, "Memory"; tests/test_memory.py holds
the counts to the code):

* **parameters, gradients, optimizer, engine buffers**: DeepSpeed 0.19's layouts. AdamW keeps two fp32 moments;
  bf16 adds fp32 master weights. ZeRO-1 shards the optimizer state (moments, master weights) over the world
  size, ZeRO-2 also the gradients, ZeRO-3 also the parameters. ZeRO-1/2/3 reduce gradients through a contiguous
  bucket of ``reduce_bucket_size`` (5e8) elements: a GPU allocates all of it, a CPU's pages exist only where
  they are written (at most the model's gradients).
* **activations**: the tensors autograd saves in ``PrimeTransformer.forward``, counted tensor by tensor (per
  block: 11 d + 2 h values per position, h the MLP width; with time conditioning 4 d more per position and 9 d
  per sequence; LayerNorm statistics and the attention's log-sum-exp in float32). Attention is
  ``scaled_dot_product_attention``'s flash kernel on CPU and GPU alike (no N x N scores are kept; a padding mask
  would switch to the math kernel, which training never passes). With ``engine.activation_checkpointing`` a
  block keeps only its input, and the backward recomputes one block at a time.
* **logits and the loss head**: the logits (B, N, C) in the activation dtype, their gradient (float32 logits:
  the (P, b**l) padded buffer the head writes; bf16: (P, C) bf16), and one row chunk of the head's temporaries
  (``diffusion.loss_head_row_bytes`` x ``diffusion.rows_per_chunk``: ``engine.loss_chunk_mb``, on CPU at most
  ``diffusion.CPU_CHUNK_BYTES``). The AR model's cross-entropy keeps float32 log-softmax and gradient buffers of
  (P, C). GenMD4's loss forms the carry-over joint (P, b**l) (``diffusion._genmd4_nelbo``).
* **sampler**: the cached logits (B, N, C), a fresh network output and one chunk of draws
  (``sampler.sampler_row_bytes``).
* **runtime**: what a process holds before any of it: on CPU the measured resident size of Python with torch
  and DeepSpeed imported (``CPU_RUNTIME_BYTES``), on a GPU the CUDA context outside the caching allocator
  (``CUDA_CONTEXT_BYTES``, a typical figure, not measured here).

``largest_micro_batch`` and the batch rules keep ``HEADROOM`` of the budget free for what is not modelled
(allocator fragmentation, communication temporaries, the data loader).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from prime_scale.radix import resolve_base
from prime_scale.config import Config

MB, GB = 1 << 20, 1 << 30
BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size (and allgather / ZeRO-3 prefetch: 5e7)
PREFETCH_ELEMENTS = 50_000_000
CPU_RUNTIME_BYTES = 560 * MB  # measured: python + torch 2.13 + deepspeed 0.19 + prime_scale imported, 2 threads
CUDA_CONTEXT_BYTES = 1 * GB  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator
HEADROOM = 0.10  # of a budget kept free for what the model does not count
FREQ_DIM = 256  # TimeEmbedding's sinusoidal features


@dataclass
class MemoryEstimate:
    """Bytes per rank, by component; ``total`` is their sum. ``table()`` prints them."""

    what: str  # "train", "eval" or "sample", and the shape it was asked for
    parameters: int = 0  # this rank's weights (bf16 or fp32; a 1/world share under ZeRO-3)
    gradients: int = 0  # this rank's gradients, where they live between backward and step
    optimizer: int = 0  # AdamW's fp32 moments and, with bf16, fp32 master weights: this rank's share
    engine: int = 0  # DeepSpeed's gradient buckets and ZeRO-3's gathered parameters
    activations: int = 0  # saved for the backward (training), or the live set of one block (inference)
    logits: int = 0  # the network's output (B, N, C); in training also its gradient
    head: int = 0  # loss head / sampler: one row chunk of temporaries, the sampler's logits cache
    runtime: int = 0  # the process before any of the above (CPU: imports; GPU: the CUDA context)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "what")

    def table(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "what"]
        lines = [f"memory per rank, {self.what}:"]
        lines += [f"  {name:12s} {value / GB:9.3f} GiB" for name, value in rows]
        lines.append(f"  {'total':12s} {self.total / GB:9.3f} GiB")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- counts

def parameter_count(cfg: Config) -> int:
    """PrimeTransformer.from_config(cfg).num_params(), from the config alone."""
    m, d = cfg.model, cfg.model.d_model
    l, P, C = cfg.prime.num_subtokens, m.tokens_per_position, cfg.data.vocab_size
    b = resolve_base(C, l, cfg.prime.base)
    h = int(m.mlp_ratio * d)
    tc = m.time_conditioning
    norm = 0 if tc else 2 * d  # LayerNorm weight + bias (adaLN's norms have none)
    block = 2 * norm + 4 * d * d + 2 * d * h + (6 * d * d + 6 * d if tc else 0)
    n = P * l * (b + 1) * d + m.n_layer * block + norm + d * P * C
    if m.merge == "mlp":
        n += 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    if tc:
        n += (FREQ_DIM * d + d) + (d * d + d) + (2 * d * d + 2 * d)  # time embedding MLP, final adaLN
    if cfg.diffusion.schedule == "genmd4" and m.objective == "diffusion":
        n += l * b  # the learned exponents
    return n


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def activation_bytes(cfg: Config, batch: int, dtype: Optional[str] = None,
                     checkpointing: Optional[bool] = None, device: str = "cuda") -> int:
    """Bytes autograd saves in one training forward of ``batch`` sequences (the tensors the backward reads;
    parameters excluded), counted as PrimeTransformer.forward makes them (tests/test_memory.py compares this
    with what autograd saves, tensor by tensor)."""
    m, d, H = cfg.model, cfg.model.d_model, cfg.model.n_head
    s = _bytes(dtype or cfg.train.dtype)
    ckpt = cfg.engine.activation_checkpointing if checkpointing is None else checkpointing
    S = cfg.data.seq_len // m.tokens_per_position  # positions per sequence
    positions = batch * S
    h, tc, l = int(m.mlp_ratio * d), m.time_conditioning, cfg.prime.num_subtokens
    stat = s if device == "cpu" else 4  # LayerNorm's mean and rstd: the input's dtype on CPU, float32 on CUDA
    # per block: input, norm, qkv (3), rotated q and k, attention output and its reshaped copy, residual, norm,
    # MLP hidden before and after GELU (h each); adaLN adds the two modulated norms and the two gated branches
    layer_position = (11 * d + 2 * h + (4 * d if tc else 0)) * s + 4 * stat + 4 * H  # + the attention's lse
    layer_sequence = 9 * d * s if tc else 0  # adaLN's shift/scale/gate chunks and the SiLU of the conditioning
    # embedding indices (int64), the last block's output, the final norm (and its adaLN modulation), stats
    fixed_position = 8 * m.tokens_per_position * l + (2 * d + (d if tc else 0)) * s + 2 * stat
    if m.merge == "mlp":  # the merge MLP: its norm's input and output, hidden before and after GELU
        fixed_position += 10 * d * s + 2 * stat
    fixed_sequence = (FREQ_DIM + 5 * d) * s if tc else 0  # the time embedding's features and MLP
    rotary = S * (d // H) * 4  # cos and sin (float32), shared by every block ...
    if s != 4 and not ckpt:
        rotary *= m.n_layer  # ... or cast to the activation dtype for q and k in each block
    if ckpt:  # a block keeps its input (and the conditioning it shares)
        per_layer = positions * d * s
    else:
        per_layer = positions * layer_position + batch * layer_sequence
    return m.n_layer * per_layer + positions * fixed_position + batch * fixed_sequence + rotary


def _chunk_bytes(rows: int, row_bytes: int, chunk_mb: float, device: str) -> int:
    from prime_scale.diffusion import rows_per_chunk

    return rows_per_chunk(rows, row_bytes, chunk_mb, device) * row_bytes if rows else 0


def loss_head_bytes(cfg: Config, batch: int, device: str, training: bool, dtype: Optional[str] = None) -> tuple[int, int]:
    """(logits and their gradient, the head's temporaries) of ``batch`` sequences, bytes."""
    from prime_scale.diffusion import loss_head_row_bytes

    C, l = cfg.data.vocab_size, cfg.prime.num_subtokens
    b = resolve_base(C, l, cfg.prime.base)
    rows = batch * cfg.data.seq_len
    s = _bytes(dtype or cfg.train.dtype)
    logits = rows * C * s
    small = rows * 4 * (2**l + 8 * l)  # the sets' log-sum-exps, the per-digit losses, masks and digits
    if cfg.model.objective == "ar":  # F.cross_entropy(logits.float()): the float copy, log-softmax, gradients
        temps = rows * C * 4 * ((2 if s == 4 else 3) + (1 if training else 0)) + (rows * C * s if training else 0)
        return logits, temps + small
    if cfg.diffusion.schedule == "genmd4" and cfg.model.objective == "diffusion":
        joint = rows * b**l * 4  # the carry-over joint, its digit marginals' inputs and its gradient
        return logits + (rows * C * s if training else 0), joint * (4 if training else 2) + small
    compact = device == "cpu"
    chunk = _chunk_bytes(rows, loss_head_row_bytes(C, b, l, compact), cfg.engine.loss_chunk_mb, device)
    grad = (rows * b**l * 4 if s == 4 else rows * C * s) if training else 0
    return logits + grad, chunk + small


def _largest_parameter(cfg: Config) -> int:
    """Elements of the largest weight: the output head (P C x d) or an MLP matrix."""
    m = cfg.model
    return max(m.tokens_per_position * cfg.data.vocab_size, int(m.mlp_ratio * m.d_model)) * m.d_model


def engine_state(cfg: Config, world: int, stage: int, s: int, device: str, accumulation: int
                    ) -> tuple[int, int, dict, dict]:
    """DeepSpeed 0.19's per-rank state (``engine.deepspeed_config``: a torch AdamW, contiguous gradients, default
    buckets): (parameters, optimizer state, what else is alive at the start of a backward, what is alive at the
    end of the backward and in the step), the last two as {field: bytes}.

    ZeRO-0 steps a torch AdamW on the whole model; with bf16 (and bf16 gradient accumulation, DeepSpeed's
    default) it is FP16_UnfusedOptimizer, which keeps fp32 master weights of the whole model and, in the step,
    an fp32 copy of every gradient. ZeRO-1/2/3
    keep fp32 master weights and moments of this rank's partition and reduce gradients through a bucket of
    BUCKET_ELEMENTS (a GPU allocates it whole at the start of the backward; a CPU's pages exist once written);
    ZeRO-1 keeps every .grad until the reduction after the backward, ZeRO-2/3 only the partition. The step
    makes an fp32 gradient of the partition and AdamW's temporaries. Gradients from earlier micro-steps
    (``accumulation`` > 1) are alive at the start of a backward."""
    psi, bf16, cpu = parameter_count(cfg), s == 2, device == "cpu"
    shard = world if stage >= 1 else 1
    params = psi * s // (world if stage == 3 else 1)
    optimizer = (4 * psi if (bf16 or stage >= 1) else 0) // shard + 8 * psi // shard
    # AdamW's temporaries: a torch optimizer over the model's tensors (CPU: one tensor at a time, GPU: foreach
    # over all), or over DeepSpeed's flat fp32 partition
    if stage == 0:
        step = 2 * _largest_parameter(cfg) * 4 if cpu else psi * 4
    else:
        step = 2 * psi * 4 // shard
    if stage == 0:
        start = {"gradients": psi * s if accumulation > 1 else 0}
        end = {"gradients": psi * s + (4 * psi if bf16 else 0), "optimizer": step}
        return params, optimizer, start, end
    bucket = min(psi, BUCKET_ELEMENTS) * s
    partition = psi * s // world
    kept = psi * s if stage == 1 else partition  # what a micro-step leaves for the next to accumulate into
    gathered = 2 * PREFETCH_ELEMENTS * s if stage == 3 else 0  # ZeRO-3: the block being run and the prefetched one
    start = {"gradients": kept if accumulation > 1 else 0, "engine": (0 if cpu else BUCKET_ELEMENTS * s) + gathered}
    # on CPU the reduction of a bf16/fp32 bucket through gloo copies it (measured: 1.5x the bucket at its peak)
    comm = bucket * 3 // 2 if cpu and world > 1 else 0
    end = {"gradients": (psi * s if stage == 1 else 0) + partition + 4 * psi // world,
           "engine": (bucket if cpu else BUCKET_ELEMENTS * s) + gathered + comm,
           "optimizer": step + partition}  # + the flattened partition the fp32 gradient is made from
    return params, optimizer, start, end


def _runtime(device: str) -> int:
    return CPU_RUNTIME_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES


def estimate(cfg: Config, world_size: int = 1, micro_batch: Optional[int] = None, device: str = "cuda",
             zero_stage: Optional[int] = None, dtype: Optional[str] = None,
             activation_checkpointing: Optional[bool] = None) -> MemoryEstimate:
    """Peak bytes per rank of one training step (forward, backward, AdamW) of ``cfg`` under DeepSpeed, with
    ``micro_batch`` sequences per rank (default: engine.micro_batch_size, or train.batch_size / world_size).
    ``zero_stage``, ``dtype`` ("float32" | "bfloat16") and ``activation_checkpointing`` default to the config's.

    The peak is the larger of two moments, and the estimate is what is alive then: the start of the backward
    (the saved activations, the logits, their gradient and one chunk of the loss head, next to the weights and
    optimizer state) or the optimizer step (every gradient, DeepSpeed's reductions, AdamW's temporaries)."""
    _check_device(device)
    stage = cfg.engine.zero_stage if zero_stage is None else zero_stage
    dtype = dtype or cfg.train.dtype
    B = micro_batch or cfg.engine.micro_batch_size or max(1, cfg.train.batch_size // world_size)
    accumulation = max(1, cfg.train.batch_size // (B * world_size))
    s = _bytes(dtype)
    params, optimizer, start, end = engine_state(cfg, world_size, stage, s, device, accumulation)
    ckpt = cfg.engine.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    acts = activation_bytes(cfg, B, dtype, ckpt, device)
    if ckpt:  # the backward recomputes one block's saved tensors
        acts += activation_bytes(replace(cfg, model=replace(cfg.model, n_layer=1)), B, dtype, False, device)
    logits, head = loss_head_bytes(cfg, B, device, training=True, dtype=dtype)
    what = f"train, micro-batch {B} x {cfg.data.seq_len}, {world_size} ranks, ZeRO-{stage}, {dtype}, {device}"
    backward = MemoryEstimate(f"{what}; peak at the start of the backward", params, optimizer=optimizer,
                              activations=acts, logits=logits, head=head, runtime=_runtime(device), **start)
    step = MemoryEstimate(f"{what}; peak in the optimizer step", params, runtime=_runtime(device),
                          **{**end, "optimizer": optimizer + end["optimizer"]})
    return max(backward, step, key=lambda e: e.total)


def _inference_activations(cfg: Config, batch: int, s: int) -> int:
    """A no-grad forward keeps the residual stream and one block's intermediates alive at a time."""
    m, d = cfg.model, cfg.model.d_model
    positions = batch * cfg.data.seq_len // m.tokens_per_position
    return positions * (2 * d + 3 * d + 2 * int(m.mlp_ratio * d)) * s


def estimate_eval(cfg: Config, batch: int, device: str = "cuda", dtype: Optional[str] = None) -> MemoryEstimate:
    """Bytes of one evaluation forward (no grad) of ``batch`` sequences: the network's live activations, the
    logits and one loss-head chunk (weights as stored: fp32 for an export, the run's dtype in training)."""
    _check_device(device)
    dtype = dtype or cfg.train.dtype
    s = _bytes(dtype)
    logits, head = loss_head_bytes(cfg, batch, device, training=False, dtype=dtype)
    return MemoryEstimate(f"eval, batch {batch} x {cfg.data.seq_len}, {dtype}, {device}",
                          parameters=parameter_count(cfg) * s, activations=_inference_activations(cfg, batch, s),
                          logits=logits, head=head, runtime=_runtime(device))


def estimate_sample(cfg: Config, batch: int, device: str = "cuda", dtype: Optional[str] = None) -> MemoryEstimate:
    """Bytes of one sampling step of ``batch`` sequences: a network forward, its output copied into the
    sampler's logits cache (B, N, C), and one chunk of carry-over draws."""
    from prime_scale.sampler import sampler_row_bytes

    _check_device(device)
    dtype = dtype or cfg.train.dtype
    s = _bytes(dtype)
    C, l = cfg.data.vocab_size, cfg.prime.num_subtokens
    codes = resolve_base(C, l, cfg.prime.base) ** l
    rows = batch * cfg.data.seq_len
    logits = rows * C * s
    draws = _chunk_bytes(rows, sampler_row_bytes(codes, cfg.sample.top_p < 1.0), cfg.engine.loss_chunk_mb, device)
    return MemoryEstimate(f"sample, batch {batch} x {cfg.data.seq_len}, {dtype}, {device}",
                          parameters=parameter_count(cfg) * s, activations=_inference_activations(cfg, batch, s),
                          logits=logits, head=logits + draws + rows * 64, runtime=_runtime(device))


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


# ---------------------------------------------------------------------------------------------------- batches

def placement(model) -> tuple[str, str]:
    """("cpu" | "cuda", "float32" | "bfloat16"): where a network's (or DeepSpeed engine's) weights live and
    their dtype, the arguments the batch rules take."""
    import torch

    p = next(model.parameters())
    return "cpu" if p.device.type == "cpu" else "cuda", "bfloat16" if p.dtype == torch.bfloat16 else "float32"


def _largest(fits, limit: int) -> int:
    """The largest n in 1..limit with fits(n) (fits is monotone), 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def largest_micro_batch(cfg: Config, world_size: int, budget_bytes: float, device: str = "cuda",
                        zero_stage: Optional[int] = None, dtype: Optional[str] = None,
                        activation_checkpointing: Optional[bool] = None, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose training step fits ``budget_bytes`` per rank (less HEADROOM); 0 if not
    even one sequence does."""
    usable = budget_bytes * (1 - HEADROOM)
    return _largest(lambda b: estimate(cfg, world_size, b, device, zero_stage, dtype,
                                       activation_checkpointing).total <= usable, limit)


def _budget_batch(estimator, cfg: Config, device: str, dtype: Optional[str], budget_mb: Optional[float],
                  what: str) -> int:
    budget = (cfg.eval.memory_mb if budget_mb is None else budget_mb) * MB * (1 - HEADROOM)
    need = lambda b: (lambda e: e.total - e.parameters - e.runtime)(estimator(cfg, b, device, dtype))  # noqa: E731
    batch = _largest(lambda b: need(b) <= budget, 1 << 16)
    if batch == 0:
        raise ValueError(f"eval.memory_mb={budget / MB / (1 - HEADROOM):.0f} MB does not hold one {what} sequence "
                         f"of {cfg.data.seq_len} tokens (it needs {need(1) / MB / (1 - HEADROOM):.0f} MB on {device}, "
                         f"{HEADROOM:.0%} headroom included; engine.loss_chunk_mb={cfg.engine.loss_chunk_mb:.0f} "
                         "bounds its chunk of temporaries): raise eval.memory_mb, lower engine.loss_chunk_mb, or set "
                         "eval.batch_size")
    return batch


def eval_batch_size(cfg: Config, device: str = "cuda", dtype: Optional[str] = None,
                    budget_mb: Optional[float] = None) -> int:
    """eval.batch_size, or when it is 0 the largest batch whose evaluation activations, logits and loss-head
    temporaries fit eval.memory_mb (``budget_mb``; the weights and the runtime are not counted against it)."""
    if cfg.eval.batch_size and budget_mb is None:
        return cfg.eval.batch_size
    return _budget_batch(estimate_eval, cfg, device, dtype, budget_mb, "evaluation")


def sample_batch_size(cfg: Config, device: str = "cuda", dtype: Optional[str] = None,
                      budget_mb: Optional[float] = None) -> int:
    """The same rule for sampling: eval.batch_size, or when it is 0 the largest batch whose sampling step
    (network forward, logits cache, one chunk of draws) fits eval.memory_mb."""
    if cfg.eval.batch_size and budget_mb is None:
        return cfg.eval.batch_size
    return _budget_batch(estimate_sample, cfg, device, dtype, budget_mb, "sampled")


# ---------------------------------------------------------------------------------------------------- tables

def micro_batch_table(configs: dict[str, Config], budgets_gb=(80, 141), worlds=(8, 64), stages=(1, 2, 3),
                      device: str = "cuda") -> str:
    """The largest micro-batch per GPU of each config that fits each budget, per ZeRO stage and world size."""
    header = f"{'config':12s} {'params':>8s} {'GPUs':>5s} " + " ".join(
        f"{f'{g} GB Z{z}':>10s}" for g in budgets_gb for z in stages)
    lines = [header, "-" * len(header)]
    for name, cfg in configs.items():
        for world in worlds:
            cells = [f"{largest_micro_batch(cfg, world, g * 1e9, device, z):10d}" for g in budgets_gb for z in stages]
            lines.append(f"{name:12s} {parameter_count(cfg) / 1e6:7.0f}M {world:5d} " + " ".join(cells))
    return "\n".join(lines)
