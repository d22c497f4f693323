"""Build the extra Qwen2.5-VL parity fixtures in tests/fixtures/qwen2_5_vl_shapes/ (developer tool).

The shared fixture (../shared/fixtures/qwen2_5_vl/forward) covers one tiny shape. These cases
cover others: GQA ratio 3, MHA and MQA, tied and untied embeddings, several widths and depths,
other full-attention block layouts and window sizes, patch size 8, batches of two with left or
right padding, a text-only sample beside an image one, several images per batch and a
two-frame image grid.

Each case is a tiny random ``Qwen2_5_VLForConditionalGeneration`` built and run by the reference
implementation (transformers 4.57.1, eager attention, fp32, ``train()`` mode), with the init recipe
of the shared fixture: Linear/Conv ~ N(0, 1/fan_in), embeddings N(0, 1), norm weights
1 + N(0, 0.1), biases N(0, 0.05). Token ids are built by hand (no tokenizer needed) and pixel
values are quantised like real processor output (uint8 / 255, CLIP mean/std), which keeps the
compressed inputs small. Written per case:

    hf/config.json, hf/model.safetensors     (save_pretrained: the original release key spelling)
    inputs.npz   input_ids, attention_mask, labels, pixel_values, image_grid_thw
    outputs.npz  logits, loss, image_embeds, position_ids, rope_deltas, grad.<checkpoint name>
    README.md    the shapes of the case

Needs torch, which the project itself never uses. Run it from the repository root:

    pip install torch==2.13.0        # CPU wheel; never torchvision
    python scripts/make_parity_fixtures.py [--out tests/fixtures/qwen2_5_vl_shapes] [--case NAME]
    pip uninstall -y torch
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# small vocabulary, hand-placed special ids (the fixture tokenizer's 384 would make logits large)
TOKENS = {"vision_start_token_id": 150, "vision_end_token_id": 151, "vision_token_id": 152,
          "image_token_id": 153, "video_token_id": 154, "bos_token_id": 155, "eos_token_id": 156,
          "pad_token_id": 155}
VOCAB = 160
TEXT_IDS = 150  # ordinary tokens are drawn from [0, TEXT_IDS)

CASES = {
    # GQA with 3 query heads per KV head, tied embeddings, batch of 2 (left padding), 3 images
    # (one with grid_t = 2), full attention first in the vision tower.
    "gqa3_tied_batch2": {
        "seed": 2001,
        "text": {"hidden_size": 36, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 6,
                 "num_key_value_heads": 2, "rope_theta": 10000.0, "rope_scaling": {"mrope_section": [1, 1, 1]}},
        "vision": {"depth": 2, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "patch_size": 14,
                   "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 56,
                   "fullatt_block_indexes": [0]},
        "tie_word_embeddings": True,
        # per sample: segments ("text", n) / ("image", (t, h, w)); the last text segment is supervised
        "samples": [[("text", 5), ("image", (1, 4, 4)), ("text", 3), ("image", (2, 2, 2)), ("text", 6)],
                    [("text", 4), ("image", (1, 2, 6)), ("text", 5)]],
        "grads": ["visual.blocks.1.attn.qkv.weight", "visual.merger.mlp.0.bias",
                  "model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight",
                  "model.embed_tokens.weight"],
    },
    # MHA, untied, deeper LLM, patch size 8, 4-unit windows over a 5x6 merged grid (partial windows),
    # full attention in the middle of the vision tower, another rope theta.
    "mha_patch8_windows": {
        "seed": 2002,
        "text": {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "rope_theta": 50000.0, "rope_scaling": {"mrope_section": [2, 1, 1]}},
        "vision": {"depth": 3, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "patch_size": 8,
                   "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 64,
                   "fullatt_block_indexes": [1]},
        "tie_word_embeddings": False,
        "samples": [[("text", 6), ("image", (1, 10, 12)), ("text", 9)]],
        "grads": ["visual.blocks.0.attn.qkv.bias", "visual.blocks.2.mlp.gate_proj.weight",
                  "visual.merger.mlp.2.weight", "model.layers.2.self_attn.v_proj.weight", "lm_head.weight"],
    },
    # every window and every frame of one size (2 x 4 merged units, 2-unit windows, a grid_t = 2 image):
    # ms-mm then attends per window / frame as a batch instead of over all patches with a mask.
    "uniform_windows_frames": {
        "seed": 2004,
        "text": {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rope_theta": 10000.0, "rope_scaling": {"mrope_section": [1, 1, 2]}},
        "vision": {"depth": 3, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "patch_size": 8,
                   "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 32,
                   "fullatt_block_indexes": [2]},
        "tie_word_embeddings": False,
        "samples": [[("text", 4), ("image", (1, 4, 8)), ("text", 5)],
                    [("text", 3), ("image", (2, 4, 8)), ("text", 4)]],
        "grads": ["visual.blocks.0.attn.qkv.weight", "visual.blocks.2.attn.proj.bias",
                  "visual.patch_embed.proj.weight", "model.layers.1.self_attn.q_proj.weight"],
    },
    # MQA (one KV head), right padding, a text-only sample next to one with an image, the real
    # models' 112 px window (4 merged units) and two full-attention blocks in a deeper vision tower.
    "mqa_rightpad_textonly": {
        "seed": 2003,
        "text": {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 1, "rope_theta": 1000000.0, "rope_scaling": {"mrope_section": [1, 1, 2]}},
        "vision": {"depth": 4, "hidden_size": 16, "num_heads": 1, "intermediate_size": 24, "patch_size": 14,
                   "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                   "fullatt_block_indexes": [1, 3]},
        "tie_word_embeddings": False,
        "padding_side": "right",
        "samples": [[("text", 14)],
                    [("text", 3), ("image", (1, 4, 10)), ("text", 4)]],
        "grads": ["visual.blocks.3.attn.proj.weight", "visual.blocks.0.norm1.weight",
                  "model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight",
                  "model.norm.weight"],
    },
}


def _hf_config(case):
    from transformers import Qwen2_5_VLConfig

    text = dict(case["text"], vocab_size=VOCAB, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=1024,
                attention_dropout=0.0, tie_word_embeddings=case["tie_word_embeddings"],
                bos_token_id=TOKENS["bos_token_id"], eos_token_id=TOKENS["eos_token_id"])
    text["rope_scaling"] = dict(text["rope_scaling"], rope_type="default", type="default")
    vision = dict(case["vision"], in_channels=3, hidden_act="silu", tokens_per_second=2,
                  out_hidden_size=case["text"]["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=case["tie_word_embeddings"],
                            attn_implementation="eager", **TOKENS)


def _init_weights(model, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            elif "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def _inputs(case, vision_cfg, rng):
    merge = vision_cfg["spatial_merge_size"]
    rows, grids = [], []
    for sample in case["samples"]:
        ids, lab = [], []
        for i, (kind, arg) in enumerate(sample):
            if kind == "text":
                toks = rng.integers(0, TEXT_IDS, arg).tolist()
                supervised = i == len(sample) - 1
                ids += toks
                lab += toks if supervised else [-100] * arg
            else:
                t, h, w = arg
                n = t * h * w // merge ** 2
                ids += [TOKENS["vision_start_token_id"]] + [TOKENS["image_token_id"]] * n + [TOKENS["vision_end_token_id"]]
                lab += [-100] * (n + 2)
                grids.append(arg)
        rows.append((ids, lab))
    width = max(len(ids) for ids, _ in rows)
    right = case.get("padding_side", "left") == "right"

    def padded(seq, fill):
        filler = [fill] * (width - len(seq))
        return seq + filler if right else filler + seq

    input_ids = np.array([padded(ids, TOKENS["pad_token_id"]) for ids, _ in rows], np.int64)
    attention_mask = np.array([padded([1] * len(ids), 0) for ids, _ in rows], np.int64)
    label_arr = np.array([padded(lab, -100) for _, lab in rows], np.int64)
    c, tp, p = 3, vision_cfg["temporal_patch_size"], vision_cfg["patch_size"]
    n_patches = sum(t * h * w for t, h, w in grids)
    levels = rng.integers(0, 256, (n_patches, c, tp * p * p)).astype(np.float32) / 255.0
    pixel_values = ((levels - CLIP_MEAN[:, None]) / CLIP_STD[:, None]).reshape(n_patches, -1).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_arr,
            "pixel_values": pixel_values, "image_grid_thw": np.array(grids, np.int64)}


def _canonical(name):
    return name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


def _run(model, inputs, grad_names):
    import torch

    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"],
                pixel_values=t["pixel_values"], image_grid_thw=t["image_grid_thw"])
    out.loss.backward()
    params = {_canonical(n): p for n, p in model.named_parameters()}
    result = {"logits": out.logits.detach().numpy().astype(np.float32),
              "loss": np.asarray(out.loss.item(), np.float32)}
    with torch.no_grad():
        result["image_embeds"] = model.model.visual(t["pixel_values"], grid_thw=t["image_grid_thw"]).numpy()
        pos, deltas = model.model.get_rope_index(t["input_ids"], t["image_grid_thw"], None, None, t["attention_mask"])
    result["position_ids"] = pos.numpy().astype(np.int64)
    result["rope_deltas"] = deltas.numpy().astype(np.int64)
    for name in grad_names:
        result[f"grad.{name}"] = params[name].grad.numpy().copy()
    return result


def build_case(name, case, out_root: Path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(case["seed"])
    config = _hf_config(case)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    assert model.config._attn_implementation == "eager"
    _init_weights(model, case["seed"])
    if case["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    inputs = _inputs(case, case["vision"], np.random.default_rng(case["seed"]))
    outputs = _run(model, inputs, case["grads"])

    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    (out / "hf").mkdir(parents=True)
    model.save_pretrained(out / "hf", safe_serialization=True)
    for extra in ("generation_config.json",):
        (out / "hf" / extra).unlink(missing_ok=True)
    np.savez_compressed(out / "inputs.npz", **inputs)
    np.savez_compressed(out / "outputs.npz", **outputs)

    # the saved checkpoint must reproduce the outputs exactly (no state outside the files)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "hf", attn_implementation="eager",
                                                                  dtype=torch.float32)
    again = _run(reloaded, inputs, case["grads"])
    worst = max(float(np.abs(again[k].astype(np.float64) - outputs[k]).max()) for k in outputs)
    assert worst == 0.0, f"{name}: reloaded checkpoint differs by {worst}"

    _write_readme(out, name, case, inputs, outputs)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{name}: loss {float(outputs['loss']):.6f}, {size / 1024:.0f} KB, reload max|diff| {worst}")
    return size


def _write_readme(out: Path, name, case, inputs, outputs):
    lines = [f"# qwen2_5_vl_shapes / {name}", "",
             "Generated by `scripts/make_parity_fixtures.py` (transformers 4.57.1, torch 2.13.0 CPU, eager "
             "attention, fp32, train mode; see that file for the recipe). Do not edit by hand.", "",
             f"- text: {json.dumps(case['text'])}, vocab {VOCAB}, tied embeddings {case['tie_word_embeddings']}",
             f"- vision: {json.dumps(case['vision'])}",
             f"- special ids: {json.dumps(TOKENS)}",
             f"- seed {case['seed']}", "", "| file | key | shape | dtype |", "|---|---|---|---|"]
    for fname, arrays in (("inputs.npz", inputs), ("outputs.npz", outputs)):
        for k, v in arrays.items():
            lines.append(f"| {fname} | `{k}` | {list(np.shape(v))} | {np.asarray(v).dtype} |")
    lines += ["", "Gradient keys use the checkpoint (original release) names. Suggested fp32 acceptance: "
              "logits / image_embeds atol = rtol = 1e-4, loss 1e-5, gradients atol 1e-5 + rtol 1e-3, "
              "position ids and rope deltas exact.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures/qwen2_5_vl_shapes")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    args = parser.parse_args(argv)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.case or sorted(CASES):
        size = build_case(name, CASES[name], out_root)
        if size > 400 * 1024:
            raise SystemExit(f"{name}: {size / 1024:.0f} KB, over the 400 KB budget for a test fixture")


if __name__ == "__main__":
    main()
