"""Converter throughput and memory on a multi-GB synthetic Qwen2.5-VL checkpoint.

    python bench/bench_convert.py [--gb 3.5] [--tp 2] [--workdir /tmp]

Writes a sharded bf16 HF checkpoint with 7B-sized tensors (vocab 152064 x hidden 3584, LLM MLP
18944, ViT 1280 wide; depth chosen to reach about `--gb`), then, in the same run:
  1. a plain file copy of the same shards (the I/O baseline),
  2. `hf_to_mm` (tp, pp=2) in a subprocess, and
  3. `mm_to_hf` back in a subprocess (and checks the round trip is bit-exact shard by shard),
and prints MB/s and peak RSS above the import baseline, as ratios to the copy and to the largest
tensor. Everything lives in a temp dir that is deleted afterwards. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
import convert.framework as F
F.get_spec("qwen2_5_vl")

def status(key):  # kB from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

# ru_maxrss is inherited over fork/exec; VmHWM is per address space and resettable
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
args = json.loads(sys.argv[1])
t = time.perf_counter()
if args["action"] == "hf_to_mm":
    F.hf_to_mm(args["hf"], args["mm"], "qwen2_5_vl", args["tp"], args["pp"])
else:
    F.mm_to_hf(args["mm"], args["hf"], args["out"], "qwen2_5_vl")
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "base_mb": base / 1024, "peak_mb": status("VmHWM") / 1024}))
"""


def synthetic_config(target_gb: float) -> dict:
    hidden, vocab, inter, vh, vi = 3584, 152064, 18944, 1280, 3420
    bf16 = 2
    emb = vocab * hidden * bf16
    layer = ((hidden + 2 * 512) * hidden + hidden * hidden + 3 * inter * hidden) * bf16
    block = (4 * vh * vh + 3 * vi * vh) * bf16
    budget = target_gb * 1e9 - 2 * emb
    vit_depth = 8
    llm_layers = max(2, int((budget - vit_depth * block) // layer))
    llm_layers += llm_layers % 2  # even, so pp=2 splits it
    return {
        "model_type": "qwen2_5_vl", "tie_word_embeddings": False, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_token_id": 151654, "bos_token_id": 151643, "eos_token_id": 151645,
        "text_config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
                        "num_hidden_layers": llm_layers, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rope_scaling": {"mrope_section": [16, 24, 24]}, "rope_theta": 1e6},
        "vision_config": {"depth": vit_depth, "hidden_size": vh, "num_heads": 16, "intermediate_size": vi,
                          "out_hidden_size": hidden, "window_size": 112, "fullatt_block_indexes": [7]},
    }


def run_child(args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child failed ({args['action']}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.5, help="approximate checkpoint size in GB")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the temp dir goes (default: system temp)")
    a = p.parse_args(argv)
    from convert.tiny import write_random_hf

    with tempfile.TemporaryDirectory(prefix="bench_convert_", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        cfg = synthetic_config(a.gb)
        t = time.perf_counter()
        hf = write_random_hf(tmp / "hf", cfg, dtype="bfloat16", fill="fast", max_shard_bytes=2 * 10 ** 9)
        shards = sorted(hf.glob("*.safetensors"))
        size = sum(s.stat().st_size for s in shards)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {len(shards)} shards "
              f"(LLM {cfg['text_config']['num_hidden_layers']} layers, ViT {cfg['vision_config']['depth']}), "
              f"written in {time.perf_counter() - t:.1f} s")
        largest_mb = cfg["text_config"]["vocab_size"] * cfg["text_config"]["hidden_size"] * 2 / 2 ** 20

        (tmp / "copy").mkdir()
        t = time.perf_counter()
        for s in shards:
            shutil.copyfile(s, tmp / "copy" / s.name)
        with open(tmp / "copy" / shards[-1].name, "rb+") as f:
            os.fsync(f.fileno())
        copy_s = time.perf_counter() - t
        shutil.rmtree(tmp / "copy")

        half = cfg["text_config"]["num_hidden_layers"] // 2
        pp = {"llm": [half, half], "vit": [cfg["vision_config"]["depth"], 0]}
        h2m = run_child({"action": "hf_to_mm", "hf": str(hf), "mm": str(tmp / "mm"), "tp": a.tp, "pp": pp})
        m2h = run_child({"action": "mm_to_hf", "hf": str(hf), "mm": str(tmp / "mm"), "out": str(tmp / "back")})

        same = _same_tensors(hf, tmp / "back")
        mb = size / 2 ** 20
        print(f"{'':10s} {'seconds':>8s} {'MB/s':>8s} {'vs copy':>8s} {'peak RSS MB':>12s} {'/largest':>9s}")
        print(f"{'copy':10s} {copy_s:8.2f} {mb / copy_s:8.0f} {1.0:8.2f} {'-':>12s} {'-':>9s}")
        for name, r in (("hf_to_mm", h2m), ("mm_to_hf", m2h)):
            growth = r["peak_mb"] - r["base_mb"]
            print(f"{name:10s} {r['seconds']:8.2f} {mb / r['seconds']:8.0f} {copy_s / r['seconds']:8.2f} "
                  f"{growth:12.0f} {growth / largest_mb:9.2f}")
        print(f"largest tensor {largest_mb:.0f} MB, checkpoint {mb:.0f} MB; import baseline "
              f"{h2m['base_mb']:.0f} MB RSS (not counted above); hf->mm->hf bit-exact: {same}")


def _same_tensors(a: Path, b: Path) -> bool:
    """Tensor-by-tensor byte comparison (shard boundaries may differ)."""
    from convert.framework import HFCheckpoint
    from convert.registry import get_spec
    spec = get_spec("qwen2_5_vl")
    x, y = HFCheckpoint(a, spec), HFCheckpoint(b, spec)
    if sorted(x.keys()) != sorted(y.keys()):
        return False
    return all(x.dtype(k) == y.dtype(k) and x.get(k).tobytes() == y.get(k).tobytes() for k in x.keys())


if __name__ == "__main__":
    main()
