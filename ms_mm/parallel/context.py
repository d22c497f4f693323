"""MindSpore's auto-parallel context for a ParallelConfig (one place, shared by training and DryRun).

    set_parallel_context(pc)      # after mindspore.communication.init()

Semi-auto parallel with ``full_batch=True``: every rank is fed the same global batch and the
plan's strategies cut it (rows by dp). ``pipeline_stages`` is set from ``pc.pp``.
"""
from __future__ import annotations

from ms_mm.parallel.config import ParallelConfig


def set_parallel_context(pc: ParallelConfig) -> None:
    import mindspore as ms
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=pc.world_size, full_batch=True,
                                 pipeline_stages=pc.pp)
