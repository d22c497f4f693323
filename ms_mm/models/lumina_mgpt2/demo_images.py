"""The bundled demo images of Lumina-mGPT 2.0 in the guide's dataset layout (shapes and colours from
`ms_mm.data.demo`'s generator, their one-line descriptions as prompts), and the embedded default's
fixed sizes and places. Used by feature extraction's embedded default and by `demo.py`."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ms_mm.data import demo

EMBEDDED_MOVQGAN_DIR = Path("ckpt") / "hf_path" / "MoVQGAN-tiny"
EMBEDDED_DATA_DIR = Path("data") / "demo_lumina"
DATA_FILE = "data.json"
FEATURES_DIR = "features"
DEMO_INDEX = f"{FEATURES_DIR}/data.jsonl"
EMBEDDED_TARGET_SIZE = 64      # 2 x 2 grids of 32 px (8 x 8 tiny-MoVQGAN codes) at most
EMBEDDED_PATCH_SIZE = 32
SIDES = (64, 128)              # drawn sizes -> crops 64x64, 64x32, 32x64: three compiled encoder shapes
DEMO_PAD_TO = 128              # every demo sequence fits (the longest, 64x64, is ~110 tokens): one compiled shape


def write_demo_images(out_dir: str | os.PathLike, n: int = 48, seed: int = 0) -> Path:
    """`n` images + `data.json` in the guide's layout under `out_dir` (deterministic); returns data.json.
    Already there (same n) -> left as is."""
    out_dir = Path(out_dir)
    path = out_dir / DATA_FILE
    if path.is_file():
        try:
            if len(json.loads(path.read_text())) == n:
                return path
        except (ValueError, TypeError):
            pass
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        spec = demo._random_spec(rng)
        h, w = rng.choice(SIDES), rng.choice(SIDES)
        rel = f"images/{i:05d}.png"
        demo._draw(spec, h, w, rng).save(out_dir / rel)
        items.append({"file": rel, "prompt": demo._a_describe(spec)})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(items, indent=1))
    os.replace(tmp, path)
    return path
