"""Look inside a prepared dataset: ``python -m data_prep.inspect URL [--split val] [-n 3] [--chars 400]``.

Prints the manifest (without the per-shard list unless ``--shards``) and decodes the first samples of a split:
text through the dataset's own tokenizer (tokenizer.model or tokenizer.json), images as their shape, label and a coarse grey-level sketch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the dataset folder (data.path): local path or fsspec URL")
    p.add_argument("--split", default="train")
    p.add_argument("-n", type=int, default=3, help="samples to decode")
    p.add_argument("--chars", type=int, default=400, help="characters of decoded text to show per sample")
    p.add_argument("--shards", action="store_true", help="also list every shard with its size and sha256")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = read_manifest(args.url)
    except FileNotFoundError:
        print(f"error: no manifest.json under {args.url}: not a prepared dataset (or its job has not finished)",
              file=sys.stderr)
        return 1
    shown = json.loads(json.dumps(manifest))
    if not args.shards:
        for split in shown.get("splits", {}).values():
            split["shards"] = f"{len(split['shards'])} shards, {sum(s['bytes'] for s in split['shards']):,} bytes"
    print(json.dumps(shown, indent=2))
    if args.split not in manifest.get("splits", {}):
        print(f"error: no split {args.split!r}; the dataset has {', '.join(manifest.get('splits', {}))}",
              file=sys.stderr)
        return 1
    for block in describe_samples(args.url, manifest, args.split, args.n, args.chars):
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
