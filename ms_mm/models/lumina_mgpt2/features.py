"""Lumina-mGPT 2.0 feature extraction: images + prompts -> token sequences on disk (+ a data.jsonl index).

    python -m ms_mm.models.lumina_mgpt2.features --mm-data feature_extract/data.json \\
        --mm-model feature_extract/model.json --mm-tool tools.json [--workers N] [--skip-bad-samples]

(what `examples/mindspore/lumina/mgpt2/feature_extract/feature_extraction.sh` runs, `--workers
$NPUS_PER_NODE`). The data json (`dataset_type: "lumina"`, `item_processor_type:
TokenizerItemProcessor`) names the dataset (`basic_parameters.data_config.path`: a json list of
`{"file", "prompt"}`, image paths relative to it), `patch_size` / `target_size` (the crop sizes) and
the text tokenizer (`tokenizer_config.from_pretrained`: the Lumina-mGPT 2.0 checkpoint directory);
the model json names MoVQGAN (`ae.from_pretrained`: a directory with `movqgan_config.json` + the
weights as safetensors); the tools json's `sorafeature.save_path` is where the features go:

    save_path/files/00000012.npz              one record (processing.write_feature)
    save_path/records/R-of-N-record.jsonl     what worker R of N finished, one line per record
    save_path/data.jsonl                      the index training reads, written when all are done

Workers: N processes (one per device; on CPU one per shard), worker R taking the R-th contiguous
block of items, as upstream pre_tokenize's `--splits/--rank`. Each record is written to a temp file
and renamed, then its line is appended (flushed, fsynced) to the worker's record file. A restart
reads every record file (a half-written last line is dropped), recovers a finished file whose line
was lost, and encodes only what is left: every image is encoded once. Without weights (absent
`from_pretrained` paths) the embedded default runs: the tiny MoVQGAN and the bundled tiny tokenizer on
the bundled demo images.

Bad samples (missing or unreadable image, missing keys, a sequence longer than the context
`max_length` / the checkpoint's max_position_embeddings) stop the run with one line naming the
item and file; with `--skip-bad-samples` they are counted and skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ms_mm.data.errors import BadSampleError
from ms_mm.models.lumina_mgpt2.demo_images import EMBEDDED_DATA_DIR, EMBEDDED_MOVQGAN_DIR
from ms_mm.models.lumina_mgpt2.inputs import t2i_sequence
from ms_mm.models.lumina_mgpt2.processing import (
    DATASET_TYPE, INDEX_FILE, TOKENIZER_PROCESSOR, TextTokenizer, generate_crop_size_list, image_to_array,
    item_prompt, layout_vector, read_feature, token_config_for, var_center_crop, whiten_transparency, write_feature,
)

__all__ = ["ExtractionSpec", "resolve_spec", "load_movqgan", "run_worker", "merge_index", "extract", "main",
           "CRASH_ENV", "EMBEDDED_MOVQGAN_DIR"]

# Test hook: "K" makes a worker die (os._exit) right after renaming its K-th new feature file into
# place, before its record line is written: the worst moment for a crash.
CRASH_ENV = "MS_MM_LUMINA_CRASH_AFTER"


class ExtractionError(ValueError):
    """A bad json / path: one line, no traceback."""


def _read_json(path, what: str) -> dict:
    if not path:
        raise ExtractionError(f"{what} is required")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExtractionError(f"{what} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ExtractionError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


class ExtractionSpec:
    """Everything a worker needs, resolved from the three jsons (paths as strings, so it crosses
    to worker processes as json)."""

    def __init__(self, data_path, tokenizer_dir, movqgan_dir, save_path, patch_size, target_size, max_length,
                 vocab_size, seed=0, embedded=False):
        self.data_path, self.tokenizer_dir, self.movqgan_dir = str(data_path), str(tokenizer_dir), str(movqgan_dir)
        self.save_path = str(save_path)
        self.patch_size, self.target_size = int(patch_size), int(target_size)
        self.max_length = None if max_length is None else int(max_length)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.seed, self.embedded = int(seed), bool(embedded)

    def to_json(self) -> str:
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, s: str) -> "ExtractionSpec":
        return cls(**json.loads(s))


def _weights_present(path) -> bool:
    p = Path(path) if path else None
    return bool(p) and p.exists() and (p.is_file() or any(p.iterdir()))


def resolve_spec(data_json_path, model_json_path, tool_json_path, say=print) -> ExtractionSpec:
    data_cfg = _read_json(data_json_path, "--mm-data")
    model_cfg = _read_json(model_json_path, "--mm-model")
    tool_cfg = _read_json(tool_json_path, "--mm-tool") if tool_json_path else {}
    dp = data_cfg.get("dataset_param") or {}
    if dp.get("dataset_type", DATASET_TYPE) != DATASET_TYPE:
        raise ExtractionError(f"--mm-data {data_json_path}: dataset_param.dataset_type is {dp.get('dataset_type')!r}, "
                              f"expected {DATASET_TYPE!r}")
    pp = dp.get("preprocess_parameters") or {}
    kind = pp.get("item_processor_type", TOKENIZER_PROCESSOR)
    if kind != TOKENIZER_PROCESSOR:
        raise ExtractionError(f"--mm-data {data_json_path}: preprocess_parameters.item_processor_type is {kind!r}; "
                              f"feature extraction uses {TOKENIZER_PROCESSOR!r} (LoadFeatureItemProcessor is the "
                              f"training json's)")
    data_path = _get(dp, "basic_parameters.data_config.path")
    tokenizer_dir = _get(dp, "tokenizer_config.from_pretrained")
    movqgan_dir = _get(model_cfg, "ae.from_pretrained") or model_cfg.get("from_pretrained")
    save_path = _get(tool_cfg, "sorafeature.save_path") or "./sora_features"
    for what, value in (("dataset_param.basic_parameters.data_config.path", data_path),
                        ("dataset_param.tokenizer_config.from_pretrained", tokenizer_dir)):
        if not value:
            raise ExtractionError(f"--mm-data {data_json_path}: {what} is required")
    if not movqgan_dir:
        raise ExtractionError(f"--mm-model {model_json_path}: ae.from_pretrained (the MoVQGAN checkpoint) is required")
    patch_size, target_size = int(pp.get("patch_size", 32)), int(pp.get("target_size", 512))
    max_length = pp.get("max_length")
    vocab_size = None
    missing = [f"{what} {p}" for what, p in (("MoVQGAN", movqgan_dir), ("tokenizer", tokenizer_dir))
               if not _weights_present(p)]
    embedded = bool(missing)
    if embedded:
        from ms_mm.models.lumina_mgpt2.demo_images import EMBEDDED_PATCH_SIZE, EMBEDDED_TARGET_SIZE, write_demo_images
        from ms_mm.models.lumina_mgpt2.tiny import build_tiny_movqgan
        from ms_mm.models.lumina_mgpt2.tokenizer import asset_dir

        say(f"[ms-mm] {' and '.join(missing)} not found: running the embedded default (tiny MoVQGAN + the bundled "
            f"tiny tokenizer on the bundled demo images); for real weights download ai-forever/MoVQGAN "
            f"(movqgan_270M, exported to safetensors) and Alpha-VLLM/Lumina-mGPT-2.0 to the paths the jsons name.")
        if not (EMBEDDED_MOVQGAN_DIR / "movqgan_config.json").is_file():
            build_tiny_movqgan(EMBEDDED_MOVQGAN_DIR, seed=0)
        movqgan_dir, tokenizer_dir = EMBEDDED_MOVQGAN_DIR, asset_dir()
        data_path = write_demo_images(EMBEDDED_DATA_DIR)
        patch_size, target_size = EMBEDDED_PATCH_SIZE, EMBEDDED_TARGET_SIZE
    cfg_path = Path(tokenizer_dir) / "config.json"
    if cfg_path.is_file():
        ckpt_cfg = _read_json(cfg_path, "tokenizer_config.from_pretrained config")
        vocab_size = ckpt_cfg.get("vocab_size")
        if max_length is None:
            max_length = ckpt_cfg.get("max_position_embeddings")
    if not Path(data_path).is_file():
        raise ExtractionError(f"--mm-data {data_json_path}: dataset {data_path} not found (a json list of "
                              f"{{\"file\", \"prompt\"}} beside an images/ folder)")
    return ExtractionSpec(data_path, tokenizer_dir, movqgan_dir, save_path, patch_size, target_size, max_length,
                          vocab_size, embedded=embedded)


# ------------------------------------------------------------------------------------- MoVQGAN

def load_movqgan(path):
    """MoVQGAN Cell with the weights of a checkpoint directory (`movqgan_config.json` + safetensors in
    the release's names; or an mm-convert MoVQGANConverter output holding its movqgan_config.json)."""
    import mindspore as ms  # noqa: F401

    from ms_mm.models.lumina_mgpt2.movqgan import MoVQGAN
    from ms_mm.models.lumina_mgpt2.movqgan_config import CONFIG_FILE, movqgan_config_from_release
    from ms_mm.training.weights import load_state_dict

    p = Path(path)
    if p.is_file():
        raise ExtractionError(f"MoVQGAN {p}: a torch checkpoint file cannot be read here; export it once to a "
                              f"directory with {CONFIG_FILE} and model.safetensors ({{k: v for k, v in "
                              f"torch.load(...)['state_dict'].items()}}, see docs/lumina_mgpt2.md)")
    if (p / "latest_checkpointed_iteration.txt").is_file():
        from ms_mm.training import mm_checkpoint as mmc

        if not (p / CONFIG_FILE).is_file():
            raise ExtractionError(f"MoVQGAN {p}: an MM checkpoint needs its {CONFIG_FILE} beside it")
        config = movqgan_config_from_release(json.loads((p / CONFIG_FILE).read_text()))
        state = mmc.load_model(p, float32=True)
    else:
        import convert

        try:
            config, state = convert.framework.load_hf_as_mm(p, "movqgan")
        except convert.framework.ConversionError as e:
            raise ExtractionError(f"MoVQGAN {p}: {e}") from None
    net = MoVQGAN(config)
    try:
        load_state_dict(net, state)
    except ValueError as e:
        raise ExtractionError(f"MoVQGAN {p}: {e}") from None
    net.set_train(False)
    return net


# ------------------------------------------------------------------------------------- worker

def _record_files(save_path: Path) -> List[Path]:
    return sorted((save_path / "records").glob("*-record.jsonl"))


def _read_records(path: Path, repair: bool) -> List[dict]:
    """Complete lines of a record file; with `repair` a torn last line is cut off the file."""
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    out = []
    for line in data[:good_end].splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if repair and good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return out


def _append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _shard(n_items: int, rank: int, world: int) -> range:
    per = -(-n_items // world)
    return range(min(rank * per, n_items), min((rank + 1) * per, n_items))


def _load_items(data_path: Path) -> List[dict]:
    items = _read_json(data_path, "dataset")
    if not isinstance(items, list):
        raise ExtractionError(f"dataset {data_path}: expected a json list of {{\"file\", \"prompt\"}} records")
    return items


class _Processor:
    """One item -> (input_ids, labels, grid_hw): crop, encode with MoVQGAN, tokenize the prompt."""

    def __init__(self, spec: ExtractionSpec):
        import mindspore as ms

        self.ms = ms
        self.spec = spec
        self.tokenizer = TextTokenizer(spec.tokenizer_dir)
        from ms_mm.models.lumina_mgpt2.movqgan import MoVQGANTokenizer

        self.movqgan = load_movqgan(spec.movqgan_dir)
        self.encode = MoVQGANTokenizer(self.movqgan)    # one compiled graph per crop size
        mc = self.movqgan.config
        try:
            self.tokens = token_config_for(self.tokenizer, spec.patch_size, mc.downsample_factor)
        except ValueError as e:
            raise ExtractionError(str(e)) from None
        if mc.n_embed != self.tokens.codebook_size:
            raise ExtractionError(f"MoVQGAN {spec.movqgan_dir} has a codebook of {mc.n_embed} codes but tokenizer "
                                  f"{spec.tokenizer_dir} has {self.tokens.codebook_size} <MOVQGAN*> tokens")
        self.vocab_size = spec.vocab_size or len(self.tokenizer.vocab)
        self.layout = layout_vector(self.tokens, self.vocab_size)
        self.crop_sizes = generate_crop_size_list((spec.target_size // spec.patch_size) ** 2, spec.patch_size)
        self.bos = self.tokenizer.vocab.get("<s>", 0)
        self.encoded = 0

    def __call__(self, item, index: int, where: str):
        from PIL import Image, UnidentifiedImageError

        if not isinstance(item, dict) or "file" not in item or "prompt" not in item:
            raise BadSampleError("a record needs \"file\" and \"prompt\"", where)
        image_path = Path(item["file"])
        if not image_path.is_absolute():
            image_path = Path(self.spec.data_path).parent / image_path
        if not image_path.is_file():
            raise BadSampleError(f"image {image_path} not found", where)
        try:
            with Image.open(image_path) as im:
                im.load()
                img = whiten_transparency(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BadSampleError(f"image {image_path} cannot be read ({type(e).__name__}: {e})", where) from None
        img = var_center_crop(img, self.crop_sizes)
        w, h = img.size
        prompt_ids = self.tokenizer.encode(item_prompt(str(item["prompt"]), w, h, self.spec.seed, index))
        n_image = 3 + (h // 8) * (w // 8 + 1) + 1  # start, 2 grids, rows + newline, end
        n_total = 1 + len(prompt_ids) + 1 + n_image + 1
        if self.spec.max_length and n_total > self.spec.max_length:
            raise BadSampleError(f"prompt of {len(prompt_ids)} tokens + a {w}x{h} image make {n_total} tokens, more "
                                 f"than the context max_length {self.spec.max_length}", where)
        pixels = self.ms.Tensor(image_to_array(img)[None])
        codes = self.encode(pixels)
        self.encoded += 1
        ds = self.movqgan.config.downsample_factor
        codes_hw = codes.asnumpy().reshape(h // ds, w // ds)
        ids, labels = t2i_sequence(prompt_ids, codes_hw, self.tokens, self.bos)
        return ids, labels, (h // self.spec.patch_size, w // self.spec.patch_size)


def run_worker(spec: ExtractionSpec, rank: int, world: int, skip_bad_samples: bool = False, say=print) -> dict:
    """Extract this worker's block; returns {"encoded", "complete", "recovered", "skipped"}."""
    import mindspore as ms

    if ms.get_context("device_target") == "Ascend":
        ms.set_device("Ascend", rank)
    save = Path(spec.save_path)
    (save / "files").mkdir(parents=True, exist_ok=True)
    (save / "records").mkdir(parents=True, exist_ok=True)
    mine = save / "records" / f"{rank}-of-{world}-record.jsonl"
    mine.touch()
    done = set()
    for f in _record_files(save):
        done.update(int(r["id"]) for r in _read_records(f, repair=(f == mine)) if "id" in r)
    items = _load_items(Path(spec.data_path))
    todo = [i for i in _shard(len(items), rank, world) if i not in done]
    stats = {"encoded": 0, "complete": len(_shard(len(items), rank, world)) - len(todo), "recovered": 0, "skipped": 0}
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    proc = None
    t0 = time.time()
    for i in todo:
        where = f"{spec.data_path}[{i}]"
        out = save / "files" / f"{i:08d}.npz"
        rel = f"files/{out.name}"
        if out.is_file():   # written, but the crash came before its record line
            try:
                feat = read_feature(out)
                _append_record(mine, {"file": rel, "len": int(feat["input_ids"].size), "id": i})
                stats["recovered"] += 1
                continue
            except BadSampleError:
                out.unlink()
        if proc is None:
            proc = _Processor(spec)
        try:
            ids, labels, grid_hw = proc(items[i], i, where)
        except BadSampleError as e:
            if not skip_bad_samples:
                raise
            stats["skipped"] += 1
            say(f"[ms-mm] skipping bad sample ({stats['skipped']} so far): {e}")
            continue
        write_feature(out, ids, labels, i, proc.layout, grid_hw)
        stats["encoded"] += 1
        if crash_after and stats["encoded"] >= crash_after:
            os._exit(17)
        _append_record(mine, {"file": rel, "len": len(ids), "id": i})
    dt = time.time() - t0
    rate = f", {stats['encoded'] / dt:.2f} images/s" if stats["encoded"] and dt > 0 else ""
    say(f"[ms-mm] feature worker {rank}/{world}: encoded {stats['encoded']} images, {stats['complete']} already "
        f"complete, {stats['recovered']} recovered, {stats['skipped']} bad samples skipped{rate}")
    return stats


def merge_index(spec: ExtractionSpec) -> Tuple[Path, int]:
    """All workers' records, by id, into save_path/data.jsonl (temp file + rename)."""
    save = Path(spec.save_path)
    by_id: Dict[int, dict] = {}
    for f in _record_files(save):
        for r in _read_records(f, repair=False):
            by_id.setdefault(int(r["id"]), {"file": r["file"], "len": int(r["len"]), "id": int(r["id"])})
    index = save / INDEX_FILE
    tmp = index.with_name(f".{INDEX_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(by_id):
            f.write(json.dumps(by_id[i]) + "\n")
    os.replace(tmp, index)
    return index, len(by_id)


def extract(spec: ExtractionSpec, workers: int = 1, skip_bad_samples: bool = False, say=print) -> int:
    """Run `workers` workers (in this process for one, else one process each), then merge. -> exit code."""
    Path(spec.save_path).mkdir(parents=True, exist_ok=True)
    if workers == 1:
        run_worker(spec, 0, 1, skip_bad_samples, say)
    else:
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
        procs = [subprocess.Popen([sys.executable, "-m", "ms_mm.models.lumina_mgpt2.features", "--worker",
                                   "--spec", spec.to_json(), "--rank", str(r), "--world-size", str(workers)]
                                  + (["--skip-bad-samples"] if skip_bad_samples else []), env=env)
                 for r in range(workers)]
        codes = [p.wait() for p in procs]
        bad = [r for r, c in enumerate(codes) if c != 0]
        if bad:
            say(f"[ms-mm] feature workers {bad} failed (exit {[codes[r] for r in bad]}); what they finished is kept: "
                f"run the same command again to resume")
            return max(codes[r] for r in bad)
    index, n = merge_index(spec)
    say(f"[ms-mm] features of {n} records indexed in {index}")
    return 0


def _device() -> str:
    from ms_mm.training.trainer import device_target

    return device_target()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ms_mm.models.lumina_mgpt2.features", description=__doc__.split("\n\n")[0])
    p.add_argument("--mm-data")
    p.add_argument("--mm-model")
    p.add_argument("--mm-tool")
    p.add_argument("--workers", type=int, default=1, help="worker processes (NPUS_PER_NODE)")
    p.add_argument("--skip-bad-samples", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args(argv)   # the guide's Megatron flags (--micro-batch-size ...) have no effect
    try:
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device(_device())
        if args.worker:
            run_worker(ExtractionSpec.from_json(args.spec), args.rank, args.world_size, args.skip_bad_samples)
            return 0
        if args.workers < 1:
            raise ExtractionError(f"--workers must be >= 1, got {args.workers}")
        spec = resolve_spec(args.mm_data, args.mm_model, args.mm_tool)
        return extract(spec, args.workers, args.skip_bad_samples)
    except (ExtractionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BadSampleError as e:
        print(f"error: {e} (pass --skip-bad-samples to skip such samples; finished records are kept: run the "
              f"same command again to resume)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
