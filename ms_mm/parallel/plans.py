"""Parallelize plans, looked up through the family registry.

A plan is an object with ``family``, ``check(parallel_config, model_config)`` (raise
``ParallelConfigError`` naming the size and shape that do not fit), ``check_batch(parallel_config,
batch_size, seq_len)`` and ``apply(model, parallel_config)`` (attach shard strategies / pipeline
stages to the model's Cells, in place, and return the model). Each family's lives in
``ms_mm/models/<family>/parallelize.py`` and is named by its record (``Family.parallel_plan``).
"""
from __future__ import annotations

from ms_mm import registry


class DataParallelPlan:
    """The plan of a family without one of its own, for data parallel + the distributed optimizer
    only (tp = pp = ep = cp = 1): no strategies are attached, so MindSpore's semi-auto parallel runs
    every operator data parallel over the rows of the global batch and shards the optimizer (and the
    weights it updates) over dp."""

    def __init__(self, family: str):
        self.family = family

    def check(self, pc, model_config) -> None:
        from ms_mm.parallel.errors import ParallelConfigError

        if (pc.tp, pc.pp, pc.ep, pc.cp) != (1, 1, 1, 1):
            raise ParallelConfigError(f"the {self.family} family has no tensor / pipeline / expert parallel plan: "
                                      f"tp {pc.tp}, pp {pc.pp}, ep {pc.ep}, cp {pc.cp} must all be 1 (data parallel "
                                      f"with the distributed optimizer is what it supports)")

    def check_batch(self, pc, batch_size: int, seq_len: int) -> None:
        from ms_mm.parallel.sharding import check_batch_rows

        check_batch_rows(pc, batch_size, seq_len)

    def apply(self, model, pc):
        return model


def plan_for_config(model_config):
    family = registry.family_of_config(model_config)
    if family.parallel_plan is None:
        return DataParallelPlan(family.name)
    return family.parallel_plan()


def plan_for_model(model):
    return plan_for_config(model.config)


def parallelize(model, parallel_config):
    """Check ``parallel_config`` against ``model.config`` and apply the family's plan (in place)."""
    plan = plan_for_model(model)
    plan.check(parallel_config, model.config)
    return plan.apply(model, parallel_config)
