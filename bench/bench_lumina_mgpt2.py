"""Lumina-mGPT 2.0 benchmarks on this machine (CPU unless MS_MM_DEVICE_TARGET says otherwise).

    python bench/bench_lumina_mgpt2.py [--images 16] [--side 64] [--layers 4] [--hidden 256] [--json OUT]
    MS_MM_BENCH_TORCH_PYTHON=/tmp/torchvenv/bin/python python bench/bench_lumina_mgpt2.py --only train

1. feature extraction: images/s of MoVQGAN encode + prompt tokenization + feature write (tiny
   MoVQGAN, the bundled tokenizer, demo images of `--side` px; compile excluded by a warm-up image);
2. train step: ms-mm's LuminaMGPT2ForCausalLM (graph mode, FusedAdamW + clipping through the
   trainer's TrainStep, timed as the one graph the trainer runs; the forward + backward / update
   breakdown comes from a second ms-mm run of the same step as two graphs) against transformers'
   ChameleonForConditionalGeneration (PyTorch CPU eager, eager attention, torch.optim.AdamW +
   clip_grad_norm_), same config, same random checkpoint
   (written once in the HF layout; ms-mm loads it through `convert.load_hf_as_mm`, PyTorch with
   the q/k-norm rows repeat-interleaved to (heads, head_dim)), same batch, same objective
   (CE + z_loss_weight * z-loss: HF's forward returns the CE, the z-loss is added from its logits).
   Each side runs in its own process (peak RSS is its own); median step time after `--warmup`
   steps, first-step CE of both sides compared. The PyTorch side needs torch + transformers
   (`MS_MM_BENCH_TORCH_PYTHON`, see bench/_common.py); without them only ms-mm is timed;
3. sampling: image tokens/s with the KV cache (`LuminaGenerationStep`) and without it (the whole
   fixed-length sequence per token), same seed, same codes.

Lumina-mGPT 2.0 vs HF Chameleon, as configured here: the same decoder (pre-norm, swin_norm False
on both; q/k LayerNorm over head_dim with eps 1e-5, then a per-head affine; RoPE rotate-half; SiLU
MLP; padding_idx embedding). Differences: (a) Lumina keeps the q/k-norm affine as
(model_parallel_size, head_dim) rows shared by heads/mp heads, HF as (heads, head_dim): the
repeat-interleaved copy gives the same forward, but HF trains the copies independently, so after
the first update they drift apart unless mp = heads (mp = 1, the bench's default: one row, HF
trains heads copies of it - the first-step loss is unaffected); (b) HF's loss has no z-loss
(added here by hand from the logits); (c) HF builds a VQ-VAE (`model.vqmodel`), Lumina deletes it
before training: built tiny here and deleted before the optimizer; (d) HF masks the logits of
`IMGIMG*` tokens (none in this vocabulary; Lumina: mask_image_logits False).
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


LR, BETAS, EPS, WD, CLIP = 1e-4, (0.9, 0.999), 1e-8, 0.0, 1.0


def train_hf_config(layers: int, hidden: int, seq: int, mp: int) -> dict:
    """The HF (Chameleon layout) config.json of the train-step model: the `tiny` preset's vocabulary
    and token layout, `layers` x `hidden`, FFN 4 x hidden, MHA with max(4, hidden // 64) heads."""
    from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config

    c = LuminaMGPT2Config.preset("tiny")
    t = c.tokens
    heads = max(4, hidden // 64)
    vocab = {"<s>": c.bos_token_id, "<pad>": c.pad_token_id, "</s>": c.eos_token_id,
             "<racm3:break>": t.image_start_id, "<eoss>": t.image_end_id, "<reserved08799>": t.newline_id,
             "<reserved08800>": t.grid_base_id, "<reserved08706>": t.separator_id}
    vocab.update({f"<MOVQGAN{i}>": t.code_offset + i for i in range(t.codebook_size)})
    return {
        "architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
        "vocab_size": c.vocab_size, "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "model_parallel_size": mp, "max_position_embeddings": seq, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None, "swin_norm": False, "z_loss_weight": c.z_loss_weight,
        "mask_image_logits": False, "dropout": 0.0, "attention_dropout": 0.0, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "vocabulary_map": vocab,
        # HF builds model.vqmodel from this; Lumina trains without it (deleted on the PyTorch side)
        "vq_config": {"embed_dim": 4, "num_embeddings": 64, "latent_channels": 4, "resolution": 32,
                      "base_channels": 32, "channel_multiplier": [1, 1], "num_res_blocks": 1, "attn_resolutions": []},
    }


def train_model_flops(cfg: dict, batch: int, seq: int) -> float:
    from bench._common import attention_flops, linear_flops

    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    tokens = batch * seq
    w = [((3 * h, h), tokens), ((h, h), tokens), ((2 * i, h), tokens), ((h, i), tokens)] * n + [((v, h), tokens)]
    return linear_flops(w) + attention_flops(n, batch, seq, h)


def worker_torch(ckpt: Path, batch: dict, steps: int, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from bench._common import peak_mb, rss_mb, torch_matmul_gflops

    torch.set_num_threads(threads)
    cfg = json.loads((ckpt / "config.json").read_text())
    z_w = float(cfg["z_loss_weight"])
    hf_cfg = ChameleonConfig(**{k: v for k, v in cfg.items() if k not in ("z_loss_weight", "mask_image_logits",
                                                                           "dropout", "architectures", "dtype")})
    hf_cfg._attn_implementation = "eager"
    model = ChameleonForConditionalGeneration(hf_cfg).float()
    state = load_file(str(ckpt / "model.safetensors"))
    heads, kv, mp = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["model_parallel_size"]
    for k in list(state):   # (mp, head_dim) rows shared by heads/mp heads -> HF's (heads, head_dim)
        if ".q_norm." in k:
            state[k] = state[k].repeat_interleave(heads // mp, dim=0).contiguous()
        elif ".k_norm." in k:
            state[k] = state[k].repeat_interleave(kv // mp, dim=0).contiguous()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("model.vqmodel.")]
    if missing or unexpected:
        raise SystemExit(f"checkpoint does not fit ChameleonForConditionalGeneration: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    del state      # the loaded copy: the trainer keeps only the parameters (peak RSS is the step's, not the loader's)
    gc.collect()
    del model.model.vqmodel          # as Lumina's finetune_solver.py: never trained, not in the optimizer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    base = rss_mb()
    times, cpu, losses, ces, zs, host, fwd_bwd, update = [], [], [], [], [], [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        ids = torch.from_numpy(batch["input_ids"])
        labels = torch.from_numpy(batch["labels"])
        pos = torch.from_numpy(batch["position_ids"])
        t1 = time.perf_counter()
        out = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)
        shift_logits, shift_labels = out.logits[:, :-1].float(), labels[:, 1:]
        valid = (shift_labels != -100).float()
        lse = torch.logsumexp(shift_logits, dim=-1)
        z = (lse * lse * valid).sum() / valid.sum()
        loss = out.loss + z_w * z
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(loss.item())
        ces.append(out.loss.item())
        zs.append(z.item())
        times.append(t3 - t0)
        cpu.append(time.process_time() - c0)
        host.append(t1 - t0)
        fwd_bwd.append(t2 - t1)
        update.append(t3 - t2)
    return {"times": times, "cpu_times": cpu, "losses": losses, "ce": ces, "z": zs, "base_rss_mb": base,
            "peak_rss_mb": peak_mb(), "host": host, "fwd_bwd": fwd_bwd, "update": update,
            "matmul_gflops": torch_matmul_gflops(threads)}


def worker_ms(ckpt: Path, batch: dict, steps: int, threads: int, pieces: bool = False) -> dict:
    """``pieces``: the same step as two graphs (micro batch, then update), for the breakdown; else the
    one graph the trainer runs (see ``bench._common.ms_timed_steps``)."""
    import mindspore as ms

    from bench._common import ms_matmul_gflops, ms_timed_steps, peak_mb, rss_mb
    from convert import load_hf_as_mm
    from ms_mm.models.lumina_mgpt2.inputs import MODEL_INPUT_NAMES
    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.training.optimizer import FusedAdamW
    from ms_mm.training.train_step import TrainStep
    from ms_mm.training.weights import load_state_dict

    ms.set_device(os.environ.get("MS_MM_DEVICE_TARGET", "CPU"))
    ms.set_context(mode=ms.GRAPH_MODE)
    config, state = load_hf_as_mm(str(ckpt), "lumina_mgpt2")
    model = LuminaMGPT2ForCausalLM(config)
    load_state_dict(model, state)   # checks every name and shape
    del state      # the loaded copy: the trainer keeps only the parameters (peak RSS is the step's, not the loader's)
    gc.collect()
    model.set_train(True)
    opt = FusedAdamW(model.trainable_params(), learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    step = TrainStep(model, opt, accum_steps=1, clip_grad=CLIP, extra_outputs=(2, 3),   # + (ce, z)
                     fuse_update=not pieces)
    assert MODEL_INPUT_NAMES == ("input_ids", "labels", "position_ids")
    base = rss_mb()
    res = ms_timed_steps(step, lambda: [ms.Tensor(batch[k].astype(np.int32)) for k in MODEL_INPUT_NAMES],
                         steps, pieces)
    return {**res, "ce": [o[1] for o in res["outputs"]], "z": [o[2] for o in res["outputs"]], "base_rss_mb": base,
            "peak_rss_mb": peak_mb(), "matmul_gflops": ms_matmul_gflops(), "graphs": len(step.graph_shapes)}


def bench_train(tmp: Path, layers: int, hidden: int, seq: int, batch: int, steps: int, warmup: int,
                threads: int, mp: int) -> dict:
    """Both sides in their own process on the same checkpoint and batch; prints the table."""
    import statistics

    from bench._common import report, run_worker, torch_available
    from convert.tiny import write_random_hf

    tmp.mkdir(parents=True)
    cfg = train_hf_config(layers, hidden, seq, mp)
    ckpt = write_random_hf(tmp / "hf", cfg, "lumina_mgpt2", seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg["vocab_size"], (batch, seq)).astype(np.int64)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    np.savez(tmp / "batch.npz", input_ids=ids, labels=ids, position_ids=pos)
    sides = ["torch", "ms", "ms_pieces"] if torch_available() else ["ms"]
    common = ["--ckpt", str(ckpt), "--batch-file", str(tmp / "batch.npz"), "--steps", str(warmup + steps)]
    res = {side: run_worker(__file__, side, common, threads, tmp / f"{side}.json") for side in sides}
    load = os.getloadavg()[0]
    out = {"layers": layers, "hidden": hidden, "heads": cfg["num_attention_heads"], "seq": seq, "batch": batch,
           "model_parallel_size": mp, "steps": steps, "warmup": warmup, "threads": threads,
           "load_avg_1m": load}
    for side in sides:
        r = res[side]
        out[side] = {"step_s_median": statistics.median(r["times"][warmup:]), "first_step_s": r["times"][0],
                     "peak_rss_mb": r["peak_rss_mb"], "step_rss_mb": r["peak_rss_mb"] - r["base_rss_mb"],
                     "losses": r["losses"], "ce": r["ce"], "z": r["z"]}
    if "torch" not in res:
        print(f"train step (ms-mm only, no PyTorch side): {out['ms']['step_s_median']:.3f} s median, "
              f"peak RSS {out['ms']['peak_rss_mb']:.0f} MB (load average {load:.1f})")
        return out
    peak = max(res["torch"]["matmul_gflops"], res["ms"]["matmul_gflops"])
    ratios = report(f"Lumina-mGPT 2.0 train step ({layers} layers h{hidden}, {cfg['num_attention_heads']} heads, "
                    f"vocab {cfg['vocab_size']}, model_parallel_size {mp}), batch {batch} x {seq} tokens, "
                    f"{steps} steps after {warmup} warm-up, {threads} threads; ms-mm LuminaMGPT2ForCausalLM vs "
                    f"HF ChameleonForConditionalGeneration", res, warmup, batch * seq,
                    train_model_flops(cfg, batch, seq), peak)
    out.update(ratios)
    ce_t, ce_m = res["torch"]["ce"][0], res["ms"]["ce"][0]
    out["first_step_ce_diff"] = abs(ce_t - ce_m)
    print(f"first-step CE: PyTorch {ce_t:.6f}  ms-mm {ce_m:.6f}  |diff| {abs(ce_t - ce_m):.2e}; "
          f"loss (CE + {cfg['z_loss_weight']:g} z): PyTorch {res['torch']['losses'][0]:.6f}  "
          f"ms-mm {res['ms']['losses'][0]:.6f}  |diff| {abs(res['torch']['losses'][0] - res['ms']['losses'][0]):.2e}")
    if abs(ce_t - ce_m) > 1e-4:
        print("  the first-step CE differs by more than 1e-4: the architectures differ in this config")
    last = min(len(res["torch"]["ce"]), len(res["ms"]["ce"])) - 1
    print(f"last-step CE (step {last}): PyTorch {res['torch']['ce'][last]:.6f}  ms-mm {res['ms']['ce'][last]:.6f}"
          + ("" if mp == cfg["num_attention_heads"] else
             f"  (after the first update the sides may drift: HF trains its {cfg['num_attention_heads']} q/k-norm "
             f"rows per head independently, Lumina {mp} row(s) shared by the heads)"))
    print("HF Chameleon vs Lumina-mGPT 2.0 here: same decoder (swin_norm False, q/k LayerNorm eps 1e-5 + per-head "
          "affine, RoPE, SiLU MLP); differs in the q/k-norm affine layout ((mp, head_dim) shared rows vs "
          "(heads, head_dim) copies), the loss (HF: CE only; z-loss added by hand on the PyTorch side), "
          "HF's VQ-VAE (deleted before training) and HF's IMGIMG logit mask (no such tokens here)")
    print(f"(1-minute load average {load:.2f} on {os.cpu_count()} cores after the workers: check it before "
          f"quoting a ratio; the workers' own load is up to {threads})")
    return out


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
    p.add_argument("--only", choices=["all", "features", "train", "sampling"], default="all")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured train steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured train steps first (MindSpore compiles here)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mp", type=int, default=1, help="model_parallel_size (q/k-norm rows) of the train model")
    p.add_argument("--sample-side", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--worker", choices=["torch", "ms", "ms_pieces"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        batch = dict(np.load(a.batch_file))
        if a.worker == "torch":
            out = worker_torch(a.ckpt, batch, a.steps, a.threads)
        else:
            out = worker_ms(a.ckpt, batch, a.steps, a.threads, pieces=a.worker == "ms_pieces")
        a.out.write_text(json.dumps(out))
        return 0

    import mindspore as ms

    ms.set_device(os.environ.get("MS_MM_DEVICE_TARGET", "CPU"))
    report = {"load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if a.only in ("all", "features"):
            report["feature_extraction"] = bench_features(d / "f", a.images, a.side)
            print(json.dumps({"feature_extraction": report["feature_extraction"]}), flush=True)
        if a.only in ("all", "train"):
            report["train_step"] = bench_train(d / "t", a.layers, a.hidden, a.seq, a.batch, a.steps, a.warmup,
                                               a.threads, a.mp)
            print(json.dumps({"train_step": report["train_step"]}), flush=True)
        if a.only in ("all", "sampling"):
            report["sampling"] = bench_sampling(d / "s", a.sample_side, a.layers, a.hidden)
            print(json.dumps({"sampling": report["sampling"]}), flush=True)
    report["load_avg_1m_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
