"""Registry records of Lumina-mGPT 2.0 and of its image tokenizer MoVQGAN (two converters, two
mm-parity runners, one folder).

Lumina's record also carries training on extracted features (`dataset_type: "lumina"`, the
length-grouped loader of processing.py), the CE and z-loss of each step (`step_metrics`), the
`fsdp1` switch (`check_parallel_sizes`: the distributed optimizer on Ascend, refused on CPU), a
synthetic batch for DRY_RUN=1 without features, and the embedded default (tiny decoder + tiny
MoVQGAN + bundled tokenizer, features of the bundled demo images)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, claims_json, config_from_hf, config_from_json, \
    mindspeed_model_json
from ms_mm.models.lumina_mgpt2.inputs import MODEL_INPUT_NAMES
from ms_mm.models.lumina_mgpt2.movqgan_config import MoVQGANConfig
from ms_mm.registry import EmbeddedDefault, Family, lazy


def _build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples,
                      **kwargs):
    from ms_mm.models.lumina_mgpt2.processing import build_lumina_dataloader

    return build_lumina_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size,
                                   num_workers if num_workers else None, skip_bad_samples, **kwargs)


def _llm_tokens(batch) -> int:
    """Tokens up to each row's last target (the row's real length; padding carries label -100)."""
    labels = np.asarray(batch["labels"])
    real = labels != -100
    last = np.where(real.any(1), labels.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
    return int(last.sum())


def step_metrics(config, outputs, batch) -> Dict[str, Any]:
    """construct's (ce_loss, z_loss): the loss is ce + z_loss_weight * z, both parts logged."""
    ce, z = (float(np.asarray(o)) for o in outputs)
    return {"ce loss": ce, "z loss": z}


def check_parallel_sizes(config, args) -> None:
    """`fsdp1` in model.json (MindSpeed-MM's FSDP switch: weights and optimizer states sharded over the
    data-parallel cards) maps to the trainer's distributed optimizer, MindSpore's optimizer parallel, on
    Ascend; on CPU, or with tp / pp > 1 (as the guide says), it is refused with one line."""
    fsdp1 = getattr(config, "fsdp1", None)
    if fsdp1 is None or fsdp1 is False:      # present (even as {}) = on, as MindSpeed-MM reads it
        return
    from ms_mm.training.trainer import planned_device

    device = planned_device()
    if device == "CPU":
        raise ValueError("\"fsdp1\": FSDP (the sharded optimizer) needs Ascend devices; on CPU remove \"fsdp1\" "
                         "from model.json (every rank then holds the whole optimizer state)")
    if args.tensor_model_parallel_size > 1 or args.pipeline_model_parallel_size > 1:
        raise ValueError(f"\"fsdp1\" does not combine with model parallelism (tp "
                         f"{args.tensor_model_parallel_size}, pp {args.pipeline_model_parallel_size}): set both to 1")
    args.use_distributed_optimizer = True


def synthetic_batch(config, batch_size: int, seq_len: int):
    """DRY_RUN=1 without extracted features: ``batch_size`` sequences of ``seq_len`` token ids (a
    prompt, then image codes offset into the vocabulary), the image codes supervised."""
    rng = np.random.default_rng(0)
    t = config.tokens
    prompt = max(1, seq_len // 4)
    ids = rng.integers(t.code_offset, t.code_offset + t.codebook_size, size=(batch_size, seq_len)).astype(np.int64)
    ids[:, :prompt] = rng.integers(1, min(t.code_offset, config.vocab_size), size=(batch_size, prompt))
    labels = ids.copy()
    labels[:, :prompt] = -100
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch_size, seq_len)).copy()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the tiny decoder (vocabulary map and sizes from `hf_dir`), with the user's
    `fsdp1` switch and the tiny MoVQGAN the sampler decodes with."""
    from ms_mm.models.lumina_mgpt2.demo_images import EMBEDDED_MOVQGAN_DIR

    config = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    return mindspeed_model_json(config, Path(hf_dir).resolve(), fsdp1=user_model_json.get("fsdp1"),
                                movqgan_path=str(EMBEDDED_MOVQGAN_DIR.resolve()))


def _dp_slice(inputs, dp_rank, dp, config):
    """Tokens, labels and positions per sample, no index into other rows: a rank's inputs are its slice."""
    return inputs


FAMILIES = [
    Family(
        name="lumina_mgpt2", title="Lumina-mGPT 2.0", model_ids=("lumina_mgpt2", "lumina"),
        dataset_types=("lumina",),
        converter="LuminaConverter", adapter="adapters.lumina_mgpt2",
        config_class=LuminaMGPT2Config, config_from_json=config_from_json, claims_json=claims_json,
        presets={"lumina-tiny": lambda: LuminaMGPT2Config.preset("tiny"),
                 "lumina-mgpt2-7b": lambda: LuminaMGPT2Config.preset("7B")},
        build_model=lazy("ms_mm.models.lumina_mgpt2.modeling:LuminaMGPT2ForCausalLM"), input_names=MODEL_INPUT_NAMES,
        build_dataloader=_build_dataloader,
        dp_slice=_dp_slice,
        count_tokens=_llm_tokens,
        # construct: (loss, logits, ce_loss, z_loss)
        metric_outputs=(2, 3), step_metrics=step_metrics,
        check_parallel_sizes=check_parallel_sizes, synthetic_batch=synthetic_batch,
        parity={"lumina_mgpt2": lazy("ms_mm.models.lumina_mgpt2.parity:run_parity")},
        build_tiny=lazy("ms_mm.models.lumina_mgpt2.tiny:build_tiny"),
        embedded_default=EmbeddedDefault(
            name="Lumina-mGPT-2.0-tiny", write_demo=lazy("ms_mm.models.lumina_mgpt2.demo:make_demo_dataset"),
            demo_dir="data/demo_lumina", demo_data_file="features/data.jsonl",
            demo_data_json=lazy("ms_mm.models.lumina_mgpt2.demo:demo_data_config"),
            model_json=embedded_model_json, hf_dir_key="dataset_param.tokenizer_config.from_pretrained",
            hub="Alpha-VLLM/Lumina-mGPT-2.0"),
    ),
    Family(
        name="movqgan", title="MoVQGAN", converter="MoVQGANConverter", adapter="adapters.movqgan",
        config_class=MoVQGANConfig,
        parity={"movqgan": lazy("ms_mm.models.lumina_mgpt2.parity:run_movqgan_parity")},
        build_tiny=lazy("ms_mm.models.lumina_mgpt2.tiny:build_tiny_movqgan"),
    ),
]
