"""The one registry of model families: the only way an engine reaches a family.

A family is a package `ms_mm/models/<name>/` whose `family.py` defines `FAMILY`, a `Family`
record (below). Engines — training, parallel, data, convert — look a family up by any of its names
(`family`, a model.json `model_id`, the mm-convert converter name, an mm-parity name), by its
config class or by the content of a json, and get everything else from the record; they never
import a family module themselves. Family packages are found by walking `ms_mm.models` (imported
by name, on demand: `import ms_mm.registry` imports no family), plus any module named in the
environment variable `MS_MM_FAMILY_MODULES` (comma-separated, for families that live outside
this repository) or handed to `register`.

The record holds callables; `family.py` keeps its imports light (configs, no MindSpore) and imports
Cells, processors and plans inside the callables.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["Family", "EmbeddedDefault", "UnknownFamilyError", "register", "unregister", "get", "families", "family_of_config",
           "family_for_json", "family_for_dataset_type", "family_of_preset", "load_target", "lazy", "lazy_object",
           "FAMILY_MODULES_ENV"]

FAMILY_MODULES_ENV = "MS_MM_FAMILY_MODULES"


@dataclass
class EmbeddedDefault:
    """What the example scripts run on a machine without the weights they name.

    The family's `build_tiny` writes a tiny random model in the upstream HF layout; it is converted with
    the family's converter (with `trust_remote_code` as given), `write_demo(out_dir)` writes the bundled demo data
    (returning nothing; `demo_data_file` is the file whose presence means it is there) and
    `demo_data_json(demo_dir, hf_dir)` / `model_json(hf_dir, user_model_json)` the jsons the trainer
    is then given. `hf_dir_key` is the dotted data-json key that names the HF directory (tokenizer /
    processor source) of a real run; `hub` where real weights come from (for the one-line note).
    """
    name: str                                           # "Qwen2.5-VL-tiny": ckpt/{hf_path,mm_path}/<name>
    write_demo: Callable[[Any], Any]
    demo_dir: str                                       # "data/demo"
    demo_data_file: str
    demo_data_json: Callable[[Any, Any], dict]
    model_json: Callable[[Any, dict], dict]
    hf_dir_key: str = "dataset_param.preprocess_parameters.model_name_or_path"
    hub: str = ""
    trust_remote_code: bool = False                     # its converter wants --cfg.trust_remote_code True
    train_overrides: Mapping[str, Any] = field(default_factory=dict)   # trainer flags of the demo run
                                                        # ({"--micro-batch-size": 1, ...}; after the defaults)


@dataclass
class Family:
    """Everything the engines need to know about one model family.

    Config: `config_class` (a dataclass with `to_dict` / `from_dict` / `validate`), `config_from_json`
    (the one reader of every json form the family accepts: MindSpeed-MM model.json, HF config.json,
    our `to_dict()`, `{"preset": name, ...overrides}`; used by the trainer, the launcher and the dry
    run alike), `claims_json(dict)` (whether a json with no `model_id` is this family's), `presets`
    (dry-run preset name -> config).
    Model: `build_model(config, compute_dtype)` -> Cell whose `construct(*[inputs[k] for k in
    input_names])` returns `(loss, ...)`.
    Training: `build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers,
    skip_bad_samples)` -> iterator of input dicts with `state_dict` / `load_state_dict` / `.skipped`;
    `freeze_groups` (model-json path of a `freeze` switch -> parameter-name prefixes); `count_tokens`
    (LLM tokens of a batch, for --log-tps); `metric_outputs` / `step_metrics(config, outputs, batch)`
    (extra logged numbers from construct's outputs); `check_parallel_sizes(config, train_args)`.
    Parallel: `parallel_plan()` -> the plan object (`check`, `check_batch`, `apply`); `sample_axes` and
    `dp_slice` feed each data-parallel rank its own samples;
    `synthetic_batch(config, batch_size, seq_len)` -> model inputs for the dry run.
    Data: `dataset_types` are the data-json `dataset_param.dataset_type` values the family's
    `build_dataloader` reads (`ms_mm.data.build_dataloader` dispatches on them).
    Conversion: `adapter` names the module holding the `convert.spec.FamilySpec` `SPEC`; `converter`
    is its mm-convert name. Parity: `parity` maps mm-parity names to runners
    `(hf_dir, inputs, grad_names) -> {key: array}`. Tiny models: `build_tiny(out_dir, seed, assets=None,
    **options) -> Path` writes a random tiny checkpoint in the upstream layout (`python -m convert.tiny
    NAME`); `tiny_flags` maps extra CLI switches to builder options: `{"--mha": ("mla", False, help)}`.
    """
    name: str
    title: str = ""                                     # "Qwen2.5-VL", for messages
    model_ids: Tuple[str, ...] = ()
    dataset_types: Tuple[str, ...] = ()                 # data-json dataset_type values ("" = none given)
    converter: str = ""
    adapter: str = ""                                   # "adapters.<name>" (module with SPEC)
    config_class: Optional[type] = None
    config_from_json: Optional[Callable[[dict], Any]] = None
    claims_json: Callable[[dict], bool] = lambda data: False
    presets: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    build_model: Optional[Callable[[Any, Any], Any]] = None
    input_names: Sequence[str] = ()
    build_dataloader: Optional[Callable[..., Any]] = None
    freeze_groups: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    count_tokens: Optional[Callable[[Mapping[str, Any]], int]] = None
    metric_outputs: Tuple[int, ...] = ()
    step_metrics: Optional[Callable[[Any, Sequence[Any], Mapping[str, Any]], Dict[str, Any]]] = None
    check_parallel_sizes: Optional[Callable[[Any, Any], None]] = None
    parallel_plan: Optional[Callable[[], Any]] = None
    synthetic_batch: Optional[Callable[[Any, int, int], Dict[str, Any]]] = None
    # per-rank data on the sharded path: `sample_axes` {input name: axis its samples lie along} (0 when not
    # named); `dp_slice(inputs, dp_rank, dp, config)` turns a data-parallel rank's own inputs into its slice
    # of the global batch (indices into concatenated tensors made global). None: on the sharded path every
    # rank reads the whole global micro batch and the plan cuts its rows (no per-rank form).
    sample_axes: Mapping[str, int] = field(default_factory=dict)
    dp_slice: Optional[Callable[[Dict[str, Any], int, int, Any], Dict[str, Any]]] = None
    parity: Mapping[str, Callable[..., Dict[str, Any]]] = field(default_factory=dict)
    build_tiny: Optional[Callable[..., Any]] = None
    tiny_flags: Mapping[str, Tuple[str, Any, str]] = field(default_factory=dict)
    embedded_default: Optional[EmbeddedDefault] = None
    # training extras (all optional): `extra_flags` are the family's own trainer flags ({"--flag": (type,
    # help)}, parsed after the model json names the family, handed as `options` {dest: value} to
    # `apply_flags(config, options) -> config` and to `build_dataloader(..., options=...)`); `ema_decay`
    # the default decay of the weights' EMA (0: none unless --ema); `log_line(iteration, metrics,
    # steps_per_sec) -> str` a second log line in the upstream recipe's format.
    extra_flags: Mapping[str, Tuple[Callable[[str], Any], str]] = field(default_factory=dict)
    apply_flags: Optional[Callable[[Any, Dict[str, Any]], Any]] = None
    ema_decay: float = 0.0
    log_line: Optional[Callable[[int, Dict[str, Any], float], str]] = None
    package: str = ""                                   # the family's folder (set by `register`)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, *self.model_ids, *((self.converter,) if self.converter else ()),
                                    *self.parity)))

    def spec(self):
        """The conversion spec (`convert.spec.FamilySpec`) of this family."""
        if not self.adapter:
            raise UnknownFamilyError(f"model family {self.name!r} has no converter")
        return importlib.import_module(self.adapter).SPEC


class UnknownFamilyError(KeyError):
    def __str__(self):   # KeyError would quote the message
        return str(self.args[0])


_REGISTERED: Dict[str, Family] = {}      # family name -> record
_SCANNED = False
_IMPORT_ERRORS: Dict[str, str] = {}


def load_target(target: str):
    """`"package.module:attribute"` (or a module alone) -> the object."""
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def lazy(target: str) -> Callable[..., Any]:
    """A stand-in for the callable `"module:attribute"` that imports it on the first call, so a
    `family.py` can name its Cells, processors and plans without importing MindSpore."""
    def call(*args, **kwargs):
        return load_target(target)(*args, **kwargs)

    call.__name__ = call.__qualname__ = target
    return call


def lazy_object(target: str) -> Callable[[], Any]:
    """A zero-argument callable returning the object `"module:attribute"` (imported then)."""
    def get():
        return load_target(target)

    get.__name__ = get.__qualname__ = target
    return get


def register(family_or_module) -> Family:
    """Add a family: a `Family`, or the name of a module defining `FAMILY` (or `FAMILIES`, a list of
    records, for a folder holding more than one: a model and its image tokenizer, say). Returns the
    (first) record."""
    records = [family_or_module]
    package = ""
    if isinstance(family_or_module, str):
        module = importlib.import_module(family_or_module)
        records = list(getattr(module, "FAMILIES", None) or [getattr(module, "FAMILY")])
        package = family_or_module.rpartition(".")[0]
    for family in records:
        if not isinstance(family, Family):
            raise TypeError(f"{family_or_module!r} does not define ms_mm.registry.Family records")
        if package and not family.package:
            family.package = package
        _REGISTERED[family.name] = family
    return records[0]


def unregister(name: str) -> None:
    """Forget a registered family (a test's throwaway one, say); unknown names are ignored."""
    _REGISTERED.pop(name, None)


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    modules: List[str] = []
    models = importlib.import_module("ms_mm.models")
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        if info.ispkg and not info.name.startswith("_"):
            modules.append(f"{models.__name__}.{info.name}.family")
    modules += [m.strip() for m in os.environ.get(FAMILY_MODULES_ENV, "").split(",") if m.strip()]
    for module in modules:
        try:
            register(module)
        except ModuleNotFoundError as e:
            if e.name != module:          # the family module exists but imports something missing
                _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - reported with the lookup error, never swallowed silently
            _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"


def families() -> List[Family]:
    _scan()
    return sorted(_REGISTERED.values(), key=lambda f: f.name)


def _unknown(name: str, what: str) -> UnknownFamilyError:
    listing = ", ".join(f"{f.name} ({', '.join(n for n in f.names if n != f.name)})" if len(f.names) > 1 else f.name
                        for f in families())
    msg = f"{what} {name!r} is not a known model family; known: {listing or 'none'}"
    if _IMPORT_ERRORS:
        msg += "; family modules that failed to import: " + "; ".join(f"{k}: {v}" for k, v in _IMPORT_ERRORS.items())
    return UnknownFamilyError(msg)


def get(name: str, what: str = "name") -> Family:
    """The family one of whose names (family, model_id, converter or parity name) is `name`."""
    if isinstance(name, Family):
        return name
    for family in families():
        if name in family.names:
            return family
    raise _unknown(name, what)


def family_of_config(config) -> Family:
    for family in families():
        if family.config_class is not None and isinstance(config, family.config_class):
            return family
    raise _unknown(type(config).__name__, "config class")


def family_of_preset(name: str) -> Optional[Family]:
    for family in families():
        if name in family.presets:
            return family
    return None


def family_for_dataset_type(dataset_type: str) -> Family:
    for family in families():
        if dataset_type in family.dataset_types:
            return family
    known = sorted(t for f in families() for t in f.dataset_types if t)
    raise UnknownFamilyError(f"data json: dataset_param.dataset_type {dataset_type!r} is not read by any model "
                             f"family (known: {', '.join(known)})")


def family_for_json(data: Mapping[str, Any], where: str = "model json") -> Family:
    """The family of a config json: by its `model_id` when it has one, else the family that claims it."""
    model_id = data.get("model_id")
    if model_id:
        return get(str(model_id), f"{where}: model_id")
    claimed = [f for f in families() if f.claims_json(dict(data))]
    if len(claimed) == 1:
        return claimed[0]
    if claimed:
        raise UnknownFamilyError(f"{where}: the json could be {' or '.join(f.name for f in claimed)}; "
                                 f"add a \"model_id\" to say which")
    raise UnknownFamilyError(f"{where}: no model family reads this json (no \"model_id\", and its keys "
                             f"{sorted(data)[:8]} match no family's config form)")
