"""Look inside a prepared dataset: ``python -m data_prep.inspect url=URL [split=val] [n=3] [chars=400] [shards=true]``.

Prints the manifest (without the per-shard list unless ``shards=true``) and decodes the first samples of a split:
text through the dataset's own tokenizer (tokenizer.model or tokenizer.json), images as their shape, label and a coarse grey-level sketch.
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np

from prime_scale.cli import EXIT_OK, Key, UsageError, guarded, keys_help, parse_keys, wants_help
from prime_scale.data.shards import iter_samples, read_manifest
from prime_scale.data.tokenizer import Tokenizer

_SKETCH = " .:-=+*#%@"


def _sketch(pixels: np.ndarray, width: int = 32) -> str:
    grey = pixels.mean(axis=-1)
    step = max(1, grey.shape[1] // width)
    rows = grey[::step, ::step]
    return "\n".join("".join(_SKETCH[int(v) * len(_SKETCH) // 256] for v in row) for row in rows)


def describe_samples(url: str, manifest: dict, split: str, n: int, chars: int) -> list[str]:
    out = []
    samples = itertools.islice(iter_samples(url, split), n)
    if manifest.get("kind") == "image":
        size = manifest["image_size"]
        names = manifest.get("classes", [])
        for key, members in samples:
            pixels = np.frombuffer(members["pixels.u8"], dtype=np.uint8).reshape(size, size, 3)
            label = int(members["cls"])
            name = names[label] if label < len(names) else "?"
            out.append(f"--- {key}: {size}x{size}x3, label {label} ({name}), mean {pixels.mean():.1f}\n"
                       + _sketch(pixels))
        return out
    entry = manifest.get("tokenizer")
    tok = Tokenizer.from_dataset(url, entry) if entry else None
    for key, members in samples:
        ext = next(e for e in members if e.startswith("tokens."))
        tokens = np.frombuffer(members[ext], dtype="<u2" if ext.endswith("u16") else "<u4").tolist()
        head = f"--- {key}: {len(tokens)} tokens, first ids {tokens[:12]}"
        if tok is not None:
            text = tok.decode(tokens)
            head += f"\n{text[:chars]}{' ...' if len(text) > chars else ''}"
        out.append(head)
    return out


KEYS = (
    Key("url", "the dataset folder (data.path): a local path or an fsspec URL", required=True),
    Key("split", "the split whose first samples are decoded", "train"),
    Key("n", "samples to decode", 3, int, minimum=0),
    Key("chars", "characters of decoded text shown per sample", 400, int, minimum=1),
    Key("shards", "also list every shard with its size and sha256", False, bool),
)
PROG = "python -m data_prep.inspect"


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: shown; 2: a usage error, no prepared dataset at the URL, or no such split."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(f"{__doc__}\nKeys (the older 'URL --split val -n 3' spelling still works):\n{keys_help(KEYS)}")
        return EXIT_OK
    return guarded(lambda: show(**parse_keys(argv, KEYS, positional=("url",))), PROG)


def show(url: str, split: str, n: int, chars: int, shards: bool) -> int:
    try:
        manifest = read_manifest(url)
    except FileNotFoundError:
        raise UsageError(f"no manifest.json under {url}: not a prepared dataset (or its job has not finished)") from None
    shown = json.loads(json.dumps(manifest))
    if not shards:
        for entry in shown.get("splits", {}).values():
            entry["shards"] = f"{len(entry['shards'])} shards, {sum(s['bytes'] for s in entry['shards']):,} bytes"
    print(json.dumps(shown, indent=2))
    if split not in manifest.get("splits", {}):
        raise UsageError(f"no split {split!r}; the dataset has {', '.join(manifest.get('splits', {}))}")
    for block in describe_samples(url, manifest, split, n, chars):
        print(block)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
