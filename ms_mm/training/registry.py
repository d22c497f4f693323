"""Model families the training engine can train, looked up by model.json's `model_id`.

The engine is model-agnostic: everything family-specific is one `ModelFamily` record — how to read
the model json into a config, build the Cell, build the data loader, which model-json switches
freeze which parameters, how many LLM tokens a batch holds (for --log-tps), which extra model
outputs become logged metrics (MoE aux loss, expert load ...) and which parallel sizes can split
the model. Families register themselves lazily (`register_lazy`) so importing the engine never
imports every model.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple


@dataclass
class ModelFamily:
    name: str                                    # checkpoint "family" tag, e.g. "qwen2_5_vl"
    model_ids: Tuple[str, ...]                   # model.json "model_id" values that select it
    config_from_model_json: Callable[[dict], Any]
    build_model: Callable[[Any, Any], Any]       # (config, compute dtype) -> nn.Cell; construct -> (loss, ...)
    input_names: Sequence[str]                   # order of the Cell's construct arguments
    # (data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples) ->
    # iterator of input dicts with state_dict() / load_state_dict() / .skipped
    build_dataloader: Callable[..., Any]
    # model-json path of a "freeze" switch -> parameter-name prefixes it freezes
    freeze_groups: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    count_tokens: Optional[Callable[[Mapping[str, Any]], int]] = None
    # model-json fields that list per-stage layer counts, for checking against the pp size
    pipeline_layer_keys: Tuple[str, ...] = ()
    # Extra numbers for the log line and TensorBoard. `metric_outputs`: indices of construct's outputs
    # (0 is the loss) the hook reads; `step_metrics(config, outputs, batch)` gets them as numpy arrays
    # with the micro-batch's host-side inputs and returns named scalars: a float, or a list of floats
    # (one per layer, say). The engine averages them over micro-batches, data-parallel ranks and the
    # log interval.
    metric_outputs: Tuple[int, ...] = ()
    step_metrics: Optional[Callable[[Any, Sequence[Any], Mapping[str, Any]], Dict[str, Any]]] = None
    # (config, TrainArgs) -> None; raises ValueError when the parallel sizes cannot split this model
    check_parallel_sizes: Optional[Callable[[Any, Any], None]] = None


_FAMILIES: Dict[str, ModelFamily] = {}
_LAZY: Dict[str, str] = {}   # model_id -> "module:attribute" that returns a ModelFamily


def register(family: ModelFamily) -> ModelFamily:
    for mid in family.model_ids:
        _FAMILIES[mid] = family
    return family


def register_lazy(model_id: str, target: str) -> None:
    _LAZY[model_id] = target


def known_model_ids():
    return sorted(set(_FAMILIES) | set(_LAZY))


def get_family(model_id: str, where: str = "model json") -> ModelFamily:
    if model_id not in _FAMILIES and model_id in _LAZY:
        module, _, attr = _LAZY[model_id].partition(":")
        register(getattr(importlib.import_module(module), attr)())
    if model_id not in _FAMILIES:
        raise KeyError(f"{where}: model_id {model_id!r} is not a known model family "
                       f"(known: {', '.join(known_model_ids())})")
    return _FAMILIES[model_id]


# MindSpeed-MM's model_id spellings, plus our own.
register_lazy("qwen2_5vl", "ms_mm.training.families:qwen2_5_vl_family")
register_lazy("qwen2_5_vl", "ms_mm.training.families:qwen2_5_vl_family")
register_lazy("deepseekvl2", "ms_mm.training.families:deepseek_vl2_family")
register_lazy("deepseek_vl2", "ms_mm.training.families:deepseek_vl2_family")
register_lazy("DeepSeek-VL2", "ms_mm.training.families:deepseek_vl2_family")
register_lazy("toy_vlm", "ms_mm.training.toy:toy_family")
