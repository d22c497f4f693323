"""Check a parallel plan without devices: compile one train step per simulated Ascend rank (DryRun).

    python -m ms_mm.parallel.dryrun --mm-model 7b --tp 4 --pp 1 --world-size 8 \
        --micro-batch-size 1 --seq-len 1024 [--level 1] [--ranks 0,1|stages|all] [--dtype bf16]

For each rank asked for (default: the first rank of every pipeline stage), a fresh process runs
with ``MS_SIMULATION_LEVEL``, ``RANK_SIZE`` and ``RANK_ID`` set and the stub CANN libraries of
``ms_mm.parallel.fake_cann`` on its loader path (built once, cached under
``~/.cache/ms_mm/fake-cann``). It builds the model without materialising weights
(``mindspore.nn.utils.no_init_parameters``), applies the family's plan, and compiles forward +
backward + AdamW under ``semi_auto_parallel`` on synthetic inputs of the requested shape (one
image per sample; ``micro_batch_size`` rows per data-parallel rank, ``pp`` micro batches per step
under pipeline parallel). Level 1 also has MindSpore predict each rank's peak device memory,
printed per rank. The exit status is 0 when every rank compiled. Each rank's log, and MindSpore's
``parameter_layout_dict`` as ``parameter_layouts.json`` (slice shape of every parameter), are
kept under ``--workdir``. A rank that outgrows ``--host-mem-limit-gb`` of host RAM is stopped.

The parallel sizes are checked against the model first (``ParallelConfig.check_model``): a plan
that does not divide stops with one line naming the size and the shape. ``--skip-checks`` hands
it to MindSpore instead; its error is shown followed by our one-line reading of it.

DeepSeek-VL2 (``--ep N`` / ``--expert-model-parallel-size N`` spreads its routed experts):
``--mm-model`` takes the presets ``tiny-deepseek`` (the parity fixture's tiny model),
``deepseek-vl2-tiny``, ``deepseek-vl2-small``, ``deepseek-vl2``, or a JSON file: the official HF
``config.json`` (``model_type: deepseek_vl_v2``), our ``DeepseekVL2Config.to_dict()`` or
``{"preset": "tiny-deepseek", ...overrides}``, or a MindSpeed-MM DeepSeek-VL2 ``model.json``
(SigLIP ``vision_encoder``, MoE / MLA ``text_decoder``). The family is taken from the json.

For Qwen2.5-VL ``--mm-model`` takes a preset name (``tiny``, ``3b``, ``7b``, ``32b``, ``72b``) or a JSON file in any
of these forms: our ``Qwen2_5_VLConfig.to_dict()`` (``{"vision": .., "text": .., token ids}``),
the same nested under ``"mm_model"`` / ``"model"`` / ``"config"``, ``{"preset": "7b", ...overrides}``,
an HF ``config.json`` (``vision_config`` + ``text_config`` or the flat release form), or a
MindSpeed-MM ``model_*.json`` (``image_encoder.vision_encoder`` / ``text_decoder`` with Megatron
names). Unknown keys are ignored (and listed on stderr).

Python API: ``run_dryrun(model_config, parallel_config, micro_batch_size, seq_len, ranks=(0,),
level=1, dtype="bf16") -> list[RankResult]``; ``load_model_config(spec)``;
``parse_peak_memory(log_text)``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ms_mm.parallel.config import ParallelConfig, ParallelConfigError
from ms_mm.parallel.fake_cann import FakeCannError

STEP_OK = "MS_MM_DRYRUN_STEP_OK"
_USED = re.compile(r"Used peak memory usage \(without fragments\):\s*(\d+)M")
_ACTUAL = re.compile(r"Actual peak memory usage \(with fragments\):\s*(\d+)M")
_NOT_DIVISIBLE = re.compile(r"shape value (\d+) at dim index (\d+) cannot be divisible by strategy value (\d+)")
_OP_INFO = re.compile(r"\b([A-Za-z0-9]+Info\d*)\b")
_DEVICES = re.compile(r"it requires (\d+) devices, but the device number of this stage is (\d+)")
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


# ------------------------------------------------------------------------------------- model config
_MEGATRON_TEXT = {"num_layers": "num_hidden_layers", "num_query_groups": "num_key_value_heads",
                  "ffn_hidden_size": "intermediate_size", "rotary_base": "rope_theta",
                  "layernorm_epsilon": "rms_norm_eps", "norm_epsilon": "rms_norm_eps",
                  "activation_func": "hidden_act", "untie_embeddings_and_output_weights": None}
_MEGATRON_VISION = {"num_layers": "depth", "num_attention_heads": "num_heads",
                    "ffn_hidden_size": "intermediate_size", "window_attn_size": "window_size",
                    "layernorm_epsilon": "rms_norm_eps", "activation_func": "hidden_act"}


def _known(klass, data: dict, where: str, dropped: list) -> dict:
    names = {f.name for f in dataclasses.fields(klass)}
    dropped.extend(f"{where}{k}" for k in data if k not in names)
    return {k: v for k, v in data.items() if k in names}


def _from_ours(data: dict, dropped: list):
    from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
    base = {}
    if "preset" in data:
        base = Qwen2_5_VLConfig.preset(data["preset"]).to_dict()
    merged = copy.deepcopy(base)
    for key, value in data.items():
        if key == "preset":
            continue
        if key in ("vision", "text") and isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    out = _known(Qwen2_5_VLConfig, merged, "", dropped)
    out["vision"] = _known(Qwen2_5_VLVisionConfig, merged.get("vision", {}) or {}, "vision.", dropped)
    out["text"] = _known(Qwen2_5_VLTextConfig, merged.get("text", {}) or {}, "text.", dropped)
    return Qwen2_5_VLConfig.from_dict(out)


def _from_megatron(data: dict, dropped: list):
    """MindSpeed-MM model json: image_encoder.vision_encoder / vision_projector + text_decoder."""
    text_src = dict(data["text_decoder"])
    vis_src = dict((data.get("image_encoder") or {}).get("vision_encoder") or {})
    text = {}
    for k, v in text_src.items():
        if k in _MEGATRON_TEXT:
            if _MEGATRON_TEXT[k] is None:
                text["tie_word_embeddings"] = not v
            else:
                text[_MEGATRON_TEXT[k]] = v
        else:
            text[k] = v
    if "rope_scaling" in text_src and isinstance(text_src["rope_scaling"], dict):
        text["mrope_section"] = text_src["rope_scaling"].get("mrope_section", text.get("mrope_section"))
    vision = {_MEGATRON_VISION.get(k, k): v for k, v in vis_src.items()}
    proj = (data.get("image_encoder") or {}).get("vision_projector") or {}
    if "out_hidden_size" not in vision and "out_hidden_size" in proj:
        vision["out_hidden_size"] = proj["out_hidden_size"]
    vision.setdefault("out_hidden_size", text.get("hidden_size"))
    top = {k: v for k, v in data.items() if k not in ("text_decoder", "image_encoder")}
    if "img_context_token_id" in top:
        top["image_token_id"] = top.pop("img_context_token_id")
    return _from_ours({**top, "vision": vision, "text": text}, dropped)


# DryRun names of the DeepSeek-VL2 presets -> ``DeepseekVL2Config.preset`` names
DEEPSEEK_PRESETS = {"tiny-deepseek": "tiny", "deepseek-vl2-tiny": "Tiny", "deepseek-vl2-small": "Small",
                    "deepseek-vl2": "Base", "deepseek-vl2-base": "Base"}


def _is_deepseek(data: dict) -> bool:
    """A DeepSeek-VL2 model json: HF ``config.json`` / our ``to_dict()`` (``language_config``), a preset
    override, or a MindSpeed-MM ``model.json`` with a SigLIP tower or MoE/MLA ``text_decoder``."""
    if "language_config" in data or data.get("model_type") == "deepseek_vl_v2":
        return True
    if str(data.get("preset", "")) in DEEPSEEK_PRESETS:  # ("tiny" alone is Qwen2.5-VL's)
        return True
    if isinstance(data.get("text_decoder"), dict):
        vision = (data.get("image_encoder") or {}).get("vision_encoder") or {}
        text = data["text_decoder"]
        return (str(vision.get("model_name", "")).startswith("siglip")
                or "deepseek" in str(data.get("model_id", "")).lower()
                or "num_moe_experts" in text or "multi_head_latent_attention" in text)
    return False


def _deepseek_config(data: dict, dropped: list):
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config
    if "text_decoder" in data:
        from ms_mm.models.deepseek_vl2.config import config_from_mindspeed
        return config_from_mindspeed(data)
    if "model_type" in data:
        from adapters.deepseek_vl2 import config_from_hf
        return config_from_hf(data)
    merged = {}
    if "preset" in data:
        merged = DeepseekVL2Config.preset(DEEPSEEK_PRESETS.get(data["preset"], data["preset"])).to_dict()
    for key, value in data.items():
        if key == "preset":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    known = {f.name for f in dataclasses.fields(DeepseekVL2Config)}
    dropped.extend(k for k in merged if k not in known)
    return DeepseekVL2Config.from_dict({k: v for k, v in merged.items() if k in known})


def model_family(config) -> str:
    """``qwen2_5_vl`` or ``deepseek_vl2``: the plan's family of a model config."""
    from ms_mm.parallel.plans import plan_for_config
    return plan_for_config(config).family


def load_model_config(spec):
    """A model config (Qwen2.5-VL or DeepSeek-VL2, the family taken from the json) from a preset name,
    a JSON path or an already-parsed dict (see module doc)."""
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config
    from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig
    if isinstance(spec, (Qwen2_5_VLConfig, DeepseekVL2Config)):
        return spec
    if isinstance(spec, str) and not os.path.exists(spec):
        if spec.endswith(".json"):
            raise FileNotFoundError(f"--mm-model {spec}: no such file")
        if spec in DEEPSEEK_PRESETS:
            return DeepseekVL2Config.preset(DEEPSEEK_PRESETS[spec])
        return Qwen2_5_VLConfig.preset(spec)
    data = spec
    if not isinstance(spec, dict):
        with open(spec) as fh:
            data = json.load(fh)
    for key in ("mm_model", "model", "config"):
        if isinstance(data.get(key), dict) and not ("vision" in data or "text_decoder" in data
                                                     or "language_config" in data):
            data = data[key]
            break
    dropped: list = []
    if _is_deepseek(data):
        config = _deepseek_config(data, dropped)
    elif "vision_config" in data:
        from adapters.qwen2_5_vl import config_from_hf
        config = config_from_hf(data)
    elif "text_decoder" in data:
        config = _from_megatron(data, dropped)
    else:
        config = _from_ours(data, dropped)
    if dropped:
        print(f"ms_mm.parallel.dryrun: ignored model json key(s): {', '.join(sorted(dropped))}", file=sys.stderr)
    config.validate()
    return config


# --------------------------------------------------------------------------------- synthetic batch
def synthetic_batch(config, batch_size: int, seq_len: int, image_tokens: Optional[int] = None):
    """Model inputs for ``batch_size`` samples of ``seq_len`` tokens, each with one square image
    (DeepSeek-VL2: see ``synthetic_deepseek_batch``).

    The image takes about a quarter of the sequence (at least one merged 2x2 patch group) unless
    ``image_tokens`` says how many merged tokens; all other tokens are supervised text.
    """
    if model_family(config) == "deepseek_vl2":
        return synthetic_deepseek_batch(config, batch_size, seq_len)
    import numpy as np
    from ms_mm.models.qwen2_5_vl import build_model_inputs
    vc = config.vision
    budget = seq_len - 2 if image_tokens is None else image_tokens
    side = max(1, int((seq_len // 4 if image_tokens is None else budget) ** 0.5))
    if side * side + 2 > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for an image of {side * side} tokens plus its "
                         f"start/end markers")
    merge = vc.spatial_merge_size
    grid = [1, side * merge, side * merge]
    n_patches = side * side * vc.merge_unit
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(config.vision_start_token_id, config.text.vocab_size - 1),
                       size=(batch_size, seq_len)).astype(np.int64)
    ids[:, 0] = config.vision_start_token_id
    ids[:, 1:1 + side * side] = config.image_token_id
    ids[:, 1 + side * side] = config.vision_end_token_id
    labels = ids.copy()
    labels[:, : 2 + side * side] = -100
    batch = {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
        "pixel_values": rng.standard_normal((batch_size * n_patches, vc.patch_dim)).astype(np.float32),
        "image_grid_thw": np.array([grid] * batch_size, np.int64),
    }
    return build_model_inputs(batch, config)


def synthetic_deepseek_batch(config, batch_size: int, seq_len: int):
    """DeepSeek-VL2 inputs: per sample one image cropped to 1x1 tiles (global view + one local
    tile) right after the first token, the rest supervised text."""
    import numpy as np
    from ms_mm.models.deepseek_vl2 import build_model_inputs
    from ms_mm.models.deepseek_vl2.inputs import num_image_tokens
    n_image = num_image_tokens(1, 1, config)
    if n_image + 2 > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for a 1x1-tile image of {n_image} tokens plus text")
    tile, vocab = config.vision_config.image_size, config.language_config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch_size, seq_len)).astype(np.int64)
    seq_mask = np.zeros((batch_size, seq_len), bool)
    seq_mask[:, 1:1 + n_image] = True
    labels = np.where(seq_mask, -100, ids)
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
             "images": rng.standard_normal((batch_size, 2, 3, tile, tile)).astype(np.float32),
             "images_seq_mask": seq_mask, "images_spatial_crop": np.ones((batch_size, 1, 2), np.int64)}
    return build_model_inputs(batch, config)


# ------------------------------------------------------------------------------------ log parsing
@dataclasses.dataclass
class RankResult:
    rank: int
    returncode: int
    step_ok: bool
    used_peak_mb: Optional[int]
    actual_peak_mb: Optional[int]
    seconds: float
    log_path: str
    error: str = ""      # MindSpore's error lines (failed ranks)
    hint: str = ""       # our one-line reading of them

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.step_ok


def parse_peak_memory(text: str):
    """(used MB without fragments, actual MB with fragments) from a DryRun log; None when absent."""
    used = _USED.findall(text)
    actual = _ACTUAL.findall(text)
    return (int(used[-1]) if used else None, int(actual[-1]) if actual else None)


def extract_error(text: str, max_lines: int = 12) -> str:
    """The lines of a failed DryRun log that say what MindSpore rejected."""
    keep = [line for line in text.splitlines()
            if re.search(r"Error|error\]|cannot be divisible|requires \d+ devices|Failure|Traceback|init failed", line)
            and "[WARNING]" not in line]
    return "\n".join(keep[-max_lines:])


def explain_error(text: str, pc: ParallelConfig) -> str:
    """One line naming the parallel size and the shape MindSpore refused, when the log says so."""
    m = _NOT_DIVISIBLE.search(text)
    if m:
        value, dim, split = int(m.group(1)), int(m.group(2)), int(m.group(3))
        line = text[text.rfind("\n", 0, m.start()) + 1: m.start()]
        ops_named = _OP_INFO.findall(line)
        op = re.sub(r"Info\d*$", "", ops_named[-1]) if ops_named else "an operator"
        shape = re.search(r"shape is (\[[^\]]*\])", line)
        shape = f" {shape.group(1)}" if shape else ""
        sizes = [n for n in ("tp", "dp", "pp") if getattr(pc, n) == split] or [f"a split of {split}"]
        return (f"ms-mm: {' or '.join(sizes)}={split} does not divide dim {dim} (size {value}) of the{shape} "
                f"input of {op}; choose sizes that divide the model's heads / widths / batch")
    m = _DEVICES.search(text)
    if m:
        return (f"ms-mm: the plan needs {m.group(1)} devices per pipeline stage but only {m.group(2)} exist "
                f"(world_size={pc.world_size}, tp={pc.tp}, pp={pc.pp}, dp={pc.dp})")
    return ""


# --------------------------------------------------------------------------------------- launcher
def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _total_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        return 16.0


def _worker_args(config, pc: ParallelConfig, micro_batch_size, seq_len, level, dtype, micro_batches):
    return {"family": model_family(config), "model": config.to_dict(), "parallel": pc.to_dict(),
            "micro_batch_size": micro_batch_size,
            "seq_len": seq_len, "level": level, "dtype": dtype, "micro_batches": micro_batches}


def run_dryrun(model_config, parallel_config: ParallelConfig, micro_batch_size: int, seq_len: int,
               ranks: Sequence[int] = (0,), level: int = 1, dtype: str = "bf16", micro_batches: int = 0,
               workdir=None, skip_checks: bool = False, timeout: float = 1800, fake_cann_root=None,
               parallel_ranks: int = 1, host_mem_limit_gb: Optional[float] = None) -> List[RankResult]:
    """Compile one train step for each simulated rank in ``ranks``; returns one result per rank.

    ``micro_batches`` (pipeline only; 0 = ``pp``) is the number of micro batches per step.
    ``parallel_ranks`` ranks are compiled at the same time (each is one process). A rank whose
    process grows past ``host_mem_limit_gb`` of resident host memory (default: 3/4 of the RAM,
    split over the parallel ranks) or runs past ``timeout`` seconds is stopped and reported.
    """
    if host_mem_limit_gb is None:
        host_mem_limit_gb = 0.75 * _total_ram_gb() / max(1, parallel_ranks)
    from ms_mm.parallel.fake_cann import dryrun_env, ensure_fake_cann
    from ms_mm.parallel.plans import plan_for_config
    pc = parallel_config
    plan = plan_for_config(model_config)
    micro_batches = micro_batches or (pc.pp if pc.pp > 1 else 1)
    if pc.pp > 1 and micro_batches < pc.pp:
        raise ParallelConfigError(f"micro_batches={micro_batches} is smaller than pp={pc.pp}: MindSpore's "
                                  f"pipeline needs at least one micro batch per stage")
    if not skip_checks:
        plan.check(pc, model_config)
        plan.check_batch(pc, micro_batch_size * pc.dp, seq_len)
    for r in ranks:
        if not 0 <= r < pc.world_size:
            raise ParallelConfigError(f"rank {r} is outside world_size={pc.world_size}")
    root = Path(fake_cann_root) if fake_cann_root else ensure_fake_cann()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ms_mm_dryrun_"))
    spec_path = workdir / "dryrun_spec.json"
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(_worker_args(model_config, pc, micro_batch_size, seq_len, level, dtype,
                                                 micro_batches)))
    limit_kb = int(host_mem_limit_gb * 1024 * 1024) if host_mem_limit_gb else None
    pending, running, results = list(ranks), [], []
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel_ranks):
                rank = pending.pop(0)
                rank_dir = workdir / f"rank{rank}"
                rank_dir.mkdir(exist_ok=True)
                env = dryrun_env(root, rank_id=rank, rank_size=pc.world_size, level=level)
                env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], _PROJECT_ROOT])
                log_path = rank_dir / "dryrun.log"
                log = open(log_path, "w")
                proc = subprocess.Popen([sys.executable, "-m", "ms_mm.parallel.dryrun", "--worker", str(spec_path)],
                                        cwd=rank_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append({"rank": rank, "proc": proc, "log": log, "log_path": log_path, "start": time.time(),
                                "killed": ""})
            time.sleep(0.5)
            for job in list(running):
                proc = job["proc"]
                if proc.poll() is None:
                    if time.time() - job["start"] > timeout:
                        job["killed"] = f"ms-mm: rank {job['rank']} did not finish within {timeout:.0f}s; stopped"
                    elif limit_kb and _rss_kb(proc.pid) > limit_kb:
                        job["killed"] = (f"ms-mm: rank {job['rank']} used more than {host_mem_limit_gb:g} GiB of host "
                                         f"memory while compiling; stopped (raise --host-mem-limit-gb)")
                    if not job["killed"]:
                        continue
                    proc.kill()
                    proc.wait()
                running.remove(job)
                job["log"].close()
                text = job["log_path"].read_text(errors="replace")
                used, actual = parse_peak_memory(text)
                result = RankResult(job["rank"], proc.returncode, STEP_OK in text and not job["killed"], used, actual,
                                    time.time() - job["start"], str(job["log_path"]))
                if not result.ok:
                    result.error = job["killed"] or extract_error(text) or text[-2000:]
                    result.hint = explain_error(text, pc)
                results.append(result)
    finally:  # interrupted (Ctrl-C) or failed here: no compiling rank process outlives us
        for job in running:
            if job["proc"].poll() is None:
                job["proc"].kill()
                job["proc"].wait()
            job["log"].close()
    return sorted(results, key=lambda r: r.rank)


# ----------------------------------------------------------------------------------------- worker
def _worker(spec_path: str) -> int:
    """Inside one simulated rank: build, parallelize and compile one train step."""
    t0 = time.time()
    spec = json.loads(Path(spec_path).read_text())
    import mindspore as ms
    from mindspore import nn
    from mindspore.communication import init
    from mindspore.nn.utils import no_init_parameters
    from ms_mm.parallel.context import set_parallel_context
    from ms_mm.parallel.pipeline import PipelineTrainOneStepCell, StackedPipelineCell
    from ms_mm.parallel.plans import plan_for_model
    import numpy as np

    pc = ParallelConfig(**spec["parallel"])
    config_class, model_class, input_names = _family_classes(spec["family"])
    config = config_class.from_dict(spec["model"])
    dtype = {"bf16": ms.bfloat16, "fp16": ms.float16, "fp32": ms.float32}[spec["dtype"]]
    micro_batches = spec["micro_batches"]

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("Ascend")
    init()
    set_parallel_context(pc)

    with no_init_parameters():
        model = model_class(config, compute_dtype=dtype)
        plan_for_model(model).apply(model, pc)
        net = _loss_only_cell()(model)
        if pc.pp > 1:
            net = StackedPipelineCell(net, micro_batches)
        optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-5, weight_decay=0.0)
        if pc.pp > 1:
            step = PipelineTrainOneStepCell(net, optimizer, micro_batches)
        else:
            step = nn.TrainOneStepCell(net, optimizer)
    step.set_train()
    print(f"ms-mm dryrun: host RSS after building the step {_rss_kb(os.getpid()) / 2**20:.2f} GiB", flush=True)

    # the global batch of one micro batch: micro_batch_size rows per data-parallel rank
    inputs = synthetic_batch(config, spec["micro_batch_size"] * pc.dp, spec["seq_len"])
    arrays = [inputs[k] for k in input_names]
    if pc.pp > 1:  # identical micro batches, stacked on a leading axis (see StackedPipelineCell)
        arrays = [np.stack([a] * micro_batches) for a in arrays]
    args = [ms.Tensor(a) for a in arrays]
    t1 = time.time()
    step.compile(*args)
    print(f"ms-mm dryrun: host RSS after compiling {_rss_kb(os.getpid()) / 2**20:.2f} GiB", flush=True)
    out = step(*args)
    print(f"ms-mm dryrun: host RSS after the step {_rss_kb(os.getpid()) / 2**20:.2f} GiB", flush=True)
    layouts = {name: {"dev_matrix": list(lay[0]), "tensor_map": list(lay[1]), "slice_shape": list(lay[2])}
               for name, lay in step.parameter_layout_dict.items()}
    Path("parameter_layouts.json").write_text(json.dumps(layouts, sort_keys=True))
    print(f"{STEP_OK} rank={os.environ.get('RANK_ID')} out={getattr(out, 'shape', out)} "
          f"compile+step {time.time() - t1:.1f}s total {time.time() - t0:.1f}s", flush=True)
    return 0


def _family_classes(family: str):
    """(config class, model class, model input names) of a family."""
    if family == "deepseek_vl2":
        from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES, DeepseekVL2Config, DeepseekVL2ForCausalLM
        return DeepseekVL2Config, DeepseekVL2ForCausalLM, MODEL_INPUT_NAMES
    from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, MODEL_INPUT_NAMES


def _loss_only_cell():
    from mindspore import lazy_inline, nn

    class LossOnly(nn.Cell):
        """The model's loss alone, as MindSpore's train-step cells expect."""

        # lazy_inline: the pipeline calls this cell once per micro batch; compiled as one reused
        # subgraph instead of micro_batches inlined copies (host memory and compile time)
        @lazy_inline
        def __init__(self, model):
            super().__init__(auto_prefix=False)  # keep the MM parameter names
            self.model = model

        def construct(self, *inputs):
            return self.model(*inputs)[0]

    return LossOnly


# ------------------------------------------------------------------------------------------- CLI
def _ranks(text: str):
    if text in ("all", "stages"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: expected comma-separated ints like 0,1, 'stages' or 'all'")


def default_ranks(pc: ParallelConfig, which="stages") -> List[int]:
    """'stages': the first rank of every pipeline stage (stages differ in memory); 'all': every rank."""
    if which == "all":
        return list(range(pc.world_size))
    per_stage = pc.world_size // pc.pp
    return [stage * per_stage for stage in range(pc.pp)]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m ms_mm.parallel.dryrun", description=__doc__.split("\n")[0])
    p.add_argument("--mm-model", required=True,
                   help="preset (Qwen2.5-VL: tiny, 3b, 7b, 32b, 72b; DeepSeek-VL2: tiny-deepseek, deepseek-vl2-tiny, "
                        "deepseek-vl2-small, deepseek-vl2) or a model json (family taken from it)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=1)
    p.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--llm-pp-layers", type=json.loads, default=None, help="JSON list, e.g. [1,10,10,7]")
    p.add_argument("--vit-pp-layers", type=json.loads, default=None, help="JSON list, e.g. [32,0,0,0]")
    p.add_argument("--micro-batch-size", type=int, default=1, help="per data-parallel rank")
    p.add_argument("--micro-batches", type=int, default=0, help="pipeline micro batches per step (default pp)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--level", type=int, choices=(0, 1), default=1, help="0: compile only; 1: + peak memory")
    p.add_argument("--ranks", type=_ranks, default="stages",
                   help="simulated ranks to compile: 0,1 | stages (first rank of each pipeline stage; default) | all")
    p.add_argument("--parallel-ranks", type=int, default=1, help="ranks compiled at the same time")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="activation dtype")
    p.add_argument("--workdir", default=None, help="where the rank logs go (default: a new temp dir)")
    p.add_argument("--skip-checks", action="store_true", help="let MindSpore find a bad plan itself")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per rank")
    p.add_argument("--host-mem-limit-gb", type=float, default=None,
                   help="stop a rank whose compile uses more host RAM than this (default: 3/4 of the RAM)")
    p.add_argument("--report-json", default=None, help="also write the per-rank results to this JSON file")
    p.add_argument("--fake-cann", default=None, help="a fake CANN tree to use (default: build / reuse the cached one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    args = build_parser().parse_args(argv)
    try:
        config = load_model_config(args.mm_model)
        pc = ParallelConfig(world_size=args.world_size, tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep,
                            llm_pp_layers=args.llm_pp_layers, vit_pp_layers=args.vit_pp_layers)
        ranks = default_ranks(pc, args.ranks) if isinstance(args.ranks, str) else args.ranks
        results = run_dryrun(config, pc, args.micro_batch_size, args.seq_len, ranks=ranks, level=args.level,
                             dtype=args.dtype, micro_batches=args.micro_batches, workdir=args.workdir,
                             skip_checks=args.skip_checks, timeout=args.timeout,
                             parallel_ranks=args.parallel_ranks, fake_cann_root=args.fake_cann,
                             host_mem_limit_gb=args.host_mem_limit_gb)
    except (ParallelConfigError, ValueError, FileNotFoundError, FakeCannError) as e:
        print(f"ms-mm dryrun: {e}", file=sys.stderr)
        return 2
    print(f"DryRun {args.mm_model}: world_size={pc.world_size} dp={pc.dp} tp={pc.tp} pp={pc.pp} ep={pc.ep} "
          f"micro_batch_size={args.micro_batch_size} seq_len={args.seq_len} level={args.level} dtype={args.dtype}")
    for r in results:
        if r.ok:
            mem = (f"used peak {r.used_peak_mb}M, actual peak {r.actual_peak_mb}M"
                   if r.used_peak_mb is not None else "compiled (level 0: no memory figures)")
            print(f"rank {r.rank}: ok, {mem} ({r.seconds:.0f}s)")
        else:
            print(f"rank {r.rank}: FAILED (exit {r.returncode}, log {r.log_path})\n{r.error}")
            if r.hint:
                print(r.hint)
    if args.report_json:
        report = {"parallel": pc.to_dict(), "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
                  "level": args.level, "dtype": args.dtype,
                  "ranks": [dict(dataclasses.asdict(r), ok=r.ok) for r in results]}
        Path(args.report_json).write_text(json.dumps(report, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
