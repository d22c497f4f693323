"""Parallelize plans, looked up through the family registry.

A plan is an object with ``family``, ``check(parallel_config, model_config)`` (raise
``ParallelConfigError`` naming the size and shape that do not fit), ``check_batch(parallel_config,
batch_size, seq_len)`` and ``apply(model, parallel_config)`` (attach shard strategies / pipeline
stages to the model's Cells, in place, and return the model). Each family's lives in
``ms_mm/models/<family>/parallelize.py`` and is named by its record (``Family.parallel_plan``).
"""
from __future__ import annotations

from ms_mm import registry


def plan_for_config(model_config):
    family = registry.family_of_config(model_config)
    if family.parallel_plan is None:
        raise NotImplementedError(f"no parallel plan for the {family.name} family")
    return family.parallel_plan()


def plan_for_model(model):
    return plan_for_config(model.config)


def parallelize(model, parallel_config):
    """Check ``parallel_config`` against ``model.config`` and apply the family's plan (in place)."""
    plan = plan_for_model(model)
    plan.check(parallel_config, model.config)
    return plan.apply(model, parallel_config)
