"""Convert LLaVA-Instruct-150K into MindSpeed-MM's mllm_format json.

    python examples/qwen2vl/llava_instruct_2_mllm_demo_format.py \
        [--input ./data/llava_instruct_150k.json] [--image-dir ./data/COCO2017/train2017] \
        [--output ./data/mllm_format_llava_instruct_data.json] [--overwrite]

LLaVA records (`{"image": "000000033471.jpg", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}]}`) become `{"images": [<image-dir>/<image>],
"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`. The
`<image>` placeholders stay in the text. Records whose image file is missing are left out
(counted); records without an image become text-only samples. The output is written
atomically and an existing one is kept unless `--overwrite` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROLES = {"human": "user", "gpt": "assistant"}


def convert_record(item: dict, image_dir: str, index: int) -> dict | None:
    """One LLaVA record → one mllm_format record; None if its image file is missing."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise ValueError(f"record {index}: expected an object with a 'conversations' list")
    images = []
    if item.get("image"):
        path = os.path.join(image_dir, item["image"])
        if not os.path.isfile(path):
            return None
        images.append(path)
    messages = []
    for turn_no, turn in enumerate(item["conversations"]):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise ValueError(f"record {index} (id {item.get('id')!r}), turn {turn_no}: unknown speaker "
                             f"{turn.get('from') if isinstance(turn, dict) else turn!r}; expected human or gpt")
        messages.append({"role": role, "content": turn.get("value", "")})
    return {"images": images, "messages": messages}


def convert(input_path: str, image_dir: str, output_path: str, overwrite: bool = False) -> tuple[int, int]:
    """Convert a whole file; returns (records written, records left out for a missing image)."""
    if os.path.exists(output_path) and not overwrite:
        raise FileExistsError(f"{output_path} already exists; remove or rename it, or pass --overwrite")
    try:
        with open(input_path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{input_path}: malformed json at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{input_path}: expected a list of LLaVA records")
    out, missing = [], 0
    for i, item in enumerate(data):
        rec = convert_record(item, image_dir, i)
        if rec is None:
            missing += 1
        else:
            out.append(rec)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
    os.replace(tmp, output_path)
    return len(out), missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="./data/llava_instruct_150k.json", help="LLaVA-Instruct json")
    p.add_argument("--image-dir", default="./data/COCO2017/train2017", help="directory of the COCO images")
    p.add_argument("--output", default="./data/mllm_format_llava_instruct_data.json", help="mllm_format json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        written, missing = convert(args.input, args.image_dir, args.output, args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"finish converting dataset into {args.output}: {written} records"
          + (f", {missing} left out because their image is missing under {args.image_dir}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
