"""Lumina-mGPT 2.0 benchmarks on this machine (CPU unless MS_MM_DEVICE_TARGET says otherwise).

    python bench/bench_lumina_mgpt2.py [--images 16] [--side 64] [--layers 4] [--hidden 256] [--json OUT]

1. feature extraction: images/s of MoVQGAN encode + prompt tokenization + feature write (tiny
   MoVQGAN, the bundled tokenizer, demo images of `--side` px; compile excluded by a warm-up image);
2. train step: ms-mm's LuminaMGPT2ForCausalLM (graph mode, AdamW through the trainer's TrainStep)
   step time and peak RSS on a random batch;
3. sampling: image tokens/s with the KV cache (`LuminaGenerationStep`) and without it (the whole
   fixed-length sequence per token), same seed, same codes.
The train step against transformers' ChameleonForConditionalGeneration on PyTorch CPU is not in
this script yet (see docs/lumina_mgpt2.md, "left").
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


def bench_features(tmp: Path, n: int, side: int) -> dict:
    import mindspore as ms

    from ms_mm.models.lumina_mgpt2.demo_images import write_demo_images
    from ms_mm.models.lumina_mgpt2.features import ExtractionSpec, _Processor
    from ms_mm.models.lumina_mgpt2.processing import write_feature
    from ms_mm.models.lumina_mgpt2.tiny import build_tiny_movqgan
    from ms_mm.models.lumina_mgpt2.tokenizer import ASSET_DIR

    ms.set_context(mode=ms.GRAPH_MODE)
    build_tiny_movqgan(tmp / "movq")
    data = write_demo_images(tmp / "data", n=n + 1, seed=1)
    items = json.loads(data.read_text())
    for it in items:                                   # one size: one compiled encoder graph
        from PIL import Image
        p = data.parent / it["file"]
        Image.open(p).convert("RGB").resize((side, side)).save(p)
    spec = ExtractionSpec(data, ASSET_DIR, tmp / "movq", tmp / "feat", 32, side, None, None)
    proc = _Processor(spec)
    (tmp / "feat").mkdir()
    proc(items[0], 0, "warmup")
    t0 = time.time()
    for i, it in enumerate(items[1:], 1):
        ids, labels, grid = proc(it, i, f"item {i}")
        write_feature(tmp / "feat" / f"{i}.npz", ids, labels, i, proc.layout, grid)
    dt = time.time() - t0
    return {"images": n, "side": side, "seconds": dt, "images_per_s": n / dt}


def bench_train(layers: int, hidden: int, seq: int, batch: int, steps: int) -> dict:
    import mindspore as ms

    from bench._common import peak_mb
    from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config
    from ms_mm.models.lumina_mgpt2.inputs import MODEL_INPUT_NAMES
    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.training.train_step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE)
    c = LuminaMGPT2Config.preset("tiny")
    c.hidden_size, c.intermediate_size, c.num_hidden_layers = hidden, 4 * hidden, layers
    c.num_attention_heads = c.num_key_value_heads = max(4, hidden // 64)
    c.model_parallel_size = 1
    c.max_position_embeddings = seq
    model = LuminaMGPT2ForCausalLM(c.validate())
    opt = ms.nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-4)
    step = TrainStep(model, opt, accum_steps=1, clip_grad=1.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size, (batch, seq)).astype(np.int32)
    batch_inputs = (ms.Tensor(ids), ms.Tensor(ids), ms.Tensor(np.broadcast_to(np.arange(seq, dtype=np.int32),
                                                                               (batch, seq)).copy()))
    assert MODEL_INPUT_NAMES == ("input_ids", "labels", "position_ids")
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.time()
        loss, *_ = step([batch_inputs])
        times.append(time.time() - t0)
        losses.append(float(loss))
    return {"layers": layers, "hidden": hidden, "seq": seq, "batch": batch, "first_step_s": times[0],
            "step_s_median": float(np.median(times[1:])), "peak_rss_mb": peak_mb(), "losses": losses}


def bench_sampling(tmp: Path, side: int, layers: int, hidden: int) -> dict:
    import mindspore as ms

    import convert
    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.models.lumina_mgpt2.processing import TextTokenizer
    from ms_mm.models.lumina_mgpt2.sample import LuminaSampler
    from ms_mm.models.lumina_mgpt2.tiny import build_tiny
    from ms_mm.training.weights import load_state_dict

    ms.set_context(mode=ms.GRAPH_MODE)
    build_tiny(tmp / "hf", seed=0)
    cfgj = json.loads((tmp / "hf" / "config.json").read_text())
    cfgj.update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden,
                num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(4, hidden // 64),
                model_parallel_size=1, max_position_embeddings=4096)
    from convert.tiny import write_random_hf
    write_random_hf(tmp / "hf", cfgj, "lumina_mgpt2", 0)
    config, state = convert.framework.load_hf_as_mm(tmp / "hf", "lumina_mgpt2")
    model = LuminaMGPT2ForCausalLM(config)
    load_state_dict(model, state)
    s = LuminaSampler(model, TextTokenizer(tmp / "hf"))
    out = {}
    for cache in (True, False):
        r = s.generate("A red circle in the top left on a white background.", side, side, cfg=3.0, top_k=16,
                       seed=0, use_cache=cache)
        out["with_cache" if cache else "without_cache"] = {"tokens": len(r["tokens"]) - 4,
                                                           "tokens_per_s": r["tokens_per_s"]}
        out.setdefault("codes", []).append(r["codes"].tolist())
    codes = out.pop("codes")
    out["same_codes"] = codes[0] == codes[1]
    out["speedup"] = out["with_cache"]["tokens_per_s"] / out["without_cache"]["tokens_per_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sample-side", type=int, default=128)
    p.add_argument("--json")
    a = p.parse_args(argv)
    import mindspore as ms

    ms.set_device(os.environ.get("MS_MM_DEVICE_TARGET", "CPU"))
    report = {"load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        report["feature_extraction"] = bench_features(d / "f", a.images, a.side)
        print(json.dumps({"feature_extraction": report["feature_extraction"]}), flush=True)
        report["train_step"] = bench_train(a.layers, a.hidden, a.seq, a.batch, a.steps)
        print(json.dumps({"train_step": report["train_step"]}), flush=True)
        report["sampling"] = bench_sampling(d / "s", a.sample_side, a.layers, a.hidden)
        print(json.dumps({"sampling": report["sampling"]}), flush=True)
    report["load_avg_1m_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
