"""prime_scale exports as a model of EleutherAI's lm-evaluation-harness (lm_eval; tested with 0.4.13), docs/harness.md.

    python -m prime_scale.harness --model prime_scale --model_args pretrained=runs/prime/export,mc_num=8 \\
        --tasks lambada_openai,wikitext

lm_eval 0.4.13 finds models only in its own registry (no entry-point plugins), so this module registers the model
``prime_scale`` when it is imported and ``python -m prime_scale.harness`` hands its arguments to lm_eval's own
command line. ``import prime_scale.harness`` before ``lm_eval.simple_evaluate(model="prime_scale", ...)`` does the
same from Python.

What the harness calls a log-likelihood is, for a diffusion model (MDM, MDM-Prime, GenMD4), minus the
continuous-time NELBO of ``objective.sequence_loss`` with the evaluation estimator (``diffusion.eval_estimator``,
'count' by default) averaged over ``mc_num`` draws: a Monte Carlo estimate of a *lower* bound on log p. The
conditional one, log p(continuation | context), scores only the continuation's tokens (``token_mask``): the
context's digits are visible and never masked. For the AR baseline it is the exact log-likelihood.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import sys
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from prime_scale.checkpoint import CheckpointError
from prime_scale.cli import EXIT_OK, guarded, unknown_key
from prime_scale.text_metrics import EvalError

# under lm_eval's logger, so that its handler and --verbosity show the Monte Carlo errors next to its own output
log = logging.getLogger("lm_eval.models.prime_scale")

MODEL_NAME = "prime_scale"


@dataclass
class Score:
    """The bound on -log p(scored tokens | the tokens before them) of one request, in nats."""

    nll: float  # mean of the draws: the NELBO (diffusion) or the exact NLL (AR)
    stderr: float  # Monte Carlo standard error of ``nll`` (0 for AR; nan with a single draw)
    draws: int  # NELBO draws averaged per window (AR: 1, exact)
    tokens: int  # tokens scored
    windows: int = 1  # model calls of seq_len or fewer tokens the tokens were split into


def rolling_windows(n: int, seq_len: int, first: int = 0) -> list[tuple[int, int, int]]:
    """How tokens first .. n-1 of a sequence of n are scored by a model of context ``seq_len``: a list of
    (start, end, scored_from) windows, each scoring tokens scored_from .. end-1 given tokens start .. scored_from-1.
    Every scored token is scored exactly once.

    When they fit in one window, it is the ``seq_len`` tokens that end with them (the context left-truncated).
    Otherwise the whole sequence is cut into consecutive chunks of ``seq_len``, each scored in the window of the
    ``seq_len`` tokens that end with it, and only its tokens from ``first`` on count: the last, partial chunk
    keeps a full window of context (lm_eval's rolling scheme, the model's own begin-of-sequence handling in place
    of its prefix token). With first = 0 and n a multiple of seq_len these are the disjoint blocks that
    ``evaluate_nelbo`` scores, each unconditionally."""
    if seq_len < 1 or not 0 <= first <= n:
        raise ValueError(f"need seq_len >= 1 and 0 <= first <= n, got seq_len={seq_len}, first={first}, n={n}")
    if n - first <= seq_len:
        return [(max(0, n - seq_len), n, first)] if n > first else []
    chunks = [(max(0, min(c + seq_len, n) - seq_len), min(c + seq_len, n), c) for c in range(0, n, seq_len)]
    return [(start, end, max(chunk, first)) for start, end, chunk in chunks if end > first]


def _draw_seed(seed: int, tokens: Sequence[int], scored_from: int) -> int:
    """A generator seed for one window, from the model's seed and the window's content only: a request gets the
    same draws whatever else is evaluated with it and in whatever order lm_eval sends it."""
    digest = hashlib.sha256(f"{seed}|{scored_from}|{','.join(map(str, tokens))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (the stop string itself left out)."""
    cuts = [text.find(s) for s in until if s]
    cuts = [c for c in cuts if c >= 0]
    return text[: min(cuts)] if cuts else text


@register_model(MODEL_NAME)
class PrimeScaleLM(LM):
    """A prime_scale export behind lm_eval's LM interface: loglikelihood, loglikelihood_rolling, generate_until.

    ``pretrained``: an export folder, a run folder (holding export/ or checkpoints/) or a checkpoint, as
    ``python -m prime_scale.evaluate models=...`` takes it. ``mc_num``: NELBO draws per request and window
    (default: the export's eval.repeats; ignored by AR models, whose NLL is exact). ``batch_size``: rows per forward
    pass ('auto': the model's eval.batch_size, or what fits eval.memory_mb). ``seed``: seeds every draw, per
    window from its content (``_draw_seed``). ``max_gen_toks``: generate_until's default length.
    ``max_batch_size`` is what lm_eval passes to every model; unused here.

    After each call ``last_scores`` holds one ``Score`` per request (loglikelihood and loglikelihood_rolling),
    with its Monte Carlo standard error; each is also logged (DEBUG) and their mean (INFO): lm_eval's own stderr
    is over documents."""

    def __init__(self, pretrained: str, mc_num: Optional[int] = None, batch_size: int | str = "auto",
                 device: str = "auto", seed: int = 0, max_gen_toks: int = 256,
                 max_batch_size: Optional[int] = None) -> None:
        super().__init__()
        import shutil
        import tempfile

        from prime_scale.evaluate import eval_batch
        from prime_scale.export import export_folder, from_pretrained
        from prime_scale.text_metrics import require_tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tmp = tempfile.mkdtemp(prefix="prime_harness_")
        try:  # a checkpoint is exported into tmp; the loaded model and tokenizer live in memory after this
            self.pretrained = from_pretrained(str(export_folder(str(pretrained), tmp)), device)
        except CheckpointError as e:
            raise EvalError(f"{pretrained!r} is neither an export folder (model.safetensors + config.yaml), a run "
                            f"folder with export/ or checkpoints/, nor a checkpoint: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.tokenizer = require_tokenizer(self.pretrained, "the lm-evaluation-harness")
        cfg = self.pretrained.config
        if cfg.model.tokens_per_position != 1:
            raise EvalError(f"model.tokens_per_position={cfg.model.tokens_per_position}: the harness scores text "
                            "models, which read one token per position")
        self.model = self.pretrained.model.eval()
        self.codec = self.model.codec
        self.ar = cfg.model.objective == "ar"
        # the draws of one request must be independent (evaluate's repeats of a sequence are): iid times, not
        # times stratified over the rows of a batch, which here are copies of the same sequence
        self.cfg = replace(cfg, diffusion=replace(cfg.diffusion, time_sampling="uniform"))
        self.seq_len = cfg.data.seq_len
        self.mc_num = 1 if self.ar else int(mc_num if mc_num is not None else cfg.eval.repeats)
        if self.mc_num < 1:
            raise ValueError(f"mc_num must be at least 1, got {mc_num}")
        auto = batch_size in (None, "auto") or str(batch_size).startswith("auto")
        self.batch_size = eval_batch(self.model, cfg) if auto else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or 'auto', got {batch_size}")
        self.seed = int(seed)
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device(device)
        self.time_power = 1.0  # GenMD4's robust evaluation draws t = u ** p, as evaluate_nelbo does
        if not self.ar and cfg.diffusion.schedule == "genmd4":
            from prime_scale.objective import schedule_of
            from prime_scale.schedules import robust_time_power

            self.time_power = robust_time_power(schedule_of(self.model, cfg).smallest_exponent(self.codec))
        self.last_scores: list[Score] = []

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "PrimeScaleLM":
        """As LM's, except that a key given in ``--model_args`` wins over the command line's ``--batch_size`` /
        ``--device`` (lm_eval always passes its batch_size, default 1; LM's version would fail on the clash)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "PrimeScaleLM":
        """The model from a dict of arguments; ``arg_dict``'s keys win over ``additional_config``'s."""
        allowed = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        for key in arg_dict:  # a misspelled model_args key is a usage error naming the closest one, not a TypeError
            if key not in allowed:
                raise unknown_key(key, allowed, "model_args key")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # ------------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score_window(self, tokens: Sequence[int], scored_from: int = 0,
                     greedy: bool = False) -> tuple[list[float], Optional[bool]]:
        """-log p(tokens[scored_from:] | tokens[:scored_from]) of one window of at most seq_len tokens: the
        ``mc_num`` NELBO draws (diffusion; the context never masked, only the scored tokens counted) or the exact
        NLL (AR, one value); with ``greedy``, whether the scored tokens are the greedy choice (AR: from the same
        pass; diffusion: one more, ``_greedy``), else None."""
        n = len(tokens)
        if not 0 <= scored_from < n <= self.seq_len:
            raise ValueError(f"a window of {n} tokens scored from {scored_from} (seq_len {self.seq_len})")
        from prime_scale.objective import sequence_loss

        row = torch.tensor(list(tokens), dtype=torch.long, device=self._device)
        scored = torch.arange(n, device=self._device) >= scored_from
        if self.ar:
            nll, hits = self._ar_scores(row[None], scored[None])
            return [nll[0]], hits[0] if greedy else None
        generator = torch.Generator(device=self._device).manual_seed(_draw_seed(self.seed, tokens, scored_from))
        draws = []
        for start in range(0, self.mc_num, self.batch_size):
            rows = min(self.batch_size, self.mc_num - start)
            estimate = sequence_loss(self.model, row.expand(rows, n), self.cfg, generator,
                                     self.cfg.diffusion.eval_estimator, token_mask=scored.expand(rows, n),
                                     time_power=self.time_power)
            draws += estimate.per_sequence.double().tolist()
        return draws, self._greedy(row, scored) if greedy else None

    def _ar_scores(self, rows: torch.Tensor, scored: torch.Tensor) -> tuple[list[float], list[bool]]:
        """AR rows (B, N): the exact -log p of each row's scored tokens given the tokens before them
        (``autoregressive_nll`` with the scored positions as its token_mask; the others are read, not scored), and
        whether every scored token is its position's argmax, from the same forward pass."""
        from prime_scale.autoregressive import autoregressive_nll

        seen = {}

        def forward(*args, **kwargs):
            seen["logits"] = self.model(*args, **kwargs)
            return seen["logits"]

        nll = autoregressive_nll(forward, rows, self.codec, scored).per_sequence.double()
        hit = seen["logits"].argmax(-1) == self.codec.token_to_code(rows)
        return nll.tolist(), (hit | ~scored).all(1).tolist()

    def _greedy(self, row: torch.Tensor, scored: torch.Tensor) -> bool:
        """Diffusion models have no left-to-right greedy decode; here a continuation is greedy when each of its
        tokens is the most likely value of its position with every scored digit masked and the context visible
        (one more forward pass, at masking rate 1): what a one-step decode of the continuation would write."""
        clean = self.codec.encode(row[None])
        noisy = torch.where(scored[None, :, None], torch.full_like(clean, self.codec.mask_id), clean)
        logits = self.model(noisy, torch.ones(1, device=self._device))
        hit = logits[0].argmax(-1) == self.codec.token_to_code(row)
        return bool((hit | ~scored).all())

    def score_tokens(self, tokens: Sequence[int], first: int = 0, greedy: bool = False) -> tuple[Score, Optional[bool]]:
        """The bound on -log p(tokens[first:] | tokens[:first]) (nats), summed over the ``rolling_windows``, with
        its Monte Carlo standard error (the windows' draws are independent: their variances add); with ``greedy``,
        whether every window's scored tokens are greedy (else None)."""
        nll, var, all_greedy = 0.0, 0.0, True
        windows = rolling_windows(len(tokens), self.seq_len, first)
        for start, end, scored_from in windows:
            draws, window_greedy = self.score_window(tokens[start:end], scored_from - start, greedy)
            mean = sum(draws) / len(draws)
            nll += mean
            var += (sum((d - mean) ** 2 for d in draws) / (len(draws) - 1) / len(draws) if len(draws) > 1
                    else (0.0 if self.ar else math.nan))
            all_greedy = all_greedy and bool(window_greedy)
        return (Score(nll, math.sqrt(var), self.mc_num, len(tokens) - first, len(windows)),
                all_greedy if greedy else None)

    def _log_scores(self, what: str) -> None:
        for i, s in enumerate(self.last_scores):
            log.debug("%s request %d: -log p <= %.4f ± %.4f nats (%d tokens, %d window(s), %d draw(s))", what, i,
                      s.nll, s.stderr, s.tokens, s.windows, s.draws)
        if self.last_scores:
            log.info("%s: %d requests, %s, mean Monte Carlo standard error %.4f nats per request", what,
                     len(self.last_scores), "exact NLL (AR)" if self.ar else f"{self.mc_num} NELBO draws each",
                     sum(s.stderr for s in self.last_scores) / len(self.last_scores))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm_eval's causal models cut them: trailing spaces of the context move
        to the continuation, and the continuation is what encoding the whole adds after the context's ids."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [], self.tokenizer.encode(continuation)
        whole, head = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        return head, whole[len(head):]

    def _progress(self, items, what: str, disable: bool):
        """A progress bar over the requests, shown when stderr is a terminal."""
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"prime_scale {what}", disable=disable or not sys.stderr.isatty())

    # ------------------------------------------------------------------------------------------------ lm_eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request: minus the conditional NELBO (diffusion) or the
        exact value (AR). The context is left-truncated to the seq_len window ending with the continuation; a
        continuation longer than seq_len is scored in consecutive windows (``rolling_windows``)."""
        results, self.last_scores = [], []
        for request in self._progress(requests, "loglikelihood", disable_tqdm):
            context, continuation = request.args
            head, tail = self._encode_pair(context, continuation)
            if not tail:
                score, greedy = Score(0.0, 0.0, self.mc_num, 0, 0), True
            else:
                score, greedy = self.score_tokens(head + tail, len(head), greedy=True)
            self.last_scores.append(score)
            results.append((-score.nll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        self._log_scores("loglikelihood")
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each document, bounded below for diffusion models: its tokens (no special token added)
        scored in ``rolling_windows`` of seq_len, summed."""
        results, self.last_scores = [], []
        for request in self._progress(requests, "loglikelihood_rolling", disable_tqdm):
            (text,) = request.args
            ids = self.tokenizer.encode(text)
            score = self.score_tokens(ids)[0] if ids else Score(0.0, 0.0, self.mc_num, 0, 0)
            self.last_scores.append(score)
            results.append(-score.nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        self._log_scores("loglikelihood_rolling")
        return results

    @torch.no_grad()
    def generate_tokens(self, context: Sequence[int], max_gen_toks: int) -> list[int]:
        """Token ids that follow ``context``, drawn by ``sample_with_config`` with every sampling option of the
        model's config (the diffusion sampler with cfg.sample.steps and the context as a fixed prompt, or left to
        right for AR) over a window of the context and the new tokens, seeded from the context. At most
        ``max_gen_toks`` tokens, fewer when the window of seq_len cannot hold them after one token of context; the
        context is left-truncated to fit; cut at the tokenizer's EOS (the end of a document)."""
        from prime_scale.objective import sample_with_config

        context = list(context)
        gen = min(max_gen_toks, self.seq_len - (1 if context else 0))
        if gen < 1:
            return []
        prompt = context[len(context) - min(len(context), self.seq_len - gen):]
        window = replace(self.cfg, data=replace(self.cfg.data, seq_len=len(prompt) + gen))
        prompt_ids = torch.tensor(prompt, dtype=torch.long, device=self._device)[None] if prompt else None
        out = sample_with_config(window, self.model, self.codec, 1, _draw_seed(self.seed, prompt, -gen), self._device,
                                 prompt_ids)
        ids = out.tokens[0, len(prompt):].tolist()
        eos = self.tokenizer.eos_id
        return ids[: ids.index(eos)] if eos is not None and eos in ids else ids

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text that follows each context: ``generate_tokens`` with gen_kwargs' max_gen_toks (default: the
        model's ``max_gen_toks``), decoded, cut before the first of gen_kwargs' ``until`` strings. Sampling
        follows the export's cfg.sample (temperature, top_p, steps); the task's do_sample / temperature are not
        used."""
        results = []
        for request in self._progress(requests, "generate_until", disable_tqdm):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen_toks = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.generate_tokens(self.tokenizer.encode(context) if context else [], max_gen_toks)
            results.append(_cut_at_stops(self.tokenizer.decode(ids), until))
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), results[-1])
        return results


def main(argv: Optional[list[str]] = None) -> int:
    """lm_eval's own command line (its ``cli_evaluate``), with this module's model registered: every argument
    is lm_eval's (``--model prime_scale --model_args pretrained=DIR,mc_num=K --tasks ...``). lm_eval reads
    ``sys.argv`` itself, so ``argv`` is put there for the call and the caller's restored after it. Exit status:
    0 done; 2 a usage error (lm_eval's argparse exits 2 itself; a bad model_args key or an export that cannot be
    scored is reported here)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0], *argv]
    try:
        return guarded(lambda: cli_evaluate() or EXIT_OK, "python -m prime_scale.harness",
                       usage=(EvalError, CheckpointError, FileNotFoundError))
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
