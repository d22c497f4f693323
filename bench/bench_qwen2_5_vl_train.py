"""Qwen2.5-VL train step: ms-mm (MindSpore graph mode) against Hugging Face transformers (PyTorch eager).

    pip install torch==2.13.0          # CPU build; never torchvision beside it
    python bench/bench_qwen2_5_vl_train.py [--steps 6] [--warmup 2] [--batch 2] [--threads 2] [--shape big]

Both sides train the same tiny-but-not-trivial Qwen2.5-VL (LLM 4 layers h256 GQA 8/2, ViT depth 4
h128 with window + full attention, 2 images of 224x224 -> 64 image tokens each, 256 tokens per
sample) from the same weights on the same batch, with AdamW: forward + backward + optimizer update.
Each side runs in its own process, so peak memory is its own: `peak RSS` is the process high-water
mark, `step RSS` that mark minus the resident size just before the first step (model, optimizer
state and framework already loaded). The PyTorch side writes the HF checkpoint; ms-mm loads it
through its own converter, so the first-step losses must agree (printed as a sanity check).
Timings are medians over the measured steps after warm-up (MindSpore compiles during warm-up).
`--shape big` trains a bigger LLM (8 layers, hidden 512, 1024 tokens per sample).

Besides the step time, each side reports a breakdown: host input preparation (ms-mm:
`build_model_inputs` + tensors, part of its step; PyTorch computes the same inside its forward),
forward + backward, and the update (grad norm, clipping, AdamW; ms-mm: `FusedAdamW`), each timed
to completion; and model FLOPs/s as a share of the fp32 matmul peak measured on this machine
(2048^3 GEMM, the best of PyTorch's and MindSpore's). Model FLOPs: every Linear 6 x weight size x
tokens, attention 12 x S^2 x width per layer and sequence (the LLM's causal attention counted in
full, the ViT's per window / image as upstream runs it).
Not part of the test suite: it needs torch, and timings belong in benchmarks, not assertions.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (attention_flops, linear_flops, ms_matmul_gflops, ms_timed_steps, peak_mb, report, rss_mb,  # noqa: E402
                           run_worker, torch_available, torch_matmul_gflops)

IMAGE_PAD, VISION_START, VISION_END = 2040, 2038, 2039
HF_CONFIG = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "bos_token_id": 2030, "eos_token_id": 2031, "pad_token_id": 2030,
    "image_token_id": IMAGE_PAD, "video_token_id": 2041, "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END, "vision_token_id": 2042, "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen2_5_vl_text", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "attention_dropout": 0.0,
        "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [4, 6, 6]},
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 80,
        "layer_types": ["full_attention"] * 4,
    },
    "vision_config": {
        "model_type": "qwen2_5_vl", "depth": 4, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256,
        "out_hidden_size": 256, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "window_size": 112, "fullatt_block_indexes": [3], "in_channels": 3, "hidden_act": "silu",
        "tokens_per_second": 2,
    },
}
GRID = (1, 16, 16)  # 224x224 px in 14-px patches
SEQ_LEN = 256
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.0


def use_shape(name: str) -> None:
    """`bench` (the default above) or `big`: LLM 8 layers, hidden 512 (16 heads, 4 KV heads), 1024 tokens
    per sample."""
    global SEQ_LEN
    if name == "big":
        # 16 heads keep head_dim 32, which the bench's mrope_section [4, 6, 6] (sum = head_dim / 2) needs
        HF_CONFIG["text_config"].update(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                        num_attention_heads=16, num_key_value_heads=4,
                                        layer_types=["full_attention"] * 8)
        HF_CONFIG["vision_config"]["out_hidden_size"] = 512
        SEQ_LEN = 1024


def model_flops(batch_size: int) -> float:
    """Train-step model FLOPs (see the module docstring)."""
    t, v = HF_CONFIG["text_config"], HF_CONFIG["vision_config"]
    h, hv, kv_heads, heads = t["hidden_size"], v["hidden_size"], t["num_key_value_heads"], t["num_attention_heads"]
    hd = h // heads
    patches = batch_size * GRID[0] * GRID[1] * GRID[2]
    tokens = batch_size * SEQ_LEN
    w = []
    w += [((hv, 3 * 2 * 14 * 14), patches)]
    for _ in range(v["depth"]):
        w += [((3 * hv, hv), patches), ((hv, hv), patches), ((2 * v["intermediate_size"], hv), patches),
              ((hv, v["intermediate_size"]), patches)]
    w += [((4 * hv, 4 * hv), patches // 4), ((v["out_hidden_size"], 4 * hv), patches // 4)]
    for _ in range(t["num_hidden_layers"]):
        w += [(((heads + 2 * kv_heads) * hd, h), tokens), ((h, heads * hd), tokens),
              ((2 * t["intermediate_size"], h), tokens), ((h, t["intermediate_size"]), tokens)]
    w += [((t["vocab_size"], h), tokens)]
    win = v["window_size"] // v["patch_size"]
    per_image = GRID[1] * GRID[2]
    windows = -(-GRID[1] // win) * -(-GRID[2] // win)
    n_full = len(v["fullatt_block_indexes"])
    attn = (attention_flops(v["depth"] - n_full, batch_size * windows, per_image // windows, hv)
            + attention_flops(n_full, batch_size, per_image, hv)
            + attention_flops(t["num_hidden_layers"], batch_size, SEQ_LEN, h))
    return linear_flops(w) + attn


def make_batch(batch_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_img_tokens = GRID[0] * GRID[1] * GRID[2] // 4
    ids = rng.integers(0, 2000, size=(batch_size, SEQ_LEN), dtype=np.int64)
    ids[:, 4] = VISION_START
    ids[:, 5:5 + n_img_tokens] = IMAGE_PAD
    ids[:, 5 + n_img_tokens] = VISION_END
    labels = ids.copy()
    labels[:, : SEQ_LEN // 2] = -100
    patches = batch_size * GRID[0] * GRID[1] * GRID[2]
    return {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
        "pixel_values": rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32),
        "image_grid_thw": np.tile(np.array([GRID], dtype=np.int64), (batch_size, 1)),
    }


def worker_torch(ckpt: Path, batch: dict, steps: int, threads: int) -> dict:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**HF_CONFIG)).float()
    model.config._attn_implementation = "eager"
    model.save_pretrained(str(ckpt), safe_serialization=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    base = rss_mb()
    times, cpu, losses, host, fwd_bwd, update = [], [], [], [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
        t1 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))   # the norm ms-mm also computes
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        host.append(t1 - t0)
        fwd_bwd.append(t2 - t1)
        update.append(t3 - t2)
    peak = peak_mb()
    return {"times": times, "cpu_times": cpu, "losses": losses, "base_rss_mb": base, "peak_rss_mb": peak,
            "host": host, "fwd_bwd": fwd_bwd, "update": update, "matmul_gflops": torch_matmul_gflops(threads)}


def worker_ms(ckpt: Path, batch: dict, steps: int, threads: int, pieces: bool = False) -> dict:
    import mindspore as ms

    from convert import load_hf_as_mm
    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES, Qwen2_5_VLForConditionalGeneration, build_model_inputs
    from ms_mm.training.optimizer import FusedAdamW
    from ms_mm.training.train_step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config, state = load_hf_as_mm(str(ckpt), "qwen2_5_vl")
    model = Qwen2_5_VLForConditionalGeneration(config)
    load_state_dict(model, state)  # checks every name and shape before loading
    del state      # the loaded copy: the trainer keeps only the parameters (peak RSS is the step's, not the loader's)
    gc.collect()
    model.set_train(True)
    opt = FusedAdamW(model.trainable_params(), learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    step = TrainStep(model, opt, fuse_update=not pieces)
    base = rss_mb()

    def prepare():
        prepared = build_model_inputs(batch, config)
        return [ms.Tensor(prepared[k]) for k in MODEL_INPUT_NAMES]

    res = ms_timed_steps(step, prepare, steps, pieces)
    return {**res, "base_rss_mb": base, "peak_rss_mb": peak_mb(), "matmul_gflops": ms_matmul_gflops(),
            "graphs": len(step.graph_shapes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (MindSpore compiles here)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shape", choices=["bench", "big"], default="bench",
                   help="big: LLM 8 layers, hidden 512, 1024 tokens per sample")
    p.add_argument("--worker", choices=["torch", "ms", "ms_pieces"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    use_shape(a.shape)

    if a.worker:
        batch = dict(np.load(a.batch_file))
        if a.worker == "torch":
            out = worker_torch(a.ckpt, batch, a.steps, a.threads)
        else:
            out = worker_ms(a.ckpt, batch, a.steps, a.threads, pieces=a.worker == "ms_pieces")
        a.out.write_text(json.dumps(out))
        return 0

    if not torch_available():
        return 2
    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory(prefix="bench_qwen_") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "batch.npz", **make_batch(a.batch))
        ckpt = tmp / "hf"
        res = {}
        for side in ("torch", "ms", "ms_pieces"):
            res[side] = run_worker(__file__, side, ["--ckpt", str(ckpt), "--batch-file", str(tmp / "batch.npz"),
                                                    "--steps", str(total), "--shape", a.shape], a.threads,
                                   tmp / f"{side}.json")
    t = HF_CONFIG["text_config"]
    peak = max(res["torch"]["matmul_gflops"], res["ms"]["matmul_gflops"])
    report(f"Qwen2.5-VL train step ({a.shape}: LLM {t['num_hidden_layers']} layers h{t['hidden_size']}), batch "
           f"{a.batch} x {SEQ_LEN} tokens + {a.batch} images {GRID}, {a.steps} steps after {a.warmup} warm-up, "
           f"{a.threads} threads", res, a.warmup, a.batch * SEQ_LEN, model_flops(a.batch), peak)
    print(f"first-step loss: PyTorch {res['torch']['losses'][0]:.6f}  ms-mm {res['ms']['losses'][0]:.6f}  "
          f"|diff| {abs(res['torch']['losses'][0] - res['ms']['losses'][0]):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
