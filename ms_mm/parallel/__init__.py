"""ms_mm.parallel: parallel sizes, the per-family "parallelize" plans, and the DryRun plan check.

- ``ParallelConfig`` / ``ParallelConfigError`` (config.py): dp/tp/pp/ep/cp, pipeline layer lists,
  validation against the world size and a model config.
- ``parallelize(model, parallel_config)`` (plans.py): check and apply the family's plan (found through
  ``ms_mm.registry``; each lives in ``ms_mm/models/<family>/parallelize.py``); ``sharding.py`` holds the
  per-Cell strategies the plans share.
- ``dryrun.py``: ``python -m ms_mm.parallel.dryrun`` compiles one train step per simulated Ascend
  rank with MindSpore's DryRun, using the stub CANN tree of ``fake_cann.py``.
The models themselves hold no parallel logic.
"""
from ms_mm.parallel.config import Divisibility, ParallelConfig, ParallelConfigError
from ms_mm.parallel.context import set_parallel_context
from ms_mm.parallel.plans import parallelize, plan_for_config, plan_for_model

__all__ = ["ParallelConfig", "ParallelConfigError", "Divisibility", "parallelize", "plan_for_config",
           "plan_for_model", "set_parallel_context"]
