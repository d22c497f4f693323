"""The bundled demo data (`ms_mm.data.demo`) in DeepSeek-VL2's jsonl format, and its data.json.

    python -m ms_mm.models.deepseek_vl2.demo --out DIR [--n 256] [--seed 0]

writes `DIR/images/*.png` and `DIR/deepseek_vl2_demo_data.jsonl`: one record a line,
`{"id": i, "conversations": [{"role": "<|User|>", "content": "<image>...", "images": [...]},
{"role": "<|Assistant|>", "content": "..."}, ...]}` with image paths relative to DIR (the
`data_folder`). `demo_data_config(DIR)` is the matching MindSpeed-MM `data.json` dict, using the
bundled tiny tokenizer (`ms_mm/models/deepseek_vl2/assets`) unless a processor dir is given,
so a DeepSeek-VL2 example runs on a CPU with no downloads.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

from ms_mm.data import demo

DATA_FILE = "deepseek_vl2_demo_data.jsonl"
ROLES = {"user": "<|User|>", "assistant": "<|Assistant|>"}
# Longest demo sample: two 112 px images (2 x 2 tiles each: 55 image tokens apiece) or three
# turns; both stay well under this.
DEMO_MAX_LENGTH = 192


def mllm_to_deepseek_vl2(record: dict, record_id) -> dict:
    """One mllm_format record (`messages` + `images`) → one DeepSeek-VL2 record: roles renamed,
    each image attached to the user turn whose `<image>` tag it fills."""
    images = list(record.get("images") or [])
    conversations, used = [], 0
    for m in record["messages"]:
        turn = {"role": ROLES[m["role"]], "content": m["content"]}
        n = m["content"].count("<image>")
        if n:
            turn["images"] = images[used:used + n]
            used += n
        conversations.append(turn)
    if used != len(images):
        raise ValueError(f"record {record_id}: {len(images)} images but {used} <image> tags")
    return {"id": record_id, "conversations": conversations}


def make_demo_dataset(out_dir: str | os.PathLike, n: int = 256, seed: int = 0,
                      sides: Sequence[int] = demo.SIDES, two_images: bool = True) -> Path:
    """Write `n` demo samples (the same images and dialogues as `ms_mm.data.demo` with the same
    arguments) under `out_dir` as DeepSeek-VL2 jsonl; returns the jsonl path."""
    out_dir = Path(out_dir)
    mllm_path = demo.make_demo_dataset(out_dir, n=n, seed=seed, sides=sides, two_images=two_images)
    with open(mllm_path, encoding="utf-8") as f:
        records = json.load(f)
    path = out_dir / DATA_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            f.write(json.dumps(mllm_to_deepseek_vl2(rec, i), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def demo_data_config(out_dir: str | os.PathLike, processor_dir: str | os.PathLike | None = None,
                     max_length: int | None = DEMO_MAX_LENGTH) -> dict:
    """A DeepSeek-VL2 `data.json` dict (MindSpeed-MM layout) for the demo data in `out_dir`."""
    from ms_mm.models.deepseek_vl2.tokenizer import asset_dir, special_ids

    out_dir = Path(out_dir)
    pad_id = special_ids()["pad_token_id"] if processor_dir is None else None
    return {
        "dataset_param": {
            "dataset_type": "deepseekvl2",
            "basic_parameters": {
                "data_path": str(out_dir / DATA_FILE),
                "data_folder": str(out_dir),
                "repeat_time": 1,
            },
            "processor_path": str(processor_dir or asset_dir()),
            "preprocess_parameters": None,
            "group_by_length": False,
            "max_length": max_length,
        },
        "dataloader_param": {
            "dataloader_mode": "sampler", "shuffle": True, "drop_last": True, "num_workers": 2,
            "collate_param": {"model_name": "deepseekvl2", **({"pad_id": pad_id} if pad_id is not None else {})},
            "pad_to": "max_length" if max_length else "longest",
        },
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the ms-mm demo dataset as DeepSeek-VL2 jsonl + PNGs.")
    p.add_argument("--out", required=True, help="output directory (becomes the data_folder)")
    p.add_argument("--n", type=int, default=256, help="number of samples (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-image", action="store_true", help="no two-image samples")
    args = p.parse_args(argv)
    path = make_demo_dataset(args.out, n=args.n, seed=args.seed, two_images=not args.single_image)
    print(f"wrote {args.n} DeepSeek-VL2 demo samples to {path}")


if __name__ == "__main__":
    main()
