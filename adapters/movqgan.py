"""MoVQGAN (Lumina-mGPT 2.0's image tokenizer): release config -> `MoVQGANConfig`, and the HF ⇄ MM
weight spec (`SPEC`, converter name `MoVQGANConverter`).

A MoVQGAN checkpoint directory holds ``movqgan_config.json`` (``{"ddconfig": {...}, "n_embed",
"embed_dim", ...}``, read by `movqgan_config.read_hf_config`, the spec's hook) and the ``MOVQ.state_dict()`` tensors in
``*.safetensors``. MindSpeed-MM has no MoVQGAN, so the MM names are the checkpoint names, one to
one (``IDENTITY`` for every tensor):

| HF = MM | shape |
|---|---|
| ``encoder.conv_in.{weight,bias}``, ``encoder.conv_out.*`` | conv [out, in, 3, 3] |
| ``encoder.down.{l}.block.{b}.{norm1,norm2}.{weight,bias}`` | GroupNorm [C] |
| ``encoder.down.{l}.block.{b}.{conv1,conv2,nin_shortcut}.*`` | conv |
| ``encoder.down.{l}.attn.{b}.{norm,q,k,v,proj_out}.*``, ``encoder.mid.{block_1,attn_1,block_2}.*`` | |
| ``encoder.down.{l}.downsample.conv.*``, ``encoder.norm_out.*`` | |
| ``quant_conv.*``, ``post_quant_conv.*`` | 1x1 conv |
| ``quantize.embedding.weight`` | codebook [n_embed, embed_dim] |
| ``decoder.{conv_in,conv_out}.*``, ``decoder.up.{l}.{block,attn}.{b}.*``, ``decoder.up.{l}.upsample.conv.*`` | |
| ``decoder.*.{norm1,norm2,norm,norm_out}.{norm_layer.{weight,bias}, conv_y.*, conv_b.*}`` | SpatialNorm |

Everything is replicated under tensor parallelism (no TP rules) and there is no pipeline split.
The upstream release ships ``movqgan_270M.ckpt`` (a torch pickle); it needs a one-off export to
safetensors (``{k: v for k, v in torch.load(...)["state_dict"].items()}``) before it can be read here.
"""
from __future__ import annotations

from typing import List

from convert.spec import FamilySpec, Rule
from ms_mm.models.lumina_mgpt2.movqgan_config import (
    CONFIG_FILE, MoVQGANConfig, config_from_hf, movqgan_parameter_shapes, read_hf_config,
)

__all__ = ["config_from_hf", "read_hf_config", "SPEC", "CONFIG_FILE"]   # the readers live in movqgan_config


def _as_config(config) -> MoVQGANConfig:
    return MoVQGANConfig.from_dict(config) if isinstance(config, dict) else config


def _rules(config) -> List[Rule]:
    return [Rule(name, (name,), hf_shapes=(shape,)) for name, shape in movqgan_parameter_shapes(_as_config(config)).items()]


SPEC = FamilySpec(
    family="movqgan",
    converter="MoVQGANConverter",
    config_from_hf=config_from_hf,
    rules=_rules,
    layer_counts=lambda config: {},
    tp_rules=[],
    read_hf_config=read_hf_config,
)
