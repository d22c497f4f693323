"""Check a parallel plan without devices: compile one train step per simulated Ascend rank (DryRun).

    python -m ms_mm.parallel.dryrun --mm-model 7b --tp 4 --pp 1 --world-size 8 \
        --micro-batch-size 1 --seq-len 1024 [--level 1] [--ranks 0,1|stages|all] [--dtype bf16]

For each rank asked for (default: the first rank of every pipeline stage), a fresh process runs
with ``MS_SIMULATION_LEVEL``, ``RANK_SIZE`` and ``RANK_ID`` set and the stub CANN libraries of
``ms_mm.parallel.fake_cann`` on its loader path (built once, cached under
``~/.cache/ms_mm/fake-cann``). It builds the model without materialising weights
(``mindspore.nn.utils.no_init_parameters``), applies the family's plan, and compiles forward +
backward + AdamW under ``semi_auto_parallel`` on synthetic inputs of the requested shape (one
image per sample; ``micro_batch_size`` rows per data-parallel rank, ``pp`` micro batches per step
under pipeline parallel). Level 1 also has MindSpore predict each rank's peak device memory,
printed per rank. The exit status is 0 when every rank compiled. Each rank's log, and MindSpore's
``parameter_layout_dict`` as ``parameter_layouts.json`` (slice shape of every parameter), are
kept under ``--workdir``. A rank that outgrows ``--host-mem-limit-gb`` of host RAM is stopped.

The parallel sizes are checked against the model first (``ParallelConfig.check_model``): a plan
that does not divide stops with one line naming the size and the shape. ``--skip-checks`` hands
it to MindSpore instead; its error is shown followed by our one-line reading of it.

``--mm-model`` is a preset name of any registered family (``Family.presets``: e.g. ``tiny``, ``7b``,
``deepseek-vl2-small``) or a JSON file in any form its family reads (``Family.config_from_json``:
MindSpeed-MM ``model.json``, HF ``config.json``, our ``to_dict()``, ``{"preset": ..., ...overrides}``,
possibly nested under ``"mm_model"`` / ``"model"`` / ``"config"``); the family is the json's
``model_id``, else the one whose config form it is. ``--ep N`` spreads routed experts where the
family has them.

Python API: ``run_dryrun(model_config, parallel_config, micro_batch_size, seq_len, ranks=(0,),
level=1, dtype="bf16") -> list[RankResult]``; ``load_model_config(spec)``;
``parse_peak_memory(log_text)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ms_mm import registry
from ms_mm.parallel.config import ParallelConfig, ParallelConfigError
from ms_mm.parallel.fake_cann import FakeCannError

STEP_OK = "MS_MM_DRYRUN_STEP_OK"
_USED = re.compile(r"Used peak memory usage \(without fragments\):\s*(\d+)M")
_ACTUAL = re.compile(r"Actual peak memory usage \(with fragments\):\s*(\d+)M")
_NOT_DIVISIBLE = re.compile(r"shape value (\d+) at dim index (\d+) cannot be divisible by strategy value (\d+)")
_OP_INFO = re.compile(r"\b([A-Za-z0-9]+Info\d*)\b")
_DEVICES = re.compile(r"it requires (\d+) devices, but the device number of this stage is (\d+)")
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


# ------------------------------------------------------------------------------------- model config
def model_family(config) -> str:
    """The registry name of a model config's family."""
    return registry.family_of_config(config).name


def _unknown_preset(name: str) -> ValueError:
    return ValueError("; ".join(f"unknown {f.title or f.name} preset {name!r} (presets: {', '.join(f.presets)})"
                                for f in registry.families() if f.presets))


def load_model_config(spec):
    """A model config from a preset name (any family's, ``Family.presets``), a JSON path or an
    already-parsed dict in any form its family reads (``Family.config_from_json``; the family is the
    json's ``model_id``, else the one that claims the json)."""
    if any(f.config_class is not None and isinstance(spec, f.config_class) for f in registry.families()):
        return spec
    if isinstance(spec, str) and not os.path.exists(spec):
        if spec.endswith(".json"):
            raise FileNotFoundError(f"--mm-model {spec}: no such file")
        family = registry.family_of_preset(spec)
        if family is None:
            raise _unknown_preset(spec)
        return family.presets[spec]()
    data = spec
    if not isinstance(spec, dict):
        with open(spec) as fh:
            data = json.load(fh)
    for key in ("mm_model", "model", "config"):
        if isinstance(data.get(key), dict) and not any(f.claims_json(data) for f in registry.families()):
            data = data[key]
            break
    try:
        family = registry.family_for_json(data, f"--mm-model {spec if isinstance(spec, str) else 'json'}")
    except registry.UnknownFamilyError as e:
        raise ValueError(str(e)) from None
    return family.config_from_json(data).validate()


# ------------------------------------------------------------------------------------ log parsing
@dataclasses.dataclass
class RankResult:
    rank: int
    returncode: int
    step_ok: bool
    used_peak_mb: Optional[int]
    actual_peak_mb: Optional[int]
    seconds: float
    log_path: str
    error: str = ""      # MindSpore's error lines (failed ranks)
    hint: str = ""       # our one-line reading of them

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.step_ok


def parse_peak_memory(text: str):
    """(used MB without fragments, actual MB with fragments) from a DryRun log; None when absent."""
    used = _USED.findall(text)
    actual = _ACTUAL.findall(text)
    return (int(used[-1]) if used else None, int(actual[-1]) if actual else None)


def extract_error(text: str, max_lines: int = 12) -> str:
    """The lines of a failed DryRun log that say what MindSpore rejected."""
    keep = [line for line in text.splitlines()
            if re.search(r"Error|error\]|cannot be divisible|requires \d+ devices|Failure|Traceback|init failed", line)
            and "[WARNING]" not in line]
    return "\n".join(keep[-max_lines:])


def explain_error(text: str, pc: ParallelConfig) -> str:
    """One line naming the parallel size and the shape MindSpore refused, when the log says so."""
    m = _NOT_DIVISIBLE.search(text)
    if m:
        value, dim, split = int(m.group(1)), int(m.group(2)), int(m.group(3))
        line = text[text.rfind("\n", 0, m.start()) + 1: m.start()]
        ops_named = _OP_INFO.findall(line)
        op = re.sub(r"Info\d*$", "", ops_named[-1]) if ops_named else "an operator"
        shape = re.search(r"shape is (\[[^\]]*\])", line)
        shape = f" {shape.group(1)}" if shape else ""
        sizes = [n for n in ("tp", "dp", "pp") if getattr(pc, n) == split] or [f"a split of {split}"]
        return (f"ms-mm: {' or '.join(sizes)}={split} does not divide dim {dim} (size {value}) of the{shape} "
                f"input of {op}; choose sizes that divide the model's heads / widths / batch")
    m = _DEVICES.search(text)
    if m:
        return (f"ms-mm: the plan needs {m.group(1)} devices per pipeline stage but only {m.group(2)} exist "
                f"(world_size={pc.world_size}, tp={pc.tp}, pp={pc.pp}, dp={pc.dp})")
    return ""


# --------------------------------------------------------------------------------------- launcher
def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _total_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        return 16.0


def _worker_args(config, pc: ParallelConfig, micro_batch_size, seq_len, level, dtype, micro_batches):
    return {"family": model_family(config), "model": config.to_dict(), "parallel": pc.to_dict(),
            "micro_batch_size": micro_batch_size,
            "seq_len": seq_len, "level": level, "dtype": dtype, "micro_batches": micro_batches}


def run_dryrun(model_config, parallel_config: ParallelConfig, micro_batch_size: int, seq_len: int,
               ranks: Sequence[int] = (0,), level: int = 1, dtype: str = "bf16", micro_batches: int = 0,
               workdir=None, skip_checks: bool = False, timeout: float = 1800, fake_cann_root=None,
               parallel_ranks: int = 1, host_mem_limit_gb: Optional[float] = None) -> List[RankResult]:
    """Compile one train step for each simulated rank in ``ranks``; returns one result per rank.

    ``micro_batches`` (pipeline only; 0 = ``pp``) is the number of micro batches per step.
    ``parallel_ranks`` ranks are compiled at the same time (each is one process). A rank whose
    process grows past ``host_mem_limit_gb`` of resident host memory (default: 3/4 of the RAM,
    split over the parallel ranks) or runs past ``timeout`` seconds is stopped and reported.
    """
    if host_mem_limit_gb is None:
        host_mem_limit_gb = 0.75 * _total_ram_gb() / max(1, parallel_ranks)
    from ms_mm.parallel.fake_cann import dryrun_env, ensure_fake_cann
    from ms_mm.parallel.plans import plan_for_config
    pc = parallel_config
    plan = plan_for_config(model_config)
    micro_batches = micro_batches or (pc.pp if pc.pp > 1 else 1)
    if pc.pp > 1 and micro_batches < pc.pp:
        raise ParallelConfigError(f"micro_batches={micro_batches} is smaller than pp={pc.pp}: MindSpore's "
                                  f"pipeline needs at least one micro batch per stage")
    if not skip_checks:
        plan.check(pc, model_config)
        plan.check_batch(pc, micro_batch_size * pc.dp, seq_len)
    for r in ranks:
        if not 0 <= r < pc.world_size:
            raise ParallelConfigError(f"rank {r} is outside world_size={pc.world_size}")
    root = Path(fake_cann_root) if fake_cann_root else ensure_fake_cann()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ms_mm_dryrun_"))
    spec_path = workdir / "dryrun_spec.json"
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(_worker_args(model_config, pc, micro_batch_size, seq_len, level, dtype,
                                                 micro_batches)))

    def command(rank, rank_dir):
        env = dryrun_env(root, rank_id=rank, rank_size=pc.world_size, level=level)
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], _PROJECT_ROOT])
        return [sys.executable, "-m", "ms_mm.parallel.dryrun", "--worker", str(spec_path)], env

    return run_rank_processes(command, ranks, pc, workdir, timeout=timeout, parallel_ranks=parallel_ranks,
                              host_mem_limit_gb=host_mem_limit_gb)


def run_rank_processes(command, ranks: Sequence[int], pc: ParallelConfig, workdir, timeout: float = 1800,
                       parallel_ranks: int = 1, host_mem_limit_gb: Optional[float] = None,
                       log_name: str = "dryrun.log") -> List[RankResult]:
    """Run ``command(rank, rank_dir) -> (argv, env)`` once per simulated rank (``parallel_ranks`` at a
    time, each in ``workdir/rank<N>``), stopping a process past ``timeout`` seconds or
    ``host_mem_limit_gb`` of resident memory; each log is read for ``STEP_OK`` and the memory figures."""
    if host_mem_limit_gb is None:
        host_mem_limit_gb = 0.75 * _total_ram_gb() / max(1, parallel_ranks)
    workdir = Path(workdir)
    limit_kb = int(host_mem_limit_gb * 1024 * 1024) if host_mem_limit_gb else None
    pending, running, results = list(ranks), [], []
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel_ranks):
                rank = pending.pop(0)
                rank_dir = workdir / f"rank{rank}"
                rank_dir.mkdir(exist_ok=True)
                argv, env = command(rank, rank_dir)
                log_path = rank_dir / log_name
                log = open(log_path, "w")
                proc = subprocess.Popen(argv, cwd=rank_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append({"rank": rank, "proc": proc, "log": log, "log_path": log_path, "start": time.time(),
                                "killed": ""})
            time.sleep(0.5)
            for job in list(running):
                proc = job["proc"]
                if proc.poll() is None:
                    if time.time() - job["start"] > timeout:
                        job["killed"] = f"ms-mm: rank {job['rank']} did not finish within {timeout:.0f}s; stopped"
                    elif limit_kb and _rss_kb(proc.pid) > limit_kb:
                        job["killed"] = (f"ms-mm: rank {job['rank']} used more than {host_mem_limit_gb:g} GiB of host "
                                         f"memory while compiling; stopped (raise --host-mem-limit-gb)")
                    if not job["killed"]:
                        continue
                    proc.kill()
                    proc.wait()
                running.remove(job)
                job["log"].close()
                text = job["log_path"].read_text(errors="replace")
                used, actual = parse_peak_memory(text)
                result = RankResult(job["rank"], proc.returncode, STEP_OK in text and not job["killed"], used, actual,
                                    time.time() - job["start"], str(job["log_path"]))
                if not result.ok:
                    result.error = job["killed"] or extract_error(text) or text[-2000:]
                    result.hint = explain_error(text, pc)
                results.append(result)
    finally:  # interrupted (Ctrl-C) or failed here: no compiling rank process outlives us
        for job in running:
            if job["proc"].poll() is None:
                job["proc"].kill()
                job["proc"].wait()
            job["log"].close()
    return sorted(results, key=lambda r: r.rank)


# ----------------------------------------------------------------------------------------- worker
def _worker(spec_path: str) -> int:
    """Inside one simulated rank: build, parallelize and compile one train step."""
    t0 = time.time()
    spec = json.loads(Path(spec_path).read_text())
    import mindspore as ms
    from mindspore import nn
    from mindspore.communication import init
    from mindspore.nn.utils import no_init_parameters
    from ms_mm.parallel.context import set_parallel_context
    from ms_mm.parallel.pipeline import PipelineTrainOneStepCell, StackedPipelineCell
    from ms_mm.parallel.plans import plan_for_model
    import numpy as np

    pc = ParallelConfig(**spec["parallel"])
    family = registry.get(spec["family"])
    config = family.config_class.from_dict(spec["model"])
    input_names = family.input_names
    dtype = {"bf16": ms.bfloat16, "fp16": ms.float16, "fp32": ms.float32}[spec["dtype"]]
    micro_batches = spec["micro_batches"]

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("Ascend")
    init()
    set_parallel_context(pc)

    with no_init_parameters():
        model = family.build_model(config, dtype)
        plan_for_model(model).apply(model, pc)
        net = _loss_only_cell()(model)
        if pc.pp > 1:
            net = StackedPipelineCell(net, micro_batches)
        optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-5, weight_decay=0.0)
        if pc.pp > 1:
            step = PipelineTrainOneStepCell(net, optimizer, micro_batches)
        else:
            step = nn.TrainOneStepCell(net, optimizer)
    step.set_train()
    print(f"ms-mm dryrun: host RSS after building the step {_rss_kb(os.getpid()) / 2**20:.2f} GiB", flush=True)

    # the global batch of one micro batch: micro_batch_size rows per data-parallel rank
    inputs = synthetic_batch(config, spec["micro_batch_size"] * pc.dp, spec["seq_len"])
    arrays = [inputs[k] for k in input_names]
    if pc.pp > 1:  # identical micro batches, stacked on a leading axis (see StackedPipelineCell)
        arrays = [np.stack([a] * micro_batches) for a in arrays]
    args = [ms.Tensor(a) for a in arrays]
    t1 = time.time()
    step.compile(*args)
    print(f"ms-mm dryrun: host RSS after compiling {_rss_kb(os.getpid()) / 2**20:.2f} GiB", flush=True)
    out = step(*args)
    print(f"ms-mm dryrun: host RSS after the step {_rss_kb(os.getpid()) / 2**20:.2f} GiB", flush=True)
    layouts = {name: {"dev_matrix": list(lay[0]), "tensor_map": list(lay[1]), "slice_shape": list(lay[2])}
               for name, lay in step.parameter_layout_dict.items()}
    Path("parameter_layouts.json").write_text(json.dumps(layouts, sort_keys=True))
    print(f"{STEP_OK} rank={os.environ.get('RANK_ID')} out={getattr(out, 'shape', out)} "
          f"compile+step {time.time() - t1:.1f}s total {time.time() - t0:.1f}s", flush=True)
    return 0


def synthetic_batch(config, batch_size: int, seq_len: int):
    """The family's dry-run inputs (``Family.synthetic_batch``) for ``batch_size`` samples of ``seq_len`` tokens."""
    family = registry.family_of_config(config)
    if family.synthetic_batch is None:
        raise ValueError(f"the {family.name} family gives no synthetic batch for the dry run")
    return family.synthetic_batch(config, batch_size, seq_len)


def _loss_only_cell():
    from mindspore import lazy_inline, nn

    class LossOnly(nn.Cell):
        """The model's loss alone, as MindSpore's train-step cells expect."""

        # lazy_inline: the pipeline calls this cell once per micro batch; compiled as one reused
        # subgraph instead of micro_batches inlined copies (host memory and compile time)
        @lazy_inline
        def __init__(self, model):
            super().__init__(auto_prefix=False)  # keep the MM parameter names
            self.model = model

        def construct(self, *inputs):
            return self.model(*inputs)[0]

    return LossOnly


# ------------------------------------------------------------------------------------------- CLI
def _ranks(text: str):
    if text in ("all", "stages"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: expected comma-separated ints like 0,1, 'stages' or 'all'")


def default_ranks(pc: ParallelConfig, which="stages") -> List[int]:
    """'stages': the first rank of every pipeline stage (stages differ in memory); 'all': every rank."""
    if which == "all":
        return list(range(pc.world_size))
    per_stage = pc.world_size // pc.pp
    return [stage * per_stage for stage in range(pc.pp)]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m ms_mm.parallel.dryrun", description=__doc__.split("\n")[0])
    p.add_argument("--mm-model", required=True,
                   help="a family's preset name or a model json (family taken from it)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=1)
    p.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--llm-pp-layers", type=json.loads, default=None, help="JSON list, e.g. [1,10,10,7]")
    p.add_argument("--vit-pp-layers", type=json.loads, default=None, help="JSON list, e.g. [32,0,0,0]")
    p.add_argument("--micro-batch-size", type=int, default=1, help="per data-parallel rank")
    p.add_argument("--micro-batches", type=int, default=0, help="pipeline micro batches per step (default pp)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--level", type=int, choices=(0, 1), default=1, help="0: compile only; 1: + peak memory")
    p.add_argument("--ranks", type=_ranks, default="stages",
                   help="simulated ranks to compile: 0,1 | stages (first rank of each pipeline stage; default) | all")
    p.add_argument("--parallel-ranks", type=int, default=1, help="ranks compiled at the same time")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="activation dtype")
    p.add_argument("--workdir", default=None, help="where the rank logs go (default: a new temp dir)")
    p.add_argument("--skip-checks", action="store_true", help="let MindSpore find a bad plan itself")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per rank")
    p.add_argument("--host-mem-limit-gb", type=float, default=None,
                   help="stop a rank whose compile uses more host RAM than this (default: 3/4 of the RAM)")
    p.add_argument("--report-json", default=None, help="also write the per-rank results to this JSON file")
    p.add_argument("--fake-cann", default=None, help="a fake CANN tree to use (default: build / reuse the cached one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    args = build_parser().parse_args(argv)
    try:
        config = load_model_config(args.mm_model)
        pc = ParallelConfig(world_size=args.world_size, tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep,
                            llm_pp_layers=args.llm_pp_layers, vit_pp_layers=args.vit_pp_layers)
        ranks = default_ranks(pc, args.ranks) if isinstance(args.ranks, str) else args.ranks
        results = run_dryrun(config, pc, args.micro_batch_size, args.seq_len, ranks=ranks, level=args.level,
                             dtype=args.dtype, micro_batches=args.micro_batches, workdir=args.workdir,
                             skip_checks=args.skip_checks, timeout=args.timeout,
                             parallel_ranks=args.parallel_ranks, fake_cann_root=args.fake_cann,
                             host_mem_limit_gb=args.host_mem_limit_gb)
    except (ParallelConfigError, ValueError, FileNotFoundError, FakeCannError) as e:
        print(f"ms-mm dryrun: {e}", file=sys.stderr)
        return 2
    print(f"DryRun {args.mm_model}: world_size={pc.world_size} dp={pc.dp} tp={pc.tp} pp={pc.pp} ep={pc.ep} "
          f"micro_batch_size={args.micro_batch_size} seq_len={args.seq_len} level={args.level} dtype={args.dtype}")
    for r in results:
        if r.ok:
            mem = (f"used peak {r.used_peak_mb}M, actual peak {r.actual_peak_mb}M"
                   if r.used_peak_mb is not None else "compiled (level 0: no memory figures)")
            print(f"rank {r.rank}: ok, {mem} ({r.seconds:.0f}s)")
        else:
            print(f"rank {r.rank}: FAILED (exit {r.returncode}, log {r.log_path})\n{r.error}")
            if r.hint:
                print(r.hint)
    if args.report_json:
        report = {"parallel": pc.to_dict(), "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
                  "level": args.level, "dtype": args.dtype,
                  "ranks": [dict(dataclasses.asdict(r), ok=r.ok) for r in results]}
        Path(args.report_json).write_text(json.dumps(report, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
