"""Extra BAGEL parity cases of other tiny shapes, produced by the official code, into
`tests/fixtures/bagel_shapes/<case>/` (checked by tests/test_bagel_model.py).

    python scripts/make_bagel_fixtures.py --bagel-src DIR [--out tests/fixtures/bagel_shapes]

DIR is a checkout of ByteDance-Seed/Bagel (056b5fd51a88c1eb4547318609e25d40080fcf87). Run it in a
separate virtualenv with torch 2.13.0 (CPU), transformers 4.57.1, einops, safetensors and numpy<2;
the tests never import torch. The official sources are copied to a temporary directory and run as in
the shared fixture `fixtures/bagel/forward`: the hard-coded `.to(torch.bfloat16)` casts removed (fp32),
SDPA's math backend allowed, `flash_attn_varlen_func` replaced by a per-segment SDPA stand-in
(non-causal, the ViT's only use); the data modules the packer does not need (dataset registry,
transforms, video) are stubbed. Batches are packed by the official `PackedDataset.pack_sequence` +
`to_tensor` (nested masks; split_lens / attn_modes recorded from the flex path of the same packing),
latents come from the official VAE (posterior mean), `torch.randn_like` inside `Bagel.forward` returns the
recorded `noise`, and the loss is the training loop's (ce sum / #ce tokens + mse mean(-1) sum / #mse tokens).

Cases (each exercises what the shared fixture does not):
* `gqa_edit`: GQA with 2 KV groups of 2 heads, 3 LLM layers; two ViT images of different sizes in one
  sample; an editing-style sample with a clean conditioning VAE image (timestep -inf, `full` split,
  no loss) before the noised target; two latent images of different sizes (padded latent crop);
  VAE with ch_mult [1, 2] and num_res_blocks 1 (nin_shortcut, mid-level channel change);
  timestep_shift 3.0; `ae_config.json` in the flat AutoEncoderParams form.
* `mha_freeze_und`: `freeze_und=True` (upstream Qwen2MoT detaches the und rows: decoder input, v, normed
  q / k, attention and MLP outputs, final norm); gradients of und weights (exactly zero upstream; a
  weight detached before any use has `grad None`, recorded as zeros) and of gen weights / heads. MHA
  (4 KV heads = 4 heads, head_dim 10), hidden 40 / intermediate 72, 2 layers, rope_theta 5e5; ViT of
  1 layer, 3 heads; connector_act `gelu` (exact erf); a CE text after a clean latent (its loss reaches
  the gen weights only without freeze_und) and a noised latent after a ViT image in one sample;
  VAE ch_mult [1, 1] with num_res_blocks 2, z_channels 8; latent_patch_size 1 (downsample 2).
* `interp_vae3`: `interpolate_pos=True` (PackedDataset's `get_flattened_position_ids_interpolate` for the
  ViT and latent position ids): a 7 x 2 ViT grid onto the 6-grid (repeated ids), a 3 x 4 one spread
  over it, a 3 x 5 latent grid onto max_latent_size 4, a 2 x 2 one spread; MQA (1 KV head of 4), 1 LLM
  layer, rms_norm_eps 1e-5; VAE ch_mult [1, 2, 2] (three levels, downsample 4); timestep_shift 2.0;
  text-to-image sample + ViT / clean-latent / CE sample.

Every case also gets `packing.json` + `packing_images.npz` (the samples before packing and the packer
settings) so tests can run our packer on them. Regenerating `gqa_edit` reproduces its inputs, weights
and configs bit for bit; its outputs move by float noise (<= 6e-6 here vs. the committed files, from
the machine / BLAS), so only new cases need writing: `--case NAME`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bagel_shapes"
SPECIAL = {"bos_token_id": 60, "eos_token_id": 61, "start_of_image": 62, "end_of_image": 63}

FLASH_STUB = '''
import torch
from torch.nn.functional import scaled_dot_product_attention


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **kw):
    """Per-segment SDPA stand-in ([T, H, D] packed q/k/v, segments from cu_seqlens)."""
    outs = []
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0].transpose(0, 1))
    return torch.cat(outs, 0)
'''


def prepare_sources(bagel_src: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="bagel_src_"))
    shutil.copytree(bagel_src / "modeling", tmp / "modeling")
    (tmp / "data").mkdir()
    for name in ("__init__.py", "data_utils.py", "dataset_base.py"):
        shutil.copy(bagel_src / "data" / name, tmp / "data" / name)
    (tmp / "data" / "dataset_info.py").write_text("DATASET_INFO = {}\nDATASET_REGISTRY = {}\n")
    (tmp / "data" / "transforms.py").write_text("class ImageTransform:\n    pass\n")
    (tmp / "data" / "video_utils.py").write_text("class FrameSampler:\n    pass\n")
    (tmp / "flash_attn").mkdir()
    (tmp / "flash_attn" / "__init__.py").write_text(FLASH_STUB)
    n_casts = 0
    for path in list((tmp / "modeling").rglob("*.py")):
        src = path.read_text()
        new, n = re.subn(r"\.to\(torch\.bfloat16\)", "", src)
        new = new.replace("sdpa_kernel(backends=[SDPBackend.EFFICIENT_ATTENTION])",
                          "sdpa_kernel(backends=[SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])")
        n_casts += n
        if new != src:
            path.write_text(new)
    print(f"removed {n_casts} bfloat16 casts")
    sys.path.insert(0, str(tmp))
    return tmp


CASES = {
    "gqa_edit": dict(
        llm=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256),
        vit=dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                 patch_size=14),
        ae=dict(resolution=32, in_channels=3, downsample=2, ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
                z_channels=4, scale_factor=0.3611, shift_factor=0.1159),
        bagel=dict(latent_patch_size=2, max_latent_size=6, vit_max_num_patch_per_side=4,
                   connector_act="gelu_pytorch_tanh", timestep_shift=3.0),
        # sample A: understanding over two images; sample B: edit (clean image -> noised target)
        vit_images=[(28, 42), (42, 28)],
        vae_images=[(16, 24), (20, 16)],
        seed=4242,
    ),
    "mha_freeze_und": dict(
        llm=dict(vocab_size=64, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=256),
        vit=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=3, image_size=56,
                 patch_size=14),
        ae=dict(resolution=32, in_channels=3, downsample=2, ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=2,
                z_channels=8, scale_factor=0.3611, shift_factor=0.1159),
        bagel=dict(latent_patch_size=1, max_latent_size=8, vit_max_num_patch_per_side=4, connector_act="gelu",
                   timestep_shift=1.0),
        freeze_und=True,
        # sample A: ViT image, CE text, noised latent (attends to the frozen und rows); sample B: caption,
        # clean latent, CE text attending to the clean latent (gen rows), noised target
        samples=[[("vit", 0, 0), ("text", 6, 1, 0), ("vae", 0, 1)],
                 [("text", 5, 0, 1), ("vae", 1, 0), ("text", 4, 1, 0), ("vae", 2, 1)]],
        vit_images=[(28, 42)],
        vae_images=[(8, 12), (12, 8), (10, 10)],
        grads=[
            # und side: exactly zero upstream under freeze_und
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.1.self_attn.o_proj.weight",
            "language_model.model.layers.1.mlp.down_proj.weight",
            "language_model.model.layers.1.input_layernorm.weight",
            "language_model.model.layers.0.self_attn.k_norm.weight",
            "language_model.model.norm.weight",
            "language_model.model.embed_tokens.weight",
            "vit_model.vision_model.embeddings.patch_embedding.weight",
            "connector.fc1.weight",
            # after the final norm / gen side
            "language_model.lm_head.weight",
            "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
            "language_model.model.layers.1.self_attn.v_proj_moe_gen.weight",
            "language_model.model.layers.1.self_attn.v_proj_moe_gen.bias",
            "language_model.model.layers.0.self_attn.o_proj_moe_gen.weight",
            "language_model.model.layers.1.mlp_moe_gen.gate_proj.weight",
            "language_model.model.layers.0.input_layernorm_moe_gen.weight",
            "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight",
            "language_model.model.norm_moe_gen.weight",
            "vae2llm.weight",
            "time_embedder.mlp.2.weight",
            "llm2vae.weight",
        ],
        seed=5151,
    ),
    "interp_vae3": dict(
        llm=dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256),
        vit=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=84,
                 patch_size=14),
        ae=dict(resolution=32, in_channels=3, downsample=4, ch=32, out_ch=3, ch_mult=[1, 2, 2], num_res_blocks=1,
                z_channels=4, scale_factor=0.3611, shift_factor=0.1159),
        bagel=dict(latent_patch_size=2, max_latent_size=4, vit_max_num_patch_per_side=6,
                   connector_act="gelu_pytorch_tanh", timestep_shift=2.0),
        interpolate_pos=True,
        # sample A: text-to-image with a latent grid larger than max_latent_size (interpolated ids repeat);
        # sample B: two ViT images (7 x 2 patches onto the 6-grid, 3 x 4 spread over it), clean latent, CE text
        samples=[[("text", 6, 0, 1), ("vae", 0, 1)],
                 [("vit", 0, 0), ("text", 5, 1, 0), ("vit", 1, 0), ("vae", 1, 0), ("text", 4, 1, 0)]],
        vit_images=[(98, 28), (42, 56)],
        vae_images=[(24, 40), (16, 16)],
        grads=[
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.0.self_attn.k_proj_moe_gen.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.model.layers.0.mlp_moe_gen.down_proj.weight",
            "language_model.model.embed_tokens.weight",
            "vit_model.vision_model.embeddings.patch_embedding.weight",
            "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight",
            "connector.fc1.weight",
            "vae2llm.weight",
            "time_embedder.mlp.0.weight",
            "llm2vae.weight",
        ],
        seed=6262,
    ),
}

# the layout of `gqa_edit` (cases without `samples`): per sample, items in order -- ("text", n_ids, loss, cfg),
# ("vit", index into vit_images, loss), ("vae", index into vae_images, loss)
DEFAULT_SAMPLES = [[("vit", 0, 0), ("text", 5, 0, 0), ("vit", 1, 0), ("text", 7, 1, 0), ("text", 4, 1, 0)],
                   [("text", 9, 0, 1), ("vae", 0, 0), ("vae", 1, 1)]]
DEFAULT_GRADS = [
    "language_model.model.layers.1.self_attn.k_proj.weight",
    "language_model.model.layers.1.self_attn.k_proj_moe_gen.weight",
    "language_model.model.layers.2.mlp.gate_proj.weight",
    "language_model.model.layers.2.mlp_moe_gen.up_proj.weight",
    "language_model.model.layers.0.self_attn.q_norm_moe_gen.weight",
    "language_model.model.norm_moe_gen.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.lm_head.weight",
    "vit_model.vision_model.embeddings.patch_embedding.weight",
    "vit_model.vision_model.encoder.layers.1.self_attn.v_proj.weight",
    "connector.fc2.weight",
    "time_embedder.mlp.0.weight",
    "llm2vae.bias",
]


def _randomize(module, gen, scale_norm=0.1):
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:  # norm weights
                p.copy_(1.0 + scale_norm * torch.randn(p.shape, generator=gen))


def make_case(name: str, spec: dict, out_root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from data.data_utils import get_flattened_position_ids_extrapolate, get_flattened_position_ids_interpolate
    from data.dataset_base import PackedDataset
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    freeze_und = bool(spec.get("freeze_und", False))
    interpolate_pos = bool(spec.get("interpolate_pos", False))
    position_ids_fn = (get_flattened_position_ids_interpolate if interpolate_pos
                       else get_flattened_position_ids_extrapolate)
    llm_config = Qwen2Config(**spec["llm"], qk_norm=True, tie_word_embeddings=False,
                             layer_module="Qwen2MoTDecoderLayer", freeze_und=freeze_und, hidden_act="silu", **SPECIAL)
    vit_config = SiglipVisionConfig(**spec["vit"], num_channels=3, hidden_act="gelu_pytorch_tanh",
                                    layer_norm_eps=1e-6, rope=False)
    ae_params = AutoEncoderParams(**spec["ae"])
    bagel_args = dict(spec["bagel"])
    config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                         vae_config=ae_params, interpolate_pos=interpolate_pos, **bagel_args)
    model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    vae = AutoEncoder(ae_params)
    _randomize(model, gen)
    _randomize(vae, gen)
    model.train()
    vae.eval()

    # ------------------------------------------------------------------ packing (official code)
    p = bagel_args["latent_patch_size"]
    vae_down = ae_params.downsample * p
    rng = np.random.default_rng(spec["seed"])
    vit_images = [torch.tensor(rng.uniform(-1, 1, (3, h, w)), dtype=torch.float32) for h, w in spec["vit_images"]]
    vae_images = [torch.tensor(rng.uniform(-1, 1, (3, h, w)), dtype=torch.float32) for h, w in spec["vae_images"]]

    def text(n):
        return [int(t) for t in rng.integers(0, 60, n)]

    def item(kind, loss, cfg=0):
        return {"type": kind, "enable_cfg": cfg, "loss": loss, "special_token_loss": 0, "special_token_label": None}

    # text ids drawn in sample order, item order (the images above come first)
    samples, packing_samples = [], []
    for layout in spec.get("samples", DEFAULT_SAMPLES):
        sample = {"image_tensor_list": [], "text_ids_list": [], "sequence_plan": []}
        images = []
        for entry in layout:
            if entry[0] == "text":
                _, n, loss_, cfg = entry
                sample["text_ids_list"].append(text(n))
                sample["sequence_plan"].append(item("text", loss_, cfg=cfg))
            else:
                kind, index, loss_ = entry
                source = vit_images if kind == "vit" else vae_images
                sample["image_tensor_list"].append(source[index])
                sample["sequence_plan"].append(item(f"{kind}_image", loss_))
                images.append([kind, index])
        samples.append(sample)
        packing_samples.append({"text_ids_list": [list(t) for t in sample["text_ids_list"]],
                                "sequence_plan": [dict(i) for i in sample["sequence_plan"]], "images": images})

    def packer(use_flex):
        data_config = types.SimpleNamespace(text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                            vae_cond_dropout_prob=0.0, vae_image_downsample=vae_down,
                                            vit_patch_size=vit_config.patch_size,
                                            max_num_patch_per_side=bagel_args["vit_max_num_patch_per_side"],
                                            max_latent_size=bagel_args["max_latent_size"])
        return types.SimpleNamespace(data_config=data_config, use_flex=use_flex, max_num_tokens=0,
                                     get_flattened_position_ids=position_ids_fn, **SPECIAL)

    def pack(use_flex):
        np.random.seed(spec["seed"])  # the packer draws the timestep logit with np.random.randn
        self = packer(use_flex)
        status = PackedDataset.set_sequence_status(self)
        for s in samples:
            s = {k: (list(v) if isinstance(v, list) else v) for k, v in s.items()}
            s["text_ids_list"] = [list(t) for t in s["text_ids_list"]]
            status = PackedDataset.pack_sequence(self, s, status)
        return status

    flex = pack(True)
    data = PackedDataset.to_tensor(packer(False), pack(False))

    # ------------------------------------------------------------------ forward / backward
    with torch.no_grad():
        moments = vae.encoder(data["padded_images"])
        mean = torch.chunk(moments, 2, dim=1)[0]
        latent = vae.scale_factor * (mean - vae.shift_factor)
        decoded = vae.decode(latent)
    n_latent = int(sum(h * w for h, w in data["patchified_vae_latent_shapes"]))
    noise = torch.randn(n_latent, p * p * ae_params.z_channels, generator=gen)
    captured = {}
    real_randn_like = torch.randn_like

    def fake_randn_like(x, *a, **k):
        assert tuple(x.shape) == tuple(noise.shape)
        captured["x0"] = x.detach().clone()
        return noise.clone()

    torch.randn_like = fake_randn_like
    hooks = {}
    model.connector.register_forward_hook(lambda m, i, o: hooks.__setitem__("connector", o.detach().clone()))
    model.language_model.model.register_forward_hook(lambda m, i, o: hooks.__setitem__("hidden", o.detach().clone()))
    try:
        fwd = {k: v for k, v in data.items() if k not in ("padded_images", "ce_loss_weights")}
        fwd["padded_latent"] = latent
        fwd["nested_attention_masks"] = data["nested_attention_masks"]
        out = model(**fwd)
    finally:
        torch.randn_like = real_randn_like
    ce_tok = out["ce"]
    ce = ce_tok.sum() / len(data["ce_loss_indexes"])
    mse_el = out["mse"]
    mse = mse_el.mean(dim=-1).sum() / len(data["mse_loss_indexes"])
    loss = ce + mse
    loss.backward()

    with torch.no_grad():
        hidden = hooks["hidden"]
        ce_logits = model.language_model.lm_head(hidden[data["ce_loss_indexes"]])
        velocity_pred = model.llm2vae(hidden[data["mse_loss_indexes"]])
        s = torch.sigmoid(data["packed_timesteps"])
        shift = bagel_args["timestep_shift"]
        t_eff = shift * s / (1 + (shift - 1) * s)

    grad_names = list(spec.get("grads", DEFAULT_GRADS))
    params = dict(model.named_parameters())

    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    ema = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(ema, str(case_dir / "ema.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(case_dir / "ae.safetensors"))
    llm_json = {k: getattr(llm_config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                   "rms_norm_eps", "rope_theta", "max_position_embeddings",
                                                   "hidden_act", "qk_norm", "tie_word_embeddings", "layer_module",
                                                   "freeze_und")}
    llm_json.update(model_type="qwen2", **SPECIAL)
    vit_json = {k: getattr(vit_config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_channels", "image_size", "patch_size", "hidden_act",
                                                   "layer_norm_eps", "rope")}
    vit_json.update(model_type="siglip_vision_model", num_hidden_layers=vit_config.num_hidden_layers + 1)
    (case_dir / "llm_config.json").write_text(json.dumps(llm_json, indent=2) + "\n")
    (case_dir / "vit_config.json").write_text(json.dumps(vit_json, indent=2) + "\n")
    (case_dir / "ae_config.json").write_text(json.dumps(spec["ae"], indent=2) + "\n")
    bagel_json = dict(bagel_args, visual_gen=True, visual_und=True, interpolate_pos=interpolate_pos, vit_select_layer=-2,
                      vit_rope=False, special_token_ids=SPECIAL)
    (case_dir / "bagel_config.json").write_text(json.dumps(bagel_json, indent=2) + "\n")

    def np_(t):
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    inputs = {
        "sequence_length": np.asarray(data["sequence_length"], np.int64),
        "sample_lens": np.asarray(data["sample_lens"], np.int64),
        "split_lens": np.asarray(flex["split_lens"], np.int64),
        "attn_modes": np.asarray(flex["attn_modes"]),
        "padded_latent": np_(latent),
        "patchified_vae_latent_shapes": np.asarray(data["patchified_vae_latent_shapes"], np.int64),
        "noise": np_(noise),
    }
    for k in ("packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_label_ids",
              "ce_loss_indexes", "ce_loss_weights", "packed_vit_tokens", "packed_vit_token_indexes",
              "packed_vit_position_ids", "vit_token_seqlens", "padded_images", "packed_latent_position_ids",
              "packed_vae_token_indexes", "packed_timesteps", "mse_loss_indexes"):
        inputs[k] = np_(data[k])
    for i, m in enumerate(data["nested_attention_masks"]):
        inputs[f"nested_attention_mask_{i}"] = np_(m)
    outputs = {
        "loss": np_(loss), "ce": np_(ce), "mse": np_(mse), "ce_per_token": np_(ce_tok), "ce_logits": np_(ce_logits),
        "velocity_pred": np_(velocity_pred), "velocity_target": np_(noise - captured["x0"]),
        "mse_elementwise": np_(mse_el), "packed_latent_clean": np_(captured["x0"]), "timesteps_effective": np_(t_eff),
        "last_hidden_state": np_(hidden), "vit_connector_out": np_(hooks["connector"]), "vae_latent": np_(latent),
        "vae_encoder_moments": np_(moments), "vae_decoded": np_(decoded),
    }
    for g in grad_names:  # no grad at all (freeze_und: detached before any use) is a zero gradient
        grad = params[g].grad
        outputs[f"grad.{g}"] = np_(grad if grad is not None else torch.zeros_like(params[g]))
    np.savez(case_dir / "inputs.npz", **inputs)
    # the samples before packing, for checking our packer (processing.Packer) against upstream's
    packing = {"settings": {k: getattr(packer(False).data_config, k) for k in
                            ("vit_patch_size", "max_num_patch_per_side", "max_latent_size", "vae_image_downsample")},
               "interpolate_pos": interpolate_pos, "special_token_ids": SPECIAL, "samples": packing_samples}
    (case_dir / "packing.json").write_text(json.dumps(packing, indent=1) + "\n")
    np.savez(case_dir / "packing_images.npz", **{f"vit_image_{i}": np_(t) for i, t in enumerate(vit_images)},
             **{f"vae_image_{i}": np_(t) for i, t in enumerate(vae_images)})
    np.savez(case_dir / "outputs.npz", **{k: v.astype(np.float32) for k, v in outputs.items()})
    (case_dir / "README.md").write_text(
        f"# bagel_shapes / {name}\n\nWritten by `scripts/make_bagel_fixtures.py` from the official BAGEL code "
        f"(see its docstring for the case and the conventions). Same keys as `fixtures/bagel/forward`.\n"
        f"split_lens {inputs['split_lens'].tolist()}, attn_modes {inputs['attn_modes'].tolist()}, "
        f"loss {float(loss):.6f} (ce {float(ce):.6f}, mse {float(mse):.6f}).\n")
    print(f"{name}: loss {float(loss):.6f} ce {float(ce):.6f} mse {float(mse):.6f} -> {case_dir}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bagel-src", required=True, type=Path, help="checkout of ByteDance-Seed/Bagel")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    prepare_sources(a.bagel_src)
    for name in a.case or sorted(CASES):
        make_case(name, CASES[name], a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
