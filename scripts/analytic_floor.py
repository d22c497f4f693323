"""Analytic memory floor per rank of a finetune script's configuration: parameters + gradients +
optimizer states, from the parameter counts of the model json and the parallel sizes.

    python scripts/analytic_floor.py examples/mindspore/qwen2.5vl/model_7b.json --world 8 --tp 1 --pp 4 \
        [--ep 1] [--no-distributed-optimizer] [--ema]

The model is built from the json with uninitialised weights (shapes only), the family's freeze
switches are applied and, under pp, the family's plan assigns each parameter its pipeline stage (the
split of the json's `pipeline_num_layers`). Per rank of stage s (Megatron-style mixed precision):

    floor(s) = sum over the stage's parameters p of  n(p) / shard(p) * bytes(p)
    bytes    = 2 (bf16 weight) + [trainable] (4 (fp32 gradient) + 12 / dp_opt (fp32 master + 2 Adam moments))
    shard    = tp, and ep * tp for routed-expert weights; dp_opt = dp (dp / ep for routed experts) with
               the distributed optimizer, 1 without

The second figure ("fully sharded") is the floor of weights + gradients + moments all sharded over
dp_opt, as MindSpore's optimizer parallel (and FSDP) store them: 16 / dp_opt bytes per trainable
parameter (fp32 weight = master, fp32 gradient, 2 fp32 moments), 4 per frozen one (fp32, split by tp);
a parameter whose first axis does not divide by dp_opt stays whole, as MindSpore's optimizer
parallel leaves it ("does not satisfy the conditions, thus not apply optimizer shard": Lumina's
vocabulary of 171385 rows on 8 cards).

``--ema``: the weights' EMA (BAGEL's recipe) adds one fp32 copy of each trainable parameter, laid out as
the parameter: 4 / dp_opt bytes to both figures (the sharded step keeps it as it keeps the moments).

Every parameter is counted as split by tp (the few replicated ones -- norms, row-parallel biases, the
router, the patch embedding -- make the real figure slightly higher). Activations, communication
buffers and workspace are not part of the floor.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

GB = 1024 ** 3
EXPERT_MARKERS = ("local_experts.", ".experts.weight", "experts.linear_fc")


def _is_routed_expert(name: str) -> bool:
    return "shared_experts" not in name and any(m in name for m in EXPERT_MARKERS)


def stage_of_params(model, plan, pc) -> Dict[str, int]:
    """Parameter name -> pipeline stage (the deepest Cell the plan gave a stage; stage 0 otherwise)."""
    if pc.pp == 1 or not hasattr(plan, "assign_stages"):
        return {p.name: 0 for p in model.get_parameters()}
    plan.assign_stages(model, pc)
    explicit = {}
    for name, cell in model.cells_and_names():
        stage = cell.__dict__.get("_pipeline_stage")
        if stage is not None:
            explicit[name] = stage
    out = {}
    for p in model.get_parameters():
        parts, stage = p.name.split("."), 0
        for i in range(len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in explicit:
                stage = explicit[prefix]
        out[p.name] = stage
    return out


def floors(model_json_path: str, world: int, tp: int, pp: int, ep: int = 1, distributed_optimizer: bool = True,
           ema: bool = False):
    import numpy as np
    from mindspore.nn.utils import no_init_parameters

    from ms_mm.parallel.config import ParallelConfig
    from ms_mm.parallel.plans import plan_for_config
    from ms_mm.training.trainer import apply_freeze, family_and_config

    model_json = json.loads(Path(model_json_path).read_text())
    family, config = family_and_config(model_json, model_json_path)
    import mindspore as ms

    with no_init_parameters():
        model = family.build_model(config, ms.bfloat16)
    apply_freeze(model, model_json, family, lambda msg: None)
    dp = world // (tp * pp)
    pc = _parallel_config(world, tp, pp, ep, model_json)
    plan = plan_for_config(config)
    stages = stage_of_params(model, plan, pc)
    rows: List[dict] = [dict(stage=s, params=0, trainable=0, bytes=0.0, bytes_sharded=0.0) for s in range(pp)]
    for p in model.get_parameters():
        n = int(np.prod(p.shape))
        expert = _is_routed_expert(p.name)
        shard = tp * (ep if expert else 1)
        dp_opt = max(1, (dp // ep if expert else dp) if distributed_optimizer else 1)
        per_param = 2.0 + ((4.0 + (12.0 + 4.0 * ema) / dp_opt) if p.requires_grad else 0.0)
        # ms-mm: fp32 parameters are the master copy; the optimizer parallel shards them with the moments
        # (MindSpore shards a parameter over dp only when its first axis divides: else it stays whole)
        zero_dp = dp_opt if p.shape and p.shape[0] % dp_opt == 0 else 1
        per_param_zero = ((16.0 + 4.0 * ema) / zero_dp) if p.requires_grad else 4.0
        row = rows[stages[p.name]]
        row["params"] += n
        row["trainable"] += n if p.requires_grad else 0
        row["bytes"] += n / shard * per_param
        row["bytes_sharded"] += n / shard * per_param_zero
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    return dict(family=family.name, total_params=total, dp=dp, stages=rows)


def _parallel_config(world, tp, pp, ep, model_json):
    from ms_mm.parallel.training import run_parallel_config

    class _Args:      # the subset of TrainArgs run_parallel_config reads
        pass
    args = _Args()
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.expert_model_parallel_size, args.context_parallel_size = ep, 1
    args.use_distributed_optimizer = True
    return run_parallel_config(args, world, model_json)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_json")
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--ema", action="store_true", help="the run keeps the weights' EMA (fp32, sharded as the moments)")
    a = ap.parse_args(argv)
    r = floors(a.model_json, a.world, a.tp, a.pp, a.ep, not a.no_distributed_optimizer, a.ema)
    print(f"{r['family']}: {r['total_params']:,} parameters; world {a.world} = tp {a.tp} x pp {a.pp} x dp {r['dp']}"
          f" (ep {a.ep}), distributed optimizer {not a.no_distributed_optimizer}" + (", EMA" if a.ema else ""))
    for row in r["stages"]:
        print(f"  stage {row['stage']}: {row['params']:,} parameters ({row['trainable']:,} trainable), "
              f"floor {row['bytes'] / GB:.1f} GB per rank (fully sharded: {row['bytes_sharded'] / GB:.1f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
