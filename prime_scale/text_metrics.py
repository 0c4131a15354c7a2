"""Metrics of text models beyond the validation NELBO (docs/evaluation.md): zero-shot perplexity on any local text,
generative perplexity of samples under a scorer model, and the unigram entropy of samples.

* Zero-shot PPL: documents read with data prep's readers (local text) or from MDLM's named sets
  (prime_scale.zero_shot), tokenized with the model's own tokenizer, packed exactly as the model's training data
  were (its manifest's ``packing``: concat, or wrap's [BOS] piece [EOS] blocks; the remainder dropped;
  prime_scale.data.packing), then scored by ``evaluate_nelbo``.
* Generative PPL: exp(mean NLL per scorer token) of the samples under an autoregressive scorer: an AR export of
  this pipeline (``ARScorer``) or a local HuggingFace causal LM (``HFScorer``).
* Unigram entropy: the entropy of each sample's empirical token distribution (nats), averaged over samples, as
  MDLM and ReMDM report next to gen PPL. A sampler that is too cold repeats itself: low gen PPL *and* low entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class EvalError(ValueError):
    """An evaluation that cannot be run as asked: a missing tokenizer, mismatched vocabularies, too little text."""


# ------------------------------------------------------------------------------------------------ unigram entropy


def unigram_entropy(tokens) -> torch.Tensor:
    """Entropy (nats) of each row's empirical token distribution: -sum_v p_v log p_v with p_v = count_v / N.

    ``tokens`` is a (B, N) tensor/array or a list of 1-d sequences (possibly of different lengths). A constant row
    gives 0, a row using k distinct tokens equally often gives log k."""
    rows = [torch.as_tensor(np.asarray(r), dtype=torch.long).reshape(-1) for r in tokens]
    out = torch.zeros(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError("unigram entropy of an empty sequence is undefined")
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / row.numel()
        out[i] = -(p * p.log()).sum()
    return out


def mean_unigram_entropy(tokens) -> float:
    """The average over rows of ``unigram_entropy`` (the number MDLM/ReMDM report)."""
    return float(unigram_entropy(tokens).mean())


# ------------------------------------------------------------------------------------------------ zero-shot text


def read_documents(input: str, text_field: str = "text", txt_document: str = "file") -> list[str]:
    """Every usable document of local text inputs (files, folders or globs of .txt/.jsonl/.json/.parquet, optionally
    .gz/.zst, comma-separated; or a ``datasets.save_to_disk`` folder), in data prep's reading order, through
    prime_scale.data.text_sources (same formats, same skipping of empty or broken documents)."""
    from prime_scale.config import PrepConfig
    from prime_scale.data.errors import DataPrepError, SkipLog
    from prime_scale.data.text_sources import iter_documents, plan_units

    if input.strip().startswith("hf:"):
        raise EvalError(f"zero_shot={input}: only local text is read (nothing is downloaded); save a hub dataset "
                        "with datasets' save_to_disk and pass that folder, or name one of MDLM's sets "
                        "(zero_shot=mdlm or ptb,wikitext2,...; docs/evaluation.md)")
    # large files are planned as one work unit each (no byte ranges); all units are read in order as one stream
    prep = PrepConfig(input=input, text_field=text_field, txt_document=txt_document, unit_mb=float(1 << 20))
    skips = SkipLog(quiet=True)
    try:
        docs = [text for spec in plan_units(prep) for _, text in iter_documents(spec, prep, skips)]
    except DataPrepError as e:
        raise EvalError(f"zero_shot: {str(e).removeprefix('prep.input: ')}") from None
    if not docs:
        raise EvalError(f"no usable documents in {input!r} (skipped: {skips.as_dict()['counts'] or 'none'})")
    return docs


def right_padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows of different lengths -> (ids (B, width) padded with 0, mask (B, width) of real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def require_tokenizer(pretrained, what: str):
    """The export's ``prime_scale.data.tokenizer.Tokenizer``, or a clear EvalError."""
    if pretrained.tokenizer is None:
        raise EvalError(f"{what} needs the model's tokenizer, but this export has no tokenizer file (tokenizer.model "
                        "or tokenizer.json: its data was not text prepared by data_prep.text, or it was exported "
                        "when the dataset had moved)")
    return pretrained.tokenizer


def eos_id_of(pretrained) -> int:
    eos = require_tokenizer(pretrained, "zero-shot perplexity").eos_id
    if eos is None:
        raise EvalError("the model's tokenizer has no EOS id: documents cannot be packed")
    return int(eos)


def packing_of(pretrained) -> str:
    """How the model's training data were packed (concat or wrap): zero-shot text is packed the same way."""
    return pretrained.dataset.get("packing") or "concat"


def document_stream(pretrained, docs: Sequence[str], chunk: int = 1000) -> np.ndarray:
    """The model's tokens of ``docs``, each document followed by its tokenizer's EOS, as one int64 stream (the
    packers' input; encoded ``chunk`` documents at a time, so a large set never sits in memory as Python ints)."""
    from prime_scale.data.packing import eos_stream

    tok = require_tokenizer(pretrained, "zero-shot perplexity")
    eos = eos_id_of(pretrained)
    docs = list(docs)
    parts = [eos_stream(tok.encode(docs[i : i + chunk]), eos) for i in range(0, len(docs), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def pack_for_model(pretrained, stream: np.ndarray, documents: int) -> tuple[torch.Tensor, dict]:
    """A document stream (``document_stream``) -> (n, seq_len) blocks packed as the model's training data (its
    manifest's packing with its tokenizer's BOS/EOS; the remainder dropped), and facts about them. n may be 0 or 1:
    the callers decide what is too little."""
    from prime_scale.data.packing import pack

    tok = require_tokenizer(pretrained, "zero-shot perplexity")
    eos, packing = eos_id_of(pretrained), packing_of(pretrained)
    if packing == "wrap" and tok.bos_id is None:
        raise EvalError("the model's data were wrap-packed ([BOS] piece [EOS]) but its tokenizer has no BOS id")
    blocks, used = pack(stream, packing, pretrained.config.data.seq_len, tok.bos_id, eos)
    blocks = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))
    if len(blocks) and int(blocks.max()) >= pretrained.config.data.vocab_size:
        raise EvalError(f"token id {int(blocks.max())} >= the model's vocab_size {pretrained.config.data.vocab_size}")
    # the text's own counts (the scored ones are EvalResult's sequences/tokens, capped by max_sequences)
    return blocks, {"documents": documents, "text_tokens": len(stream), "blocks": len(blocks), "packing": packing,
                    "dropped_tail_tokens": len(stream) - used}


def zero_shot_blocks(pretrained, docs: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Documents -> the model's tokens -> (n, seq_len) blocks packed as its training data, and facts about them;
    fewer than 2 blocks (no standard error) is an EvalError."""
    blocks, facts = pack_for_model(pretrained, document_stream(pretrained, docs), len(docs))
    if len(blocks) < 2:
        raise EvalError(f"the zero-shot text gives {len(blocks)} block(s) of {pretrained.config.data.seq_len} "
                        f"tokens ({facts['text_tokens']} tokens in all); at least 2 are needed for a standard error")
    return blocks, facts


# ------------------------------------------------------------------------------------------------ generative PPL


@dataclass
class GenPPL:
    ppl: float  # exp(nll_per_token)
    nll_per_token: float  # nats per scorer token
    tokens: int  # scorer tokens scored
    sequences: int  # scored windows (samples are cut into windows of the scorer's context)
    retokenized: bool  # the samples were detokenized and tokenized again by the scorer's tokenizer

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive pieces of at most ``size`` tokens (the scorer's context)."""
    ids = list(ids)
    return [ids[s : s + size] for s in range(0, len(ids), size)]


def split_at(row: Iterable[int], separator: Optional[int]) -> list[list[int]]:
    """A row of token ids cut at every ``separator`` (dropped); empty pieces are kept, so the number of pieces is
    the number of separators + 1."""
    pieces: list[list[int]] = [[]]
    for t in row:
        t = int(t)
        if separator is not None and t == separator:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return pieces


def detokenize_documents(source, tokens: torch.Tensor) -> list[list[str]]:
    """Each sample row -> its documents as text: cut at the source model's EOS, every piece decoded with its
    tokenizer (so a scorer sees the document boundaries as its own EOS, not glued text; special tokens such as
    wrap packing's BOS decode to nothing)."""
    tok = require_tokenizer(source, "scoring samples with a scorer of another tokenizer")
    return [[tok.decode(piece) for piece in split_at(row.tolist(), tok.eos_id)] for row in tokens]


def _join(pieces: list[list[int]], eos: Optional[int]) -> list[int]:
    out: list[int] = []
    for i, p in enumerate(pieces):
        if i and eos is not None:
            out.append(eos)
        out.extend(p)
    return out


def same_vocabulary(a: dict, b: dict) -> bool:
    """Whether two datasets' token ids mean the same thing: the same tokenizer (sha256), or, without a tokenizer
    (synthetic or pixel data), the very same dataset manifest."""
    ta, tb = a.get("tokenizer") or {}, b.get("tokenizer") or {}
    if ta.get("sha256") or tb.get("sha256"):
        return ta.get("sha256") == tb.get("sha256")
    return bool(a) and a == b


class ARScorer:
    """An AR export of this pipeline as the judge of samples: exact -log p of each window of its seq_len tokens,
    the first token read after BOS (autoregressive_nll)."""

    def __init__(self, pretrained, name: str = "", batch_size: int = 32):
        if pretrained.config.model.objective != "ar":
            raise EvalError(f"scorer {name or ''} is not an autoregressive export (model.objective="
                            f"{pretrained.config.model.objective}); train one with model.objective=ar "
                            "prime.num_subtokens=1, or use scorer=hf:PATH")
        self.pretrained, self.name, self.batch_size = pretrained, name, batch_size
        self.context = pretrained.config.data.seq_len

    def describe(self) -> dict:
        p = self.pretrained
        return {"kind": "ar", "name": self.name, "seq_len": self.context, "vocab_size": p.config.data.vocab_size,
                "step": p.info.get("step"), "tokenizer_sha256": (p.dataset.get("tokenizer") or {}).get("sha256")}

    def check(self, source) -> None:
        """Raise EvalError if samples of ``source`` cannot be scored (no shared vocabulary, no tokenizer)."""
        if same_vocabulary(source.dataset, self.pretrained.dataset):
            return
        if source.tokenizer is None or self.pretrained.tokenizer is None:
            raise EvalError("the scorer and the model use different token ids and one of them has no tokenizer to "
                            "go through text; score with an AR export trained on the same data")

    def score(self, source, tokens: torch.Tensor, progress: bool = False) -> GenPPL:
        self.check(source)
        direct = same_vocabulary(source.dataset, self.pretrained.dataset)
        if direct:
            seqs = [w for row in tokens.tolist() for w in windows(row, self.context)]
        else:
            tok = self.pretrained.tokenizer
            seqs = [w for docs in detokenize_documents(source, tokens)
                    for w in windows(_join(tok.encode(docs), tok.eos_id), self.context)]
        return self.score_ids(seqs, retokenized=not direct, progress=progress)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], retokenized: bool = False, progress: bool = False) -> GenPPL:
        """exp(total NLL / total tokens) of token-id sequences (each at most seq_len tokens, scored from BOS)."""
        from prime_scale.autoregressive import autoregressive_nll

        seqs = [s for s in seqs if s]
        if not seqs:
            raise EvalError("nothing to score: the samples are empty after tokenization")
        model = self.pretrained.model
        device = next(model.parameters()).device
        vocab = self.pretrained.config.data.vocab_size
        total, count = 0.0, 0
        for start in tqdm(range(0, len(seqs), self.batch_size), desc="gen PPL (AR scorer)", unit="batch",
                          disable=not progress, leave=False):
            ids, mask = right_padded(seqs[start : start + self.batch_size])
            if int(ids.max()) >= vocab:
                raise EvalError(f"token id {int(ids.max())} is outside the scorer's vocabulary of {vocab}")
            nll = autoregressive_nll(model, ids.to(device), model.codec, mask.to(device))
            total += float(nll.per_sequence.double().sum())
            count += int(nll.tokens.sum())
        value = total / count
        return GenPPL(math.exp(value), value, count, len(seqs), retokenized)


class HFScorer:
    """A local HuggingFace causal LM (a folder with config.json, weights and tokenizer files) as the judge: the
    samples are detokenized with the model's tokenizer, tokenized again with the HF tokenizer, and scored in
    windows of its context with its BOS (when it has one) in front, so every sample token is predicted. Never
    downloads anything (local_files_only=True)."""

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 8):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise EvalError("scorer=hf:PATH needs the transformers package: pip install transformers (it is in "
                            "the dev extra: pip install -e '.[dev]')") from None
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).is_dir():
            raise EvalError(f"scorer=hf:{path}: no such local folder (a HuggingFace model saved with "
                            "save_pretrained; nothing is downloaded)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise EvalError(f"scorer=hf:{path}: cannot load a causal LM and its tokenizer from it: "
                            f"{type(e).__name__}: {e}") from None
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.bos = self.tokenizer.bos_token_id
        self.eos = self.tokenizer.eos_token_id
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024
        self.context = int(limit) - (1 if self.bos is not None else 0)

    def describe(self) -> dict:
        return {"kind": "hf", "path": self.path, "model_type": self.model.config.model_type,
                "context": self.context, "bos_prefix": self.bos is not None,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def check(self, source) -> None:
        require_tokenizer(source, "scoring samples with scorer=hf:PATH (detokenization)")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, source, tokens: torch.Tensor, progress: bool = False) -> GenPPL:
        self.check(source)
        seqs = [w for docs in detokenize_documents(source, tokens)
                for w in windows(_join([self.encode(d) for d in docs], self.eos), self.context)]
        return self.score_ids(seqs, progress=progress)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], progress: bool = False) -> GenPPL:
        """exp(mean NLL per HF token): each sequence (at most ``context`` ids) scored after BOS when the tokenizer
        has one, else from its second token on (the first has no context)."""
        prefix = [self.bos] if self.bos is not None else []
        seqs = [prefix + list(s) for s in seqs if len(prefix) + len(s) >= 2]
        if not seqs:
            raise EvalError("nothing to score: the samples are empty after HF tokenization")
        total, count = 0.0, 0
        for start in tqdm(range(0, len(seqs), self.batch_size), desc="gen PPL (HF scorer)", unit="batch",
                          disable=not progress, leave=False):
            ids, mask = right_padded(seqs[start : start + self.batch_size])
            mask = mask.long()  # transformers' attention_mask
            ids, mask = ids.to(self.device), mask.to(self.device)
            # right padding: a causal model's earlier positions never see it; padded targets are not counted
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            valid = mask[:, 1:].bool()
            total += float(ce[valid].double().sum())
            count += int(valid.sum())
        value = total / count
        return GenPPL(math.exp(value), value, count, len(seqs), True)


@dataclass
class SampleStats:
    """Samples of one model in one float precision and what was measured on them."""

    tokens: torch.Tensor
    nfe: float
    float64: bool
    steps: int
    idle_ratio: float = 0.0  # mean fraction of the steps at which a sample did not change (SampleResult's)
    entropy: float = math.nan
    gen: Optional[GenPPL] = None
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"float64": self.float64, "steps": self.steps, "nfe": self.nfe, "idle_ratio": self.idle_ratio,
                "samples": len(self.tokens),
                "entropy": self.entropy, **({"gen_ppl": self.gen.ppl, "gen_nll_per_token": self.gen.nll_per_token,
                                             "gen_scored_tokens": self.gen.tokens, "retokenized": self.gen.retokenized}
                                            if self.gen else {"gen_ppl": None}),
                "examples": self.examples}


def draw(pretrained, num_samples: int, seed: int, float64: bool, steps: Optional[int] = None,
         batch_size: int = 64, progress: bool = False) -> SampleStats:
    """``num_samples`` samples of an export with everything its config says (sample_with_config), the categorical
    draws in float64 or float32, ``steps`` overriding cfg.sample.steps. Drawn in batches of ``batch_size`` with
    seeds seed, seed + 1, ... (the same seeds in both precisions). NFE and the idle-step ratio are means per
    sequence; for the AR model ``steps`` does not apply (it takes one step per token, none idle)."""
    from prime_scale.objective import sample_with_config

    cfg = pretrained.config
    cfg = replace(cfg, sample=replace(cfg.sample, float64=float64, **({"steps": steps} if steps else {})))
    device = next(pretrained.model.parameters()).device
    rows, nfe, idle = [], 0.0, 0.0
    label = "float64" if float64 else "float32"
    for i, start in enumerate(tqdm(range(0, num_samples, batch_size), desc=f"sampling ({label})", unit="batch",
                                   disable=not progress, leave=False)):
        n = min(batch_size, num_samples - start)
        result = sample_with_config(cfg, pretrained.model, pretrained.model.codec, n, seed + i, device)
        rows.append(result.tokens.cpu())
        nfe += result.nfe * n
        idle += result.idle_ratio * n
    tokens = torch.cat(rows)
    return SampleStats(tokens=tokens, nfe=nfe / num_samples, float64=float64, steps=result.steps,
                       idle_ratio=idle / num_samples, entropy=mean_unigram_entropy(tokens))
