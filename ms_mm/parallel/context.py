"""MindSpore's auto-parallel context for a ParallelConfig (one place, shared by training and DryRun).

    set_parallel_context(pc)                              # after mindspore.communication.init()
    set_parallel_context(pc, optimizer_parallel=True)     # --use-distributed-optimizer

Semi-auto parallel with ``full_batch=True``: every rank is fed the same global batch and the
plan's strategies cut it (rows by dp). The trainer instead feeds each data-parallel rank its own
samples: ``set_dataset_strategy(pc, axes)`` (before the first compile) switches to
``full_batch=False`` with a dataset strategy that declares each input's sample axis split over dp. ``pipeline_stages`` is set from ``pc.pp``. The device
matrix MindSpore derives is TP x PP x DP (expert parallel lives inside DP: the plans split experts
over ``ep`` of the ``dp`` ranks; with ep > 1 ``enable_alltoall`` lets MindSpore move the MoE tokens
with AllToAll). ``optimizer_parallel`` turns on MindSpore's optimizer parallel
(``enable_parallel_optimizer``): the optimizer states (AdamW moments) of every parameter that the
plan leaves replicated over data-parallel ranks are sharded over them, and each rank updates its
shard (Megatron's distributed optimizer / ZeRO-1); ``gradient_accumulation_shard`` also shards
the pipeline's accumulated gradients. ``zero3`` (``--use-torch-fsdp2``, FSDP) is MindSpore's optimizer
level3: each weight gathered over dp for the forward is gathered again for the backward instead of being
kept. ``strategy_file``: MindSpore also writes its strategy checkpoint (every parameter's layout, optimizer
moments included) there at compile time.
"""
from __future__ import annotations

from typing import Optional

from ms_mm.parallel.config import ParallelConfig


def parallel_context_kwargs(pc: ParallelConfig, optimizer_parallel: bool = False,
                            strategy_file: Optional[str] = None, zero3: bool = False) -> dict:
    kwargs = dict(parallel_mode="semi_auto_parallel", device_num=pc.world_size, full_batch=True,
                  pipeline_stages=pc.pp)
    if pc.ep > 1:   # a layout change that moves a split between axes is one AllToAll (the MoE token move),
        kwargs["enable_alltoall"] = True   # not AllGather + Split
    if strategy_file:      # MindSpore's strategy checkpoint of every parameter (its own transform tools read it)
        kwargs["strategy_ckpt_config"] = {"save_file": str(strategy_file), "only_trainable_params": False}
    if optimizer_parallel and pc.dp > 1:
        kwargs["enable_parallel_optimizer"] = True
        kwargs["parallel_optimizer_config"] = {"gradient_accumulation_shard": pc.pp > 1,
                                               "parallel_optimizer_threshold": 0}
        if zero3:   # FSDP (--use-torch-fsdp2): a weight gathered for the forward is not kept for the backward
            kwargs["parallel_optimizer_config"] = {"optimizer_level": "level3", "parallel_optimizer_threshold": 0}
    return kwargs


def set_parallel_context(pc: ParallelConfig, optimizer_parallel: bool = False,
                         strategy_file: Optional[str] = None, zero3: bool = False) -> None:
    import mindspore as ms
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(**parallel_context_kwargs(pc, optimizer_parallel, strategy_file, zero3))


def dataset_strategy(pc: ParallelConfig, axes):
    """MindSpore's dataset strategy for inputs fed per data-parallel rank: ``axes`` holds, per input,
    (its ndim, the axis its samples lie along); that axis is split over dp, every other axis whole.

    Given as ``Layout``s over a [dp, world / pp / dp] device matrix of each pipeline stage, so which
    ranks share a slice is explicit: the model-parallel peers of a dp rank (``ParallelConfig.dp_rank``)
    are its row of the matrix and are fed the same samples."""
    from mindspore.parallel import Layout

    per_stage = pc.world_size // pc.pp
    layout = Layout((pc.dp, per_stage // pc.dp), ("dp", "mp"))
    return tuple(layout(*["dp" if i == axis else "None" for i in range(ndim)]) for ndim, axis in axes)


def set_dataset_strategy(pc: ParallelConfig, axes) -> None:
    """Per-rank data (``full_batch=False``) with ``dataset_strategy(pc, axes)``; the rest of the context stays."""
    import mindspore as ms

    ms.set_auto_parallel_context(full_batch=False, dataset_strategy=dataset_strategy(pc, axes))


# MindSpore 2.9.0, Ascend backend: with optimizer level3 (ZeRO-3) and recomputed layers, its AddRmsNorm
# fusion joins a residual add of the forward with one of the recomputed copy and the graph gets a cycle
# ("Graph cycle exists ... PrimFunc_AddRmsNorm"; BAGEL-7B at 11520 rows under DryRun, 3 Dec 2026). The pass
# switched off (MindSpore's graph_kernel_flags --disable_pass), the same run compiles. MindSpore 2.9 warns that the
# set_context form is deprecated in favour of the MS_DEV_GRAPH_KERNEL_FLAGS variable (read at start-up, so a
# user's own value is kept and extended here); both switched the pass off in the BAGEL-7B runs.
ZERO3_RECOMPUTE_DISABLED_PASSES = ("add_rms_norm_fusion",)


def fusion_flags(zero3: bool, recompute: bool, user_flags: str = "") -> Optional[str]:
    """The ``graph_kernel_flags`` a run needs (None: leave MindSpore's default): the fusion passes that
    break ZeRO-3 with recompute switched off, after whatever the user gave (``MS_DEV_GRAPH_KERNEL_FLAGS``)."""
    if not (zero3 and recompute):
        return None
    flag = "--disable_pass=" + ",".join(ZERO3_RECOMPUTE_DISABLED_PASSES)
    return f"{user_flags} {flag}".strip() if flag not in (user_flags or "") else None
