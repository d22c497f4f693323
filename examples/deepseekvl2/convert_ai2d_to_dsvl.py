"""Convert InternVL fine-tuning jsonl (e.g. ai2d_train_12k.jsonl) into DeepSeek-VL2 jsonl.

Edit `input_file` / `output_file` below and run

    python convert_ai2d_to_dsvl.py

or give them on the command line (they win over the variables):

    python convert_ai2d_to_dsvl.py [INPUT_FILE [OUTPUT_FILE]] [--overwrite]

An InternVL line `{"id": ..., "image": "abc_images/1.png", "conversations": [{"from": "human",
"value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}]}` becomes
`{"id": ..., "conversations": [{"role": "<|User|>", "content": "<image>\\nQuestion", "images":
["abc_images/1.png"]}, {"role": "<|Assistant|>", "content": "Answer"}]}` — the format the
DeepSeek-VL2 dataset reads (image paths stay relative: they are joined to `data_folder` of
data.json). Each image goes on the user turn whose `<image>` tag it fills; a record with an
image but no tag gets `<image>\\n` in front of its first question (InternVL's convention). A line
whose tags and images do not match, or that is not valid json, stops the conversion with its
line number. The output is written to a temporary file and renamed when complete; an existing
output file is never replaced unless `--overwrite` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

input_file = "dataset/playground/opensource/ai2d_train_12k.jsonl"  # replace with the real input path
output_file = "dataset/playground/opensource/ai2d_train_12k_dsvl.jsonl"  # replace with the real output path

ROLES = {"human": "<|User|>", "gpt": "<|Assistant|>", "system": "system"}
IMAGE_TAG = "<image>"


class ConversionError(ValueError):
    pass


def convert_record(item, where: str) -> dict:
    """One InternVL record → one DeepSeek-VL2 record; `where` ("file:line") names it in errors."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list) or not item["conversations"]:
        raise ConversionError(f"{where}: expected an object with a non-empty 'conversations' list")
    image = item.get("image")
    images = [] if image in (None, "", []) else ([image] if isinstance(image, str) else image)
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ConversionError(f"{where}: 'image' must be a path or a list of paths, got {image!r}")
    turns = []
    for n, turn in enumerate(item["conversations"]):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ConversionError(f"{where}: conversations[{n}] needs 'from' (human, gpt or system) and a "
                                  f"string 'value', got {turn!r}")
        turns.append({"role": role, "content": turn["value"]})
    n_tags = sum(t["content"].count(IMAGE_TAG) for t in turns)
    if images and n_tags == 0:
        first_user = next((t for t in turns if t["role"] == "<|User|>"), None)
        if first_user is None:
            raise ConversionError(f"{where}: the record has an image but no human turn")
        first_user["content"] = (IMAGE_TAG + "\n") * len(images) + first_user["content"]
        n_tags = len(images)
    if n_tags != len(images):
        raise ConversionError(f"{where}: {n_tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)")
    used = 0
    for n, t in enumerate(turns):
        k = t["content"].count(IMAGE_TAG)
        if k and t["role"] != "<|User|>":
            raise ConversionError(f"{where}: conversations[{n}] ({t['role']}) holds an {IMAGE_TAG} tag; images "
                                  "belong on human turns")
        if k:
            t["images"] = images[used:used + k]
            used += k
    out = {"id": item["id"]} if "id" in item else {}
    out["conversations"] = turns
    return out


def transform_jsonl(input_path: str, output_path: str, overwrite: bool = False) -> int:
    """Convert the whole file; returns the number of records written."""
    if not os.path.isfile(input_path):
        raise ConversionError(f"input file not found: {input_path}")
    if os.path.exists(output_path):
        if os.path.samefile(input_path, output_path):
            raise ConversionError(f"output file {output_path} is the input file")
        if not overwrite:
            raise ConversionError(f"{output_path} already exists; remove or rename it, or pass --overwrite")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = output_path + ".tmp"
    count = 0
    try:
        with open(input_path, encoding="utf-8-sig") as src, open(tmp, "w", encoding="utf-8") as dst:
            for lineno, line in enumerate(src, start=1):
                if not line.strip():
                    continue
                where = f"{input_path}:{lineno}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConversionError(f"{where}: malformed json: {e}") from None
                dst.write(json.dumps(convert_record(item, where), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input_file", nargs="?", default=input_file, help=f"InternVL jsonl (default: {input_file})")
    p.add_argument("output_file", nargs="?", default=output_file,
                   help=f"DeepSeek-VL2 jsonl to write (default: {output_file})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        n = transform_jsonl(args.input_file, args.output_file, args.overwrite)
    except (OSError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {n} records: {args.input_file} -> {args.output_file}")
    if n:
        with open(args.output_file, encoding="utf-8") as f:
            print("first record:\n" + json.dumps(json.loads(f.readline()), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
