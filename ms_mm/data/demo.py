"""Bundled demo data: small synthetic images with questions a tiny model can learn to answer.

Each image is a coloured shape (circle / square / triangle) in one quadrant of a plain
background; the conversations ask for its colour, shape, position or a one-line description, in
MindSpeed-MM's `mllm_format` (LLaMA-Factory sharegpt style, `<image>` placeholders). Answers
follow from the pixels, so a finetune of the tiny model shows a clearly falling loss within a
few minutes on a CPU. A few samples are multi-turn, a few carry two images.

    python -m ms_mm.data.demo --out DIR [--n 256] [--seed 0]

writes `DIR/images/*.png` and `DIR/mllm_format_demo_data.json` (image paths relative to DIR, so
DIR is the `dataset_dir`). Each family's embedded default writes these samples in its own data
format and data json (`ms_mm/models/<family>/demo.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Sequence

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
    "yellow": (235, 210, 20), "purple": (140, 50, 180), "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# Multiples of 28 px: no resize inside the tiny preprocessor's 56*56..112*112 pixel budget.
SIDES = (56, 84, 112)

DATA_FILE = "mllm_format_demo_data.json"

Q_COLOR = "What color is the shape?"
Q_SHAPE = "What shape is in the image?"
Q_WHERE = "Where is the shape?"
Q_DESCRIBE = "Describe the image."
Q_FOLLOW_COLOR = "What color is it?"
Q_FOLLOW_WHERE = "And where is it?"
Q_SAME = "Do the two shapes have the same color?"


def _a_color(s):
    return f"The shape is {s['color']}."


def _a_shape(s):
    return f"It is a {s['shape']}."


def _a_where(s):
    return f"It is in the {s['position']}."


def _a_describe(s):
    article = "An" if s["color"][0] in "aeiou" else "A"
    return f"{article} {s['color']} {s['shape']} in the {s['position']} on a {s['background']} background."


def vocabulary_sentences() -> list[str]:
    """Every question and answer the generator can emit (the tiny tokenizer learns from these)."""
    out = [Q_COLOR, Q_SHAPE, Q_WHERE, Q_DESCRIBE, Q_FOLLOW_COLOR, Q_FOLLOW_WHERE, Q_SAME,
           "Yes, both are the same color.", "No, the colors are different."]
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                for background in BACKGROUNDS:
                    s = dict(color=color, shape=shape, position=position, background=background)
                    out += [_a_color(s), _a_shape(s), _a_where(s), _a_describe(s)]
    return sorted(set(out))


def _draw(spec: dict, height: int, width: int, rng: random.Random):
    from PIL import Image, ImageDraw

    bg = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in BACKGROUNDS[spec["background"]])
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    # The shape fills most of its quadrant, with a little jitter so samples are not identical.
    qh, qw = height // 2, width // 2
    top = qh if spec["position"].startswith("bottom") else 0
    left = qw if spec["position"].endswith("right") else 0
    margin = max(2, min(qh, qw) // 8)
    size = min(qh, qw) - 2 * margin - rng.randint(0, margin)
    y0 = top + margin + rng.randint(0, max(0, qh - 2 * margin - size))
    x0 = left + margin + rng.randint(0, max(0, qw - 2 * margin - size))
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLORS[spec["color"]]
    if spec["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif spec["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return img


def _random_spec(rng: random.Random) -> dict:
    return dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES),
                position=rng.choice(POSITIONS), background=rng.choice(list(BACKGROUNDS)))


def _conversation(kind: str, specs: list[dict]) -> list[dict]:
    s = specs[0]
    if kind == "two_images":
        same = specs[0]["color"] == specs[1]["color"]
        turns = [("<image><image>" + Q_SAME,
                  "Yes, both are the same color." if same else "No, the colors are different.")]
    elif kind == "multi_turn":
        turns = [("<image>" + Q_SHAPE, _a_shape(s)), (Q_FOLLOW_COLOR, f"It is {s['color']}."),
                 (Q_FOLLOW_WHERE, _a_where(s))]
    else:
        question, answer = {"color": (Q_COLOR, _a_color), "shape": (Q_SHAPE, _a_shape),
                            "where": (Q_WHERE, _a_where), "describe": (Q_DESCRIBE, _a_describe)}[kind]
        turns = [("<image>" + question, answer(s))]
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def make_demo_dataset(out_dir: str | os.PathLike, n: int = 256, seed: int = 0,
                      sides: Sequence[int] = SIDES, two_images: bool = True) -> Path:
    """Write `n` demo samples under `out_dir`; returns the path of the mllm_format json.

    Deterministic in its arguments. About 1 in 8 samples is multi-turn and (with `two_images`)
    1 in 16 has two images. Image heights and widths are drawn from `sides` (multiples of 28);
    one side and `two_images=False` give every batch the same number of image patches, which
    spares a graph-mode step its recompiles."""
    for side in sides:
        if side % 28 or not 56 <= side <= 112:
            raise ValueError(f"demo image side {side} must be a multiple of 28 in [56, 112]")
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        r = rng.random()
        kind = ("two_images" if two_images and r < 1 / 16 else "multi_turn" if r < 3 / 16
                else rng.choice(["color", "shape", "where", "describe"]))
        specs = [_random_spec(rng) for _ in range(2 if kind == "two_images" else 1)]
        images = []
        for j, spec in enumerate(specs):
            h, w = rng.choice(sides), rng.choice(sides)
            rel = f"images/{i:05d}_{j}.png"
            _draw(spec, h, w, rng).save(out_dir / rel)
            images.append(rel)
        samples.append({"messages": _conversation(kind, specs), "images": images})
    path = out_dir / DATA_FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(samples, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)  # the json appears only once every image it names exists
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the ms-mm demo dataset (mllm_format json + PNGs).")
    p.add_argument("--out", required=True, help="output directory (becomes the dataset_dir)")
    p.add_argument("--n", type=int, default=256, help="number of samples (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", type=int, nargs="+", default=list(SIDES),
                   help="image heights/widths to draw from (multiples of 28 in 56..112)")
    p.add_argument("--single-image", action="store_true", help="no two-image samples")
    args = p.parse_args(argv)
    path = make_demo_dataset(args.out, n=args.n, seed=args.seed, sides=args.sides,
                             two_images=not args.single_image)
    print(f"wrote {args.n} demo samples to {path}")


if __name__ == "__main__":
    main()
