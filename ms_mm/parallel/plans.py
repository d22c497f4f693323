"""The registry of parallelize plans, one per model family.

A plan is an object with ``family``, ``check(parallel_config, model_config)`` (raise
``ParallelConfigError`` naming the size and shape that do not fit) and
``apply(model, parallel_config)`` (attach shard strategies / pipeline stages to the model's
Cells, in place, and return the model). Families register by config and model class name:
Qwen2.5-VL (``qwen2_5_vl.py``: dp, tp, pp) and DeepSeek-VL2 (``deepseek_vl2.py``: dp, tp, ep).
"""
from __future__ import annotations

import importlib

# config / model class name -> module holding PLAN
_PLAN_MODULES = {
    "Qwen2_5_VLConfig": "ms_mm.parallel.qwen2_5_vl",
    "Qwen2_5_VLForConditionalGeneration": "ms_mm.parallel.qwen2_5_vl",
    "DeepseekVL2Config": "ms_mm.parallel.deepseek_vl2",
    "DeepseekVL2ForCausalLM": "ms_mm.parallel.deepseek_vl2",
}


def _plan(name: str):
    if name not in _PLAN_MODULES:
        raise NotImplementedError(f"no parallel plan for {name}; plans exist for {sorted(_PLAN_MODULES)}")
    return importlib.import_module(_PLAN_MODULES[name]).PLAN


def plan_for_config(model_config):
    return _plan(type(model_config).__name__)


def plan_for_model(model):
    return _plan(type(model).__name__)


def parallelize(model, parallel_config):
    """Check ``parallel_config`` against ``model.config`` and apply the family's plan (in place)."""
    plan = plan_for_model(model)
    plan.check(parallel_config, model.config)
    return plan.apply(model, parallel_config)
