"""Generate the small DeepSeek-VL2 reference fixtures under tests/fixtures/deepseek_vl2_shapes/.

The shared fixtures (../shared/fixtures/deepseek_vl2) cover one MLA and one MHA shape. These add
the variants they leave out, computed by the *official* code (deepseek-ai/DeepSeek-VL2,
``deepseek_vl2/models``), which this script imports from a checkout you pass in; nothing of it is
copied into the repository:

* ``lm_*``: the DeepSeekMoE decoder (``modeling_deepseek.DeepseekV2ForCausalLM``) for other MLA
  ranks (q_lora_rank set), expert counts, top-k, routing methods (group-limited, noaux_tc with
  sigmoid), shared-expert counts, dense/MoE layer patterns, seq/non-seq aux loss, left padding.
  Saved as a full DeepSeek-VL2 HF directory (tiny random vision tower + projector that a
  text-only batch never reads), so the test loads it through the project's converter.
* ``tiles.npz``: ``DeepseekVLV2ForCausalLM.prepare_inputs_embeds`` on a padded batch with several
  images and tile grids, for ``global_view_pos`` head and tail (vision/projector replaced by a
  lookup of fixed per-tile features, so only the token layout is under test), and the official
  ``select_best_resolution`` on many image sizes.

Run with torch (CPU) available, e.g. in a throwaway venv:

    python scripts/make_deepseek_vl2_fixtures.py --upstream /path/to/DeepSeek-VL2 \
        --out tests/fixtures/deepseek_vl2_shapes

transformers 4.57.1 is enough for the decoder (LlamaFlashAttention2, gone from it, is stubbed: it
is only used with flash-attention; for ``use_mla: false`` today's LlamaAttention, the same math,
is called through the 4.38 signature upstream uses). timm/xformers/torchvision/attrdict are
stubbed: the parts that need them are not executed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np

SEED = 4001
MIN_MARGIN = 1e-3  # relative; fp32 score differences between implementations are ~1e-6


# ------------------------------------------------------------------------------ upstream import

def import_upstream(root: Path):
    """(modeling_deepseek, configuration_deepseek, modeling_deepseek_vl_v2, processing) modules."""
    import transformers.models.llama.modeling_llama as llama

    if not hasattr(llama, "LlamaFlashAttention2"):
        llama.LlamaFlashAttention2 = type("LlamaFlashAttention2", (), {})
    for name in ("timm", "timm.layers", "timm.models", "timm.models._manipulate", "xformers", "xformers.ops",
                 "attrdict", "torchvision", "torchvision.transforms"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    for mod, attrs in (("timm.layers", ["PatchEmbed", "Mlp", "DropPath", "AttentionPoolLatent", "PatchDropout",
                                         "resample_abs_pos_embed", "LayerType"]),
                       ("timm.models._manipulate", ["named_apply", "checkpoint_seq", "adapt_input_conv"]),
                       ("attrdict", ["AttrDict"]), ("xformers.ops", ["memory_efficient_attention"])):
        for a in attrs:
            if not hasattr(sys.modules[mod], a):
                setattr(sys.modules[mod], a, object)
    pkg_dir = root / "deepseek_vl2" / "models"
    if not (pkg_dir / "modeling_deepseek.py").is_file():
        raise SystemExit(f"--upstream {root}: no deepseek_vl2/models/modeling_deepseek.py there")
    pkg = types.ModuleType("dsvl2_upstream")
    pkg.__path__ = [str(pkg_dir)]  # a namespace for the submodules; upstream __init__ is not run
    sys.modules["dsvl2_upstream"] = pkg
    mods = [importlib.import_module(f"dsvl2_upstream.{m}") for m in
            ("modeling_deepseek", "configuration_deepseek", "modeling_deepseek_vl_v2", "processing_deepseek_vl_v2")]
    # use_mla: false runs transformers' LlamaAttention, called with the 4.38 signature upstream
    mods[0].ATTENTION_CLASSES["mha_eager"] = _llama_attention_438()
    return mods


def _llama_attention_438():
    """Today's LlamaAttention (same math as 4.38's) behind the 4.38 call signature upstream uses:
    it computes its own rotary cos/sin from position_ids and returns (out, weights, cache)."""
    from transformers.models.llama import modeling_llama as llama

    class LlamaAttention438(llama.LlamaAttention):
        def __init__(self, config, layer_idx=None):
            super().__init__(config, layer_idx)
            self.rotary_emb = llama.LlamaRotaryEmbedding(config)

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                    output_attentions=False, use_cache=False, **kwargs):
            cos_sin = self.rotary_emb(hidden_states, position_ids)
            out, weights = super().forward(hidden_states, cos_sin, attention_mask)
            return out, weights, None

    return LlamaAttention438


# ------------------------------------------------------------------------------ decoder cases

LM_BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
               num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=256,
               rms_norm_eps=1e-6, rope_theta=10000.0, aux_loss_alpha=0.01, hidden_act="silu",
               attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, use_mla=True,
               bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_scaling=None, ep_size=1)

LM_CASES = {
    # MLA with q compression, group-limited routing, renormalised top-k, non-seq aux, no dense layer
    "lm_qlora_group_limited": dict(
        train=True, batch=2, seq=20, left_pad=[0, 5],
        cfg=dict(num_hidden_layers=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                 v_head_dim=12, n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=2,
                 first_k_dense_replace=0, moe_layer_freq=1, topk_method="group_limited_greedy", n_group=3,
                 topk_group=2, scoring_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.5,
                 seq_aux=False),
        grads=["language.model.layers.0.self_attn.q_a_proj.weight",
               "language.model.layers.0.self_attn.q_b_proj.weight",
               "language.model.layers.1.self_attn.kv_b_proj.weight",
               "language.model.layers.1.mlp.gate.weight",
               "language.model.layers.0.mlp.experts.4.up_proj.weight",
               "language.model.layers.1.mlp.shared_experts.down_proj.weight",
               "language.model.embed_tokens.weight"]),
    # DeepSeek-VL2 (Base) routing: sigmoid scores + e_score_correction_bias, noaux_tc (inference only upstream)
    "lm_sigmoid_noaux_tc": dict(
        train=False, batch=1, seq=18, left_pad=[0],
        cfg=dict(num_hidden_layers=3, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=6,
                 v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=None,
                 first_k_dense_replace=1, moe_layer_freq=1, topk_method="noaux_tc", n_group=4, topk_group=2,
                 scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, seq_aux=True),
        grads=[]),
    # VL2-Tiny style plain MHA, here with grouped KV heads, sigmoid scores with greedy top-k
    "lm_mha_gqa_sigmoid": dict(
        train=True, batch=1, seq=18, left_pad=[0],
        cfg=dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, use_mla=False,
                 q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
                 n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                 moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1, scoring_func="sigmoid",
                 norm_topk_prob=True, routed_scaling_factor=1.0, seq_aux=True),
        grads=["language.model.layers.0.self_attn.q_proj.weight",
               "language.model.layers.1.self_attn.k_proj.weight",
               "language.model.layers.1.self_attn.v_proj.weight",
               "language.model.layers.1.mlp.gate.weight",
               "language.model.layers.1.mlp.experts.5.down_proj.weight"]),
    # top-1 greedy, MoE every other layer, seq aux, one shared expert
    "lm_top1_layer_freq2": dict(
        train=True, batch=1, seq=16, left_pad=[0],
        cfg=dict(num_hidden_layers=4, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=8,
                 v_head_dim=6, n_routed_experts=5, num_experts_per_tok=1, n_shared_experts=1,
                 first_k_dense_replace=1, moe_layer_freq=2, topk_method="greedy", n_group=1, topk_group=1,
                 scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, seq_aux=True),
        grads=["language.model.layers.2.mlp.gate.weight",
               "language.model.layers.2.mlp.experts.3.gate_proj.weight",
               "language.model.layers.1.mlp.down_proj.weight",
               "language.model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
               "language.lm_head.weight"]),
}

VISION = dict(model_name="siglip_so400m_patch14_384", image_size=28, patch_size=14, width=8, layers=1, heads=2,
              mlp_ratio=2.0, global_pool="map", ignore_head=True, class_token=False, num_classes=0,
              use_checkpoint=False, weight_init="skip", model_type="vision")


def vision_projector_tensors(rng, n_embed):
    """Tiny random vision tower + projector (official names); a text-only batch never reads them."""
    w, m, g = VISION["width"], int(VISION["width"] * VISION["mlp_ratio"]), (VISION["image_size"] // 14) ** 2
    shapes = {"vision.patch_embed.proj.weight": (w, 3, 14, 14), "vision.patch_embed.proj.bias": (w,),
              "vision.pos_embed": (1, g, w), "vision.norm.weight": (w,), "vision.norm.bias": (w,),
              "vision.attn_pool.latent": (1, 1, w), "vision.attn_pool.q.weight": (w, w), "vision.attn_pool.q.bias": (w,),
              "vision.attn_pool.kv.weight": (2 * w, w), "vision.attn_pool.kv.bias": (2 * w,),
              "vision.attn_pool.proj.weight": (w, w), "vision.attn_pool.proj.bias": (w,),
              "vision.attn_pool.norm.weight": (w,), "vision.attn_pool.norm.bias": (w,),
              "vision.attn_pool.mlp.fc1.weight": (m, w), "vision.attn_pool.mlp.fc1.bias": (m,),
              "vision.attn_pool.mlp.fc2.weight": (w, m), "vision.attn_pool.mlp.fc2.bias": (w,),
              "projector.layers.0.weight": (n_embed, 4 * w), "projector.layers.0.bias": (n_embed,),
              "projector.layers.2.weight": (n_embed, n_embed), "projector.layers.2.bias": (n_embed,),
              "image_newline": (n_embed,), "view_seperator": (n_embed,)}
    for i in range(VISION["layers"]):
        p = f"vision.blocks.{i}."
        shapes.update({p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "attn.qkv.weight": (3 * w, w),
                       p + "attn.qkv.bias": (3 * w,), p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
                       p + "norm2.weight": (w,), p + "norm2.bias": (w,), p + "mlp.fc1.weight": (m, w),
                       p + "mlp.fc1.bias": (m,), p + "mlp.fc2.weight": (w, m), p + "mlp.fc2.bias": (w,)})
    return {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _kth_gap(x, k):
    """Relative gap between the k-th and (k+1)-th largest values (scores are compared, and differ
    between fp32 implementations, relative to their size)."""
    s = np.sort(x, axis=-1)[:, ::-1]
    if s.shape[1] <= k:
        return np.inf
    a, b = s[:, k - 1], s[:, k]
    return float(((a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-30)).min())


def routing_margin(choice_scores, cfg):
    """Smallest decision gap of the upstream selection (group choice, then expert choice) over all
    tokens and MoE layers: how far every routing decision is from a tie."""
    k, method = cfg["num_experts_per_tok"], cfg["topk_method"]
    gaps = []
    for sc in choice_scores:
        if method == "greedy":
            gaps.append(_kth_gap(sc, k))
            continue
        t, e = sc.shape
        grouped = sc.reshape(t, cfg["n_group"], e // cfg["n_group"])
        group = np.sort(grouped, -1)[..., -2:].sum(-1) if method == "noaux_tc" else grouped.max(-1)
        gaps.append(_kth_gap(group, cfg["topk_group"]))
        keep = np.argsort(-group, -1)[:, :cfg["topk_group"]]
        mask = np.zeros_like(group, bool)
        np.put_along_axis(mask, keep, True, -1)
        masked = np.where(np.repeat(mask, e // cfg["n_group"], -1), sc, 0.0)
        gaps.append(_kth_gap(masked, k))
    return min(gaps) if gaps else np.inf


def make_lm_case(mods, name, spec, out_dir: Path):
    import torch
    from safetensors.numpy import save_file

    modeling, configuration, _, _ = mods
    cfg_kwargs = dict(LM_BASE, **spec["cfg"])
    config = configuration.DeepseekV2Config(**cfg_kwargs)
    config._attn_implementation = "eager"
    b, s = spec["batch"], spec["seq"]
    rng = np.random.default_rng(SEED + len(name))
    for attempt in range(50):
        torch.manual_seed(SEED + attempt)
        model = modeling.DeepseekV2ForCausalLM(config).float()
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None:  # wide gate logits keep the top-k choice far from ties
                    gate.weight.normal_(0.0, 3.0 / np.sqrt(config.hidden_size))
                    if hasattr(gate, "e_score_correction_bias"):
                        gate.e_score_correction_bias.normal_(0.0, 0.1)
            for p in model.parameters():
                if p.dim() == 1 and p.shape[0] == config.hidden_size:
                    p.add_(0.1 * torch.randn_like(p))  # norms away from 1
        # routing choice scores, captured before the top-k, to check the margin
        choice = []

        def grab(module, args, output, choice=choice):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sc = torch.nn.functional.linear(x, module.weight.float())
            sc = sc.softmax(-1) if module.scoring_func == "softmax" else sc.sigmoid()
            if module.topk_method == "noaux_tc":
                sc = sc + module.e_score_correction_bias
            choice.append(sc.detach().numpy())

        hooks = [layer.mlp.gate.register_forward_hook(grab) for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        input_ids = rng.integers(3, config.vocab_size, size=(b, s))
        attention_mask = np.ones((b, s), np.int64)
        for i, pad in enumerate(spec["left_pad"]):
            input_ids[i, :pad] = config.pad_token_id
            attention_mask[i, :pad] = 0
        labels = input_ids.copy()
        labels[attention_mask == 0] = -100
        labels[:, : s // 3] = -100  # a prompt part, unsupervised
        model.train(spec["train"])
        with torch.no_grad():
            model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask), use_cache=False)
        for h in hooks:
            h.remove()
        margin = routing_margin(choice, spec["cfg"])
        if margin > MIN_MARGIN:  # no routing decision near a tie
            break
    else:
        raise SystemExit(f"{name}: no seed gave a routing margin > {MIN_MARGIN}")

    routing = {}

    def keep(module, args, output):
        idx, weight, aux = output
        routing[len(routing)] = (idx.detach().numpy(), weight.detach().numpy(), None if aux is None else aux.detach())

    layer_ids = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(keep) for i in layer_ids]
    model.train(spec["train"])
    model.zero_grad()
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                labels=torch.tensor(labels), use_cache=False)
    for h in hooks:
        h.remove()
    outputs = {"logits": out.logits.detach().numpy().astype(np.float32),
               "loss": np.asarray(out.loss.item(), np.float32)}
    for j, i in enumerate(layer_ids):
        idx, weight, aux = routing[j]
        order = np.argsort(idx, axis=-1, kind="stable")
        outputs[f"moe.layer{i}.topk_idx"] = np.take_along_axis(idx, order, -1).astype(np.int64)
        outputs[f"moe.layer{i}.topk_weight"] = np.take_along_axis(weight, order, -1).astype(np.float32)
        if aux is not None:
            outputs[f"moe.layer{i}.aux_loss"] = np.asarray(aux.item(), np.float32)
    if spec["grads"]:
        out.loss.backward()  # AddAuxiliaryLoss injects d(aux)=1 in train mode: grad of CE + sum(aux)
        params = dict(model.named_parameters())
        for g in spec["grads"]:
            outputs["grad." + g] = params[g[len("language."):]].grad.numpy().astype(np.float32)

    state = {"language." + k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    state.update(vision_projector_tensors(rng, config.hidden_size))
    hf = out_dir / name / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(hf / "model.safetensors"))
    lang = dict(cfg_kwargs, model_type="deepseek_v2")
    full = {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekVLV2ForCausalLM"], "tile_tag": "2D",
            "global_view_pos": "head", "candidate_resolutions": [[28, 28], [28, 56], [56, 28]],
            "vision_config": VISION,
            "projector_config": dict(model_type="mlp_projector", projector_type="downsample_mlp_gelu",
                                     input_dim=VISION["width"], n_embed=config.hidden_size, depth=2, mlp_ratio=1,
                                     downsample_ratio=2, token_pooling=False),
            "language_config": lang, "torch_dtype": "float32"}
    (hf / "config.json").write_text(json.dumps(full, indent=1))
    tile = VISION["image_size"]
    inputs = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask, "labels": labels,
              "images": np.zeros((b, 1, 3, tile, tile), np.float32), "images_seq_mask": np.zeros((b, s), bool),
              "images_spatial_crop": np.zeros((b, 1, 2), np.int64)}
    np.savez_compressed(out_dir / name / "inputs.npz", **inputs)
    np.savez_compressed(out_dir / name / "outputs.npz", **outputs)
    print(f"{name}: margin {margin:.3f}, loss {outputs['loss']:.5f}, {len(outputs)} outputs")


# ------------------------------------------------------------------------------ token layout

def make_tiles(mods, out_dir: Path):
    import torch

    _, _, vl, processing = mods
    rng = np.random.default_rng(SEED)
    d, side, tile = 6, 2, 56  # embed dim, tokens per tile side (56 px / patch 14 = 4, / downsample 2), tile pixels
    hw = side * side
    vocab, image_id = 40, 39
    # per sample: list of (w_tiles, h_tiles); sample 1 is shorter and gets left padding
    samples = [[(2, 1), (1, 3)], [(3, 2)], [(1, 1)]]
    max_images = max(len(x) for x in samples)

    def n_tokens(w, h):  # the processor's count (tokenize_with_images)
        return side * (side + 1) + 1 + (h * side) * (w * side + 1)

    seqs, masks, crops, tiles = [], [], [], []
    for grids in samples:
        ids, mask = [0], [False]
        for w, h in grids:
            text = rng.integers(3, image_id, size=rng.integers(1, 4)).tolist()
            ids += text + [image_id] * n_tokens(w, h)
            mask += [False] * len(text) + [True] * n_tokens(w, h)
        ids += [1]
        mask += [False]
        seqs.append(ids)
        masks.append(mask)
        crops.append(grids + [(0, 0)] * (max_images - len(grids)))
        tiles.append(sum(1 + w * h for w, h in grids))
    s = max(len(x) for x in seqs)
    max_tiles = max(tiles)
    input_ids = np.full((len(samples), s), 2, np.int64)
    seq_mask = np.zeros((len(samples), s), bool)
    attention_mask = np.zeros((len(samples), s), np.int64)
    for i, (ids, mask) in enumerate(zip(seqs, masks)):  # left padding, as the processor's batchify
        input_ids[i, s - len(ids):] = ids
        seq_mask[i, s - len(ids):] = mask
        attention_mask[i, s - len(ids):] = 1
    images = np.zeros((len(samples), max_tiles, 3, tile, tile), np.float32)
    first = 0
    for i, n in enumerate(tiles):  # each real tile filled with its global number: padding tiles stay 0
        images[i, :n] = (first + 1 + np.arange(n, dtype=np.float32))[:, None, None, None]
        first += n
    tile_embeds = rng.standard_normal((sum(tiles), hw, d)).astype(np.float32)
    embed = rng.standard_normal((vocab, d)).astype(np.float32)
    newline = rng.standard_normal(d).astype(np.float32)
    separator = rng.standard_normal(d).astype(np.float32)

    out = {"input_ids": input_ids, "attention_mask": attention_mask, "images": images, "images_seq_mask": seq_mask,
           "images_spatial_crop": np.asarray(crops, np.int64), "tile_embeds": tile_embeds, "embed_table": embed,
           "image_newline": newline, "view_seperator": separator}
    for pos in ("head", "tail"):
        fake = types.SimpleNamespace(
            tile_tag="2D", global_view_pos=pos,
            image_newline=torch.tensor(newline), view_seperator=torch.tensor(separator),
            vision=lambda x: x, projector=lambda x: torch.tensor(tile_embeds),
            language=types.SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding.from_pretrained(
                torch.tensor(embed))))
        with torch.no_grad():
            got = vl.DeepseekVLV2ForCausalLM.prepare_inputs_embeds(
                fake, torch.tensor(input_ids), torch.tensor(images), torch.tensor(seq_mask),
                torch.tensor(np.asarray(crops, np.int64)))
        out[f"inputs_embeds_{pos}"] = got.numpy()

    # the official best-fit rule on many image sizes and the released candidate grid
    cands = [[384 * m, 384 * n] for m in range(1, 10) for n in range(1, 10) if m * n <= 9]
    sizes = np.concatenate([rng.integers(20, 4000, size=(300, 2)), [[384, 384], [768, 384], [1000, 1000], [13, 4000]]])
    best = np.asarray([processing.select_best_resolution((int(w), int(h)), cands) for w, h in sizes], np.int64)
    out.update(resolution_candidates=np.asarray(cands, np.int64), image_sizes=sizes.astype(np.int64),
               best_resolutions=best)
    np.savez_compressed(out_dir / "tiles.npz", **out)
    print(f"tiles: batch {input_ids.shape}, {sum(tiles)} tiles, {len(sizes)} resolution picks")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="checkout of deepseek-ai/DeepSeek-VL2")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    mods = import_upstream(args.upstream)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, spec in LM_CASES.items():
        make_lm_case(mods, name, spec, args.out)
    make_tiles(mods, args.out)


if __name__ == "__main__":
    main()
