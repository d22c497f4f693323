"""Launcher behind the example finetune scripts: weights check, embedded default, dry run, msrun.

    python -m ms_mm.training.launch [msrun flags: --local_worker_num --worker_num --node_rank
        --master_addr --master_port --log_dir --join --bind_core ...] -- [trainer flags]

What it does, in order:
1. parses the trainer flags (an unknown flag fails here, before anything starts);
2. `DRY_RUN=1`: runs this same trainer (`pretrain_vlm.py`) for 2 iterations on simulated Ascend
   ranks (MindSpore DryRun, `ms_mm.parallel.fake_cann`): the first rank of every pipeline stage, or
   every rank with `DRY_RUN_RANKS=all` (or a list `0,4`); weights uninitialised
   (`no_init_parameters`), the configured data (a synthetic batch when it cannot be read), no
   checkpoint saved; prints one line per rank with its predicted peak device memory against the
   card's 64 GB, and stops. Logs under `<--log_dir>/dryrun/rank<N>/`;
3. if the weights the scripts name are absent (`--load` dir, or the HF directory the data json
   names: the family's `EmbeddedDefault.hf_dir_key`, e.g. `model_name_or_path` or `processor_path`),
   prints one line saying so and switches to the **embedded default** of the model family
   (`Family.embedded_default`, found through `ms_mm.registry` by the model json's `model_id`): a tiny
   model in the upstream HF layout (`Family.build_tiny`), converted with the family's converter
   (`convert.hf_to_mm`), the family's bundled demo data, and a short finetune with one worker on CPU;
   afterwards the result is converted back (`convert.mm_to_hf`);
4. otherwise checks the sizes (world size vs. parallel sizes, expert count vs. EP, precision on this
   device) and starts training: directly for one worker, through `msrun` for more.

Environment knobs: `MS_MM_DEMO_ITERS` (embedded-default iterations, default 200), `DRY_RUN`,
`DRY_RUN_RANKS` (stages | all | 0,4), `DRY_RUN_LEVEL` (1: + memory figures; 0: compile only),
`DRY_RUN_PARALLEL` (ranks compiled at the same time, default 1), `DRY_RUN_TIMEOUT` (s per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ms_mm import registry
from ms_mm.training.arguments import ArgumentError, parse_args
from ms_mm.training.trainer import (DRY_RUN_ENV, check_parallel_sizes, device_target, family_and_config,
                                    parallel_run_config, refuse_parallel_on_cpu)

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_SCRIPT = Path(__file__).resolve().with_name("pretrain_vlm.py")

HF_DIR_KEY = "dataset_param.preprocess_parameters.model_name_or_path"   # families without a recipe


def _msrun_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ms_mm.training.launch", allow_abbrev=False)
    p.add_argument("--worker_num", type=int, default=1)
    p.add_argument("--local_worker_num", type=int, default=1)
    p.add_argument("--node_rank", type=int, default=0)
    p.add_argument("--master_addr", default="127.0.0.1")
    p.add_argument("--master_port", type=int, default=6000)
    p.add_argument("--log_dir", default="msrun_log")
    p.add_argument("--join", default="True")
    p.add_argument("--bind_core", default=None)
    p.add_argument("--cluster_time_out", default=None)
    p.add_argument("--tail_worker_log", default=None)
    return p


def _set_flag(argv: List[str], flag: str, value: Optional[str]) -> List[str]:
    """Remove every occurrence of `flag` (with its value if `value` is not None) and append the new one."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1 if value is None else 2
            continue
        if argv[i].startswith(flag + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out + ([flag] if value is None else [flag, str(value)])


def _drop_flag(argv: List[str], flag: str) -> List[str]:
    return [a for a in argv if a != flag]


def _embedded(model_id: str):
    """The family's embedded-default recipe, or None (unknown model_id, or a family without one)."""
    try:
        return registry.get(model_id).embedded_default
    except registry.UnknownFamilyError:
        return None


def _hf_dir_key(model_id: str) -> str:
    emb = _embedded(model_id)
    return emb.hf_dir_key if emb is not None else HF_DIR_KEY


def _hf_dir(data_json: dict, model_id: str) -> Optional[str]:
    """The HF checkpoint directory the data json names (the tokenizer / processor source)."""
    value = data_json
    for key in _hf_dir_key(model_id).split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, str) else None


def _weights_present(path: Optional[str]) -> bool:
    if not path:
        return False
    p = Path(path)
    return p.is_dir() and any(p.iterdir())


def _say(what: str) -> None:
    print(f"[ms-mm] {what}", flush=True)


def prepare_embedded_default(model_id: str, user_model_json: dict, workdir: Path = Path(".")) -> dict:
    """Build (once) the tiny HF model, its MM conversion, the demo data and their jsons.

    Returns {"load", "mm_model", "mm_data", "hf_dir", "family", "trust_remote_code", "name"}; paths
    relative to `workdir`.
    """
    import convert

    family = registry.get(model_id)
    recipe = family.embedded_default
    name = recipe.name
    hf_dir = workdir / "ckpt" / "hf_path" / name
    mm_dir = workdir / "ckpt" / "mm_path" / name
    data_dir = workdir / recipe.demo_dir
    conf_dir = workdir / "ckpt" / "embedded_default" / family.name
    if not (hf_dir / "config.json").is_file():
        _say(f"building the tiny model (HF layout) in {hf_dir}")
        family.build_tiny(hf_dir, 0)
    if not (mm_dir / "latest_checkpointed_iteration.txt").is_file():
        _say(f"converting it with {family.converter} hf_to_mm into {mm_dir}")
        convert.hf_to_mm(hf_dir, mm_dir, family.name, trust_remote_code=recipe.trust_remote_code)
    if not (data_dir / recipe.demo_data_file).is_file():
        _say(f"writing the bundled demo data into {data_dir}")
        recipe.write_demo(data_dir)
    conf_dir.mkdir(parents=True, exist_ok=True)
    model_json = conf_dir / "model.json"
    model_json.write_text(json.dumps(recipe.model_json(hf_dir, user_model_json), indent=2))
    data_json = conf_dir / "data.json"
    data_json.write_text(json.dumps(recipe.demo_data_json(data_dir, hf_dir), indent=2))
    return {"load": str(mm_dir), "mm_model": str(model_json), "mm_data": str(data_json), "hf_dir": str(hf_dir),
            "family": family.name, "converter": family.converter, "trust_remote_code": recipe.trust_remote_code,
            "name": name, "train_overrides": dict(recipe.train_overrides)}


def explicit_load(argv: Sequence[str]) -> Optional[str]:
    """A `--load` appended on the script's command line (given after the script's own, so given twice)
    that names an MM checkpoint directory: the embedded default honours it instead of the tiny release."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--load"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--load=")]
    if len(values) < 2:
        return None
    last = _flag_value(argv, "--load")
    return last if last and (Path(last) / "latest_checkpointed_iteration.txt").is_file() else None


def embedded_overrides(argv: List[str], emb: dict, device: str) -> List[str]:
    """The user's trainer flags, rewritten for a short single-worker run of the tiny model (an explicit
    `--load` of a checkpoint appended by the user stays)."""
    iters = int(os.environ.get("MS_MM_DEMO_ITERS", "200"))
    overrides = {
        "--load": explicit_load(argv) or emb["load"], "--mm-model": emb["mm_model"], "--mm-data": emb["mm_data"],
        "--tensor-model-parallel-size": 1, "--pipeline-model-parallel-size": 1, "--context-parallel-size": 1,
        "--expert-model-parallel-size": 1,
        "--micro-batch-size": 2, "--global-batch-size": 4, "--train-iters": iters,
        "--lr": 1e-3, "--min-lr": 1e-5, "--lr-warmup-fraction": 0.05, "--clip-grad": 1.0, "--weight-decay": 0.0,
        "--num-workers": 2, "--log-interval": max(1, iters // 40),
    }
    overrides.update(emb.get("train_overrides") or {})      # the family's own demo settings
    out = list(argv)
    for flag, value in overrides.items():
        out = _set_flag(out, flag, str(value))
    out = _drop_flag(out, "--finetune")
    if device.upper() == "CPU":
        out = _drop_flag(out, "--bf16")      # no bf16 kernels on CPU: fp32
    return out


def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """Last value given for `flag` (the trainer parses it the same way: last one wins)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


CARD_MEMORY_MB = 65536       # the simulated Ascend card (DryRun: "Device MOC memory size: 65536M")


def _size(mb: int) -> str:
    return f"{mb} MB" if mb < 10240 else f"{mb / 1024:.1f} GB"


def _absolute_paths(value, base: Path):
    """`value` (a parsed json) with every relative path string that exists under `base` made absolute."""
    if isinstance(value, dict):
        return {k: _absolute_paths(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(v, base) for v in value]
    if (isinstance(value, str) and ("/" in value or value.startswith(".")) and not Path(value).is_absolute()
            and (base / value).exists()):
        return str((base / value).resolve())
    return value


def trainer_dry_run(train_argv: List[str], model_json: dict, world_size: int, log_dir: str) -> int:
    """`DRY_RUN=1`: the trainer itself on simulated Ascend ranks, one line per rank with its peak memory."""
    from ms_mm.parallel import ParallelConfigError
    from ms_mm.parallel.dryrun import default_ranks, run_rank_processes
    from ms_mm.parallel.fake_cann import FakeCannError, dryrun_env, ensure_fake_cann
    from ms_mm.parallel.training import run_parallel_config

    args = parse_args(train_argv)
    seq_len = _flag_value(train_argv, "--seq-length") or ""
    try:
        args.validate(world_size, "Ascend")
        family, config = family_and_config(model_json, args.mm_model)
        check_parallel_sizes(family, config, args, args.mm_model)
        parallel = parallel_run_config(family, config, args, model_json, world_size, args.mm_model,
                                       int(seq_len or 0))
        pc = parallel[0] if parallel else run_parallel_config(args, world_size, model_json)
        which = os.environ.get("DRY_RUN_RANKS", "stages").strip() or "stages"
        if which in ("stages", "all"):
            ranks = default_ranks(pc, which)
        else:
            ranks = [int(r) for r in which.split(",") if r.strip()]
            bad = [r for r in ranks if not 0 <= r < world_size]
            if bad:
                raise ArgumentError(f"DRY_RUN_RANKS={which}: rank(s) {bad} outside the world of {world_size}")
        root = ensure_fake_cann()
    except (ArgumentError, ParallelConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FakeCannError as e:
        print(f"error: DRY_RUN=1: {e}", file=sys.stderr)
        return 2
    level = int(os.environ.get("DRY_RUN_LEVEL", "1"))
    rank_argv = list(train_argv)
    workdir = Path(log_dir).resolve() / "dryrun"
    workdir.mkdir(parents=True, exist_ok=True)
    # the ranks run in their own log directories: a json naming relative paths that exist here (dataset
    # files, the checkpoint dir a model json reads its config from) is handed over as a copy with them absolute
    for flag, name in (("--mm-model", "model.json"), ("--mm-data", "data.json")):
        given = Path(_flag_value(train_argv, flag)).resolve()
        content = json.loads(given.read_text())
        absolute = _absolute_paths(content, Path.cwd())
        if absolute != content:
            given = workdir / name
            given.write_text(json.dumps(absolute, indent=2))
        rank_argv = _set_flag(rank_argv, flag, str(given))
    for flag in ("--save", "--save-interval", "--load", "--tensorboard-dir"):
        rank_argv = _set_flag(rank_argv, flag, "")[:-2]
    rank_argv = _set_flag(rank_argv, "--train-iters", "2")
    rank_argv = _set_flag(rank_argv, "--log-interval", "1")
    rank_argv = _set_flag(rank_argv, "--num-workers", "0")
    stage_size = pc.world_size // pc.pp

    def command(rank, rank_dir):
        env = dryrun_env(root, rank_id=rank, rank_size=world_size, level=level)
        for key in ("MS_WORKER_NUM", "WORLD_SIZE", "MS_NODE_RANK", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        env.update({DRY_RUN_ENV: "1", "MS_MM_DEVICE_TARGET": "Ascend", "MS_MM_DRY_RUN_SEQ_LEN": seq_len,
                    "TRANSFORMERS_VERBOSITY": "error"})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
        return [sys.executable, str(ENTRY_SCRIPT), *rank_argv], env

    _say(f"DRY_RUN=1: {family.name} on {world_size} simulated Ascend ranks (dp {pc.dp}, tp {pc.tp}, pp {pc.pp}, "
         f"ep {pc.ep}{', distributed optimizer' if args.use_distributed_optimizer else ''}): the trainer for 2 "
         f"iterations on rank(s) {','.join(map(str, ranks))}, weights uninitialised, no checkpoint written; "
         f"logs in {workdir}")
    results = run_rank_processes(command, ranks, pc, workdir,
                                 timeout=float(os.environ.get("DRY_RUN_TIMEOUT", "3600")),
                                 parallel_ranks=int(os.environ.get("DRY_RUN_PARALLEL", "1")), log_name="train.log")
    fits_all = True
    for r in results:
        where = f"rank {r.rank} (pipeline stage {r.rank // stage_size})"
        if not r.ok:
            fits_all = False
            print(f"{where}: FAILED (exit {r.returncode}, log {r.log_path})\n{r.error}"
                  + (f"\n{r.hint}" if r.hint else ""), flush=True)
        elif r.actual_peak_mb is None:
            print(f"{where}: ok, compiled and ran 2 iterations (level {level}: no memory figures) "
                  f"({r.seconds:.0f} s)", flush=True)
        else:
            fits = r.actual_peak_mb <= CARD_MEMORY_MB
            fits_all &= fits
            print(f"{where}: ok, predicted peak device memory {_size(r.actual_peak_mb)} "
                  f"({_size(r.used_peak_mb)} without fragments) of {CARD_MEMORY_MB // 1024} GB: "
                  f"{'fits' if fits else 'DOES NOT FIT'} ({r.seconds:.0f} s)", flush=True)
    return 0 if fits_all else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        launcher_argv, train_argv = argv[:cut], argv[cut + 1:]
    else:
        launcher_argv, train_argv = [], argv
    runner = _msrun_parser().parse_args(launcher_argv)
    try:
        args = parse_args(train_argv)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for flag, value in (("--mm-model", args.mm_model), ("--mm-data", args.mm_data)):
        if not value or not Path(value).is_file():
            print(f"error: {flag} {value}: no such file", file=sys.stderr)
            return 2
    try:
        model_json = json.loads(Path(args.mm_model).read_text())
        data_json = json.loads(Path(args.mm_data).read_text())
    except json.JSONDecodeError as e:
        print(f"error: invalid JSON in the model/data json: line {e.lineno} column {e.colno}: {e.msg}",
              file=sys.stderr)
        return 2
    if os.environ.get("DRY_RUN", "0") not in ("", "0"):
        return trainer_dry_run(train_argv, model_json, runner.worker_num, runner.log_dir)

    device = device_target()
    model_id = model_json.get("model_id", "")
    hf_path = _hf_dir(data_json, model_id)
    missing = []
    if args.load is not None and not _weights_present(args.load):
        missing.append(f"LOAD_PATH {args.load}")
    if hf_path is not None and not _weights_present(hf_path):
        missing.append(f"{_hf_dir_key(model_id).rsplit('.', 1)[-1]} {hf_path}")
    embedded = None
    if missing:
        recipe = _embedded(model_id)
        if recipe is None:
            print(f"error: {' and '.join(missing)} not found, and model_id {model_id!r} has no embedded default",
                  file=sys.stderr)
            return 2
        hub = recipe.hub.format(name=Path(hf_path or args.load or "").name)
        convert = " ".join(["mm-convert", registry.get(model_id).converter, "hf_to_mm",
                            *(["--cfg.trust_remote_code", "True"] if recipe.trust_remote_code else [])])
        where = _hf_dir_key(model_id).rsplit(".", 1)[-1]
        print(f"[ms-mm] {' and '.join(missing)} not found: running the embedded default (tiny model + demo data, "
              f"1 worker on {device}); for real weights download {hub} to the data json's {where}, "
              f"convert it with `{convert}` into LOAD_PATH (see README.md).", flush=True)
        try:
            embedded = prepare_embedded_default(model_id, model_json)
        except (OSError, ValueError, KeyError) as e:   # ConversionError is a ValueError
            print(f"error: preparing the embedded default failed: {e}", file=sys.stderr)
            return 1
        train_argv = embedded_overrides(train_argv, embedded, device)
        runner.worker_num = runner.local_worker_num = 1
    else:
        # fail here, before msrun starts N processes, on sizes / precision that cannot work
        try:
            checked = parse_args(train_argv)
            if model_id:
                family, config = family_and_config(model_json, args.mm_model)
                check_parallel_sizes(family, config, checked, args.mm_model)
            checked.validate(runner.worker_num, device)
            refuse_parallel_on_cpu(checked, device, runner.worker_num)
            if model_id:
                parallel_run_config(family, config, checked, model_json, runner.worker_num, args.mm_model,
                                    int(_flag_value(train_argv, "--seq-length") or 0))
        except ArgumentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # msrun starts its workers with `python`: make that this interpreter
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.setdefault("GLOG_v", "3")                       # MindSpore: errors only
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if runner.worker_num == 1 and runner.local_worker_num == 1:
        cmd = [sys.executable, str(ENTRY_SCRIPT), *train_argv]
    else:
        msrun = Path(sys.executable).with_name("msrun")
        cmd = [str(msrun) if msrun.is_file() else "msrun",
               f"--worker_num={runner.worker_num}", f"--local_worker_num={runner.local_worker_num}",
               f"--node_rank={runner.node_rank}", f"--master_addr={runner.master_addr}",
               f"--master_port={runner.master_port}", f"--log_dir={runner.log_dir}", f"--join={runner.join}"]
        for opt in ("bind_core", "cluster_time_out", "tail_worker_log"):
            if getattr(runner, opt) is not None:
                cmd.append(f"--{opt}={getattr(runner, opt)}")
        cmd += [str(ENTRY_SCRIPT), *train_argv]
    print(f"[ms-mm] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0 or embedded is None:
        return rc
    if args.save:
        import convert

        out = Path("ckpt") / "mm_to_hf" / embedded["name"]
        _say(f"converting the result back with {embedded['converter']} mm_to_hf into {out}")
        try:
            convert.mm_to_hf(args.save, embedded["hf_dir"], out, embedded["family"],
                             trust_remote_code=embedded["trust_remote_code"])
        except (OSError, ValueError, KeyError) as e:
            print(f"error: converting {args.save} back to the HF layout failed: {e}", file=sys.stderr)
            return 1
        print(f"[ms-mm] embedded default done: finetuned checkpoint in {args.save}, HF layout in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
