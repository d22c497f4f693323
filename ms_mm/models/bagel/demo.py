"""The bundled BAGEL demo data: the `bagel_example` layout, small enough to learn on a CPU.

    python -m ms_mm.models.bagel.demo --out DIR [--n 96] [--seed 0]

writes, in the upstream example's layout (`data/dataset_info.py` + `data/configs/example.yaml`):

    DIR/t2i/part-0000{0,1}.parquet           columns image (PNG bytes), captions (json {"caption": ...})
    DIR/editing/seedxedit_multi/part-0000{0,1}.parquet
                                             columns image_list (PNG bytes: source, edited),
                                             instruction_list ([[instruction, paraphrase]])
    DIR/editing/parquet_info/seedxedit_multi.json   {parquet path: {"num_row_groups", "num_rows"}}
    DIR/vlm/images/*.png, DIR/vlm/llava_ov_si.jsonl {"id", "image", "conversations": [{"from", "value"}]}

Each image is one coloured shape (circle / square / triangle) on a plain background; captions say
what is drawn ("a red circle on a blue background"), edit pairs change the shape's colour ("make the
circle green"), and questions ask for the colour or the shape. `demo_data_config(DIR, tokenizer_dir)`
is the MindSpeed-MM `data.json` dict reading them (`dataset_type: "bagel"`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path
from typing import Dict, List

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 210, 20),
          "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIDE = 64                     # demo images are 64 x 64: 4 x 4 latent tokens, 4 x 4 ViT patches at 56 px
DATA_FILE = "vlm/llava_ov_si.jsonl"   # its presence means the demo data is there
NUM_FILES = 2                 # parquet files per parquet dataset (a multiple of 1 and 2 cards)

Q_COLOR = "What colour is the shape?"
Q_SHAPE = "What shape is in the image?"
Q_BACKGROUND = "What colour is the background?"


def caption(s: Dict[str, str]) -> str:
    return f"a {s['color']} {s['shape']} on a {s['background']} background"


def instruction(shape: str, color: str) -> str:
    return f"make the {shape} {color}"


def answer(question: str, s: Dict[str, str]) -> str:
    if question == Q_COLOR:
        return f"The shape is {s['color']}."
    if question == Q_SHAPE:
        return f"It is a {s['shape']}."
    return f"The background is {s['background']}."


def vocabulary_sentences() -> List[str]:
    """Every caption, instruction, question and answer the generator emits (the tokenizer's corpus)."""
    out = [Q_COLOR, Q_SHAPE, Q_BACKGROUND]
    for color in COLORS:
        for shape in SHAPES:
            out.append(instruction(shape, color))
            out.append(f"change the colour of the {shape} to {color}")
            for background in COLORS:
                if background == color:
                    continue
                s = dict(color=color, shape=shape, background=background)
                out.append(caption(s))
                out += [answer(q, s) for q in (Q_COLOR, Q_SHAPE, Q_BACKGROUND)]
    return sorted(set(out))


def random_spec(rng: random.Random) -> Dict[str, str]:
    color = rng.choice(list(COLORS))
    background = rng.choice([c for c in COLORS if c != color])
    return dict(color=color, shape=rng.choice(SHAPES), background=background)


def draw(spec: Dict[str, str], side: int = SIDE):
    """A PIL image of `spec`: the shape centred, half the image wide."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), COLORS[spec["background"]])
    d = ImageDraw.Draw(img)
    a, b = side // 4, 3 * side // 4
    fill = COLORS[spec["color"]]
    if spec["shape"] == "circle":
        d.ellipse([a, a, b, b], fill=fill)
    elif spec["shape"] == "square":
        d.rectangle([a, a, b, b], fill=fill)
    else:
        d.polygon([(side // 2, a), (b, b), (a, b)], fill=fill)
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, columns: Dict[str, list], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(columns), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def make_demo_dataset(out_dir, n: int = 96, seed: int = 0) -> Path:
    """Write `n` samples of each kind under `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    rng = random.Random(seed)
    per_file = max(1, n // NUM_FILES)
    # text-to-image
    for f in range(NUM_FILES):
        specs = [random_spec(rng) for _ in range(per_file)]
        _write_parquet(out / "t2i" / f"part-{f:05d}.parquet",
                       {"image": [png_bytes(draw(s)) for s in specs],
                        "captions": [json.dumps({"caption": caption(s)}) for s in specs]}, row_group_size=16)
    # editing: source image, edited image (other colour), the instruction and a paraphrase
    info = {}
    edit_dir = out / "editing" / "seedxedit_multi"
    for f in range(NUM_FILES):
        images, instructions = [], []
        for _ in range(per_file):
            s = random_spec(rng)
            new = rng.choice([c for c in COLORS if c not in (s["color"], s["background"])])
            images.append([png_bytes(draw(s)), png_bytes(draw({**s, "color": new}))])
            instructions.append([[instruction(s["shape"], new), f"change the colour of the {s['shape']} to {new}"]])
        path = edit_dir / f"part-{f:05d}.parquet"
        _write_parquet(path, {"image_list": images, "instruction_list": instructions}, row_group_size=16)
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        info[str(path)] = {"num_row_groups": meta.num_row_groups, "num_rows": meta.num_rows}
    (out / "editing" / "parquet_info").mkdir(parents=True, exist_ok=True)
    (out / "editing" / "parquet_info" / "seedxedit_multi.json").write_text(json.dumps(info, indent=1))
    # understanding (llava-style jsonl + images)
    (out / "vlm" / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        s = random_spec(rng)
        name = f"{i:05d}.png"
        draw(s).save(out / "vlm" / "images" / name)
        q1, q2 = rng.sample([Q_COLOR, Q_SHAPE, Q_BACKGROUND], 2)
        conv = [{"from": "human", "value": f"<image>\n{q1}"}, {"from": "gpt", "value": answer(q1, s)}]
        if i % 3 == 0:
            conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": answer(q2, s)}]
        lines.append(json.dumps({"id": i, "image": name, "conversations": conv}))
    tmp = out / (DATA_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / DATA_FILE)
    return out


def demo_data_config(out_dir, tokenizer_dir=None) -> dict:
    """The MindSpeed-MM `data.json` (dataset_type "bagel") for the demo data in `out_dir`, with the
    bundled tiny tokenizer unless `tokenizer_dir` (an HF checkpoint directory) is given."""
    out = Path(out_dir)
    bundled = Path(__file__).resolve().parent / "assets"        # ms_mm.models.bagel.tokenizer.ASSET_DIR
    gen_transform = {"image_stride": 16, "max_image_size": SIDE, "min_image_size": SIDE}
    vit_transform = {"image_stride": 14, "max_image_size": 56, "min_image_size": 56}
    return {
        "dataset_param": {
            "dataset_type": "bagel",
            "preprocess_parameters": {},
            "basic_parameters": {
                "available_data": ["t2i_pretrain", "unified_edit", "vlm_sft"],
                "t2i_pretrain": {
                    "dataset_names": ["t2i"],
                    "t2i": {"data_dir": str(out / "t2i"), "num_files": NUM_FILES, "num_total_samples": n_rows(out)},
                    "image_transform_args": gen_transform, "is_mandatory": True, "num_used_data": [NUM_FILES],
                    "weight": 1},
                "unified_edit": {
                    "dataset_names": ["seedxedit_multi"],
                    "seedxedit_multi": {"data_dir": str(out / "editing" / "seedxedit_multi"), "num_files": NUM_FILES,
                                        "num_total_samples": n_rows(out),
                                        "parquet_info_path": str(out / "editing" / "parquet_info" /
                                                                 "seedxedit_multi.json")},
                    "image_transform_args": gen_transform, "vit_image_transform_args": vit_transform,
                    "is_mandatory": False, "num_used_data": [NUM_FILES], "weight": 1},
                "vlm_sft": {
                    "dataset_names": ["llava_ov"],
                    "llava_ov": {"data_dir": str(out / "vlm" / "images"), "jsonl_path": str(out / DATA_FILE),
                                 "num_total_samples": n_rows(out)},
                    "image_transform_args": vit_transform, "is_mandatory": True, "shuffle_lines": True,
                    "shuffle_seed": 0, "num_used_data": [n_rows(out)], "weight": 1},
                "model_path": str(tokenizer_dir or bundled),
                "text_cond_dropout_prob": 0.1, "vae_cond_dropout_prob": 0.1, "vit_cond_dropout_prob": 0.1,
                "vit_patch_size": 14, "max_num_patch_per_side": 8, "max_latent_size": 8,
                "vae_image_downsample": 16, "data_seed": 42, "num_workers": 1, "interpolate_pos": False,
                "use_flex": True, "data_status": None,
            },
            "packed_parameters": {"expected_num_tokens": 224, "max_num_tokens_per_sample": 128,
                                  "max_num_tokens": 256, "prefer_buffer_before": 128, "max_buffer_size": 16,
                                  "max_num_vit_tokens": 64, "max_num_latent_tokens": 96, "max_num_vae_images": 6},
        },
        "dataloader_param": {"dataloader_mode": "base", "drop_last": True, "seed": 42, "batch_size": 1,
                             "collate_param": {"model_name": "bagel"}, "prefetch_factor": 4},
    }


def n_rows(out: Path) -> int:
    path = Path(out) / DATA_FILE
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the BAGEL demo data (t2i, editing, vlm) in the bagel_example layout.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=96, help="samples of each kind (default 96)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    make_demo_dataset(args.out, args.n, args.seed)
    print(f"wrote the BAGEL demo data ({args.n} samples of each kind) to {args.out}")


if __name__ == "__main__":
    main()
