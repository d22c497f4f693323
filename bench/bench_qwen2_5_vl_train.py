"""Qwen2.5-VL train step: ms-mm (MindSpore graph mode) against Hugging Face transformers (PyTorch eager).

    pip install torch==2.13.0          # CPU build; never torchvision beside it
    python bench/bench_qwen2_5_vl_train.py [--steps 6] [--warmup 2] [--batch 2] [--threads 2]

Both sides train the same tiny-but-not-trivial Qwen2.5-VL (LLM 4 layers h256 GQA 8/2, ViT depth 4
h128 with window + full attention, 2 images of 224x224 -> 64 image tokens each, 256 tokens per
sample) from the same weights on the same batch, with AdamW: forward + backward + optimizer update.
Each side runs in its own process, so peak memory is its own: `peak RSS` is the process high-water
mark, `step RSS` that mark minus the resident size just before the first step (model, optimizer
state and framework already loaded). The PyTorch side writes the HF checkpoint; ms-mm loads it
through its own converter, so the first-step losses must agree (printed as a sanity check).
Timings are medians over the measured steps after warm-up (MindSpore compiles during warm-up).
Not part of the test suite: it needs torch, and timings belong in benchmarks, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import peak_mb, report, rss_mb, run_worker, torch_available  # noqa: E402

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
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    base = rss_mb()
    times, cpu, losses = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "cpu_times": cpu, "losses": losses, "base_rss_mb": base, "peak_rss_mb": peak_mb()}


def worker_ms(ckpt: Path, batch: dict, steps: int, threads: int) -> dict:
    import mindspore as ms
    from mindformers.core.optim import AdamW

    from convert import load_hf_as_mm
    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES, Qwen2_5_VLForConditionalGeneration, build_model_inputs
    from ms_mm.training.train_step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config, state = load_hf_as_mm(str(ckpt), "qwen2_5_vl")
    model = Qwen2_5_VLForConditionalGeneration(config)
    load_state_dict(model, state)  # checks every name and shape before loading
    model.set_train(True)
    opt = AdamW(model.trainable_params(), learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    step = TrainStep(model, opt)
    host = build_model_inputs(batch, config)
    inputs = [ms.Tensor(host[k]) for k in MODEL_INPUT_NAMES]
    base = rss_mb()
    times, cpu, losses = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _, _ = step([inputs])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
    return {"times": times, "cpu_times": cpu, "losses": losses, "base_rss_mb": base, "peak_rss_mb": peak_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (MindSpore compiles here)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--worker", choices=["torch", "ms"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        batch = dict(np.load(a.batch_file))
        fn = worker_torch if a.worker == "torch" else worker_ms
        a.out.write_text(json.dumps(fn(a.ckpt, batch, a.steps, a.threads)))
        return 0

    if not torch_available():
        return 2
    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory(prefix="bench_qwen_") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "batch.npz", **make_batch(a.batch))
        ckpt = tmp / "hf"
        res = {}
        for side in ("torch", "ms"):
            res[side] = run_worker(__file__, side, ["--ckpt", str(ckpt), "--batch-file", str(tmp / "batch.npz"),
                                                    "--steps", str(total)], a.threads, tmp / f"{side}.json")
    report(f"Qwen2.5-VL train step, batch {a.batch} x {SEQ_LEN} tokens + {a.batch} images {GRID}, "
           f"{a.steps} steps after {a.warmup} warm-up, {a.threads} threads", res, a.warmup, a.batch * SEQ_LEN)
    print(f"first-step loss: PyTorch {res['torch']['losses'][0]:.6f}  ms-mm {res['ms']['losses'][0]:.6f}  "
          f"|diff| {abs(res['torch']['losses'][0] - res['ms']['losses'][0]):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
