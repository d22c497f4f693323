"""The tiny DeepSeek-VL2 of the embedded default, in the official release layout.

    python -m convert.tiny deepseek_vl2 --out DIR [--seed N] [--mha] [--assets TOKENIZER_DIR]

writes `config.json` (`vision_config` / `projector_config` / `language_config`, model_type
`deepseek_vl_v2`), `model.safetensors` (`vision.*`, `projector.layers.*`, `language.*` names),
`processor_config.json` matching the config, `generation_config.json` and the tokenizer files of
`ms_mm/models/deepseek_vl2/assets/` (or `--assets`). `--mha` makes the plain-attention variant
(as deepseek-vl2-tiny).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from convert.tiny import tokenizer_special_ids, write_random_hf
from ms_mm.models.deepseek_vl2.tokenizer import ASSET_DIR as DEEPSEEK_VL2_ASSETS

_DEEPSEEK_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "chat_template.jinja", "tokenizer.model", "special_ids.json")
DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", \
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5c\u2581pad\u2581\uff5c>"


def deepseek_vl2_tiny_config(vocab_size: int, bos: int, eos: int, pad: int, mla: bool = True,
                             candidate_resolutions=None, patch_size: int = 14,
                             downsample_ratio: int = 2) -> Dict[str, Any]:
    """Official-layout config.json of the tiny DeepSeek-VL2 (MoE + MLA, or plain MHA with `mla=False`).

    Vision: tiles of the smallest candidate resolution (default 112 px: 8x8 patches of 14), width
    64, 2 blocks. Projector: 2x2 downsample MLP. LLM: hidden 128, 3 layers (layer 0 dense, 1-2 MoE
    with 8 routed experts top-2 + 1 shared), MLA heads 4 (kv_lora 64, qk_nope 32, qk_rope 16, v 32).
    Small enough to learn the demo data in minutes on 2 CPU cores, big enough that EP 2/4/8 and
    TP 2/4 split it.
    """
    language = {
        "model_type": "deepseek_v2", "vocab_size": int(vocab_size), "hidden_size": 128, "intermediate_size": 256,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "scoring_func": "softmax",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True,
        "ep_size": 1, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": int(bos), "eos_token_id": int(eos), "pad_token_id": int(pad),
    }
    if mla:
        language.update(use_mla=True, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32)
    else:  # as deepseek-vl2-tiny's config.json: MLA fields present but null / 0
        language.update(use_mla=False, q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0,
                        v_head_dim=0)
    if candidate_resolutions is None:
        t = 112
        candidate_resolutions = [[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t], [t, 3 * t], [3 * t, t]]
    tile = int(np.gcd.reduce(np.asarray(candidate_resolutions, dtype=np.int64).ravel()))  # the tile side
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2", "torch_dtype": "float32",
        "tile_tag": "2D", "global_view_pos": "head",
        "candidate_resolutions": [list(map(int, r)) for r in candidate_resolutions],
        "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": tile,
                          "patch_size": int(patch_size), "width": 64, "layers": 2, "heads": 2, "mlp_ratio": 2.0,
                          "global_pool": "map", "ignore_head": True, "class_token": False, "num_classes": 0,
                          "use_checkpoint": False, "weight_init": "skip"},
        "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                             "input_dim": 64, "n_embed": 128, "depth": 2, "mlp_ratio": 1,
                             "downsample_ratio": int(downsample_ratio),
                             "token_pooling": False},
        "language_config": language,
    }


def build_tiny(out: Path, seed: int = 0, assets: Optional[Path] = None, mla: bool = True) -> Path:
    """The tiny model (MLA + MoE; `mla=False`: plain MHA) + tokenizer/processor files in `out`."""
    out = Path(out)
    assets = Path(assets) if assets else DEEPSEEK_VL2_ASSETS
    tok_json = assets / "tokenizer.json"
    if not tok_json.is_file():
        raise FileNotFoundError(f"{tok_json} not found: the DeepSeek-VL2 tokenizer files are needed for the "
                                f"vocabulary (give --assets DIR with tokenizer.json)")
    special = tokenizer_special_ids(tok_json)
    missing = [t for t in (DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD) if t not in special]
    if missing:
        raise ValueError(f"{tok_json}: special token(s) {missing} not among its added tokens")
    vocab = -(-special["_size"] // 64) * 64  # padded like the released vocabularies (TP-divisible)
    # the model's tiling follows the bundled processor config, so the processor the examples load
    # from the assets and the model agree on tiles and image-token counts
    proc_path = assets / "processor_config.json"
    proc = json.loads(proc_path.read_text()) if proc_path.is_file() else {}
    tiling = {k: proc[k] for k in ("candidate_resolutions", "patch_size", "downsample_ratio") if k in proc}
    hf_config = deepseek_vl2_tiny_config(vocab, special[DEEPSEEK_BOS], special[DEEPSEEK_EOS],
                                         special[DEEPSEEK_PAD], mla, **tiling)
    write_random_hf(out, hf_config, "deepseek_vl2", seed)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("dtype", None)  # the official config names it torch_dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in _DEEPSEEK_TOKENIZER_FILES:
        if (assets / name).is_file():
            shutil.copyfile(assets / name, out / name)  # contents only: assets may be read-only
    proc = proc or {
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "normalize": True, "image_token": "<image>",
        "pad_token": DEEPSEEK_PAD, "add_special_token": False, "sft_format": "deepseek", "mask_prompt": True,
        "ignore_id": -100, "processor_class": "DeepseekVLV2Processor"}
    proc.update(candidate_resolutions=hf_config["candidate_resolutions"],
                patch_size=hf_config["vision_config"]["patch_size"],
                downsample_ratio=hf_config["projector_config"]["downsample_ratio"])
    (out / "processor_config.json").write_text(json.dumps(proc, indent=1) + "\n")
    gen = {"bos_token_id": special[DEEPSEEK_BOS], "eos_token_id": special[DEEPSEEK_EOS],
           "pad_token_id": special[DEEPSEEK_PAD], "_from_model_config": True}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
