"""The one converter loop: HF checkpoint ⇄ MM checkpoint for any family spec, tensor by tensor.

* `HFCheckpoint` — a lazily opened HF weight dir (single file or sharded with
  `model.safetensors.index.json`); names are canonicalised with the spec's aliases.
* `hf_to_mm` / `mm_to_hf` / `resplit` — the three `mm-convert` actions. Everything is planned
  from the safetensors headers first (names, shapes, dtypes: missing, mis-shaped and leftover
  tensors are all reported before a byte is written), then each output tensor is produced from
  its parts, written and dropped. Peak memory is about one fused tensor plus its parts.
* `load_hf_as_mm` / `mm_state_to_hf` (`mm_grads_to_hf`) — the same rules on in-memory dicts,
  for parity tests and `mm-parity`.

Family specifics live in `adapters/<family>.py` (see `convert/spec.py` for the format); the
MM directory format lives in `ms_mm/training/mm_checkpoint.py`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from convert.spec import FamilySpec, Rule, SpecError, expand_rules
from convert.registry import get_spec
from ms_mm.training.mm_checkpoint import (
    BF16, CheckpointError, LazyTensor, ParallelLayout, SafetensorsFile, SafetensorsWriter, open_model,
    save_model, to_float32,
)

__all__ = ["ConversionError", "RemoteCodeNotTrusted", "HFCheckpoint", "check_trust_remote_code", "custom_model_types",
           "read_hf_config", "make_layout", "hf_to_mm", "mm_to_hf", "resplit", "load_hf_as_mm", "mm_state_to_hf",
           "mm_grads_to_hf", "normalize_pp_layers"]

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default max_shard_size ("5GB")


class ConversionError(ValueError):
    """Bad converter input; the message names the file, tensor or argument."""


class RemoteCodeNotTrusted(ConversionError):
    """config.json names a custom-code model type and trust_remote_code was not given."""


def custom_model_types(spec: FamilySpec) -> Tuple[str, ...]:
    """config.json model types of `spec` that need trust_remote_code (see `FamilySpec`)."""
    return tuple(spec.custom_model_types or ())


def check_trust_remote_code(spec: FamilySpec, hf_config: Mapping[str, Any], hf_dir, trust_remote_code: bool) -> None:
    """MindSpeed-MM's rule, kept for the user's sake: a checkpoint whose config.json names a
    custom-code model type is converted only after the user said they trust it. ms-mm itself reads
    config.json as data and never imports or runs code from the checkpoint, whatever the flag."""
    model_type = hf_config.get("model_type") if isinstance(hf_config, Mapping) else None
    if trust_remote_code or model_type not in custom_model_types(spec):
        return
    raise RemoteCodeNotTrusted(
        f"{Path(hf_dir) / 'config.json'} has model_type {model_type!r}, a custom-code model that transformers "
        f"loads only with trust_remote_code (MindSpeed-MM's {spec.converter} needs it too); after checking that "
        f"the checkpoint comes from a source you trust, pass --cfg.trust_remote_code True. ms-mm only reads "
        f"config.json and the safetensors as data: no code from the checkpoint is imported or run either way")


def _fmt_list(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# HF side
# ---------------------------------------------------------------------------------------------

def read_hf_config(hf_dir, spec: Optional[FamilySpec] = None) -> Dict[str, Any]:
    """The checkpoint's config as one dict: `config.json`, or what the spec's `read_hf_config` hook
    assembles (families whose release splits the config over several files)."""
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"HF directory {hf_dir} does not exist")
    if spec is not None and spec.read_hf_config is not None:
        return spec.read_hf_config(Path(hf_dir))
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found (the HF directory needs its config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


class HFCheckpoint:
    """The tensors of an HF weight directory, opened lazily, under canonical HF names."""

    def __init__(self, hf_dir, spec: FamilySpec):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: malformed index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no *.safetensors weights found in {self.dir}")
        self._where: Dict[str, Tuple[SafetensorsFile, str]] = OrderedDict()
        for fname in files:
            if not (self.dir / fname).is_file():
                raise ConversionError(f"{index} lists {fname}, which is missing from {self.dir}")
            f = SafetensorsFile(self.dir / fname)
            for name in f.keys():
                canon = spec.canonical_hf_name(name)
                if canon in self._where:
                    other_file, other = self._where[canon]
                    raise ConversionError(f"tensor {canon!r} appears twice: {other!r} in {other_file.path.name} "
                                          f"and {name!r} in {fname}")
                self._where[canon] = (f, name)

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def shape(self, name):
        f, n = self._where[name]
        return f.shape(n)

    def dtype(self, name):
        f, n = self._where[name]
        return f.dtype(n)

    def get(self, name) -> np.ndarray:
        f, n = self._where[name]
        return f.get(n)

    def source(self, name) -> str:
        f, n = self._where[name]
        return f"{n!r} in {f.path}"


def _rules_for(spec: FamilySpec, config) -> List[Rule]:
    return expand_rules(spec.rules(config), spec.layer_counts(config))


def _plan_hf_to_mm(spec: FamilySpec, config, hf: HFCheckpoint) -> "OrderedDict[str, LazyTensor]":
    """Check every HF tensor against the spec (from headers only) and return lazy MM tensors."""
    rules = _rules_for(spec, config)
    missing = [h for r in rules for h in r.hf if h not in hf]
    if missing:
        raise ConversionError(f"{hf.dir}: missing tensor(s) required by the {spec.family} config: "
                              f"{_fmt_list(missing)}")
    used = {h for r in rules for h in r.hf}
    leftover = [k for k in hf.keys() if k not in used]
    if leftover:
        raise ConversionError(f"{hf.dir}: unexpected tensor(s) not covered by the {spec.family} spec "
                              f"(does config.json match the weights?): {_fmt_list(leftover)}")
    plan: "OrderedDict[str, LazyTensor]" = OrderedDict()
    for r in rules:
        shapes = [tuple(hf.shape(h)) for h in r.hf]
        if r.hf_shapes is not None:
            for h, got, want in zip(r.hf, shapes, r.hf_shapes):
                if tuple(got) != tuple(want):
                    raise ConversionError(f"tensor {hf.source(h)} has shape {list(got)}, but config.json "
                                          f"implies {list(want)}")
        dtypes = {hf.dtype(h) for h in r.hf}
        if len(dtypes) != 1:
            raise ConversionError(f"tensors {list(r.hf)} (fused into {r.mm!r}) have different dtypes {dtypes}")
        try:
            mm_shape = r.layout.mm_shape(shapes)
        except SpecError as e:
            raise ConversionError(f"cannot fuse {list(r.hf)} into {r.mm!r}: {e}") from e
        plan[r.mm] = LazyTensor(mm_shape, dtypes.pop(),
                                lambda r=r: r.layout.to_mm([hf.get(h) for h in r.hf]))
    return plan


# ---------------------------------------------------------------------------------------------
# layout arguments
# ---------------------------------------------------------------------------------------------

def normalize_pp_layers(value, what: str) -> Optional[List[int]]:
    """Accept [1,10,10,7] or [[1,10,10,7]] (one virtual-pipeline chunk); None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != 1:
            raise ConversionError(f"{what}: {len(value)} virtual-pipeline chunks given ({value}); only one "
                                  f"pipeline chunk per stage is supported")
        value = value[0]
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConversionError(f"{what}: expected a list of non-negative layer counts like [1,10,10,7], got {value!r}")
    return list(value)


def spec_tp_rules(spec: FamilySpec, config) -> List[Tuple[str, str]]:
    """The family's TP split rules for `config` (a list, or a function of the config; None = defaults)."""
    rules = spec.tp_rules(config) if callable(spec.tp_rules) else spec.tp_rules
    return list(rules) if rules is not None else ParallelLayout().tp_rules


def make_layout(spec: FamilySpec, config, tp_size: int = 1,
                pp_layers: Optional[Mapping[str, Any]] = None, ep_size: int = 1) -> ParallelLayout:
    """Validate the parallel arguments against the model and build its `ParallelLayout`."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ConversionError(f"tp_size must be a positive integer, got {tp_size!r}")
    counts = spec.layer_counts(config)
    pp_layers = {k: v for k, v in (pp_layers or {}).items() if v is not None}
    for key in pp_layers:
        if key not in spec.pp_modules:
            raise ConversionError(f"{key}_pp_layers given, but {spec.family} pipelines only "
                                  f"{sorted(spec.pp_modules) or 'nothing'}")
    norm = {k: normalize_pp_layers(v, f"{k}_pp_layers") for k, v in pp_layers.items()}
    if norm:
        n_stages = {len(v) for v in norm.values()}
        if len(n_stages) > 1:
            raise ConversionError("pipeline layer lists have different numbers of stages: "
                                  + ", ".join(f"{k}_pp_layers={v}" for k, v in norm.items()))
        pp = n_stages.pop()
        for key, (count_key, human) in spec.pp_modules.items():
            norm.setdefault(key, [counts[count_key]] + [0] * (pp - 1))
    for key, v in norm.items():
        count_key, human = spec.pp_modules[key]
        if sum(v) != counts[count_key]:
            raise ConversionError(f"{key}_pp_layers {v} sums to {sum(v)}, but the {human} has "
                                  f"{counts[count_key]} layers")
    if tp_size > 1:
        for what, n in spec.tp_checks(config):
            if n % tp_size:
                raise ConversionError(f"tp_size {tp_size} does not divide the {what} = {n}")
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConversionError(f"ep_size must be a positive integer, got {ep_size!r}")
    layout = ParallelLayout(tp_size=tp_size, pp_layers=norm, family=spec.family,
                            tp_rules=spec_tp_rules(spec, config),
                            pp_stages=spec.pp_stages or ParallelLayout().pp_stages,
                            tied=[list(t) for t in spec.tied_copies(config)], ep_size=ep_size)
    if ep_size > 1:  # checked on the config, before anything is read or written
        experts = [r for r in _rules_for(spec, config) if layout.is_expert(r.mm)]
        if not experts:
            raise ConversionError(f"ep_size {ep_size} given but the model has no expert tensors (no "
                                  f"{spec.family} tensor name matches {layout.expert_pattern})")
        counts = {r.layout.mm_shape(r.hf_shapes)[0] for r in experts if r.hf_shapes}
        if len(counts) == 1:
            n = counts.pop()
            if n % ep_size:
                raise ConversionError(f"ep_size {ep_size} does not divide the number of routed experts {n}"
                                      f" (each EP rank must hold the same number of experts)")
            layout.num_experts = n
    return layout


# ---------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------

def hf_to_mm(hf_dir, mm_dir, family: Union[str, FamilySpec], tp_size: int = 1,
             pp_layers: Optional[Mapping[str, Any]] = None, iteration: Union[str, int] = "release",
             ep_size: int = 1, trust_remote_code: bool = False) -> Path:
    """Convert an HF weight dir into `mm_dir/<iteration>/...` (+ latest_checkpointed_iteration.txt).

    `ep_size` > 1 deals the routed experts out to EP ranks: the stacked expert tensors [E, ...] are cut on
    dim 0, experts [r·E/ep, (r+1)·E/ep) to EP rank r. `trust_remote_code=False` (the default, as in MindSpeed-MM) refuses
    custom-code model types (`check_trust_remote_code`); nothing from the checkpoint is ever executed.
    """
    spec = get_spec(family)
    hf_config = read_hf_config(hf_dir, spec)
    check_trust_remote_code(spec, hf_config, hf_dir, trust_remote_code)
    config = spec.config_from_hf(hf_config)
    layout = make_layout(spec, config, tp_size, pp_layers, ep_size)
    plan = _plan_hf_to_mm(spec, config, HFCheckpoint(hf_dir, spec))
    try:
        return save_model(mm_dir, plan, layout, iteration, metadata={"format": "ms-mm", "family": spec.family})
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def _copy_extra_files(spec: FamilySpec, hf_dir: Path, out: Path) -> None:
    for p in sorted(hf_dir.iterdir()):
        if not p.is_file() or p.name == INDEX_FILE or p.name.endswith(".safetensors"):
            continue
        if any(fnmatch.fnmatch(p.name, pat) for pat in spec.hf_extra_files):
            shutil.copy2(p, out / p.name)


def check_layout_args(layout: ParallelLayout, tp_size, pp_layers, mm_dir, ep_size=None) -> None:
    """If the user restated the parallel config, it must match what the checkpoint says."""
    if tp_size is not None and tp_size != layout.tp_size:
        raise ConversionError(f"--cfg.parallel_config.tp_size {tp_size} does not match tp_size "
                              f"{layout.tp_size} recorded in {mm_dir}")
    if ep_size is not None and ep_size != layout.ep_size:
        raise ConversionError(f"--cfg.parallel_config.ep_size {ep_size} does not match ep_size "
                              f"{layout.ep_size} recorded in {mm_dir}")
    for key, value in (pp_layers or {}).items():
        if value is None:
            continue
        want = normalize_pp_layers(value, f"{key}_pp_layers")
        have = layout.pp_layers.get(key, None)
        if have is None and len(want) == 1:
            continue
        if want != have:
            raise ConversionError(f"--cfg.parallel_config.{key}_pp_layers {want} does not match {have} "
                                  f"recorded in {mm_dir}")


def mm_to_hf(mm_dir, hf_dir, save_hf_dir, family: Union[str, FamilySpec], tp_size: Optional[int] = None,
             pp_layers: Optional[Mapping[str, Any]] = None, iteration: Union[str, int, None] = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, ep_size: Optional[int] = None,
             trust_remote_code: bool = False) -> Path:
    """Write an MM checkpoint (merged over TP/PP) back as HF safetensors into `save_hf_dir`.

    `hf_dir` supplies config.json (the shapes) and the tokenizer/processor files copied along.
    Output uses the family's canonical HF names, sharded like transformers above `max_shard_bytes`.
    """
    spec = get_spec(family)
    hf_dir, save_hf_dir = Path(hf_dir), Path(save_hf_dir)
    hf_config = read_hf_config(hf_dir, spec)
    check_trust_remote_code(spec, hf_config, hf_dir, trust_remote_code)
    config = spec.config_from_hf(hf_config)
    try:
        reader = open_model(mm_dir, iteration)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    check_layout_args(reader.layout, tp_size, pp_layers, mm_dir, ep_size)
    rules = _rules_for(spec, config)
    missing = [r.mm for r in rules if r.mm not in reader]
    if missing:
        raise ConversionError(f"{reader.iter_dir}: missing tensor(s) required by config.json in {hf_dir}: "
                              f"{_fmt_list(missing)}")
    tied_dst = {dst for _, dst in spec.tied_copies(config)}
    used = {r.mm for r in rules}
    leftover = [k for k in reader.keys() if k not in used and k not in tied_dst]
    if leftover:
        raise ConversionError(f"{reader.iter_dir}: unexpected tensor(s) not in the {spec.family} spec for "
                              f"{hf_dir / 'config.json'}: {_fmt_list(leftover)}")
    # plan every HF tensor (name, shape, dtype) before writing anything
    planned: List[Tuple[Rule, List[Tuple[str, Tuple[int, ...], np.dtype]]]] = []
    for r in rules:
        shape = tuple(reader.shape(r.mm))
        if r.hf_shapes is not None:
            want = r.layout.mm_shape(r.hf_shapes)
            if shape != tuple(want):
                raise ConversionError(f"{reader.iter_dir}: tensor {r.mm!r} has shape {list(shape)}, but "
                                      f"config.json implies {list(want)}")
        dtype = reader.dtype(r.mm)
        planned.append((r, [(h, s, dtype) for h, s in zip(r.hf, r.layout.hf_shapes(shape))]))
    # shard assignment in write order: each shard is a contiguous run of tensors
    shards: List[List[Tuple[str, Tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    total = 0
    file_names: List[str] = []  # with spec.hf_weight_file: one shard per named file, no index
    for _, parts in planned:
        for h, s, dt in parts:
            nbytes = int(np.prod(s, dtype=np.int64)) * np.dtype(dt).itemsize
            if spec.hf_weight_file is not None:
                fname = spec.hf_weight_file(h)
                if fname not in file_names:
                    file_names.append(fname)
                    if len(file_names) > len(shards):
                        shards.append([])
                shards[file_names.index(fname)].append((h, s, dt))
            else:
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append((h, s, dt))
                size += nbytes
            total += nbytes
    n = len(shards)
    if file_names:
        names = file_names
    else:
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {h: i for i, shard in enumerate(shards) for h, _, _ in shard}
    remaining = [len(s) for s in shards]

    save_hf_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = save_hf_dir.parent / f".tmp_{save_hf_dir.name}_{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    writers: Dict[int, SafetensorsWriter] = {}
    try:
        for r, parts in planned:
            hf_parts = r.layout.to_hf(reader.get(r.mm))
            for (h, _, _), arr in zip(parts, hf_parts):
                i = shard_of[h]
                if i not in writers:
                    writers[i] = SafetensorsWriter(stage / names[i], shards[i], {"format": "pt"})
                writers[i].write(h, arr)
                remaining[i] -= 1
                if remaining[i] == 0:
                    writers.pop(i).close()
            del hf_parts
        if n > 1 and not file_names:
            index = {"metadata": {"total_size": total}, "weight_map": {h: names[shard_of[h]] for h in shard_of}}
            (stage / INDEX_FILE).write_text(json.dumps(index, indent=2))
        _copy_extra_files(spec, hf_dir, stage)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # commit: a fresh dir is renamed into place; into an existing dir files are replaced one by one
    # and stale weight shards of an earlier conversion are removed
    if not save_hf_dir.exists():
        os.replace(stage, save_hf_dir)
    else:
        for p in save_hf_dir.iterdir():
            if p.is_file() and (p.name.endswith(".safetensors") or p.name == INDEX_FILE) \
                    and not (stage / p.name).exists():
                p.unlink()
        for p in stage.iterdir():
            os.replace(p, save_hf_dir / p.name)
        stage.rmdir()
    return save_hf_dir


def resplit(source_dir, target_dir, tp_size: int = 1, pp_layers: Optional[Mapping[str, Any]] = None,
            iteration: Union[str, int, None] = None, family: Union[str, FamilySpec, None] = None,
            ep_size: int = 1) -> Path:
    """Re-split an MM checkpoint to a new TP size / pipeline split (same iteration name)."""
    try:
        reader = open_model(source_dir, iteration)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    src = reader.layout
    spec = get_spec(family or src.family) if (family or src.family) else None
    norm = {k: normalize_pp_layers(v, f"target {k}_pp_layers") for k, v in (pp_layers or {}).items() if v is not None}
    if norm:
        pp = {len(v) for v in norm.values()}
        if len(pp) > 1:
            raise ConversionError(f"target pipeline layer lists have different numbers of stages: {norm}")
        pp = pp.pop()
    for key, v in norm.items():
        have = src.pp_layers.get(key)
        total = sum(have) if have else _count_layers(reader, src, key)
        if sum(v) != total:
            human = spec.pp_modules.get(key, (key, key))[1] if spec else key
            raise ConversionError(f"target {key}_pp_layers {v} sums to {sum(v)}, but the {human} in "
                                  f"{source_dir} has {total} layers")
    for key, v in src.pp_layers.items():
        if norm and key not in norm:
            norm[key] = [sum(v)] + [0] * (pp - 1)
    try:
        layout = ParallelLayout(tp_size=tp_size, pp_layers=norm, family=src.family, tp_rules=src.tp_rules,
                                pp_stages=src.pp_stages, tied=src.tied, ep_size=ep_size,
                                expert_pattern=src.expert_pattern)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    it = iteration if iteration is not None else reader.iter_dir.name
    it = "release" if it == "release" else int(str(it).replace("iter_", ""))
    state = OrderedDict((k, reader.lazy(k)) for k in reader.keys())
    try:
        return save_model(target_dir, state, layout, it, metadata={"format": "ms-mm", "family": src.family})
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def _count_layers(reader, layout: ParallelLayout, key: str) -> int:
    prefix = next((s["layers"] for s in layout.pp_stages if s["key"] == key), None)
    if prefix is None:
        raise ConversionError(f"{key}_pp_layers: the checkpoint's layout has no pipeline module {key!r}")
    idx = {int(k[len(prefix):].split(".")[0]) for k in reader.keys() if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# ---------------------------------------------------------------------------------------------
# in-memory helpers (parity)
# ---------------------------------------------------------------------------------------------

def load_hf_as_mm(hf_dir, family: Union[str, FamilySpec, None] = None,
                  dtype: Optional[np.dtype] = np.float32) -> Tuple[Any, Dict[str, np.ndarray]]:
    """(model config, {MM name: array}) from an HF dir; floats widened to `dtype` (None keeps them).
    `family` defaults to the family whose config form the directory's `config.json` is."""
    if family is None:
        from ms_mm import registry

        family = registry.family_for_json(read_hf_config(hf_dir), f"{Path(hf_dir) / 'config.json'}").name
    spec = get_spec(family)
    config = spec.config_from_hf(read_hf_config(hf_dir, spec))
    plan = _plan_hf_to_mm(spec, config, HFCheckpoint(hf_dir, spec))
    out = {}
    for name, lazy in plan.items():
        arr = lazy.load()
        if dtype is not None and (arr.dtype == BF16 or np.issubdtype(arr.dtype, np.floating)):
            arr = to_float32(arr).astype(dtype, copy=False)
        out[name] = np.ascontiguousarray(arr)
    return config, out


def mm_state_to_hf(family: Union[str, FamilySpec], config, mm_state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """MM-named arrays (weights or their gradients) → canonical HF names; fused tensors are split."""
    spec = get_spec(family)
    rules = {r.mm: r for r in _rules_for(spec, config)}
    unknown = [k for k in mm_state if k not in rules]
    if unknown:
        raise ConversionError(f"no {spec.family} rule maps MM tensor(s) {_fmt_list(unknown)} to HF names")
    out = {}
    for name, value in mm_state.items():
        r = rules[name]
        arr = np.asarray(value)
        try:
            parts = r.layout.to_hf(arr)
        except SpecError as e:
            raise ConversionError(f"MM tensor {name!r} {list(arr.shape)}: {e}") from e
        if r.hf_shapes is not None:
            for h, p, want in zip(r.hf, parts, r.hf_shapes):
                if tuple(p.shape) != tuple(want):
                    raise ConversionError(f"MM tensor {name!r} has shape {list(arr.shape)}; its HF part {h!r} "
                                          f"would be {list(p.shape)}, config implies {list(want)}")
        out.update(zip(r.hf, (np.ascontiguousarray(p) for p in parts)))
    return out


def mm_grads_to_hf(family: Union[str, FamilySpec], config, mm_grads: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Gradients w.r.t. MM parameters → gradients w.r.t. the HF checkpoint tensors (exact splits)."""
    return mm_state_to_hf(family, config, mm_grads)
