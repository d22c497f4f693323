"""The training loop: set up the runtime, build model / optimizer / data from the jsons, train, save.

    args -> runtime (device, msrun data parallel, seeds) -> model json -> family (registry)
         -> model (+ freeze, + --load) -> AdamW + LR -> TrainStep -> data loader (+ resume position)
         -> loop: global batch = accum micro-batches -> step -> log -> save every --save-interval

`train(args)` returns the list of per-iteration losses (used by tests); `main(argv)` is the
command-line entry (`pretrain_vlm.py`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ms_mm.training.arguments import ArgumentError, TrainArgs, parse_args, parse_family_flags
from ms_mm import registry
from ms_mm.registry import Family

DEVICE_ENV = "MS_MM_DEVICE_TARGET"
DUMP_PARAMS_ENV = "MS_MM_DUMP_PARAMS_DIR"
STRATEGY_FILE = "strategy.ckpt"    # a dry-run rank's MindSpore strategy checkpoint, beside its parameter_layouts.json


def device_target() -> str:
    """MS_MM_DEVICE_TARGET (exported by auto_convert.sh), else Ascend when CANN is installed, else CPU."""
    value = os.environ.get(DEVICE_ENV)
    if value:
        if value.upper() not in ("CPU", "ASCEND", "GPU"):
            raise ArgumentError(f"{DEVICE_ENV}={value!r}: expected CPU or Ascend")
        return "Ascend" if value.upper() == "ASCEND" else value.upper()
    if os.environ.get("ASCEND_HOME_PATH") or os.path.isfile("/usr/local/Ascend/ascend-toolkit/set_env.sh"):
        return "Ascend"
    return "CPU"


def launched_world_size() -> int:
    """Number of processes msrun started (1 when run directly)."""
    for key in ("MS_WORKER_NUM", "WORLD_SIZE", "RANK_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def read_json(path: Optional[str], flag: str) -> dict:
    if not path:
        raise ArgumentError(f"{flag} is required")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArgumentError(f"{flag} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ArgumentError(f"{flag} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _lookup(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def freeze_switches(model_json: dict, defaults: Dict[str, bool]) -> Dict[str, bool]:
    """The `freeze` switches of a user's model.json ({freeze-group path: bool}), `defaults` where it
    has none (the embedded default trains what the real run would)."""
    out = {}
    for path, default in defaults.items():
        flag = _lookup(model_json, path + ".freeze")
        out[path] = bool(default if flag is None else flag)
    return out


def apply_freeze(model, model_json: dict, family: Family, log) -> List:
    """Set requires_grad=False on the groups model.json marks `"freeze": true`; return trainable params."""
    frozen_prefixes = []
    for path, prefixes in family.freeze_groups.items():
        flag = _lookup(model_json, path + ".freeze")
        if flag is None:
            continue
        if not isinstance(flag, bool):
            raise ArgumentError(f"model json: {path}.freeze must be true or false, got {flag!r}")
        if flag:
            frozen_prefixes += list(prefixes)
            log(f"freezing {path} (parameters {', '.join(prefixes)}*)")
    for p in model.get_parameters():
        if any(p.name.startswith(pre) for pre in frozen_prefixes):
            p.requires_grad = False
    trainable = model.trainable_params()
    if not trainable:
        raise ArgumentError("model json freezes every parameter group: nothing to train")
    return trainable


DRY_RUN_ENV = "MS_MM_DRY_RUN"     # set by the launcher in each simulated rank (DRY_RUN=1 bash <script>)


def dry_run_rank() -> bool:
    return os.environ.get(DRY_RUN_ENV, "0") not in ("", "0")


def planned_device() -> str:
    """The device a run is planned for: Ascend under ``DRY_RUN=1`` (the launcher checking a script for
    simulated Ascend ranks, and each simulated rank), else ``device_target()``."""
    if dry_run_rank() or os.environ.get("DRY_RUN", "0") not in ("", "0"):
        return "Ascend"
    return device_target()


def refuse_parallel_on_cpu(args: TrainArgs, device: str, world: int) -> None:
    from ms_mm.parallel.training import uses_parallel_path

    if device.upper() == "CPU" and uses_parallel_path(args, world):
        raise ArgumentError(
            f"tp {args.tensor_model_parallel_size} / pp {args.pipeline_model_parallel_size} / ep "
            f"{args.expert_model_parallel_size}{' / --use-distributed-optimizer' if args.use_distributed_optimizer else ''}"
            f" need MindSpore semi-auto parallel, which the CPU backend refuses: train on Ascend, or check the "
            f"plan and its memory here with DRY_RUN=1 bash <script>")


def setup_runtime(args: TrainArgs, parallel_config=None):
    """Device, graph mode, msrun data / semi-auto parallel and seeds; returns (device, rank, world_size).

    ``parallel_config`` (a checked ``ms_mm.parallel.ParallelConfig``): semi-auto parallel with the
    plan's sizes (``ms_mm.parallel.set_parallel_context``) instead of pure data parallel."""
    import mindspore as ms

    device = device_target()
    world = launched_world_size()
    args.validate(world, device)
    refuse_parallel_on_cpu(args, device, world)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device(device)
    except RuntimeError:
        # the runtime is already up in this process (kernels ran before: tests, notebooks); that
        # is fine when it is already this device
        if ms.get_context("device_target") != device:
            raise
    rank = 0
    if world > 1:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        if dry_run_rank():     # a simulated Ascend rank (DryRun): its id and the world come from the env
            rank, world = int(os.environ["RANK_ID"]), int(os.environ["RANK_SIZE"])
        else:
            rank, world = get_rank(), get_group_size()
        args.validate(world, device)
        if parallel_config is not None:
            from ms_mm.parallel import set_parallel_context

            set_parallel_context(parallel_config, optimizer_parallel=args.use_distributed_optimizer,
                                 strategy_file=STRATEGY_FILE if dry_run_rank() else None,
                                 zero3=args.use_torch_fsdp2 and parallel_config.pp == 1)
        else:
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                         device_num=world)
    elif args.model_parallel_size > 1:
        raise ArgumentError(f"WORLD_SIZE=1 cannot hold tensor-model-parallel-size "
                            f"{args.tensor_model_parallel_size} * pipeline-model-parallel-size "
                            f"{args.pipeline_model_parallel_size}")
    # identical seeds on every rank keep initial weights identical under data parallel
    ms.set_seed(args.seed)
    np.random.seed(args.seed)
    import random
    random.seed(args.seed)
    return device, rank, world


def _to_tensors(batch: dict, names: Sequence[str]):
    import mindspore as ms

    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(f"data loader batch lacks model input(s) {missing}")
    return tuple(ms.Tensor(np.asarray(batch[n])) for n in names)


def _gather_data_states(state: dict, world: int, all_gather=None) -> dict:
    """{"per_rank": [state of rank 0, rank 1, ...]}: every rank's whole position (its json: cursors,
    packing buffers, skip counts) is all-gathered. ``all_gather(int64 array [1, n]) -> [world, n]``
    defaults to MindSpore's AllGather over the world."""
    if world == 1:
        return {"per_rank": [json.loads(json.dumps(state))]}
    if all_gather is None:
        import mindspore as ms
        from mindspore import ops

        def all_gather(rows):
            return ops.AllGather()(ms.Tensor(rows)).asnumpy()
    blob = np.frombuffer(json.dumps(state, sort_keys=True).encode(), dtype=np.uint8).astype(np.int64)
    sizes = all_gather(np.asarray([[blob.size]], dtype=np.int64)).reshape(-1)
    padded = np.zeros((1, int(sizes.max())), dtype=np.int64)
    padded[0, :blob.size] = blob
    rows = all_gather(padded)
    return {"per_rank": [json.loads(bytes(row[:int(n)].astype(np.uint8)).decode()) for row, n in zip(rows, sizes)]}


def per_rank_data(family: Family) -> bool:
    """On the sharded path, does each data-parallel rank read only its own samples (the family has a
    per-rank form of its inputs, ``Family.dp_slice``)?"""
    return family.dp_slice is not None


def _per_dp_rank(gathered: dict, pc) -> dict:
    """Of every rank's data position (``_gather_data_states``), one per data-parallel rank: that of its
    first rank on pipeline stage 0 (its model-parallel peers read the same samples)."""
    per_rank = gathered["per_rank"]
    firsts = {}
    for r in range(pc.world_size // pc.pp):
        firsts.setdefault(pc.dp_rank(r), r)
    return {"per_rank": [per_rank[firsts[d]] for d in range(pc.dp)]}


def _check_same_shapes(signature, names: Sequence[str], world: int, all_gather=None) -> None:
    """Per-rank data: every rank's micro batches must have the shapes the others have (one compiled graph
    across the ranks); a rank whose samples pad to other shapes is named with the inputs that differ."""
    mine = [list(shape) for shape in signature]
    ranks = _gather_data_states({"shapes": mine}, world, all_gather)["per_rank"]
    for r, other in enumerate(ranks):
        if other["shapes"] != ranks[0]["shapes"]:
            diff = [f"{n} {a} vs {b}" for n, a, b in zip(names, ranks[0]["shapes"], other["shapes"]) if a != b]
            raise ValueError(f"rank {r}'s micro batches have other shapes than rank 0's ({'; '.join(diff)}): the "
                             f"sharded step compiles one graph for every rank; pad every sample to one shape "
                             f"(fixed sequence length and image size)")


def _own_data_state(saved: dict, rank: int, world: int, where: str) -> dict:
    if "per_rank" not in saved:
        return saved
    per_rank = saved["per_rank"]
    if len(per_rank) != world:
        raise ArgumentError(f"--load {where}: the data position was saved by {len(per_rank)} rank(s), this run "
                            f"has {world}; resume with the same data-parallel size")
    return per_rank[rank]


def family_and_config(model_json: dict, where: str):
    """(Family, config) for a model json; errors name the json file."""
    model_id = model_json.get("model_id")
    if not model_id:
        raise ArgumentError(f"--mm-model {where}: no \"model_id\" key")
    try:
        family = registry.get(model_id, f"--mm-model {where}: model_id")
    except KeyError as e:
        raise ArgumentError(str(e.args[0])) from None
    try:
        config = family.config_from_json(model_json)
    except (ValueError, TypeError, KeyError) as e:
        raise ArgumentError(f"--mm-model {where}: {e.args[0] if isinstance(e, KeyError) else e}") from e
    return family, config


def parallel_run_config(family: Family, config, args: TrainArgs, model_json: dict, world: int, where: str,
                        seq_len: int = 0):
    """(ParallelConfig, micro batches per step) of a run on the sharded path, None otherwise; every size
    that does not divide (layers over stages, heads over tp, experts over ep, the global batch over
    dp x micro batch, the world over tp x pp) is one ArgumentError naming the sizes and shapes."""
    from ms_mm.parallel import ParallelConfigError
    from ms_mm.parallel.training import check_run, run_parallel_config, uses_parallel_path

    if not uses_parallel_path(args, world):
        return None
    try:
        pc = run_parallel_config(args, world, model_json)
        return pc, check_run(pc, config, args, seq_len)
    except ParallelConfigError as e:
        raise ArgumentError(f"--mm-model {where}: {e}") from None
    except NotImplementedError as e:
        raise ArgumentError(f"--mm-model {where}: {e}; train it with tp = pp = ep = 1") from None


def check_parallel_sizes(family: Family, config, args: TrainArgs, where: str) -> None:
    if family.check_parallel_sizes is None:
        return
    try:
        family.check_parallel_sizes(config, args)
    except ValueError as e:
        raise ArgumentError(f"--mm-model {where}: {e}") from None


def _step_metrics(family: Family, config, step_fn, batches) -> dict:
    """The family's named metrics for one step: mean over micro-batches, then over DP ranks."""
    from ms_mm.training.metrics import flatten_metrics, mean_metrics, unflatten_metrics

    if family.step_metrics is None:
        return {}
    per_micro = [family.step_metrics(config, outputs, batch)
                 for outputs, batch in zip(step_fn.last_extra_outputs, batches)]
    layout, vector = flatten_metrics(mean_metrics(per_micro))
    return unflatten_metrics(layout, step_fn.data_parallel_mean(vector))


def _padding_note(loader) -> str:
    """'padding: tokens 12.0 %, patches 3.1 %' of the batches the loader handed out so far."""
    totals = getattr(loader, "padding", None) or {}
    parts = [f"{k} {100.0 * (1 - real / padded) if padded else 0.0:.1f} %" for k, (real, padded) in sorted(totals.items())]
    return "padding: " + (", ".join(parts) if parts else "not reported")


def write_model_json(save_dir: str, model_json: dict) -> None:
    """`SAVE/model.json`: the model json the save dir was trained with, so inference (a family's
    sampler, say) needs only `--load` (temp file + rename)."""
    path = Path(save_dir) / "model.json"
    tmp = path.with_name(".model.json.tmp")
    tmp.write_text(json.dumps(model_json, indent=2) + "\n")
    os.replace(tmp, path)


def resumable_iteration(save_dir, family_name: str, log) -> Optional[int]:
    """The iteration a re-run continues from: the latest training checkpoint in `save_dir` when there is
    one of this family (a converter's `release` or another model's checkpoint is not resumed; the latter
    is said in one line)."""
    from ms_mm.training import mm_checkpoint as mmc

    if not save_dir or not (Path(save_dir) / mmc.LATEST_FILE).is_file():
        return None
    try:
        latest = mmc.latest_iteration(save_dir)
        saved_family = mmc.read_layout(mmc.iteration_dir(save_dir, latest)).family if latest != "release" else ""
    except (mmc.CheckpointError, OSError, ValueError) as e:
        raise ArgumentError(f"--save {save_dir}: cannot read its latest checkpoint to resume from ({e}); "
                            f"fix or move it, or pass --no-auto-resume to start over") from None
    if latest == "release" or latest is None:
        return None
    if saved_family and saved_family != family_name:
        log(f"--save {save_dir} holds a {saved_family} checkpoint (iteration {latest}), not {family_name}: "
            f"starting over (its iterations are overwritten as this run saves)")
        return None
    return int(latest)


def train(args: TrainArgs, stream=None) -> List[float]:
    import mindspore as ms

    from ms_mm.training import checkpointing as ckpt
    from ms_mm.training.metrics import MetricsLogger
    from ms_mm.training.optimizer import build_optimizer, current_lr
    from ms_mm.training.train_step import TrainStep, build_loss_scaler

    model_json = read_json(args.mm_model, "--mm-model")
    data_json = read_json(args.mm_data, "--mm-data")
    family, config = family_and_config(model_json, args.mm_model)
    options = parse_family_flags(family, args.family_argv)
    if family.apply_flags is not None and options:
        try:
            config = family.apply_flags(config, options)
        except ValueError as e:
            raise ArgumentError(f"--mm-model {args.mm_model}: {e}") from e
    # the model's own limits on the parallel sizes first (they name the model's numbers), then the runtime
    check_parallel_sizes(family, config, args, args.mm_model)
    dry_run = dry_run_rank()
    world0 = launched_world_size()
    args.validate(world0, device_target())
    refuse_parallel_on_cpu(args, device_target(), world0)
    parallel = parallel_run_config(family, config, args, model_json, world0, args.mm_model,
                                   int(os.environ.get("MS_MM_DRY_RUN_SEQ_LEN", "0") or 0))
    pc, micro_per_step = parallel or (None, None)
    ema_decay = family.ema_decay if args.ema is None else args.ema
    device, rank, world = setup_runtime(args, pc)
    # the loss lives on the last pipeline stage: its first rank logs
    log_rank = (pc.pp - 1) * (world // pc.pp) if pc is not None and pc.pp > 1 else 0
    is_rank0 = rank == log_rank or dry_run

    def log(msg):
        if is_rank0:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", file=stream, flush=True)

    log(f"ms-mm training: family {family.name}, device {device}, world size {world} "
        f"(dp {args.data_parallel_size}), micro batch {args.micro_batch_size}, global batch "
        f"{args.global_batch_size}, gradient accumulation {args.grad_accum_steps}, "
        f"precision {'fp16' if args.fp16 else 'bf16' if args.bf16 else 'fp32'}")
    if args.ignored_flags:
        log(f"accepted for MindSpeed-MM compatibility, no effect here: {' '.join(args.ignored_flags)}")

    # activations in fp16/bf16, parameters (the optimizer's master copy) stay fp32
    compute_dtype = ms.float16 if args.fp16 else ms.bfloat16 if args.bf16 else ms.float32
    if dry_run:     # simulated ranks: shapes only, never the weights on the host
        from mindspore.nn.utils import no_init_parameters

        with no_init_parameters():
            model = family.build_model(config, compute_dtype)
    else:
        model = family.build_model(config, compute_dtype)
    if args.recompute_granularity or args.recompute_method or args.recompute_num_layers:
        from ms_mm.parallel import ParallelConfigError
        from ms_mm.parallel.training import apply_recompute

        try:
            recomputed = apply_recompute(model, args.recompute_granularity, args.recompute_method,
                                         args.recompute_num_layers)
        except ParallelConfigError as e:
            raise ArgumentError(str(e)) from None
        log(f"recomputing {len(recomputed)} layer(s) in the backward pass (--recompute-granularity "
            f"{args.recompute_granularity})")
        if pc is not None and device.upper() == "ASCEND":
            from ms_mm.parallel.context import fusion_flags

            flags = fusion_flags(args.use_torch_fsdp2 and pc.pp == 1, True,
                                 os.environ.get("MS_DEV_GRAPH_KERNEL_FLAGS", ""))
            if flags:
                ms.set_context(graph_kernel_flags=flags)
                log(f"graph_kernel_flags {flags!r}: MindSpore 2.9's AddRmsNorm fusion makes a graph cycle under "
                    f"ZeRO-3 (--use-torch-fsdp2) with recompute")
    if pc is not None:
        from ms_mm.parallel import parallelize

        parallelize(model, pc)
        log(f"sharding plan of {family.name} applied: semi-auto parallel, dp {pc.dp} x tp {pc.tp} x pp {pc.pp}"
            f" (ep {pc.ep}), {micro_per_step} micro batch(es) of {args.micro_batch_size * pc.dp} rows per step"
            + (f", {args.micro_batch_size} read by each dp rank" if per_rank_data(family) else
               ", every rank reading all of them")
            + ((", weights, gradients and optimizer states sharded over dp, each weight gathered again for the "
                "backward (--use-torch-fsdp2: ZeRO-3)" if args.use_torch_fsdp2 and pc.pp == 1 else
                ", optimizer states sharded over dp (--use-distributed-optimizer)")
               if args.use_distributed_optimizer and pc.dp > 1 else ""))
    trainable = apply_freeze(model, model_json, family, log)
    n_total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    n_train = sum(int(np.prod(p.shape)) for p in trainable)
    log(f"parameters: {n_total:,} total, {n_train:,} trainable")
    optimizer = build_optimizer(args, trainable, device)
    loss_scaler = build_loss_scaler(args)
    if pc is not None:
        from ms_mm.parallel.training import ParallelTrainStep

        per_rank = per_rank_data(family)
        step_fn = ParallelTrainStep(model, optimizer, pc, micro_per_step, clip_grad=args.clip_grad,
                                    loss_scaler=loss_scaler, input_names=family.input_names, dry_run=dry_run,
                                    sample_axes=([family.sample_axes.get(n, 0) for n in family.input_names]
                                                 if per_rank else None),
                                    check_shapes=(None if dry_run or not per_rank or pc.dp == 1 else
                                                  lambda sig: _check_same_shapes(sig, family.input_names, world)),
                                    ema_decay=ema_decay, zero3=args.use_torch_fsdp2 and pc.pp == 1)
        if step_fn.accumulation == "tagged":
            log(f"gradient accumulation over {micro_per_step} micro batches: each one's forward and backward runs "
                f"before the next (MindSpore's gradient-accumulation pass), so one micro batch's activations are "
                f"live at a time")
        elif step_fn.accumulation == "summed":
            log(f"gradient accumulation over {micro_per_step} micro batches under ZeRO-3 (--use-torch-fsdp2): "
                f"their losses are summed in one graph and differentiated together, so every micro batch's "
                f"activations are kept until the backward (MindSpore 2.9 runs its gradient-accumulation pass "
                f"with optimizer level 3 only under @lazy_inline); a larger --micro-batch-size costs the same")
        if step_fn.shared:
            log(f"the model's loss is compiled once and shared by the {micro_per_step} pipeline micro batches "
                f"(@lazy_inline)")
    else:
        step_fn = TrainStep(model, optimizer, accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
                            loss_scaler=loss_scaler, data_parallel=world > 1,
                            extra_outputs=family.metric_outputs if family.step_metrics else ())

    state = ckpt.LoadedState()
    load, model_only, weights_from = args.load, args.finetune or args.resume_model_only, None
    resume_at = resumable_iteration(args.save, family.name, log) if args.auto_resume else None
    if resume_at is not None:
        load, model_only = args.save, False         # upstream: the latest checkpoint resumes everything
        log(f"--auto_resume: resuming from the latest checkpoint in {args.save} (--save already holds iteration "
            f"{resume_at}; --no-auto-resume starts over)")
    elif model_only and args.finetune_from_ema:
        weights_from = ckpt.EMA_DIR
    if load:
        # a sharded run reads its own blocks once the step is compiled (the layouts exist only then)
        sharded_load = pc is not None and not dry_run
        state = ckpt.load_checkpoint(load, model, optimizer, load_optim=not args.no_load_optim,
                                     load_rng=not args.no_load_rng, finetune=model_only, weights_from=weights_from,
                                     deferred=sharded_load)
        if sharded_load:
            def load_blocks(layout_dict, state=state):
                from ms_mm.parallel.checkpoint import layouts_from_mindspore

                n = ckpt.load_sharded_weights(state, model, optimizer, layouts_from_mindspore(layout_dict), rank,
                                              pipeline=pc.pp > 1, ema=step_fn.ema_parameters,
                                              first_stage=pc.stage_of_rank(rank) == 0)
                log(f"read this rank's blocks of {n} tensor(s) from {state.weights_dir}"
                    + (f" and {state.optim_file}" if state.optim_file else ""))
            step_fn.on_compiled = load_blocks
        log(f"loaded {load}: " + ("model weights (release), starting at iteration 0" if state.release
                                   else f"iteration {state.iteration}")
            + (f" (weights from {state.iter_dir})" if weights_from else ""))
        if state.train_state and loss_scaler is not None and "loss_scale" in state.train_state:
            loss_scaler.scale_value.set_data(ms.Tensor(state.train_state["loss_scale"], ms.float32))
            if hasattr(loss_scaler, "counter") and "loss_scale_counter" in state.train_state:
                loss_scaler.counter.set_data(ms.Tensor(state.train_state["loss_scale_counter"], ms.int32))

    ema = None
    if ema_decay and pc is not None:    # inside the sharded step, laid out as the weights (read with them)
        log(f"EMA of the weights: decay {ema_decay}, updated in the sharded step (each rank its share), saved as "
            f"{ckpt.EMA_DIR}/ in each checkpoint" + (" (restored)" if ckpt.saved_ema_dir(state) else ""))
    elif ema_decay:
        from ms_mm.training.ema import WeightEMA

        ema = WeightEMA(model, ema_decay)
        ema_dir = ckpt.saved_ema_dir(state)
        saved_ema = ckpt.read_extra_model(state.iter_dir, ckpt.EMA_DIR) if ema_dir is not None else None
        if saved_ema is not None:
            ema.load(saved_ema, str(ema_dir))
        log(f"EMA of the weights: decay {ema_decay}, saved as {ckpt.EMA_DIR}/ in each checkpoint"
            + (" (restored)" if saved_ema is not None else ""))

    # sharded path: each data-parallel rank reads its own samples, its model-parallel peers the same ones
    # (per_rank_data); a family without a per-rank form has every rank read the global micro batches
    if pc is None:
        load_mbs, load_rank, load_world = args.micro_batch_size, rank, world
    elif per_rank_data(family):
        load_mbs, load_rank, load_world = args.micro_batch_size, pc.dp_rank(rank), pc.dp
    else:
        load_mbs, load_rank, load_world = args.micro_batch_size * pc.dp, 0, 1
    try:
        loader = family.build_dataloader(data_json, config, load_mbs, args.seed, load_rank, load_world,
                                         args.num_workers, args.skip_bad_samples,
                                         **({"options": options} if options else {}))
    except (KeyError, ValueError, FileNotFoundError) as e:
        if not dry_run:
            raise ArgumentError(f"--mm-data {args.mm_data}: {e.args[0] if isinstance(e, KeyError) else e}") from e
        from ms_mm.parallel.training import SyntheticLoader

        loader = SyntheticLoader(family, config, load_mbs, int(os.environ.get("MS_MM_DRY_RUN_SEQ_LEN", "0") or 0))
        log(f"DRY_RUN: the data json's samples are not readable here ({e}); {loader.describe()}")
    if state.data_state is not None:
        loader.load_state_dict(_own_data_state(state.data_state, load_rank, load_world, args.load))

    logger = MetricsLogger(train_iters=args.train_iters, start_iteration=state.iteration,
                           global_batch_size=args.global_batch_size, log_interval=args.log_interval,
                           log_tps=args.log_tps, tensorboard_dir=args.tensorboard_dir, is_rank0=is_rank0,
                           stream=stream, extra_line=family.log_line)
    iteration, consumed = state.iteration, state.consumed_samples
    losses: List[float] = []

    last_saved = None if state.release else iteration
    if args.save and is_rank0:
        stale = ckpt.remove_stale_staging(args.save)
        if stale:
            log(f"removed unfinished checkpoint staging left by a killed run: {', '.join(stale)}")

    def save():
        nonlocal last_saved
        last_saved = iteration
        # every rank takes part: data positions differ per rank once bad samples are skipped (a sharded
        # run keeps one position per data-parallel rank)
        if pc is None:
            data_state = _gather_data_states(loader.state_dict(), world)
        elif load_world > 1:
            data_state = _per_dp_rank(_gather_data_states(loader.state_dict(), world), pc)
        else:
            data_state = {"per_rank": [loader.state_dict()]}
        if not is_rank0 and pc is None:
            return
        train_state = {"iteration": iteration, "consumed_samples": consumed, "world_size": world,
                       "global_batch_size": args.global_batch_size, "family": family.name,
                       "optimizer_step": int(optimizer.global_step.asnumpy().reshape(-1)[0])}
        if loss_scaler is not None:
            train_state["loss_scale"] = float(loss_scaler.scale_value.asnumpy())
            if hasattr(loss_scaler, "counter"):
                train_state["loss_scale_counter"] = int(loss_scaler.counter.asnumpy())
        t0 = time.time()
        if pc is not None:      # sharded: every rank writes its blocks, rank 0 assembles the iteration
            from mindspore.communication.comm_func import barrier

            from ms_mm.parallel.checkpoint import layouts_from_mindspore

            path = ckpt.save_sharded_checkpoint(args.save, iteration, model, optimizer,
                                                layouts_from_mindspore(step_fn.parameter_layout_dict), rank=rank,
                                                family=family.name, data_state=data_state, train_state=train_state,
                                                save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
                                                barrier=barrier, pipeline=pc.pp > 1,
                                                layout=ckpt.run_checkpoint_layout(family, config, pc),
                                                ema=step_fn.ema_parameters, first_stage=pc.stage_of_rank(rank) == 0)
            if rank == 0:
                write_model_json(args.save, model_json)
                print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] saved checkpoint {path} (blocks of {world} ranks) "
                      f"in {time.time() - t0:.1f} s", file=stream, flush=True)
            return
        path = ckpt.save_checkpoint(args.save, iteration, model, optimizer, family=family.name,
                                    data_state=data_state, train_state=train_state,
                                    save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
                                    extra_models={ckpt.EMA_DIR: ema.state()} if ema is not None else None)
        write_model_json(args.save, model_json)
        log(f"saved checkpoint {path} in {time.time() - t0:.1f} s")

    try:
        while iteration < args.train_iters:
            t0 = time.time()
            lr = args.lr if dry_run else current_lr(optimizer)   # no host kernels on simulated ranks
            micro, batches, tokens = [], [], 0
            for _ in range(args.grad_accum_steps):
                try:
                    batch = next(loader)
                except StopIteration:
                    raise RuntimeError(f"the data loader ran out of samples at iteration {iteration}") from None
                if family.count_tokens is not None:
                    tokens += family.count_tokens(batch)
                if pc is not None and load_world > 1:   # this dp rank's samples as its slice of the global batch
                    batch = family.dp_slice(batch, load_rank, load_world, config)
                micro.append(_to_tensors(batch, family.input_names))
                batches.append(batch)
            loss, grad_norm, finite = step_fn(micro)
            for shapes in step_fn.new_shapes:   # one static-shape graph per input-shape bucket
                log(f"compiled the train-step graph for input shapes "
                    f"{', '.join(f'{n} {list(sh)}' for n, sh in zip(family.input_names, shapes))} "
                    f"({len(step_fn.graph_shapes)} graph(s) so far; {_padding_note(loader)})")
                if pc is not None and load_world > 1:
                    log(f"  this rank's slice of the global micro batch, whose shapes are "
                        f"{', '.join(f'{n} {list(sh)}' for n, sh in zip(family.input_names, step_fn.global_shapes(shapes)))}")
            if ema is not None:
                ema.update()
            metrics = _step_metrics(family, config, step_fn, batches) if pc is None else {}
            iteration += 1
            consumed += args.global_batch_size
            losses.append(loss)
            logger.step(iteration=iteration, consumed_samples=consumed, loss=loss, lr=lr, grad_norm=grad_norm,
                        finite=finite, step_time=time.time() - t0,
                        tokens=tokens * (load_world if pc is not None else args.data_parallel_size),
                        loss_scale=float(loss_scaler.scale_value.asnumpy()) if loss_scaler is not None else None,
                        skipped_samples=getattr(loader, "skipped", 0), metrics=metrics)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                save()
            if args.exit_interval and iteration % args.exit_interval == 0:
                log(f"exiting at iteration {iteration} (--exit-interval {args.exit_interval})")
                break
        # Megatron saves at the end of training too
        if args.save and last_saved != iteration:
            save()
    finally:
        logger.close()
        if hasattr(loader, "close"):
            loader.close()   # stop prefetch threads
    if os.environ.get(DUMP_PARAMS_ENV):
        # test hook: every rank writes its final parameters (data-parallel replicas must agree)
        from ms_mm.training.mm_checkpoint import write_safetensors

        Path(os.environ[DUMP_PARAMS_ENV]).mkdir(parents=True, exist_ok=True)
        write_safetensors(Path(os.environ[DUMP_PARAMS_ENV]) / f"rank_{rank}.safetensors",
                          {p.name: p.asnumpy() for p in model.get_parameters()})
    logger.summary()
    log(f"input-shape buckets: {len(step_fn.graph_shapes)} compiled graph(s); {_padding_note(loader)}")
    if dry_run:
        from ms_mm.parallel.dryrun import STEP_OK

        if pc is not None:   # the rank's compiled parameter layouts, beside its log
            step_fn.write_parameter_layouts("parameter_layouts.json")
        print(f"{STEP_OK} rank={rank} iterations={len(losses)}", flush=True)
    return losses


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    from ms_mm.training.checkpointing import TrainCheckpointError

    try:
        args = parse_args(argv)
        train(args)
    except (ArgumentError, TrainCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - bad samples: one line naming the file / record
        from ms_mm.data import BadSampleError

        if not isinstance(e, BadSampleError):
            raise
        print(f"error: {e} (pass --skip-bad-samples to skip such samples; checkpoints already saved are "
              f"kept)", file=sys.stderr)
        return 1
    return 0
