"""Registry record of BAGEL-MoT: converter, configs, model, mm-parity runner, and the finetuning path
(packed data loader, the train Cell with the frozen VAE inside, CE / MSE / packing-efficiency
metrics and the upstream log line, the weights' EMA, the recipe's own flags, the embedded default)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ms_mm.models.bagel.config import (BagelConfig, claims_mindspeed, config_from_hf, config_from_mindspeed,
                                       mindspeed_model_json)
from ms_mm.models.bagel.processing import TRAIN_INPUT_NAMES
from ms_mm.registry import EmbeddedDefault, Family, lazy


def config_from_json(d):
    """MindSpeed-MM model.json (`mllm` / `image_encoder` / `ae`), HF-style release configs (`llm_config` /
    `vit_config` / `ae_config` dicts), `{"preset": name}` or our `to_dict()` form."""
    if claims_mindspeed(d):
        return config_from_mindspeed(d)
    if "llm_config" in d:
        return config_from_hf(d)
    if "preset" in d:
        return BagelConfig.preset(d["preset"])
    return BagelConfig.from_dict({k: v for k, v in d.items() if k != "model_id"})


def _build_model(config, compute_dtype):
    from ms_mm.models.bagel.modeling import BagelForTraining

    return BagelForTraining(config, compute_dtype)


def _build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples,
                      **kwargs):
    from ms_mm.models.bagel.processing import build_bagel_dataloader

    return build_bagel_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers,
                                  skip_bad_samples, **kwargs)


def _tokens(batch) -> int:
    return int(batch["num_real_tokens"])


def step_metrics(config, outputs, batch) -> Dict[str, Any]:
    ce, mse = (float(o) for o in outputs)
    return {"ce loss": ce, "mse loss": mse,
            "packing efficiency": float(batch["num_real_tokens"]) / float(batch["token_budget"])}


def log_line(iteration, metrics, steps_per_sec) -> str:
    """Upstream train/pretrain_unified_navit.py's line."""
    return (f"(step={iteration:07d}) Train Loss mse: {metrics.get('mse loss', float('nan')):.4f}, "
            f"Train Loss ce: {metrics.get('ce loss', float('nan')):.4f}, Train Steps/Sec: {steps_per_sec:.2f}, "
            f"Packing Efficiency: {metrics.get('packing efficiency', float('nan')):.3f}")


def _bool(v):
    from ms_mm.training.arguments import str2bool

    return str2bool(v)


EXTRA_FLAGS = {
    "--visual_gen": (_bool, "train the generation tasks (t2i_pretrain, unified_edit); False: understanding only"),
    "--visual_und": (_bool, "train the understanding task (vlm_sft); False: generation only"),
    "--max_latent_size": (int, "latent position table side (model) and the data's largest latent side"),
    "--expected_num_tokens": (int, "= packed_parameters.expected_num_tokens"),
    "--max_num_tokens": (int, "= packed_parameters.max_num_tokens (the packed sequence budget)"),
    "--max_num_tokens_per_sample": (int, "= packed_parameters.max_num_tokens_per_sample"),
    "--timestep_shift": (float, "flow-matching timestep shift"),
    "--freeze_und": (_bool, "upstream's freeze_und: no gradient through the understanding tokens (their und "
                            "weights, the ViT, connector and text embedding stay as loaded; lm_head still learns)"),
    "--ce_weight": (float, "weight of the CE loss"),
    "--mse_weight": (float, "weight of the MSE loss"),
}


def apply_flags(config, options):
    for key in ("max_latent_size", "timestep_shift", "ce_weight", "mse_weight"):
        if options.get(key) is not None:
            setattr(config, key, type(getattr(config, key))(options[key]))
    if options.get("freeze_und") is not None:
        config.llm.freeze_und = bool(options["freeze_und"])
    return config.validate()


FREEZE_DEFAULTS = {"image_encoder.vision_encoder": False, "image_encoder.vision_projector": False}


def dp_slice(inputs, dp_rank, dp, config):
    """The sharded path's per-rank form: each data-parallel rank trains its own packed sequence, so every
    model input gets a leading axis of one sequence (the masks already have it: [1, 1, S, S]) and the
    global micro batch is the dp ranks' sequences stacked along it. Indices stay local to the sequence
    (the model gathers per sequence), and every rank's shapes are the same budgets."""
    out = dict(inputs)
    for name in TRAIN_INPUT_NAMES:
        if name not in ("vit_attention_mask", "attention_mask"):
            out[name] = inputs[name][None]
    return out


def embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the embedded default's tiny BAGEL (release configs in `hf_dir`), with the user's
    freeze switches."""
    from adapters.bagel import read_hf_config
    from ms_mm.training.trainer import freeze_switches

    config = config_from_hf(read_hf_config(Path(hf_dir)))
    freeze = freeze_switches(user_model_json, FREEZE_DEFAULTS)
    return mindspeed_model_json(config, freeze={p.rsplit(".", 1)[-1]: v for p, v in freeze.items()},
                                from_pretrained=str(Path(hf_dir) / "ae.safetensors"))


def synthetic_batch(config, batch_size: int, seq_len: int) -> Dict[str, Any]:
    """DRY_RUN=1 without readable data: the global batch's `batch_size` packed samples of `seq_len` tokens,
    packed into one sequence of `batch_size * seq_len` rows (each sample attends only within itself, as
    the packer packs them), in `TRAIN_INPUT_NAMES` order plus the loader's host-side keys. Each sample is
    a ViT image (understanding), a supervised text and a VAE image with the flow-matching loss, the two
    images taking about a quarter of the sample each, so the ViT, both MoT experts and the VAE all run."""
    import numpy as np

    from ms_mm.models.bagel.processing import Budgets, DataSettings, Packer, _plan, padded_model_inputs

    if batch_size < 1:
        raise ValueError(f"synthetic_batch: batch_size {batch_size} must be at least 1")
    ds, patch = config.latent_downsample, config.vit.patch_size
    side = max(1, int((seq_len // 4) ** 0.5))
    lat_side, vit_side = min(side, config.max_latent_size), min(side, config.vit_max_num_patch_per_side)
    n_text = seq_len - lat_side ** 2 - vit_side ** 2 - 6         # + bos/eos and the images' start/end
    if n_text < 1:
        raise ValueError(f"synthetic_batch: seq_len {seq_len} is too short for a ViT image, a text and a VAE image")
    special = {k: int(getattr(config, k)) for k in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")}
    high = max(1, min(config.llm.vocab_size, *special.values()))
    rng = np.random.default_rng(0)
    total = batch_size * seq_len
    vit_rows, lat_rows = batch_size * vit_side ** 2, batch_size * lat_side ** 2
    budgets = Budgets(max_num_tokens=total, max_num_vit_tokens=vit_rows, max_num_latent_tokens=lat_rows,
                      max_num_vae_images=batch_size, vae_image_size=(lat_side * ds, lat_side * ds),
                      max_num_ce_tokens=total - vit_rows - lat_rows, expected_num_tokens=total,
                      max_num_tokens_per_sample=seq_len, prefer_buffer_before=total, max_buffer_size=1)
    settings = DataSettings(groups=[], budgets=budgets, model_path="", text_cond_dropout_prob=0.0,
                            vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0, vit_patch_size=patch,
                            max_num_patch_per_side=config.vit_max_num_patch_per_side,
                            max_latent_size=config.max_latent_size, vae_image_downsample=ds,
                            interpolate_pos=bool(config.interpolate_pos))
    packer = Packer(settings, special, rng)
    plan = [_plan("vit_image"), _plan("text", loss=1), _plan("vae_image", loss=1)]
    for _ in range(batch_size):
        sample = {"text_ids_list": [rng.integers(0, high, size=n_text).tolist()],
                  "images": [rng.uniform(-1, 1, (3, vit_side * patch, vit_side * patch)).astype(np.float32),
                             rng.uniform(-1, 1, (3, lat_side * ds, lat_side * ds)).astype(np.float32)],
                  "sequence_plan": plan}
        packer.add(sample, {k: 0 for k in packer.used})
    inputs = padded_model_inputs(packer.batch(), config, budgets, rng, ds, posterior_rng=np.random.default_rng(1))
    inputs["num_samples"] = batch_size
    return inputs


def _demo_data_json(demo_dir, hf_dir):
    from ms_mm.models.bagel.demo import demo_data_config

    return demo_data_config(demo_dir, hf_dir)


FAMILY = Family(
    name="bagel", title="BAGEL", model_ids=("bagel",), dataset_types=("bagel",),
    converter="BagelConverter", adapter="adapters.bagel",
    config_class=BagelConfig, config_from_json=config_from_json,
    claims_json=lambda d: ("llm_config" in d and "vit_config" in d) or claims_mindspeed(d),
    presets={"bagel-tiny": lambda: BagelConfig.preset("tiny"), "bagel-7b-mot": lambda: BagelConfig.preset("7B-MoT")},
    build_model=_build_model, input_names=TRAIN_INPUT_NAMES,
    build_dataloader=_build_dataloader,
    freeze_groups={
        "image_encoder.vision_encoder": ("image_encoder.encoder.",),
        "image_encoder.vision_projector": ("image_encoder.projector.",),
        "ae": ("vae.",),
    },
    count_tokens=_tokens,
    metric_outputs=(1, 2), step_metrics=step_metrics,      # construct: (loss, ce, mse)
    parity={"bagel": lazy("ms_mm.models.bagel.parity:run_parity")},
    build_tiny=lazy("ms_mm.models.bagel.tiny:build_tiny"),
    synthetic_batch=synthetic_batch, dp_slice=dp_slice,
    extra_flags=EXTRA_FLAGS, apply_flags=apply_flags, ema_decay=0.9999, log_line=log_line,
    embedded_default=EmbeddedDefault(
        name="BAGEL-tiny", write_demo=lazy("ms_mm.models.bagel.demo:make_demo_dataset"), demo_dir="data/demo_bagel",
        demo_data_file="vlm/llava_ov_si.jsonl", demo_data_json=_demo_data_json, model_json=embedded_model_json,
        hf_dir_key="dataset_param.basic_parameters.model_path", hub="ByteDance-Seed/BAGEL-7B-MoT",
        train_overrides={"--micro-batch-size": 1, "--global-batch-size": 1, "--lr": 2e-3, "--min-lr": 1e-4,
                         "--num-workers": 1, "--ema": 0.99, "--clip-grad": 1.0}),
)
