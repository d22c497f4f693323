"""Tiny random models in the upstream HF on-disk layout (the examples' embedded default).

    python -m convert.tiny FAMILY --out DIR [--seed N] [--assets TOKENIZER_DIR] [family switches]

FAMILY is any name of a registered model family (`ms_mm.registry`) that has a tiny builder
(`Family.build_tiny`, in `ms_mm/models/<family>/tiny.py`); the family's own switches
(`Family.tiny_flags`, e.g. DeepSeek-VL2's `--mha`) are accepted for it alone. The weights come from the
family spec's own name/shape table (`write_random_hf`), so the same writer also makes the large
synthetic checkpoints of `bench/bench_convert.py` and the memory test — streamed, one tensor at a time.

Init (as the fixtures, but with zero biases and unit norms — fine for training): Linear / Conv
weights ~ N(0, 1/fan_in), norm weights 1, biases 0; a spec's `init_tensor` overrides it for its own
tensors (token embeddings ~ N(0, 1), say).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from convert.framework import INDEX_FILE
from convert.registry import get_spec
from convert.spec import expand_rules
from ms_mm import registry
from ms_mm.training.mm_checkpoint import BF16, SafetensorsWriter

__all__ = ["write_random_hf", "build_tiny", "tokenizer_special_ids", "main"]


def _fast_fill(shape, dtype) -> np.ndarray:
    # content does not matter (benchmarks, memory tests): one allocation, not constant
    if dtype == BF16:
        return np.resize(np.arange(0x3C00, 0x3C00 + 1021, dtype=np.uint16), shape).view(BF16)
    return np.resize((np.arange(1021, dtype=np.float32) / 1021 - 0.5), shape)


def _init(name: str, shape, rng: np.random.Generator, spec) -> np.ndarray:
    if spec.init_tensor is not None:          # the family's own rule for tensors of its own (embeddings ...)
        arr = spec.init_tensor(name, tuple(shape), rng)
        if arr is not None:
            return arr
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:  # norm weights
        return np.ones(shape, np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    # round to nearest even, as torch does when casting fp32 → bf16
    u = x.astype(np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return r.view(BF16)


def write_random_hf(out_dir, hf_config: Dict[str, Any], family: Optional[str] = None, seed: int = 0,
                    dtype: str = "float32", fill: str = "random", max_shard_bytes: Optional[int] = None) -> Path:
    """Write `config.json` + random weights (every tensor the family spec expects, HF names).

    `family` (a family or converter name) defaults to the family whose config form `hf_config` is."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if fill not in ("random", "fast"):
        raise ValueError(f"fill must be 'random' or 'fast', got {fill!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family is None:
        family = registry.family_for_json(hf_config, "hf_config").name
    spec = get_spec(family)
    config = spec.config_from_hf(hf_config)
    rules = expand_rules(spec.rules(config), spec.layer_counts(config))
    unshaped = [r.mm for r in rules if r.hf_shapes is None]
    if unshaped:
        raise ValueError(f"the {family} spec gives no hf_shapes for {unshaped[:3]}: cannot make random weights")
    rng = np.random.default_rng(seed)
    item = 2 if dtype == "bfloat16" else 4
    np_dtype = BF16 if dtype == "bfloat16" else np.dtype(np.float32)
    tensors = [(h, tuple(s)) for r in rules for h, s in zip(r.hf, r.hf_shapes)]
    shards, size = [[]], 0
    for h, s in tensors:
        nbytes = int(np.prod(s)) * item
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((h, s))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(names, shards):
        with SafetensorsWriter(out / fname, [(h, s, np_dtype) for h, s in shard], {"format": "pt"}) as w:
            for h, s in shard:
                if fill == "fast":
                    w.write(h, _fast_fill(s, np_dtype))
                    continue
                arr = _init(h, s, rng, spec)
                w.write(h, _to_bf16(arr) if dtype == "bfloat16" else arr)
    if n > 1:
        total = sum(int(np.prod(s)) * item for h, s in tensors)
        weight_map = {h: fname for fname, shard in zip(names, shards) for h, _ in shard}
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    cfg = dict(hf_config)
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def tokenizer_special_ids(tokenizer_json: Path) -> Dict[str, int]:
    """{token text: id} of a tokenizer.json's added tokens, plus "_size" = highest id + 1."""
    try:
        tok = json.loads(tokenizer_json.read_text())
        vocab = tok["model"]["vocab"]
        ids = vocab.values() if isinstance(vocab, dict) else range(len(vocab))
        added = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{tokenizer_json}: cannot read the vocabulary ({type(e).__name__}: {e})") from e
    added["_size"] = max(list(ids) + list(added.values())) + 1
    return added



def tiny_families():
    return [f for f in registry.families() if f.build_tiny is not None]


def build_tiny(family: str, out_dir, seed: int = 0, assets: Optional[Path] = None, **options) -> Path:
    """The tiny model of `family` + tokenizer/processor files, ready for `mm-convert ... hf_to_mm`.
    `options` are the family's own (`Family.tiny_flags`: DeepSeek-VL2's `mla=False`, say)."""
    try:
        fam = registry.get(family, "tiny model family")
    except registry.UnknownFamilyError:
        fam = None
    if fam is None or fam.build_tiny is None:
        raise ValueError(f"no tiny builder for family {family!r} (available: "
                         f"{', '.join(f.name for f in tiny_families())})")
    known = {option for option, _, _ in fam.tiny_flags.values()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of the {fam.name} tiny builder"
                         + (f" (it takes {', '.join(sorted(known))})" if known else ""))
    return fam.build_tiny(Path(out_dir), seed, Path(assets) if assets else None, **options)


def main(argv=None) -> int:
    fams = tiny_families()
    p = argparse.ArgumentParser(prog="python -m convert.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=[f.name for f in fams])
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default=None, help="tokenizer/processor dir (default: the family's bundled one)")
    owners: Dict[str, list] = {}
    for f in fams:
        for flag, (option, value, text) in f.tiny_flags.items():
            if flag not in owners:
                p.add_argument(flag, dest=flag.lstrip("-").replace("-", "_"), action="store_true",
                               help=f"{f.name}: {text}")
            owners.setdefault(flag, []).append(f)
    a = p.parse_args(argv)
    options = {}
    for flag, fs in owners.items():
        if getattr(a, flag.lstrip("-").replace("-", "_")):
            mine = [f for f in fs if f.name == a.family]
            if not mine:
                p.error(f"{flag} applies to {', '.join(f.name for f in fs)} only")
            option, value, _ = mine[0].tiny_flags[flag]
            options[option] = value
    try:
        out = build_tiny(a.family, a.out, a.seed, a.assets, **options)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m convert.tiny: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote tiny {a.family} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
