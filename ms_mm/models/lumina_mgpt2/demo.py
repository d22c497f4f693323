"""The bundled demo data of Lumina-mGPT 2.0: shapes-and-colours images (`ms_mm.data.demo`'s
generator) with their one-line descriptions as prompts, in the guide's dataset layout, and the
embedded default's features and feature data json.

    python -m ms_mm.models.lumina_mgpt2.demo --out DIR [--n 64] [--seed 0]

writes `DIR/images/*.png` + `DIR/data.json` (`[{"file": "images/00000.png", "prompt": "A red circle
in the top left on a white background."}, ...]`). `make_demo_dataset(DIR)` (the embedded default's
`write_demo`) also builds the tiny MoVQGAN and extracts the features into `DIR/features/` with the
bundled tiny tokenizer, so the trainer's data json (`demo_data_config`) points at them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ms_mm.models.lumina_mgpt2.demo_images import (  # noqa: F401  (re-exported)
    DATA_FILE, DEMO_INDEX, DEMO_PAD_TO, EMBEDDED_MOVQGAN_DIR, EMBEDDED_PATCH_SIZE, EMBEDDED_TARGET_SIZE, FEATURES_DIR,
    SIDES, write_demo_images,
)


def make_demo_dataset(out_dir: str | os.PathLike, n: int = 48, seed: int = 0) -> Path:
    """Demo images, then their features (tiny MoVQGAN in `ckpt/hf_path/MoVQGAN-tiny`, bundled tokenizer)
    in `out_dir/features/`; returns the features' data.jsonl."""
    from ms_mm.models.lumina_mgpt2.features import ExtractionSpec, extract
    from ms_mm.models.lumina_mgpt2.tiny import build_tiny_movqgan
    from ms_mm.models.lumina_mgpt2.tokenizer import asset_dir

    out_dir = Path(out_dir)
    data = write_demo_images(out_dir, n, seed)
    if not (EMBEDDED_MOVQGAN_DIR / "movqgan_config.json").is_file():
        build_tiny_movqgan(EMBEDDED_MOVQGAN_DIR, seed=0)
    spec = ExtractionSpec(data, asset_dir(), EMBEDDED_MOVQGAN_DIR, out_dir / FEATURES_DIR, EMBEDDED_PATCH_SIZE,
                          EMBEDDED_TARGET_SIZE, None, None, seed=seed, embedded=True)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    if extract(spec, 1) != 0:
        raise RuntimeError(f"feature extraction of the demo data in {out_dir} failed")
    return out_dir / DEMO_INDEX


def demo_data_config(out_dir: str | os.PathLike, hf_dir=None) -> dict:
    """The trainer's feature data json (MindSpeed-MM layout) for the demo features in `out_dir`."""
    return {
        "dataset_param": {
            "dataset_type": "lumina",
            "basic_parameters": {"data_config": {"path": str(Path(out_dir) / DEMO_INDEX)}},
            "preprocess_parameters": {"item_processor_type": "LoadFeatureItemProcessor"},
        },
        "dataloader_param": {
            "dataloader_mode": "sampler", "sampler_type": "LuminaMetaLenDistSampler", "shuffle": True,
            "drop_last": True, "group_by_length": True, "num_workers": 2, "pad_to": DEMO_PAD_TO, "collate_param": {},
        },
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the Lumina-mGPT 2.0 demo dataset (data.json + images/).")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote {write_demo_images(a.out, a.n, a.seed)}")


if __name__ == "__main__":
    main()
