"""The paper's OpenWebText path at full size, rehearsed on CPU: real shapes, real data path, real faults.

    python bench/paper_scale.py                      # owt_small (12 x 768, seq 1024, C = 50,257), then owt_large
    python bench/paper_scale.py --layers 2 --d-model 256 --heads 4 --large reduced \
        --batch 4 --eval-sequences 4 --sample-steps 8                  # the CI version (tests/test_paper_scale.py)

1. data: data_prep.text trains a GPT-2-style byte-level BPE of 50,257 pieces on Debian's Python docs and packs them
   the MDLM way (prep.packing=wrap: [BOS] 1022 tokens [EOS] blocks; prep.val_select=last: the last documents are
   validation);
2. train: owt_small's network (l = 2) on those tokens in bf16 under DeepSpeed ZeRO-2, 2 CPU ranks (torchrun),
   micro-batch 1 with gradient accumulation to a global batch of 8 (--batch). The run saves after 3 optimizer
   steps and is killed (SIGKILL, every process) during the 4th; the same command resumes it, finishes step 4 and
   scores the validation NELBO (eval.max_sequences=8, --eval-sequences; eval.repeats=1: a full evaluation at this
   size takes hours on CPU);
3. export the checkpoint (safetensors), reload it with from_pretrained, draw one 1024-token sample with 64 steps
   (--sample-steps);
4. in processes of their own, owt_large (16 x 2048, ~1B parameters) under ZeRO-3 on 2 ranks, one micro-step, when
   the memory model says it fits this machine (an out-of-memory end is reported with the model's figure).

Per step it prints the time and tokens/s, and per rank the peak resident memory next to
prime_scale.memory.estimate's figure for that rank. This CPU lacks bf16 matrix units, so bf16 products are computed
as tensor cores compute them (bf16 inputs, fp32 accumulation, bf16 outputs: bench/cpu_bf16.py) unless
--native-bf16. Not a timed test; tests/test_paper_scale.py runs the CI version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/paper_scale.py`: the repo root leads sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, Figure, machine_line, parser, proc_status, write_json  # noqa: E402

PY_DOCS = "/usr/share/doc/python3.11/html/_sources"
KILL_AFTER_STEP = 3  # the checkpoint the killed run leaves; the resumed run trains one step more
GiB = 2**30


# ------------------------------------------------------------------------------------------------ rank processes

def record_peak_memory(path: Path, every_s: float = 0.5) -> None:
    """A daemon thread that keeps ``path`` holding this process's peak resident memory (VmHWM), so the figure
    survives a SIGKILL of the process."""
    rank = os.environ.get("RANK", "0")

    def loop() -> None:
        while True:
            peak = proc_status()["VmHWM"]
            tmp = path.with_name(f"{path.name}.{rank}.tmp")
            tmp.write_text(json.dumps({"rank": int(rank), "peak_rss": peak}))
            os.replace(tmp, path.with_name(f"{path.name}.rank{rank}.json"))
            time.sleep(every_s)

    threading.Thread(target=loop, daemon=True).start()


def worker(argv: list[str]) -> int:
    """A rank under torchrun: ``--worker PEAK_FILE [--emulate-bf16] [--one-step] [--memory-limit BYTES] --
    key=value ...``. The limit caps the rank's address space, so running out is this process's MemoryError, never
    the kernel's OOM killer choosing among the machine's processes."""
    peak_file, rest = Path(argv[0]), argv[1:]
    split = rest.index("--")
    flags, overrides = rest[:split], rest[split + 1:]
    if "--memory-limit" in flags:
        import resource

        limit = int(flags[flags.index("--memory-limit") + 1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    record_peak_memory(peak_file)
    import contextlib

    from bench.cpu_bf16 import emulated_bf16_matmuls

    with emulated_bf16_matmuls() if "--emulate-bf16" in flags else contextlib.nullcontext():
        if "--one-step" not in flags:
            from prime_scale import engine

            return engine.main(overrides)
        from bench.common import make_trainer
        from prime_scale.config import load_config

        start = time.perf_counter()
        trainer = make_trainer(load_config(overrides), "deepspeed")
        built = time.perf_counter()
        loss = trainer.step(0)
        print(f"ONE_STEP loss {loss:.4f} build {built - start:.1f} s step {time.perf_counter() - built:.1f} s",
              flush=True)
        return 0


# ------------------------------------------------------------------------------------------------ the rehearsal

def torchrun(out: Path, name: str, overrides: list[str], flags: list[str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", str(out / f"peak_{name}"), *flags, "--", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank (torchrun starts each rank in a session of its own)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def follow(proc: subprocess.Popen, log: Path, stop_on: str = "") -> tuple[int, str]:
    """Stream the run's output into ``log`` (and lines of ours to the console); with ``stop_on``, kill the whole
    run as soon as a line contains it. Returns (exit status, output)."""
    lines = []
    with open(log, "a") as f:
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if line.startswith(("[prime_scale]", "ONE_STEP", "config error", "error")):
                print(f"    {line.rstrip()}", flush=True)
            if stop_on and stop_on in line:
                kill_tree(proc)
                return -signal.SIGKILL, "".join(lines)
    return proc.wait(), "".join(lines)


def peaks(out: Path, name: str) -> list[int]:
    return [json.loads((out / f"peak_{name}.rank{r}.json").read_text())["peak_rss"] for r in (0, 1)]


def prepare(out: Path, common: list[str], docs: str) -> dict:
    from data_prep.batch import run_job
    from data_prep.text import TextJob
    from prime_scale.config import load_config

    cfg = load_config([*common, f"prep.input={docs}"])
    start = time.perf_counter()
    manifest = run_job(TextJob(cfg), workers=2, progress=False)
    wall = time.perf_counter() - start
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    source_bytes = sum(p.stat().st_size for p in Path(docs).rglob("*") if p.is_file())
    print(f"data: {wall:.0f} s: {manifest['tokenizer']['library']} byte-level BPE of {manifest['tokenizer']['vocab_size']:,}"
          f" pieces trained on {manifest['tokenizer']['trained']['sample_documents']} documents; "
          f"{train['tokens'] + val['tokens']:,} tokens from {source_bytes / 2**20:.1f} MiB "
          f"({(train['tokens'] + val['tokens']) / source_bytes:.3f} tokens/byte); {manifest['packing']} packing: "
          f"{train['sequences']:,} train / {val['sequences']:,} val blocks of {manifest['seq_len']} "
          f"(val: the last {val['documents']} documents), {len(train['shards'])} train shards", flush=True)
    return {"wall": wall, "manifest": manifest}


def main(argv=None) -> list[Figure]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        sys.exit(worker(argv[1:]))
    p = parser(__doc__)
    p.add_argument("--out", default="", help="working folder (default: a temporary folder, removed at the end)")
    p.add_argument("--docs", default=PY_DOCS, help="the corpus (Debian's python3.11-doc reStructuredText)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (owt_small: 12)")
    p.add_argument("--d-model", type=int, default=768, help="width (owt_small: 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (owt_small: 12)")
    p.add_argument("--val-docs", type=int, default=10, help="validation = the last this many documents")
    p.add_argument("--batch", type=int, default=8,
                   help="global batch of the ZeRO-2 run: micro-batch 1 on each of the 2 ranks, the rest by gradient "
                        "accumulation (an even number)")
    p.add_argument("--eval-sequences", type=int, default=8, help="validation sequences scored (eval.max_sequences)")
    p.add_argument("--sample-steps", type=int, default=64, help="sampling steps of the one 1024-token sample")
    p.add_argument("--large", choices=("owt_large", "reduced", "none"), default="owt_large",
                   help="the ZeRO-3 case: owt_large itself, a 2-layer stand-in at width 512 (CI), or none")
    p.add_argument("--native-bf16", action="store_true", help="use PyTorch's own bf16 CPU kernels")
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        p.error(f"--batch must be an even number >= 2 (micro-batch 1 on each of 2 ranks), got {args.batch}")
    print(machine_line(), flush=True)
    if not Path(args.docs).is_dir():
        raise SystemExit(f"no corpus at {args.docs}: apt-get install python3.11-doc")
    from bench.cpu_bf16 import native_bf16_is_slow

    emulate = not args.native_bf16 and native_bf16_is_slow()
    print(f"bf16 products: {'fp32 arithmetic rounded to bf16 (bench/cpu_bf16.py)' if emulate else 'native'}",
          flush=True)
    flags = ["--emulate-bf16"] if emulate else []
    with tempfile.TemporaryDirectory(prefix="paper_scale_") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        return rehearse(args, out, flags)


def rehearse(args, out: Path, flags: list[str]) -> list[Figure]:
    import random

    from prime_scale.config import load_config
    from prime_scale.memory import estimate
    from prime_scale.metrics import step_records
    from prime_scale.run_paths import RunPaths

    started = time.perf_counter()
    port = random.Random(os.getpid()).randint(20000, 40000)
    # one list of settings for data prep and training: the manifest check compares them
    common = ["config=owt_small", f"data.path={out / 'data'}", "data.shard_size_mb=1", "prep.tokenizer=",
              "prep.tokenizer_type=byte_bpe", "prep.packing=wrap", "prep.val_select=last",
              f"prep.val_docs={args.val_docs}", "prep.tokenizer_sentences=1000000"]
    data = prepare(out, common, args.docs)

    model = [f"model.n_layer={args.layers}", f"model.d_model={args.d_model}", f"model.n_head={args.heads}"]
    train = [*common, *model, "train.device=cpu", "train.dtype=bfloat16", "engine.zero_stage=2",
             f"train.batch_size={args.batch}", "engine.micro_batch_size=1", "train.steps=4", "train.warmup_steps=1",
             "train.log_every=1", "train.eval_every=1000000", f"ckpt.every_steps={KILL_AFTER_STEP}",
             "ckpt.every_minutes=0", f"eval.max_sequences={args.eval_sequences}", "eval.repeats=1", "eval.batch_size=1",
             "log.wandb=disabled", f"run.out_dir={out / 'runs'}", "run.name=owt_small"]
    cfg = load_config(train)
    run_dir = out / "runs" / "owt_small"
    log = out / "train.log"
    print(f"train: {cfg.model.n_layer} x {cfg.model.d_model}, l = {cfg.prime.num_subtokens}, C = "
          f"{cfg.data.vocab_size:,}, seq {cfg.data.seq_len}, bf16, ZeRO-2 on 2 ranks, micro-batch 1 x "
          f"{cfg.train.batch_size // 2} accumulated per rank = global batch {cfg.train.batch_size}; killed after the "
          f"step-{KILL_AFTER_STEP} save, then resumed", flush=True)
    t0 = time.perf_counter()
    status, _ = follow(torchrun(out, "first", train, flags, port), log,
                       stop_on=f"saved {run_dir / 'checkpoints'}/step_{KILL_AFTER_STEP:08d}")
    killed_at = time.perf_counter() - t0
    if status != -signal.SIGKILL:
        raise SystemExit(f"the first run ended with status {status} before its step-{KILL_AFTER_STEP} save; see {log}")
    first_peaks = peaks(out, "first")
    t1 = time.perf_counter()
    status, text = follow(torchrun(out, "resumed", train, flags, port + 1), log)
    resumed_s = time.perf_counter() - t1
    if status != 0 or f"at step {KILL_AFTER_STEP}" not in text:
        raise SystemExit(f"the resumed run ended with status {status}; see {log}")
    steps = step_records(run_dir)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    predicted = estimate(cfg, world_size=2, micro_batch=1, device="cpu")
    resumed_peaks = peaks(out, "resumed")
    figures = []
    for step in sorted(steps):
        rate = steps[step]["tokens_per_s"]
        print(f"  step {step}: loss {steps[step]['loss']:.4f}, {tokens_per_step / rate:.1f} s, {rate:,.0f} tokens/s",
              flush=True)
    step_s = [tokens_per_step / steps[s]["tokens_per_s"] for s in sorted(steps) if s > 1]  # step 1 warms up
    figures.append(Figure("train_step_s", sorted(step_s)[len(step_s) // 2], "s", note="median of steps 2-4"))
    figures.append(Figure("train_tokens_per_s", tokens_per_step / figures[-1].value, "tokens/s"))
    for r in (0, 1):
        peak = max(first_peaks[r], resumed_peaks[r])
        print(f"  rank {r}: peak RSS {peak / GiB:.2f} GiB (first run {first_peaks[r] / GiB:.2f}, resumed "
              f"{resumed_peaks[r] / GiB:.2f}); memory model {predicted.total / GiB:.2f} GiB "
              f"({peak / predicted.total:.2f}x)", flush=True)
        figures.append(Figure(f"peak_rss_rank{r}", peak / GiB, "GiB", note=f"model {predicted.total / GiB:.2f} GiB"))
    figures.append(Figure("peak_over_model", max(first_peaks + resumed_peaks) / predicted.total, "x"))
    val = RunPaths(run_dir).validation_records()[-1]
    print(f"  validation NELBO {val['val/nelbo_per_token']:.4f} ± {val['val/stderr']:.4f} nats/token over "
          f"{val['val/sequences']} sequences (PPL {val['val/ppl']:,.0f}; 4 steps of training: the number shows the "
          f"path works, not a model)", flush=True)
    print(f"  first run killed after {killed_at:.0f} s, resumed run {resumed_s:.0f} s", flush=True)

    figures += sample_from_export(run_dir, out, cfg, args.sample_steps)
    if args.large != "none":
        figures += large_step(args.large, out, common, flags, port + 2)
    wall = time.perf_counter() - started
    print(f"summary: paper shapes on CPU ({cfg.model.n_layer} x {cfg.model.d_model}, C = {cfg.data.vocab_size:,}, "
          f"seq {cfg.data.seq_len}, bf16 ZeRO-2 x 2 ranks): data {data['wall']:.0f} s, step "
          f"{figures[0].value:.1f} s ({figures[1].value:,.0f} tokens/s), SIGKILL after the step-"
          f"{KILL_AFTER_STEP} save and resumed from it, peak RSS {max(first_peaks + resumed_peaks) / GiB:.2f} GiB "
          f"per rank vs model {predicted.total / GiB:.2f} GiB; {wall / 60:.1f} min wall", flush=True)
    write_json(figures, args.json)
    return figures


def sample_from_export(run_dir: Path, out: Path, cfg, steps: int) -> list[Figure]:
    import dataclasses

    import torch

    from prime_scale.export import export, from_pretrained
    from prime_scale.objective import sample_with_config

    t0 = time.perf_counter()
    folder = export(str(run_dir / "checkpoints"), str(out / "export"))
    pre = from_pretrained(str(folder))
    exported_s = time.perf_counter() - t0
    size = (folder / "model.safetensors").stat().st_size
    print(f"export: {exported_s:.0f} s, {size / 2**20:,.0f} MiB of safetensors ({pre.model.num_params():,} "
          f"parameters, {pre.info['weights']} weights of step {pre.info['step']}), tokenizer {pre.tokenizer!r}",
          flush=True)
    sample_cfg = dataclasses.replace(pre.config, sample=dataclasses.replace(pre.config.sample, steps=steps))
    t1 = time.perf_counter()
    with torch.no_grad():
        result = sample_with_config(sample_cfg, pre.model, pre.model.codec, 1, seed=0, device="cpu")
    sample_s = time.perf_counter() - t1
    text = pre.detokenize(result.tokens)[0]
    print(f"sample: 1 x {result.tokens.shape[1]} tokens, {steps} steps, NFE {result.nfe:.0f}, {sample_s:.0f} s "
          f"({result.tokens.shape[1] / sample_s:,.0f} tokens/s): {text[:120]!r}", flush=True)
    return [Figure("export_s", exported_s, "s"), Figure("sample_tokens_per_s", result.tokens.shape[1] / sample_s,
                                                         "tokens/s")]


def large_step(which: str, out: Path, common: list[str], flags: list[str], port: int) -> list[Figure]:
    """One micro-step of owt_large (or its 2-layer stand-in) under ZeRO-3 on 2 ranks, each rank's address space
    capped at its share of the available memory; not started when the memory model's figure exceeds twice that share
    (an out-of-memory end is reported with the model's figure)."""
    import psutil

    from prime_scale.config import load_config
    from prime_scale.memory import estimate, parameter_count

    shape = [] if which == "owt_large" else ["model.n_layer=2", "model.d_model=512", "model.n_head=8"]
    overrides = [*common, "config=owt_large", *shape, "train.device=cpu", "train.dtype=bfloat16",
                 "engine.zero_stage=3", "train.batch_size=2", "engine.micro_batch_size=1"]
    overrides = [o for o in overrides if o != "config=owt_small"]
    cfg = load_config(overrides)
    predicted = estimate(cfg, world_size=2, micro_batch=1, device="cpu")
    available = psutil.virtual_memory().available
    name = f"{which} ({cfg.model.n_layer} x {cfg.model.d_model}, {parameter_count(cfg) / 1e9:.2f} B parameters)"
    print(f"large: {name}, ZeRO-3 on 2 ranks, micro-batch 1: memory model {predicted.total / GiB:.2f} GiB per rank, "
          f"{2 * predicted.total / GiB:.1f} GiB for both; {available / GiB:.1f} GiB available", flush=True)
    figures = [Figure(f"{which}_model_gib_per_rank", predicted.total / GiB, "GiB")]
    share = int(0.45 * available)  # per rank: both ranks and this process's own memory must fit
    if predicted.total > 2 * share:  # the model over-counts ZeRO-3 on CPU (the reduced case: about 0.7x), so try
        print(f"  not started: the model's {predicted.total / GiB:.1f} GiB per rank exceed twice the "
              f"{share / GiB:.1f} GiB share of the available memory", flush=True)
        return figures
    t0 = time.perf_counter()
    status, text = follow(torchrun(out, "large", overrides, [*flags, "--one-step", "--memory-limit", str(share)],
                                   port), out / "large.log")
    wall = time.perf_counter() - t0
    if status != 0:
        oom = "out of memory" if ("MemoryError" in text or "can't allocate memory" in text
                                  or "DefaultCPUAllocator" in text) else "failed"
        reached = [p for p in (out / f"peak_large.rank{r}.json" for r in (0, 1)) if p.is_file()]
        reached = max(json.loads(p.read_text())["peak_rss"] for p in reached) if reached else 0
        print(f"  {oom}: status {status} after {wall:.0f} s with {share / GiB:.1f} GiB of address space per rank "
              f"(peak RSS reached {reached / GiB:.2f} GiB); the model says {predicted.total / GiB:.2f} GiB per "
              f"rank; log {out / 'large.log'}", flush=True)
        return figures + ([Figure(f"{which}_rss_before_end_gib", reached / GiB, "GiB")] if reached else [])
    peak = max(peaks(out, "large"))
    print(f"  one micro-step in {wall:.0f} s, peak RSS {peak / GiB:.2f} GiB per rank vs model "
          f"{predicted.total / GiB:.2f} GiB ({peak / predicted.total:.2f}x)", flush=True)
    return figures + [Figure(f"{which}_peak_rss_gib", peak / GiB, "GiB"),
                      Figure(f"{which}_peak_over_model", peak / predicted.total, "x")]


if __name__ == "__main__":
    main()
