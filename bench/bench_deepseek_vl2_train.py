"""DeepSeek-VL2 train step: ms-mm (MindSpore graph mode) against a PyTorch reference built from
Hugging Face transformers parts (PyTorch eager, CPU).

    pip install torch==2.13.0          # CPU build; never torchvision beside it
    python bench/bench_deepseek_vl2_train.py [--steps 5] [--warmup 2] [--batch 2] [--threads 2] [--shape big]

The model is tiny but has every DeepSeek-VL2 part: SigLIP ViT (4 blocks, width 128, 112-px tiles),
2x2-downsample MLP projector, 2D tile layout with image_newline / view_seperator, and a DeepSeek-V2
decoder with MLA (8 heads, kv_lora 64, q nope/rope 32/16) and MoE (layer 0 dense, layers 1-3 with
8 routed experts top-2 + 1 shared). Each sample: 256 tokens, one 224x112 image = global view +
2 local tiles (57 image tokens). Both sides start from the same official-layout checkpoint
(written here with `convert.tiny.write_random_hf`) and run forward + backward + AdamW.

The PyTorch reference is what the fixture README validated against the official code:
`SiglipVisionModel` (timm names mapped to HF names, qkv split) + hand-written projector and tile
layout + `DeepseekV2ForCausalLM` on `inputs_embeds`. ms-mm loads the checkpoint through its own
converter (`convert.load_hf_as_mm`). The transformers port has no MoE auxiliary loss, so the
first-step sanity check compares the cross-entropy; ms-mm's objective adds the seq-aux loss
(alpha 0.001, printed). ms-mm's CPU MoE is the blocked dispatch (the chosen pairs sorted by expert
into padded blocks: static shapes, up to B - 1 padding rows per expert computed too); the Ascend path
dispatches with grouped matmul instead. `--shape big`: LLM 8 layers, hidden 512, 1024 tokens per sample.

Also reported: a breakdown (host input preparation, forward + backward, update), each timed to
completion, and model FLOPs/s as a share of the fp32 matmul peak measured here (2048^3 GEMM, the
best of PyTorch's and MindSpore's). Model FLOPs count the top-k routed experts a token needs
(ms-mm's blocked dispatch computes its padding rows too) and attention in full. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (attention_flops, linear_flops, ms_matmul_gflops, ms_timed_steps, peak_mb, report, rss_mb,  # noqa: E402
                           run_worker, torch_available, torch_matmul_gflops)

SEQ_LEN = 256
TILE = 112
IMAGE_TOKEN, BOS, EOS, PAD = 2000, 2001, 2002, 2003
CROP = (2, 1)  # (width tiles, height tiles) of each sample's image
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.0

HF_CONFIG = {
    "architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2", "torch_dtype": "float32",
    "tile_tag": "2D", "global_view_pos": "head",
    "candidate_resolutions": [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]],
    "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": TILE,
                      "patch_size": 14, "width": 128, "layers": 4, "heads": 4, "mlp_ratio": 2.0,
                      "global_pool": "map", "ignore_head": True, "class_token": False},
    "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu", "input_dim": 128,
                         "n_embed": 256, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2, "token_pooling": False},
    "language_config": {
        "model_type": "deepseek_v2", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "use_mla": True, "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001,
        "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
    },
}


def use_shape(name: str) -> None:
    """`bench` (the default above) or `big`: LLM 8 layers, hidden 512, 1024 tokens per sample."""
    global SEQ_LEN
    if name == "big":
        HF_CONFIG["language_config"].update(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                                            num_hidden_layers=8)
        HF_CONFIG["projector_config"]["n_embed"] = 512
        SEQ_LEN = 1024


def model_flops(batch_size: int) -> float:
    """Train-step model FLOPs (see the module docstring)."""
    v, p, lang = HF_CONFIG["vision_config"], HF_CONFIG["projector_config"], HF_CONFIG["language_config"]
    w_v, mlp = v["width"], int(v["width"] * v["mlp_ratio"])
    tiles = batch_size * (1 + CROP[0] * CROP[1])
    patches = (TILE // 14) ** 2
    merged = tokens_per_side() ** 2
    tokens = batch_size * SEQ_LEN
    h, heads = lang["hidden_size"], lang["num_attention_heads"]
    qh = lang["qk_nope_head_dim"] + lang["qk_rope_head_dim"]
    w = [((w_v, 3 * 14 * 14), tiles * patches)]
    for _ in range(v["layers"]):
        w += [((3 * w_v, w_v), tiles * patches), ((w_v, w_v), tiles * patches), ((mlp, w_v), tiles * patches),
              ((w_v, mlp), tiles * patches)]
    r2 = p["downsample_ratio"] ** 2
    w += [((p["n_embed"], p["input_dim"] * r2), tiles * merged), ((p["n_embed"], p["n_embed"]), tiles * merged)]
    mi, k, shared = lang["moe_intermediate_size"], lang["num_experts_per_tok"], lang["n_shared_experts"]
    for i in range(lang["num_hidden_layers"]):
        w += [((heads * qh + lang["kv_lora_rank"] + lang["qk_rope_head_dim"], h), tokens),
              ((heads * (lang["qk_nope_head_dim"] + lang["v_head_dim"]), lang["kv_lora_rank"]), tokens),
              ((h, heads * lang["v_head_dim"]), tokens)]
        if i < lang["first_k_dense_replace"]:
            w += [((2 * lang["intermediate_size"], h), tokens), ((h, lang["intermediate_size"]), tokens)]
        else:
            w += [((lang["n_routed_experts"], h), tokens), ((2 * mi, h), tokens * k), ((h, mi), tokens * k),
                  ((2 * mi * shared, h), tokens), ((h, mi * shared), tokens)]
    w += [((lang["vocab_size"], h), tokens)]
    attn = (attention_flops(v["layers"], tiles, patches, w_v)
            + attention_flops(lang["num_hidden_layers"], batch_size, SEQ_LEN, heads * (qh + lang["v_head_dim"]) // 2))
    return linear_flops(w) + attn


def tokens_per_side() -> int:
    grid = TILE // 14
    return -(-grid // HF_CONFIG["projector_config"]["downsample_ratio"])


def num_image_tokens() -> int:
    h = tokens_per_side()
    tw, th = CROP
    return h * (h + 1) + 1 + (th * h) * (tw * h + 1)  # global rows+newlines, separator, local rows+newlines


def make_batch(batch_size: int, seed: int = 0) -> dict:
    """A DeepseekVLV2Processor-shaped batch (images [B, tiles, 3, T, T], images_seq_mask, crops)."""
    rng = np.random.default_rng(seed)
    n_img = num_image_tokens()
    ids = rng.integers(0, IMAGE_TOKEN, size=(batch_size, SEQ_LEN), dtype=np.int64)
    ids[:, 0] = BOS
    ids[:, 4:4 + n_img] = IMAGE_TOKEN
    seq_mask = np.zeros_like(ids, dtype=bool)
    seq_mask[:, 4:4 + n_img] = True
    labels = ids.copy()
    labels[:, : SEQ_LEN // 2] = -100
    tiles = 1 + CROP[0] * CROP[1]
    return {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
        "images": rng.uniform(-1, 1, size=(batch_size, tiles, 3, TILE, TILE)).astype(np.float32),
        "images_seq_mask": seq_mask,
        "images_spatial_crop": np.tile(np.array([[CROP]], dtype=np.int64), (batch_size, 1, 1)),
    }


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def _torch_model(hf_cfg: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    v, p, lang = hf_cfg["vision_config"], hf_cfg["projector_config"], hf_cfg["language_config"]

    class DeepseekVL2Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = SiglipVisionModel(SiglipVisionConfig(
                hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]),
                num_hidden_layers=v["layers"], num_attention_heads=v["heads"], image_size=v["image_size"],
                patch_size=v["patch_size"], num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                vision_use_head=False, attn_implementation="eager"))
            r2 = p["downsample_ratio"] ** 2
            self.projector = nn.Module()  # official names: projector.layers.{0,2}
            self.projector.layers = nn.Sequential(nn.Linear(p["input_dim"] * r2, p["n_embed"]), nn.GELU(),
                                                  nn.Linear(p["n_embed"], p["n_embed"]))
            self.image_newline = nn.Parameter(torch.zeros(p["n_embed"]))
            self.view_seperator = nn.Parameter(torch.zeros(p["n_embed"]))
            cfg = DeepseekV2Config(**{k: x for k, x in lang.items() if k != "model_type"})
            cfg._attn_implementation = "eager"
            self.language = DeepseekV2ForCausalLM(cfg)

        def project(self, tiles):  # [N, 3, T, T] -> [N, h*w, D]
            x = self.vision(pixel_values=tiles).last_hidden_state
            n, hw, c = x.shape
            g = int(round(hw ** 0.5))
            x = x.reshape(n, g, g, c).permute(0, 3, 1, 2)
            r = p["downsample_ratio"]
            pad = (-g) % r
            if pad:
                x = F.pad(x, (0, pad, 0, pad))
            x = F.unfold(x, kernel_size=r, stride=r).permute(0, 2, 1)  # channels in (c, kh, kw) order
            return self.projector.layers(x)

        def forward(self, input_ids, attention_mask, labels, images, images_seq_mask, images_spatial_crop):
            embeds = self.language.get_input_embeddings()(input_ids)
            rows = []
            for b in range(input_ids.shape[0]):
                feats, t = [], 0
                crops = [c for c in images_spatial_crop[b].tolist() if c[0] > 0 and c[1] > 0]
                n_tiles = sum(1 + tw * th for tw, th in crops)
                emb = self.project(images[b, :n_tiles])
                h = int(round(emb.shape[1] ** 0.5))
                d = emb.shape[-1]
                for tw, th in crops:
                    glob = torch.cat([emb[t].view(h, h, d), self.image_newline.expand(h, 1, d)], 1).reshape(-1, d)
                    loc = emb[t + 1:t + 1 + tw * th].view(th, tw, h, h, d).permute(0, 2, 1, 3, 4)
                    loc = torch.cat([loc.reshape(th * h, tw * h, d), self.image_newline.expand(th * h, 1, d)], 1)
                    feats += [glob, self.view_seperator[None], loc.reshape(-1, d)]
                    t += 1 + tw * th
                row = embeds[b].clone()
                row[images_seq_mask[b]] = torch.cat(feats, 0)
                rows.append(row)
            out = self.language(inputs_embeds=torch.stack(rows), attention_mask=attention_mask, labels=labels)
            return out.loss

    return DeepseekVL2Reference()


def _official_to_reference(name: str, arr: np.ndarray, width: int):
    """Official DeepSeek-VL2 checkpoint tensor -> [(reference module name, array)] (timm -> HF SigLIP)."""
    V = "vision.vision_model."
    if name.startswith("vision.attn_pool."):
        return []  # ignore_head: the attention-pool head is unused upstream too
    if name.startswith("vision.blocks."):
        i, rest = name[len("vision.blocks."):].split(".", 1)
        L = f"{V}encoder.layers.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            return [(f"{L}self_attn.{q}_proj.{kind}", part) for q, part in zip("qkv", np.split(arr, 3, axis=0))]
        ren = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.proj.": "self_attn.out_proj.",
               "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
        for a, b in ren.items():
            if rest.startswith(a):
                return [(L + b + rest[len(a):], arr)]
    if name == "vision.pos_embed":
        return [(f"{V}embeddings.position_embedding.weight", arr.reshape(-1, width))]
    if name.startswith("vision.patch_embed.proj."):
        return [(f"{V}embeddings.patch_embedding." + name.rsplit(".", 1)[1], arr)]
    if name.startswith("vision.norm."):
        return [(f"{V}post_layernorm." + name.rsplit(".", 1)[1], arr)]
    return [(name, arr)]  # projector.layers.{0,2}.*, image_newline, view_seperator, language.*


def worker_torch(ckpt: Path, batch: dict, steps: int, threads: int) -> dict:
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    model = _torch_model(hf_cfg).float()
    state = {}
    for name, arr in load_file(str(ckpt / "model.safetensors")).items():
        for k, a in _official_to_reference(name, arr, hf_cfg["vision_config"]["width"]):
            state[k] = torch.from_numpy(np.ascontiguousarray(a))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del state      # the loaded copy: the trainer keeps only the parameters (peak RSS is the step's, not the loader's)
    gc.collect()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    base = rss_mb()
    times, cpu, losses, host, fwd_bwd, update = [], [], [], [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
        t1 = time.perf_counter()
        loss = model(**inputs)
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


# ---------------------------------------------------------------------------------------------
# ms-mm
# ---------------------------------------------------------------------------------------------

def worker_ms(ckpt: Path, batch: dict, steps: int, threads: int, pieces: bool = False) -> dict:
    import mindspore as ms

    from convert import load_hf_as_mm
    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES, DeepseekVL2ForCausalLM, build_model_inputs
    from ms_mm.training.optimizer import FusedAdamW
    from ms_mm.training.train_step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config, state = load_hf_as_mm(str(ckpt), "deepseek_vl2")
    model = load_state_dict(DeepseekVL2ForCausalLM(config), state)
    del state      # the loaded copy: the trainer keeps only the parameters (peak RSS is the step's, not the loader's)
    gc.collect()
    model.set_train(True)
    opt = FusedAdamW(model.trainable_params(), learning_rate=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    # the CE and aux losses (model outputs 2 and 3) come out of the train step itself, as in the trainer:
    # the first step's are those of the weights before any update (no separate forward graph to compile)
    step = TrainStep(model, opt, extra_outputs=(2, 3), fuse_update=not pieces)
    base = rss_mb()

    def prepare():
        prepared = build_model_inputs(batch, config)
        return [ms.Tensor(prepared[k]) for k in MODEL_INPUT_NAMES]

    res = ms_timed_steps(step, prepare, steps, pieces)
    _, ce0, aux0 = res["first_outputs"]          # (loss, CE, aux per MoE layer)
    return {**res, "base_rss_mb": base, "peak_rss_mb": peak_mb(), "first_ce": float(ce0),
            "first_aux": float(np.sum(aux0)), "matmul_gflops": ms_matmul_gflops()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (MindSpore compiles here)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
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
    from convert.tiny import write_random_hf

    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory(prefix="bench_dsvl2_") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "batch.npz", **make_batch(a.batch))
        ckpt = write_random_hf(tmp / "hf", HF_CONFIG, "deepseek_vl2", seed=0)
        res = {}
        for side in ("torch", "ms", "ms_pieces"):
            res[side] = run_worker(__file__, side, ["--ckpt", str(ckpt), "--batch-file", str(tmp / "batch.npz"),
                                                    "--steps", str(total), "--shape", a.shape], a.threads,
                                   tmp / f"{side}.json")
    lang = HF_CONFIG["language_config"]
    report(f"DeepSeek-VL2 train step (MLA + MoE {lang['n_routed_experts']} experts top-"
           f"{lang['num_experts_per_tok']}, {lang['num_hidden_layers']} LLM layers, ViT "
           f"{HF_CONFIG['vision_config']['layers']} blocks), batch {a.batch} x {SEQ_LEN} tokens + {a.batch} images "
           f"({1 + CROP[0] * CROP[1]} tiles of {TILE} px), {a.steps} steps after {a.warmup} warm-up, "
           f"{a.threads} threads ({a.shape} shape)", res, a.warmup, a.batch * SEQ_LEN, model_flops(a.batch),
           max(res["torch"]["matmul_gflops"], res["ms"]["matmul_gflops"]))
    pt, ms_ce, aux = res["torch"]["losses"][0], res["ms"]["first_ce"], res["ms"]["first_aux"]
    print(f"first-step CE loss: PyTorch {pt:.6f}  ms-mm {ms_ce:.6f}  |diff| {abs(pt - ms_ce):.2e}  "
          f"(ms-mm objective adds MoE seq-aux {aux:.6f}: first step {res['ms']['losses'][0]:.6f})")
    print(f"losses over the steps: PyTorch {' '.join(f'{x:.4f}' for x in res['torch']['losses'])}")
    print(f"                       ms-mm   {' '.join(f'{x:.4f}' for x in res['ms']['losses'])} (CE + aux)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
