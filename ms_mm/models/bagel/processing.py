"""BAGEL's data pipeline: the `bagel_example` datasets, sequence packing to static budgets, the loader.

    data.json (MindSpeed-MM, dataset_type "bagel")  or  upstream YAML + dataset_info
      -> groups (t2i_pretrain: parquet image + captions; unified_edit: parquet image_list +
         instruction_list + parquet_info; vlm_sft: llava jsonl + images), each a stream over this
         rank's shard of its records
      -> samples (sequence plan, text ids, image arrays), as upstream's T2IIterableDataset /
         UnifiedEditIterableDataset / SftJSONLIterableDataset build them
      -> packing (upstream `PackedDataset`: mandatory groups first, weighted sampling, the buffer,
         `expected_num_tokens` / `max_num_tokens` / `max_num_tokens_per_sample`, cond dropout,
         sigmoid-normal timesteps) into one packed sequence per micro batch
      -> static-shape model inputs (`padded_model_inputs`): the sequence padded to fixed budgets of
         text / ViT / latent rows, VAE images and CE rows, so one compiled graph serves every step;
         padding rows attend only to themselves and carry zero loss weight.

Sharding: parquet files are dealt to ranks as upstream (`num_files` must be a multiple of the card
count), jsonl lines likewise. Every random choice is a function of (data seed, position): sample-level
choices of (seed, group, epoch, record), batch-level ones (group sampling, dropout, timesteps, the flow
noise and the VAE posterior noise) of (seed, rank, batch number). So the loader's `state_dict()` (per-group cursors, the packing
buffer as record references, the batch number) restores the exact stream. The shared background
producer (`ms_mm.data.prefetch.Prefetcher`) keeps `prefetch` batches ready (`BagelPackedLoader.prefetched`),
so loading overlaps the step.
"""
from __future__ import annotations

import ast
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_mm.data.errors import BadSampleError
from ms_mm.data.prefetch import Closeable, Prefetcher
from ms_mm.models.bagel.inputs import MASK_VALUE, build_model_inputs

logger = logging.getLogger(__name__)

GROUP_KINDS = ("t2i_pretrain", "vlm_sft", "unified_edit")       # upstream DATASET_REGISTRY
TRAIN_INPUT_NAMES = (
    "text_ids", "vit_pixels", "vit_position_ids", "vit_attention_mask",
    "padded_images", "posterior_noise", "latent_gather_index", "latent_position_ids", "timesteps", "noise",
    "position_ids", "attention_mask",
    "ce_rows", "ce_labels", "ce_weights", "mse_rows", "mse_latent_rows", "mse_weights",
)
T2I_COLUMNS = ("image", "captions")
EDIT_COLUMNS = ("image_list", "instruction_list")


class DataConfigError(ValueError):
    """A data json / YAML that cannot describe a BAGEL run; the message names the file and key."""


# ------------------------------------------------------------------------------------- images
class ImageTransform:
    """Upstream `ImageTransform`: `MaxLongEdgeMinShortEdgeResize` (sides multiples of `image_stride`,
    long side <= max, short side >= min, pixels <= max_pixels / img_num; bicubic) then [-1, 1]."""

    def __init__(self, max_image_size, min_image_size, image_stride, max_pixels=14 * 14 * 9 * 1024):
        self.max_size, self.min_size = int(max_image_size), int(min_image_size)
        self.stride, self.max_pixels = int(image_stride), int(max_pixels)

    def _div(self, v):
        return max(self.stride, int(round(v / self.stride) * self.stride))

    def _scaled(self, w, h, scale):
        return self._div(round(w * scale)), self._div(round(h * scale))

    def size(self, width, height, img_num=1) -> Tuple[int, int]:
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        w, h = self._scaled(width, height, scale)
        if w * h > self.max_pixels / img_num:
            w, h = self._scaled(w, h, self.max_pixels / img_num / (w * h))
        if max(w, h) > self.max_size:
            w, h = self._scaled(w, h, self.max_size / max(w, h))
        return w, h

    def max_tokens(self) -> int:
        """Most stride x stride cells one image can give (for budget defaults)."""
        side = self.max_size // self.stride
        return min(side * side, self.max_pixels // (self.stride * self.stride))

    def __call__(self, img, img_num=1) -> np.ndarray:
        from PIL import Image

        w, h = self.size(*img.size, img_num=img_num)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, np.float32) / np.float32(255.0)
        return ((arr - 0.5) / 0.5).transpose(2, 0, 1).copy()              # [3, H, W]


def decode_image(data: bytes, where: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _rgb(im)
    except Exception as e:  # noqa: BLE001 - PIL raises several types
        raise BadSampleError(f"cannot decode the image bytes ({type(e).__name__}: {e})", where) from None


def open_image(path: str, where: str):
    from PIL import Image

    if not os.path.isfile(path):
        raise BadSampleError(f"image not found: {path}", where)
    try:
        with Image.open(path) as im:
            im.load()
            return _rgb(im)
    except Exception as e:  # noqa: BLE001
        raise BadSampleError(f"cannot read image {path} ({type(e).__name__}: {e})", where) from None


def _rgb(image):
    """Upstream `pil_img2rgb`: transparent images composited on white."""
    from PIL import Image

    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def patchify(image: np.ndarray, p: int) -> np.ndarray:
    """[c, h*p, w*p] -> [(h w), (p q c)] (upstream `patchify`)."""
    c, H, W = image.shape
    x = image.reshape(c, H // p, p, W // p, p).transpose(1, 3, 2, 4, 0)
    return x.reshape(-1, p * p * c)


def flattened_position_ids(h: int, w: int, patch: int, max_per_side: int, interpolate: bool = False) -> np.ndarray:
    """Flattened grid position ids of an image of h x w pixels cut into patch x patch cells, on the
    `max_per_side` grid of the position tables (upstream data_utils.py).

    Extrapolate (`get_flattened_position_ids_extrapolate`, the default): cell (r, c) -> r * max_per_side + c,
    the top-left corner of the table. Interpolate (`..._interpolate`, `interpolate_pos=True`): the image's
    cells are spread over the whole grid: cell r of n rows sits at the fraction r / n, which lands in the
    bucket of the grid boundaries k / max_per_side (k = 1 .. max_per_side - 1) at or below it."""
    n_h, n_w = h // patch, w // patch
    if not interpolate:
        rows, cols = np.arange(n_h), np.arange(n_w)
    else:
        rows, cols = _interpolated_cells(n_h, max_per_side), _interpolated_cells(n_w, max_per_side)
    return (rows[:, None] * max_per_side + cols).reshape(-1).astype(np.int64)


def _arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """torch.arange(start, end, step) for a float32 result: ceil((end - start) / step) values, each
    start + i * step computed in double, then rounded to float32."""
    n = max(0, int(np.ceil((end - start) / step)))
    return (start + step * np.arange(n, dtype=np.float64)).astype(np.float32)


def _interpolated_cells(n: int, max_per_side: int) -> np.ndarray:
    """Bucket index on the max_per_side grid of each of n cells (torch.bucketize(right=True) = the number
    of boundaries <= the cell's fraction), with upstream's float32 fractions and boundaries."""
    boundaries = _arange_f32(1.0 / max_per_side, 1.0, 1.0 / max_per_side)
    fractions = _arange_f32(0.0, 1.0 - 1e-6, 1.0 / n)
    return np.searchsorted(boundaries, fractions, side="right").astype(np.int64)


# ------------------------------------------------------------------------------------- config
@dataclass
class GroupSpec:
    kind: str                       # t2i_pretrain | vlm_sft | unified_edit
    names: List[str]
    infos: List[dict]               # the dataset_info entry of each name
    num_used_data: List[Optional[int]]
    weight: float
    is_mandatory: bool
    transform: ImageTransform
    vit_transform: Optional[ImageTransform]
    shuffle_lines: bool = False
    shuffle_seed: int = 0
    where: str = ""                 # "data.json: dataset_param.basic_parameters.t2i_pretrain"


@dataclass
class Budgets:
    """Static sizes of one packed micro batch (the compiled graph's shapes)."""
    max_num_tokens: int
    max_num_vit_tokens: int
    max_num_latent_tokens: int
    max_num_vae_images: int
    vae_image_size: Tuple[int, int]
    max_num_ce_tokens: int
    expected_num_tokens: int
    max_num_tokens_per_sample: int
    prefer_buffer_before: int
    max_buffer_size: int

    @property
    def max_num_text_tokens(self) -> int:
        return self.max_num_tokens - self.max_num_vit_tokens - self.max_num_latent_tokens


@dataclass
class DataSettings:
    groups: List[GroupSpec]
    budgets: Budgets
    model_path: str
    text_cond_dropout_prob: float = 0.1
    vit_cond_dropout_prob: float = 0.4
    vae_cond_dropout_prob: float = 0.1
    vit_patch_size: int = 14
    max_num_patch_per_side: int = 70
    max_latent_size: int = 32
    vae_image_downsample: int = 16
    data_seed: int = 42
    interpolate_pos: Optional[bool] = None      # None: the model config's (upstream passes one flag to both)
    extra: Dict[str, Any] = field(default_factory=dict)


def _read_dataset_info(spec, where: str) -> dict:
    """A dataset_info dict, a .json file, or upstream's data/dataset_info.py (its DATASET_INFO literal)."""
    if isinstance(spec, dict):
        return spec
    path = Path(str(spec))
    if not path.is_file():
        raise DataConfigError(f"{where}: dataset_info file {path} not found")
    text = path.read_text()
    if path.suffix == ".py":
        for node in ast.parse(text, str(path)).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DATASET_INFO" for t in node.targets):
                try:
                    return ast.literal_eval(node.value)
                except ValueError as e:
                    raise DataConfigError(f"{path}: DATASET_INFO is not a plain literal ({e})") from None
        raise DataConfigError(f"{path}: no `DATASET_INFO = {{...}}` assignment")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _read_yaml(path: str, where: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise DataConfigError(f"{where}: dataset_config_file {path} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataConfigError(f"{path}: invalid YAML{f' at line {mark.line + 1}' if mark else ''}: {e}") from None
    if not isinstance(data, dict):
        raise DataConfigError(f"{path}: expected a mapping of dataset groups")
    return data


def _transform(args, where: str) -> ImageTransform:
    if not isinstance(args, dict):
        raise DataConfigError(f"{where}: an object with image_stride, max_image_size, min_image_size is required")
    try:
        return ImageTransform(**args)
    except TypeError as e:
        raise DataConfigError(f"{where}: {e}") from None


def read_data_settings(data_cfg: dict, options: Optional[dict] = None) -> DataSettings:
    """The groups, budgets and data settings of a BAGEL data json; errors name the key."""
    options = dict(options or {})
    dp = data_cfg.get("dataset_param")
    if not isinstance(dp, dict):
        raise DataConfigError("data json: dataset_param (an object) is required")
    bp = dp.get("basic_parameters")
    if not isinstance(bp, dict):
        raise DataConfigError("data json: dataset_param.basic_parameters (an object) is required")
    prefix = "dataset_param.basic_parameters"
    if bp.get("dataset_config_file"):
        # upstream form: data/configs/*.yaml (groups) + data/dataset_info.py (paths)
        group_cfgs = _read_yaml(bp["dataset_config_file"], f"data json: {prefix}.dataset_config_file")
        info = _read_dataset_info(bp.get("dataset_info"), f"data json: {prefix}.dataset_info") \
            if bp.get("dataset_info") is not None else None
        if info is None:
            raise DataConfigError(f"data json: {prefix}.dataset_info (DATASET_INFO dict, .json or dataset_info.py) "
                                  f"is required with dataset_config_file")
        available = list(group_cfgs)
        where_of = {g: f"{bp['dataset_config_file']}: {g}" for g in available}
    else:
        available = bp.get("available_data")
        if not isinstance(available, list) or not available:
            raise DataConfigError(f"data json: {prefix}.available_data (a list of dataset groups) is required")
        group_cfgs, info = {}, {}
        for g in available:
            if g not in bp or not isinstance(bp[g], dict):
                raise DataConfigError(f"data json: {prefix}.available_data names {g!r} but {prefix}.{g} "
                                      f"(an object) is missing")
            group_cfgs[g] = bp[g]
            info[g] = {n: bp[g][n] for n in bp[g].get("dataset_names") or [] if isinstance(bp[g].get(n), dict)}
        where_of = {g: f"data json: {prefix}.{g}" for g in available}
    if options.get("visual_gen") is False:
        available = [g for g in available if g == "vlm_sft"]
    if options.get("visual_und") is False:
        available = [g for g in available if g != "vlm_sft"]
    if not available:
        raise DataConfigError("no dataset group left to train (--visual_gen / --visual_und removed them all)")
    groups = []
    for g in available:
        where = where_of[g]
        if g not in GROUP_KINDS:
            raise DataConfigError(f"{where}: unknown dataset group {g!r} (known: {', '.join(GROUP_KINDS)})")
        cfg = group_cfgs[g]
        names = cfg.get("dataset_names")
        if not isinstance(names, list) or not names:
            raise DataConfigError(f"{where}.dataset_names (a list) is required")
        infos = []
        for n in names:
            entry = (info.get(g) or {}).get(n)
            if not isinstance(entry, dict):
                known = sorted((info.get(g) or {}))
                raise DataConfigError(f"{where}.dataset_names: unknown dataset {n!r} (dataset_info[{g!r}] has "
                                      f"{known or 'none'})")
            need = ("data_dir", "jsonl_path") if g == "vlm_sft" else ("data_dir",)
            if g == "unified_edit":
                need = ("data_dir", "parquet_info_path")
            for k in need:
                if not entry.get(k):
                    raise DataConfigError(f"{where}.{n}.{k} is required")
            infos.append(entry)
        used = cfg.get("num_used_data") or [None] * len(names)
        if len(used) != len(names):
            raise DataConfigError(f"{where}.num_used_data has {len(used)} entries for {len(names)} dataset_names")
        transform = _transform(cfg.get("image_transform_args"), f"{where}.image_transform_args")
        vit_transform = None
        if g == "unified_edit":
            vit_transform = _transform(cfg.get("vit_image_transform_args"), f"{where}.vit_image_transform_args")
        groups.append(GroupSpec(g, list(names), infos, list(used), float(cfg.get("weight", 1.0)),
                                bool(cfg.get("is_mandatory", False)), transform, vit_transform,
                                bool(cfg.get("shuffle_lines", False)), int(cfg.get("shuffle_seed", 0)), where))
    if sum(gr.weight for gr in groups) <= 0:
        raise DataConfigError("data json: the dataset groups' weights sum to 0")

    pk = dict(dp.get("packed_parameters") or {})
    for k in ("expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample"):
        if options.get(k) is not None:
            pk[k] = int(options[k])
    max_latent = int(options.get("max_latent_size") or bp.get("max_latent_size", 32))
    settings = DataSettings(
        groups=groups, budgets=None, model_path=str(bp.get("model_path") or ""),
        text_cond_dropout_prob=float(bp.get("text_cond_dropout_prob", 0.1)),
        vit_cond_dropout_prob=float(bp.get("vit_cond_dropout_prob", 0.4)),
        vae_cond_dropout_prob=float(bp.get("vae_cond_dropout_prob", 0.1)),
        vit_patch_size=int(bp.get("vit_patch_size", 14)), max_num_patch_per_side=int(bp.get("max_num_patch_per_side", 70)),
        max_latent_size=max_latent, vae_image_downsample=int(bp.get("vae_image_downsample", 16)),
        data_seed=int(bp.get("data_seed", 42)), interpolate_pos=bp.get("interpolate_pos"))
    if settings.interpolate_pos is not None and not isinstance(settings.interpolate_pos, bool):
        raise DataConfigError(f"data json: {prefix}.interpolate_pos={settings.interpolate_pos!r}: expected true or false")
    settings.budgets = _budgets(pk, settings)
    if not settings.model_path:
        raise DataConfigError(f"data json: {prefix}.model_path (the tokenizer / checkpoint directory) is required")
    return settings


def _budgets(pk: dict, s: DataSettings) -> Budgets:
    where = "data json: dataset_param.packed_parameters"
    max_tokens = int(pk.get("max_num_tokens", 36864))
    expected = int(pk.get("expected_num_tokens", max_tokens))
    per_sample = int(pk.get("max_num_tokens_per_sample", max_tokens))
    gen = [g.transform for g in s.groups if g.kind != "vlm_sft"]
    vit = [g.transform for g in s.groups if g.kind == "vlm_sft"] + [g.vit_transform for g in s.groups if g.vit_transform]
    # defaults: room for one largest image of each kind, at least a third of the sequence
    vit_one = max([t.max_tokens() for t in vit] or [0])
    lat_one = max([min(t.max_tokens(), s.max_latent_size ** 2) for t in gen] or [0])
    n_vit = int(pk.get("max_num_vit_tokens", max(vit_one, max_tokens // 3) if vit else 1))
    n_lat = int(pk.get("max_num_latent_tokens", max(lat_one, max_tokens // 3) if gen else 1))
    side = max([t.max_size for t in gen] or [s.vae_image_downsample])
    side = -(-side // s.vae_image_downsample) * s.vae_image_downsample
    n_img = int(pk.get("max_num_vae_images", max(1, n_lat // max(1, min(lat_one, 1) if lat_one else 1)) if gen else 1))
    if "max_num_vae_images" not in pk and gen:
        smallest = min(t.size(t.min_size, t.min_size)[0] // s.vae_image_downsample for t in gen) ** 2
        n_img = max(1, n_lat // max(1, smallest))
    b = Budgets(max_num_tokens=max_tokens, max_num_vit_tokens=max(1, n_vit), max_num_latent_tokens=max(1, n_lat),
                max_num_vae_images=max(1, n_img), vae_image_size=(side, side),
                max_num_ce_tokens=int(pk.get("max_num_ce_tokens", 0)) or 1,
                expected_num_tokens=expected, max_num_tokens_per_sample=per_sample,
                prefer_buffer_before=int(pk.get("prefer_buffer_before", 16384)),
                max_buffer_size=int(pk.get("max_buffer_size", 50)))
    if b.max_num_text_tokens < 8:
        raise DataConfigError(f"{where}: max_num_tokens {max_tokens} leaves {b.max_num_text_tokens} text rows after "
                              f"max_num_vit_tokens {b.max_num_vit_tokens} + max_num_latent_tokens "
                              f"{b.max_num_latent_tokens}")
    if not pk.get("max_num_ce_tokens"):
        b.max_num_ce_tokens = b.max_num_text_tokens
    if expected > max_tokens:
        raise DataConfigError(f"{where}: expected_num_tokens {expected} exceeds max_num_tokens {max_tokens}")
    return b


# ------------------------------------------------------------------------------------- records
def _parquet_files(data_dir: str, num_used: Optional[int], where: str) -> List[str]:
    if not os.path.isdir(data_dir):
        raise DataConfigError(f"{where}.data_dir {data_dir}: no such directory")
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
    if not files:
        raise DataConfigError(f"{where}.data_dir {data_dir}: no .parquet files")
    if num_used:  # upstream get_parquet_data_paths: repeat the list up to num_used_data
        files = (files * (num_used // len(files) + 1))[:num_used]
    return files


def _check_columns(path: str, columns: Sequence[str], where: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError
        raise DataConfigError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataConfigError(f"{path}: parquet file lacks column(s) {missing} (has {names}; {where} needs "
                              f"{list(columns)})")


def _rank_share(items: list, seed: int, rank: int, world: int) -> list:
    """Upstream `set_epoch`: sort, shuffle with the data seed, contiguous equal chunks per rank."""
    import random

    items = sorted(items)
    random.Random(seed).shuffle(items)
    n = len(items) // world
    return items[rank * n:(rank + 1) * n]


class GroupStream:
    """One dataset group on one rank: its records, a cursor (epoch, index), sample construction."""

    def __init__(self, spec: GroupSpec, index: int, settings: DataSettings, tokenizer, rank: int, world: int,
                 skip_bad: bool):
        self.spec, self.index, self.settings, self.tokenizer = spec, index, settings, tokenizer
        self.seed = settings.data_seed
        self.records: List[tuple] = []
        self.epoch, self.cursor = 0, 0
        self._table_cache: Dict[Tuple[str, int], Any] = {}
        self.dropped_files: List[str] = []
        if spec.kind == "vlm_sft":
            self._vlm_records(rank, world)
        else:
            self._parquet_records(rank, world, skip_bad)
        if not self.records:
            raise DataConfigError(f"{spec.where}: no records for rank {rank} of {world}")

    # -- building the rank's record list
    def _vlm_records(self, rank, world):
        import random

        lines = []
        for name, info, used in zip(self.spec.names, self.spec.infos, self.spec.num_used_data):
            path = info["jsonl_path"]
            if not os.path.isfile(path):
                raise DataConfigError(f"{self.spec.where}.{name}.jsonl_path {path}: no such file")
            with open(path, encoding="utf-8") as f:
                raw = [(path, i + 1, info["data_dir"]) for i, line in enumerate(f) if line.strip()]
            if self.spec.shuffle_lines:
                random.Random(self.spec.shuffle_seed).shuffle(raw)
            lines += raw[:used] if used else raw
        self.records = _rank_share(lines, self.seed, rank, world)

    def _parquet_records(self, rank, world, skip_bad):
        import pyarrow.parquet as pq

        columns = T2I_COLUMNS if self.spec.kind == "t2i_pretrain" else EDIT_COLUMNS
        files = []
        for name, info, used in zip(self.spec.names, self.spec.infos, self.spec.num_used_data):
            where = f"{self.spec.where}.{name}"
            num_files = info.get("num_files")
            if num_files is not None and int(num_files) % world:
                raise DataConfigError(f"{where}.num_files = {num_files} is not a multiple of the card count {world} "
                                      f"(parquet files are sharded evenly across ranks)")
            found = _parquet_files(info["data_dir"], used or num_files, where)
            if self.spec.kind == "unified_edit":
                pinfo = _read_dataset_info(info["parquet_info_path"], f"{where}.parquet_info_path")
                found = [f for f in found if f in pinfo or os.path.abspath(f) in pinfo]
                if not found:
                    raise DataConfigError(f"{info['parquet_info_path']}: lists none of the parquet files in "
                                          f"{info['data_dir']}")
            files += found
        if len(files) % world:
            raise DataConfigError(f"{self.spec.where}: {len(files)} parquet files (num_used_data / num_files) is not "
                                  f"a multiple of the card count {world}")
        for path in _rank_share(files, self.seed, rank, world):
            try:
                _check_columns(path, columns, self.spec.where)
            except DataConfigError:
                if not skip_bad:
                    raise
                self.dropped_files.append(path)
                logger.warning("skipping parquet file %s: it lacks the columns %s", path, list(columns))
                continue
            meta = pq.ParquetFile(path).metadata
            for rg in range(meta.num_row_groups):
                for row in range(meta.row_group(rg).num_rows):
                    self.records.append((path, rg, row))

    # -- iteration
    def next(self):
        """(reference, record) of the next record; the cursor moves on (epochs repeat)."""
        if self.cursor >= len(self.records):
            self.epoch, self.cursor = self.epoch + 1, 0
        ref = (self.index, self.epoch, self.cursor)
        self.cursor += 1
        return ref

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_records": len(self.records)}

    def sample(self, ref) -> dict:
        """The sample of a record reference (deterministic: its random choices are seeded by `ref`)."""
        _, epoch, i = ref
        rng = np.random.default_rng([self.seed, self.index, epoch, i])
        rec = self.records[i]
        if self.spec.kind == "vlm_sft":
            where = f"{rec[0]}:{rec[1]}"
            return self._vlm_sample(rec, rng, where)
        where = f"{rec[0]}: row group {rec[1]}, row {rec[2]}"
        row = self._row(rec)
        if self.spec.kind == "t2i_pretrain":
            return self._t2i_sample(row, rng, where)
        return self._edit_sample(row, rng, where)

    def _row(self, rec):
        import pyarrow.parquet as pq

        path, rg, row = rec
        key = (path, rg)
        table = self._table_cache.get(key)
        if table is None:
            table = pq.ParquetFile(path).read_row_group(rg).to_pydict()
            self._table_cache = {key: table}            # one row group at a time, as upstream
        return {k: v[row] for k, v in table.items()}

    def _encode(self, text):
        return list(self.tokenizer.encode(text))

    def _t2i_sample(self, row, rng, where):
        image = self.spec.transform(decode_image(row["image"], f"{where}, column 'image'"))
        try:
            captions = json.loads(row["captions"]) if isinstance(row["captions"], (str, bytes)) else row["captions"]
            texts = [str(v) for v in (captions.values() if isinstance(captions, dict) else captions)]
        except (ValueError, AttributeError, TypeError) as e:
            raise BadSampleError(f"column 'captions' is not a json object of captions ({e})", where) from None
        ids = [self._encode(t) for t in texts]
        text = ids[int(rng.integers(len(ids)))] if ids else self._encode(" ")
        return {"text_ids_list": [text], "images": [image],
                "sequence_plan": [_plan("text", enable_cfg=1), _plan("vae_image", loss=1)], "where": where}

    def _edit_sample(self, row, rng, where):
        images, instructions = row["image_list"], row["instruction_list"]
        if not isinstance(images, list) or len(images) < 2 or len(instructions) < len(images) - 1:
            raise BadSampleError(f"image_list needs >= 2 images and instruction_list one list per edit (got "
                                 f"{len(images) if isinstance(images, list) else type(images).__name__} / "
                                 f"{len(instructions) if isinstance(instructions, list) else '?'})", where)
        n = len(images)
        start = int(rng.integers(n - 1))
        end = int(rng.integers(start + 1, min(start + 3, n)))     # upstream: start+1 .. min(start+3, n) - 1
        gen, vit = self.spec.transform, self.spec.vit_transform
        sample = {"text_ids_list": [], "images": [], "sequence_plan": [], "where": where}

        def image(i):
            return decode_image(images[i], f"{where}, column 'image_list'[{i}]")

        def add_image(pil, need_loss, need_vae, need_vit):
            if need_loss:
                sample["sequence_plan"].append(_plan("vae_image", loss=1))
                sample["images"].append(gen(pil))
            if need_vae:
                sample["sequence_plan"].append(_plan("vae_image", enable_cfg=1))
                sample["images"].append(gen(pil))
            if need_vit:
                sample["sequence_plan"].append(_plan("vit_image", enable_cfg=1))
                sample["images"].append(vit(pil))

        def add_text(text):
            sample["sequence_plan"].append(_plan("text", enable_cfg=1))
            sample["text_ids_list"].append(self._encode(text))

        def choose(i):
            options = list(instructions[i - 1])
            return str(options[int(rng.integers(len(options)))])

        add_image(image(start), False, True, True)
        if end - start > 1 and rng.random() < 0.5:               # several instructions at once
            if end == n - 1:
                end -= 1
            add_text(". ".join(choose(i) for i in range(start + 1, end + 1)) + ".")
            add_image(image(end), True, False, False)
        else:
            for i in range(start + 1, end + 1):
                add_text(choose(i))
                add_image(image(i), True, i != end, i != end)
        return sample

    def _vlm_sample(self, rec, rng, where):
        path, line_no, image_dir = rec
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                if k == line_no:
                    break
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadSampleError(f"malformed json ({e.msg} at column {e.colno})", where) from None
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise BadSampleError("record has no 'conversations' list", where)
        names = item.get("image") or []
        names = names if isinstance(names, list) else [names]
        pil = [open_image(os.path.join(image_dir, n), where) for n in names]
        images = [self.spec.transform(im, img_num=len(pil)) for im in pil]
        sample = {"text_ids_list": [], "images": [], "sequence_plan": [], "where": where}
        used = 0
        for turn in item["conversations"]:
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or "value" not in turn:
                raise BadSampleError("each conversation turn needs 'from' (human / gpt) and 'value'", where)
            if turn["from"] == "gpt":
                pieces = [(turn["value"], 1)]
            else:
                parts = str(turn["value"]).split("<image>")
                pieces = []
                for k, text in enumerate(parts):
                    pieces.append((text.strip(), 0))
                    if k != len(parts) - 1 and used < len(images):
                        pieces.append((None, 0))
                        used += 1
            for text, loss in pieces:
                if text is None:
                    sample["sequence_plan"].append(_plan("vit_image"))
                    sample["images"].append(images[len([p for p in sample["sequence_plan"]
                                                        if p["type"] == "vit_image"]) - 1])
                elif text:
                    ids = self._encode(text)
                    if ids:
                        sample["sequence_plan"].append(_plan("text", loss=loss))
                        sample["text_ids_list"].append(ids)
        if used != len(images):
            raise BadSampleError(f"{len(images)} image(s) but {used} <image> tag(s)", where)
        if not any(p["loss"] for p in sample["sequence_plan"]):
            raise BadSampleError("no gpt turn: nothing to supervise", where)
        return sample


def _plan(kind, loss=0, enable_cfg=0):
    return {"type": kind, "enable_cfg": enable_cfg, "loss": loss, "special_token_loss": 0, "special_token_label": None}


# ------------------------------------------------------------------------------------- packing
def sample_cost(sample: dict, s: DataSettings) -> Dict[str, int]:
    """Rows a sample takes in each budget (before condition dropout, which only removes rows)."""
    text = vit = lat = vae = ce = 0
    texts, images = iter(sample["text_ids_list"]), iter(sample["images"])
    for item in sample["sequence_plan"]:
        if item["type"] == "text":
            n = len(next(texts)) + 2                    # bos ... eos
            text += n
            ce += (n - 1) if item["loss"] else 0
        else:
            img = next(images)
            text += 2                                   # start / end of image
            if item["type"] == "vit_image":
                vit += (img.shape[1] // s.vit_patch_size) * (img.shape[2] // s.vit_patch_size)
            else:
                vae += 1
                lat += (img.shape[1] // s.vae_image_downsample) * (img.shape[2] // s.vae_image_downsample)
    return {"text": text, "vit": vit, "latent": lat, "vae_images": vae, "ce": ce, "total": text + vit + lat}


class Packer:
    """One packed sequence being filled (upstream `PackedDataset.pack_sequence` + `to_tensor`)."""

    def __init__(self, settings: DataSettings, special: dict, rng: np.random.Generator):
        self.s, self.special, self.rng = settings, special, rng
        self.used = {"text": 0, "vit": 0, "latent": 0, "vae_images": 0, "ce": 0, "total": 0}
        self.st = {k: [] for k in ("sample_lens", "packed_position_ids", "split_lens", "attn_modes",
                                   "packed_text_ids", "packed_text_indexes", "packed_label_ids", "ce_loss_indexes",
                                   "vae_images", "packed_latent_position_ids", "vae_latent_shapes",
                                   "packed_vae_token_indexes", "packed_timesteps", "mse_loss_indexes",
                                   "packed_vit_tokens", "vit_token_seqlens", "packed_vit_position_ids",
                                   "packed_vit_token_indexes")}
        self.curr = 0
        self.num_samples = 0

    def fits(self, cost: Dict[str, int]) -> bool:
        b = self.s.budgets
        limits = {"text": b.max_num_text_tokens, "vit": b.max_num_vit_tokens, "latent": b.max_num_latent_tokens,
                  "vae_images": b.max_num_vae_images, "ce": b.max_num_ce_tokens, "total": b.max_num_tokens}
        return all(self.used[k] + cost[k] <= limits[k] for k in limits)

    def add(self, sample: dict, cost: Dict[str, int]) -> None:
        for k in self.used:
            self.used[k] += cost[k]
        st, s, rng, sp = self.st, self.s, self.rng, self.special
        texts, images = list(sample["text_ids_list"]), list(sample["images"])
        curr, rope, sample_len = self.curr, 0, 0
        split_lens, attn_modes = [], []
        for item in sample["sequence_plan"]:
            split_len = 0
            if item["type"] == "text":
                ids = texts.pop(0)
                if item["enable_cfg"] and rng.random() < s.text_cond_dropout_prob:
                    continue
                shifted = [sp["bos_token_id"]] + list(ids)
                st["packed_text_ids"].extend(shifted)
                st["packed_text_indexes"].extend(range(curr, curr + len(shifted)))
                if item["loss"]:
                    st["ce_loss_indexes"].extend(range(curr, curr + len(shifted)))
                    st["packed_label_ids"].extend(list(ids) + [sp["eos_token_id"]])
                curr += len(shifted)
                st["packed_text_ids"].append(sp["eos_token_id"])
                st["packed_text_indexes"].append(curr)
                curr += 1
                split_len = len(shifted) + 1
                attn_modes.append("causal")
                st["packed_position_ids"].extend(range(rope, rope + split_len))
                rope += split_len
            elif item["type"] == "vit_image":
                img = images.pop(0)
                if item["enable_cfg"] and rng.random() < s.vit_cond_dropout_prob:
                    rope += 1
                    continue
                st["packed_text_ids"].append(sp["start_of_image"])
                st["packed_text_indexes"].append(curr)
                curr += 1
                tokens = patchify(img, s.vit_patch_size)
                n = tokens.shape[0]
                st["packed_vit_token_indexes"].extend(range(curr, curr + n))
                curr += n
                st["packed_vit_tokens"].append(tokens)
                st["vit_token_seqlens"].append(n)
                st["packed_vit_position_ids"].append(flattened_position_ids(
                    img.shape[1], img.shape[2], s.vit_patch_size, s.max_num_patch_per_side, bool(s.interpolate_pos)))
                st["packed_text_ids"].append(sp["end_of_image"])
                st["packed_text_indexes"].append(curr)
                curr += 1
                split_len = n + 2
                attn_modes.append("full")
                st["packed_position_ids"].extend([rope] * split_len)
                rope += 1
            else:  # vae_image
                img = images.pop(0)
                if item["enable_cfg"] and rng.random() < s.vae_cond_dropout_prob:
                    rope += 1
                    continue
                st["packed_text_ids"].append(sp["start_of_image"])
                st["packed_text_indexes"].append(curr)
                curr += 1
                st["vae_images"].append(img)
                st["packed_latent_position_ids"].append(flattened_position_ids(
                    img.shape[1], img.shape[2], s.vae_image_downsample, s.max_latent_size, bool(s.interpolate_pos)))
                h, w = img.shape[1] // s.vae_image_downsample, img.shape[2] // s.vae_image_downsample
                st["vae_latent_shapes"].append((h, w))
                n = h * w
                st["packed_vae_token_indexes"].extend(range(curr, curr + n))
                if item["loss"]:
                    st["mse_loss_indexes"].extend(range(curr, curr + n))
                    timestep = float(rng.standard_normal())
                else:
                    timestep = float("-inf")
                st["packed_timesteps"].extend([timestep] * n)
                curr += n
                st["packed_text_ids"].append(sp["end_of_image"])
                st["packed_text_indexes"].append(curr)
                curr += 1
                split_len = n + 2
                attn_modes.append("noise" if item["loss"] else "full")
                st["packed_position_ids"].extend([rope] * split_len)
                if not item["loss"]:
                    rope += 1
            split_lens.append(split_len)
            sample_len += split_len
        self.curr = curr
        st["sample_lens"].append(sample_len)
        st["split_lens"].extend(split_lens)
        st["attn_modes"].extend(attn_modes)
        self.num_samples += 1

    def batch(self) -> dict:
        """The packed batch (the keys of `inputs.BATCH_KEYS`, split_lens / attn_modes, `vae_images`)."""
        st, s = self.st, self.s
        z = lambda shape, dt=np.int64: np.zeros(shape, dt)  # noqa: E731
        p = s.vit_patch_size
        return {
            "sequence_length": np.asarray(self.curr), "sample_lens": np.asarray(st["sample_lens"], np.int64),
            "split_lens": np.asarray(st["split_lens"], np.int64), "attn_modes": np.asarray(st["attn_modes"]),
            "packed_text_ids": np.asarray(st["packed_text_ids"], np.int64),
            "packed_text_indexes": np.asarray(st["packed_text_indexes"], np.int64),
            "packed_position_ids": np.asarray(st["packed_position_ids"], np.int64),
            "packed_label_ids": np.asarray(st["packed_label_ids"], np.int64),
            "ce_loss_indexes": np.asarray(st["ce_loss_indexes"], np.int64),
            "packed_vit_tokens": (np.concatenate(st["packed_vit_tokens"]) if st["packed_vit_tokens"]
                                  else z((0, 3 * p * p), np.float32)),
            "packed_vit_token_indexes": np.asarray(st["packed_vit_token_indexes"], np.int64),
            "packed_vit_position_ids": (np.concatenate(st["packed_vit_position_ids"]) if st["packed_vit_position_ids"]
                                        else z((0,))),
            "vit_token_seqlens": np.asarray(st["vit_token_seqlens"], np.int64),
            "vae_images": list(st["vae_images"]),
            "patchified_vae_latent_shapes": np.asarray(st["vae_latent_shapes"], np.int64).reshape(-1, 2),
            "packed_latent_position_ids": (np.concatenate(st["packed_latent_position_ids"])
                                           if st["packed_latent_position_ids"] else z((0,))),
            "packed_vae_token_indexes": np.asarray(st["packed_vae_token_indexes"], np.int64),
            "packed_timesteps": np.asarray(st["packed_timesteps"], np.float32),
            "mse_loss_indexes": np.asarray(st["mse_loss_indexes"], np.int64),
        }


def padded_model_inputs(batch: dict, config, budgets: Budgets, rng: np.random.Generator,
                        vae_downsample: int, pad_token_id: int = 0, noise: Optional[np.ndarray] = None,
                        posterior_rng: Optional[np.random.Generator] = None) -> dict:
    """A packed batch -> `TRAIN_INPUT_NAMES` arrays padded to `budgets` (static shapes; `posterior_noise` is
    the VAE posterior's standard normal draw from `posterior_rng`, zeros without one), plus the host-side
    `num_real_tokens`, `token_budget`, `row_of_position` (padded model row of each packed position) and
    `latent_rows` (padded rows of the real latent tokens).

    The real rows keep `build_model_inputs`' order (text, ViT, latent) at the start of each segment;
    padding rows attend only to themselves (so no softmax row is empty) and no real row attends to them;
    CE / MSE padding entries have weight 0."""
    b = budgets
    H, W = b.vae_image_size
    z = config.vae.z_channels
    n_img = len(batch["vae_images"])
    if n_img > b.max_num_vae_images:
        raise ValueError(f"{n_img} VAE images exceed max_num_vae_images {b.max_num_vae_images}")
    dummy_latent = np.zeros((n_img, z, H // config.vae.downsample, W // config.vae.downsample), np.float32)
    real = build_model_inputs({**batch, "padded_latent": dummy_latent, **({"noise": noise} if noise is not None else {})},
                              config, rng=rng)
    n_t, n_v, n_l = len(real["text_ids"]), len(real["vit_pixels"]), len(real["latent_position_ids"])
    T_t, T_v, T_l = b.max_num_text_tokens, b.max_num_vit_tokens, b.max_num_latent_tokens
    if n_t > T_t or n_v > T_v or n_l > T_l:
        raise ValueError(f"packed rows text {n_t} / ViT {n_v} / latent {n_l} exceed the budgets {T_t} / {T_v} / {T_l}")
    S = T_t + T_v + T_l
    new_row = np.concatenate([np.arange(n_t), T_t + np.arange(n_v), T_t + T_v + np.arange(n_l)]).astype(np.int64)

    def pad(arr, n, fill=0):
        out = np.full((n,) + arr.shape[1:], fill, arr.dtype)
        out[:len(arr)] = arr
        return out

    allowed = real["attention_mask"][0, 0] == 0
    mask = np.full((S, S), np.float32(MASK_VALUE), np.float32)
    mask[np.ix_(new_row, new_row)] = np.where(allowed, np.float32(0), np.float32(MASK_VALUE))
    pad_rows = np.setdiff1d(np.arange(S), new_row)
    mask[pad_rows, pad_rows] = 0.0
    vit_allowed = real["vit_attention_mask"][0, 0] == 0
    vit_mask = np.full((T_v, T_v), np.float32(MASK_VALUE), np.float32)
    vit_mask[:n_v, :n_v] = np.where(vit_allowed, np.float32(0), np.float32(MASK_VALUE))
    vit_mask[np.arange(n_v, T_v), np.arange(n_v, T_v)] = 0.0
    positions = np.zeros(S, np.int32)
    positions[new_row] = real["position_ids"]
    images = np.zeros((b.max_num_vae_images, 3, H, W), np.float32)
    for i, img in enumerate(batch["vae_images"]):
        images[i, :, :img.shape[1], :img.shape[2]] = img
    latent_shape = (b.max_num_vae_images, z, H // config.vae.downsample, W // config.vae.downsample)
    posterior_noise = (posterior_rng.standard_normal(latent_shape, dtype=np.float32) if posterior_rng is not None
                       else np.zeros(latent_shape, np.float32))
    n_ce, n_mse = len(real["ce_rows"]), len(real["mse_rows"])
    if n_ce > b.max_num_ce_tokens:
        raise ValueError(f"{n_ce} CE tokens exceed max_num_ce_tokens {b.max_num_ce_tokens}")
    timesteps = pad(real["timesteps"], T_l, np.float32(0.0))
    out = {
        "text_ids": pad(real["text_ids"], T_t, pad_token_id),
        "vit_pixels": pad(real["vit_pixels"], T_v),
        "vit_position_ids": pad(real["vit_position_ids"], T_v),
        "vit_attention_mask": vit_mask[None, None],
        "padded_images": images,
        "posterior_noise": posterior_noise,
        "latent_gather_index": pad(real["latent_gather_index"], T_l),
        "latent_position_ids": pad(real["latent_position_ids"], T_l),
        "timesteps": timesteps,
        "noise": pad(real["noise"], T_l, np.float32(0.0)),
        "position_ids": positions,
        "attention_mask": mask[None, None],
        "ce_rows": pad(new_row[real["ce_rows"]].astype(np.int32), b.max_num_ce_tokens),
        "ce_labels": pad(real["ce_labels"], b.max_num_ce_tokens),
        "ce_weights": pad(real["ce_weights"], b.max_num_ce_tokens, np.float32(0.0)),
        "mse_rows": pad(new_row[real["mse_rows"]].astype(np.int32), T_l, T_t + T_v),
        "mse_latent_rows": pad(real["mse_latent_rows"], T_l),
        "mse_weights": pad(real["mse_weights"], T_l, np.float32(0.0)),
    }
    out["num_real_tokens"] = int(batch["sequence_length"])
    out["token_budget"] = S
    out["num_ce_tokens"], out["num_mse_tokens"] = n_ce, n_mse
    out["row_of_position"] = new_row[real["row_of_position"]]
    out["latent_rows"] = T_t + T_v + np.arange(n_l)
    return out


# ------------------------------------------------------------------------------------- loader
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DataConfigError(f"data json: dataset_param.basic_parameters.model_path {path}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise DataConfigError(f"data json: model_path {path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


class BagelPackedLoader(Closeable):
    """Endless iterator of static-shape BAGEL micro batches (one packed sequence each); see the module
    docstring. `state_dict()` is the position after the last batch handed out."""

    def __init__(self, settings: DataSettings, config, *, rank=0, world_size=1, skip_bad_samples=False,
                 prefetch=4, tokenizer=None):
        from ms_mm.models.bagel.tokenizer import special_token_ids

        self.s, self.config = settings, config
        self.rank, self.world_size = int(rank), int(world_size)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.tokenizer = tokenizer or load_tokenizer(settings.model_path)
        self.special = special_token_ids(self.tokenizer)
        for key, value in self.special.items():
            if getattr(config, key) != value:
                raise DataConfigError(f"tokenizer {settings.model_path}: {key} is {value}, the model config has "
                                      f"{getattr(config, key)} (a tokenizer of another checkpoint?)")
        self.pad_token_id = int(self.tokenizer.pad_token_id or 0)
        self.streams = [GroupStream(g, i, settings, self.tokenizer, rank, world_size, skip_bad_samples)
                        for i, g in enumerate(settings.groups)]
        weights = np.asarray([g.weight for g in settings.groups], np.float64)
        self.cumprobs = np.cumsum(weights) / weights.sum()
        self.prefetch = max(1, int(prefetch))
        self._position = {"batches": 0, "skipped": 0, "buffer": [], "groups": [st.state() for st in self.streams]}
        self._skipped_files = sum(len(st.dropped_files) for st in self.streams)
        self._prefetcher = None
        self.stats = {"real_tokens": 0, "budget_tokens": 0, "batches": 0, "samples": 0}

    # --------------------------------------------------------------- public
    @property
    def skipped(self) -> int:
        return self._position["skipped"] + self._skipped_files

    @property
    def prefetched(self) -> int:
        return self._prefetcher.ready if self._prefetcher is not None else 0

    def state_dict(self) -> dict:
        return {**json.loads(json.dumps(self._position)), "seed": self.s.data_seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.s.data_seed), ("world_size", self.world_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"data loader state was saved with {key}={state[key]!r}, this loader has {mine!r}: "
                                 f"the data position cannot be restored exactly")
        groups = state.get("groups") or []
        if len(groups) != len(self.streams):
            raise ValueError(f"data loader state has {len(groups)} dataset groups, the data json {len(self.streams)}")
        for st, g in zip(self.streams, groups):
            if g.get("num_records", len(st.records)) != len(st.records):
                raise ValueError(f"{st.spec.where}: the data changed since the checkpoint ({g['num_records']} records "
                                 f"then, {len(st.records)} now)")
        self._stop_producer()
        self._position = {"batches": int(state["batches"]), "skipped": int(state.get("skipped", 0)),
                          "buffer": [list(r) for r in state.get("buffer", [])],
                          "groups": [{"epoch": int(g["epoch"]), "cursor": int(g["cursor"]),
                                      "num_records": len(st.records)} for st, g in zip(self.streams, groups)]}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._prefetcher is None:
            self._start()
        # the end, or the producer's error at its place in the stream, is raised here and again on
        # every later call (the prefetcher keeps it) until load_state_dict
        batch, position = self._prefetcher.get()
        self._position = position
        self.stats["real_tokens"] += batch["num_real_tokens"]
        self.stats["budget_tokens"] += batch["token_budget"]
        self.stats["batches"] += 1
        self.stats["samples"] += batch["num_samples"]
        return batch

    def close(self) -> None:
        """Stop the producer thread (iterating again restarts it from the current position). A loader
        that ended or failed stays so until `load_state_dict`."""
        if self._prefetcher is not None and self._prefetcher.alive:
            self._stop_producer()

    # --------------------------------------------------------------- producer
    def _start(self):
        position = json.loads(json.dumps(self._position))
        self._prefetcher = Prefetcher(lambda: self._batches(position), self.prefetch, name="ms_mm-bagel-packer")

    def _stop_producer(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = None

    def _batches(self, position):
        """The packed batches from `position` on, each with the position after it (runs in the prefetch
        thread; the streams' cursors are that thread's until the loader stops it)."""
        for st, g in zip(self.streams, position["groups"]):
            st.epoch, st.cursor = g["epoch"], g["cursor"]
        buffer = [(tuple(ref), None) for ref in position["buffer"]]
        batches, skipped = position["batches"], position["skipped"]
        while True:
            batch, buffer, skipped = self._pack_one(batches, buffer, skipped)
            batches += 1
            yield batch, {"batches": batches, "skipped": skipped, "buffer": [list(r) for r, _ in buffer],
                          "groups": [st.state() for st in self.streams]}

    def _sample(self, ref, skipped_box):
        """(sample, cost) of a reference, or None for a bad / too long sample that is skipped."""
        st = self.streams[ref[0]]
        try:
            sample = st.sample(ref)
        except BadSampleError as e:
            if not self.skip_bad_samples:
                raise
            skipped_box[0] += 1
            logger.warning("skipping bad sample (%d so far): %s", skipped_box[0], e)
            return None
        cost = sample_cost(sample, self.s)
        b = self.s.budgets
        limits = (("total", b.max_num_tokens_per_sample, "max_num_tokens_per_sample"),
                  ("vit", b.max_num_vit_tokens, "max_num_vit_tokens"),
                  ("latent", b.max_num_latent_tokens, "max_num_latent_tokens"),
                  ("vae_images", b.max_num_vae_images, "max_num_vae_images"),
                  ("text", b.max_num_text_tokens, "text rows (max_num_tokens - ViT - latent budgets)"),
                  ("ce", b.max_num_ce_tokens, "max_num_ce_tokens"))
        for key, limit, name in limits:
            if cost[key] > limit:
                err = BadSampleError(f"sample has {cost[key]} {key} tokens, more than {name} = {limit} "
                                     f"(data json: dataset_param.packed_parameters)", sample["where"])
                if not self.skip_bad_samples:
                    raise err
                skipped_box[0] += 1
                logger.warning("skipping too long sample (%d so far): %s", skipped_box[0], err)
                return None
        return sample, cost

    def _draw(self, stream_index, skipped_box, limit=10000):
        """The next good sample of one group (bad ones skipped when allowed)."""
        for _ in range(limit):
            ref = self.streams[stream_index].next()
            got = self._sample(ref, skipped_box)
            if got is not None:
                return ref, got
        raise RuntimeError(f"{self.s.groups[stream_index].where}: {limit} bad samples in a row")

    def _pack_one(self, batch_no, buffer, skipped):
        b = self.s.budgets
        rng = np.random.default_rng([self.s.data_seed, self.rank, batch_no])
        packer = Packer(self.s, self.special, rng)
        box = [skipped]
        buffer = list(buffer)
        for i, st in enumerate(self.streams):          # at least one sample of each mandatory group
            if self.s.groups[i].is_mandatory:
                ref, (sample, cost) = self._draw(i, box)
                if packer.fits(cost):
                    packer.add(sample, cost)
                else:
                    buffer.append((ref, (sample, cost)))
        while True:
            from_buffer = packer.curr < b.prefer_buffer_before and bool(buffer)
            if from_buffer:
                ref, got = buffer.pop(0)
                if got is None:                             # restored from a checkpoint: rebuild it
                    got = self._sample(ref, box)
                    if got is None:
                        continue
            else:
                g = int(np.searchsorted(self.cumprobs, rng.random(), side="right"))
                ref, got = self._draw(min(g, len(self.streams) - 1), box)
            sample, cost = got
            if not packer.fits(cost):
                if not from_buffer and len(buffer) < b.max_buffer_size:
                    buffer.append((ref, got))
                    continue
                buffer.insert(0, (ref, got)) if from_buffer else buffer.append((ref, got))
                if packer.num_samples == 0:
                    continue
                break
            packer.add(sample, cost)
            if packer.curr >= b.expected_num_tokens:
                break
        noise_rng = np.random.default_rng([self.s.data_seed, self.rank, batch_no, 1])
        posterior_rng = np.random.default_rng([self.s.data_seed, self.rank, batch_no, 2])
        inputs = padded_model_inputs(packer.batch(), self.config, b, noise_rng, self.s.vae_image_downsample,
                                     self.pad_token_id, posterior_rng=posterior_rng)
        inputs["num_samples"] = packer.num_samples
        return inputs, buffer, box[0]


def build_bagel_dataloader(data_cfg, config, micro_batch_size=1, seed=1234, rank=0, world_size=1, num_workers=None,
                           skip_bad_samples=False, options=None, **kwargs) -> BagelPackedLoader:
    """The training loader a BAGEL data json describes (the trainer's `Family.build_dataloader`)."""
    if micro_batch_size != 1:
        raise DataConfigError(f"--micro-batch-size {micro_batch_size}: a BAGEL micro batch is one packed sequence; "
                              f"use --micro-batch-size 1 and raise packed_parameters.max_num_tokens instead")
    settings = read_data_settings(data_cfg, options)
    if settings.max_latent_size > config.max_latent_size:
        raise DataConfigError(f"data json: max_latent_size {settings.max_latent_size} exceeds the model's "
                              f"max_latent_size {config.max_latent_size} (its latent position table)")
    if settings.max_num_patch_per_side > config.vit_max_num_patch_per_side:
        raise DataConfigError(f"data json: max_num_patch_per_side {settings.max_num_patch_per_side} exceeds the "
                              f"model's vit_max_num_patch_per_side {config.vit_max_num_patch_per_side}")
    if settings.vae_image_downsample != config.latent_downsample:
        raise DataConfigError(f"data json: vae_image_downsample {settings.vae_image_downsample} differs from the "
                              f"model's VAE downsample x latent_patch_size = {config.latent_downsample}")
    if settings.interpolate_pos is None:
        settings.interpolate_pos = bool(config.interpolate_pos)
    elif settings.interpolate_pos != config.interpolate_pos:
        raise DataConfigError(f"data json: dataset_param.basic_parameters.interpolate_pos {settings.interpolate_pos} "
                              f"differs from the model's interpolate_pos {config.interpolate_pos} (upstream sets "
                              f"both from one flag)")
    if settings.vit_patch_size != config.vit.patch_size:
        raise DataConfigError(f"data json: vit_patch_size {settings.vit_patch_size} differs from the model's "
                              f"{config.vit.patch_size}")
    prefetch = int((data_cfg.get("dataloader_param") or {}).get("prefetch_factor", 4))
    return BagelPackedLoader(settings, config, rank=rank, world_size=world_size, skip_bad_samples=skip_bad_samples,
                             prefetch=max(prefetch, num_workers or 0, 2))
