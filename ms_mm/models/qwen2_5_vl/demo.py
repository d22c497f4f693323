"""The bundled demo data (`ms_mm.data.demo`: shapes and colours, mllm_format) as a Qwen2.5-VL data json.

    python -m ms_mm.data.demo --out DIR      # the images + mllm_format json this reads

`demo_data_config(DIR)` is the matching MindSpeed-MM `data_*.json` dict, using the bundled tiny
tokenizer (`ms_mm/models/qwen2_5_vl/assets`) unless a processor dir is given.
"""
from __future__ import annotations

import os
from pathlib import Path

from ms_mm.data.demo import DATA_FILE, make_demo_dataset
from ms_mm.models.qwen2_5_vl.tokenizer import TINY_MAX_PIXELS, TINY_MIN_PIXELS, asset_dir

__all__ = ["DATA_FILE", "make_demo_dataset", "demo_data_config"]


def demo_data_config(out_dir: str | os.PathLike, processor_dir: str | os.PathLike | None = None,
                     cutoff_len: int = 128) -> dict:
    """A `data_*.json`-shaped dict (MindSpeed-MM layout) for the demo data in `out_dir`, using
    the bundled tiny tokenizer unless `processor_dir` is given."""
    out_dir = Path(out_dir)
    # cutoff_len 128: the longest demo sample is ~100 tokens (three turns, or two 112x112 images)
    return {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {
                "model_name_or_path": str(processor_dir or asset_dir()),
                "use_fast_tokenizer": True,
                "split_special_tokens": False,
                "image_max_pixels": TINY_MAX_PIXELS,
                "image_min_pixels": TINY_MIN_PIXELS,
            },
            "basic_parameters": {
                "template": "qwen2vl",
                "dataset_dir": str(out_dir),
                "dataset": str(out_dir / DATA_FILE),
                "cache_dir": str(out_dir / "cache_dir"),
                "train_on_prompt": False,
                "mask_history": False,
                "cutoff_len": cutoff_len,
                "max_samples": None,
            },
            "attr": {"system": None, "images": "images", "videos": None, "messages": "messages",
                     "role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant"},
        },
        "dataloader_param": {
            "dataloader_mode": "sampler", "drop_last": True, "shuffle": True, "num_workers": 2,
            "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True},
            "pad_to": "cutoff_len",
        },
    }
