"""Training checkpoints: model weights + optimizer, RNG, data-loader and step state, saved atomically.

Layout (docs/internals.md), one commit per iteration through `mm_checkpoint.staged_iteration`:

    SAVE/iter_0000010/
        parallel_layout.json, mp_rank_00/model.safetensors    model weights (mm_checkpoint)
        optim.safetensors     AdamW moments + global_step      (unless --no-save-optim)
        rng.json              python / numpy / MindSpore RNG   (unless --no-save-rng)
        data_state.json       data-loader position
        train_state.json      iteration, consumed samples, loss-scaler state, args summary
        ema/                  the weights' EMA (`ms_mm.training.ema`), same layout as the model
    SAVE/latest_checkpointed_iteration.txt                     written last

Everything is written into a hidden staging dir that is renamed into place only when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one. `--load` accepts a
converter output (`release`: weights only, training starts at iteration 0) or a training save dir.
Only rank 0 writes: under data parallel every rank holds the same model and optimizer state.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import mindspore as ms
import numpy as np

from ms_mm.training import mm_checkpoint as mmc

OPTIM_FILE = "optim.safetensors"
RNG_FILE = "rng.json"
DATA_STATE_FILE = "data_state.json"
TRAIN_STATE_FILE = "train_state.json"
EMA_DIR = "ema"
EMA_PREFIX = "ema."           # the sharded step's EMA Parameters: ema.<weight>
# Test hook: "<iteration>:<marker file>" makes the save of that iteration create the marker and
# stall inside the staged write (before the commit), so a test can kill the process there.
STALL_ENV = "MS_MM_TEST_STALL_IN_SAVE"


class TrainCheckpointError(RuntimeError):
    """A training checkpoint cannot be loaded; the message names the file or key."""


@dataclass
class LoadedState:
    iteration: int = 0
    consumed_samples: int = 0
    release: bool = True
    data_state: Optional[Dict[str, Any]] = None
    train_state: Optional[Dict[str, Any]] = None
    iter_dir: Optional[Path] = None          # the directory the weights came from
    # deferred=True (a sharded run, which reads its slices once the step is compiled): what to read
    weights_dir: Optional[Path] = None
    optim_file: Optional[Path] = None


# --- model weights ------------------------------------------------------------------------------

def model_state(model) -> Dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def load_model_weights(model, path: str) -> None:
    """Load full-MM-name weights into `model`; every model parameter must be present."""
    try:
        weights = mmc.load_model(path, float32=True)
    except mmc.CheckpointError as e:
        raise TrainCheckpointError(f"--load {path}: {e}") from e
    params = {p.name: p for p in model.get_parameters()}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise TrainCheckpointError(
            f"--load {path}: checkpoint does not match the model json: "
            + (f"{len(missing)} model parameter(s) missing from the checkpoint, e.g. {missing[:3]}; " if missing else "")
            + (f"{len(unexpected)} checkpoint tensor(s) unknown to the model, e.g. {unexpected[:3]}" if unexpected else ""))
    for name, p in params.items():
        arr = weights[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise TrainCheckpointError(f"--load {path}: tensor {name!r} has shape {list(arr.shape)}, "
                                       f"the model expects {list(p.shape)}")
        p.set_data(ms.Tensor(arr, dtype=p.dtype))


# --- optimizer ----------------------------------------------------------------------------------

def _optimizer_state(optimizer, model_param_names) -> Dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in optimizer.get_parameters() if p.name not in model_param_names}


def _load_optimizer_state(optimizer, model_param_names, path: Path) -> None:
    saved = mmc.read_safetensors(path)
    own = {p.name: p for p in optimizer.get_parameters() if p.name not in model_param_names}
    missing = sorted(set(own) - set(saved))
    if missing:
        raise TrainCheckpointError(f"{path}: optimizer state has no entry for {missing[:3]} "
                                   f"({len(missing)} missing; was the model json's freeze set changed? "
                                   f"then resume with --no-load-optim)")
    for name, p in own.items():
        arr = saved[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise TrainCheckpointError(f"{path}: {name!r} has shape {list(arr.shape)}, expected {list(p.shape)}")
        p.set_data(ms.Tensor(arr, dtype=p.dtype))


# --- RNG ----------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"algo": algo, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "mindspore": ms.get_rng_state().asnumpy().tolist(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["algo"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    ms.set_rng_state(ms.Tensor(np.asarray(state["mindspore"], dtype=np.uint8)))


# --- save / load --------------------------------------------------------------------------------

def remove_stale_staging(save_dir: str) -> list:
    """Delete staging dirs (`.tmp_iter_*_<pid>`) left by killed runs whose process is gone."""
    import shutil

    removed = []
    root = Path(save_dir)
    if not root.is_dir():
        return removed
    for d in root.glob(".tmp_*_*"):
        pid = d.name.rsplit("_", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                      # that process still runs: maybe saving right now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, *, family: str, data_state, train_state,
                    save_optim: bool = True, save_rng: bool = True,
                    extra_models: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> Path:
    """Commit one iteration atomically; returns the iteration dir. `extra_models` ({"ema": state}) are
    written as further model directories inside it."""
    layout = mmc.ParallelLayout(family=family)
    names = {p.name for p in model.get_parameters()}
    with mmc.staged_iteration(save_dir, iteration) as stage:
        mmc.write_model_files(stage, model_state(model), layout)
        for name, state in (extra_models or {}).items():
            mmc.write_model_files(stage / name, state, layout)
        if save_optim:
            mmc.write_safetensors(stage / OPTIM_FILE, _optimizer_state(optimizer, names))
        if save_rng:
            _write_json(stage / RNG_FILE, rng_state())
        _write_json(stage / DATA_STATE_FILE, data_state)
        _write_json(stage / TRAIN_STATE_FILE, train_state)
        _maybe_stall(iteration, stage)
    return mmc.iteration_dir(save_dir, iteration)


def load_checkpoint(load_dir: str, model, optimizer, *, load_optim: bool = True, load_rng: bool = True,
                    finetune: bool = False, weights_from: Optional[str] = None, deferred: bool = False) -> LoadedState:
    """Restore from a converter output (release) or a training save dir (its latest iteration).
    `weights_from="ema"`: the model weights come from the iteration's `ema/` (when it has one).
    `deferred`: the weights and optimizer moments are not read here; the state names where they are
    (`weights_dir`, `optim_file`) for `load_sharded_weights` once the sharded step is compiled."""
    root = Path(load_dir)
    if not root.exists():
        raise TrainCheckpointError(f"--load {load_dir}: no such directory")
    try:
        latest = mmc.latest_iteration(root)
    except mmc.CheckpointError as e:
        raise TrainCheckpointError(f"--load {load_dir}: {e}") from e
    iter_dir = root if latest is None else mmc.iteration_dir(root, latest)
    if latest is not None and not iter_dir.is_dir():
        raise TrainCheckpointError(f"{root / mmc.LATEST_FILE} names iteration {latest!r} but {iter_dir} is missing")
    weights_dir = iter_dir
    if weights_from and (iter_dir / weights_from).is_dir():
        weights_dir = iter_dir / weights_from
    if deferred:
        try:
            mmc.open_model(weights_dir)            # a readable MM checkpoint: say so now, not after compiling
        except mmc.CheckpointError as e:
            raise TrainCheckpointError(f"--load {load_dir}: {e}") from e
    else:
        load_model_weights(model, str(weights_dir))
    train_file = iter_dir / TRAIN_STATE_FILE
    if latest == "release" or finetune or not train_file.is_file():
        return LoadedState(iter_dir=weights_dir, weights_dir=weights_dir)
    train_state = _read_json(train_file)
    names = {p.name for p in model.get_parameters()}
    optim_file = iter_dir / OPTIM_FILE
    if load_optim:
        if not optim_file.is_file():
            raise TrainCheckpointError(f"{optim_file} is missing (saved with --no-save-optim?); "
                                       f"resume with --no-load-optim to start a fresh optimizer")
        if not deferred:
            _load_optimizer_state(optimizer, names, optim_file)
    # --no-load-optim: a fresh optimizer, step 0 included. mindformers' AdamW drives both the bias
    # correction and the LR schedule from that one step, so the schedule restarts with its warm-up
    # (as Megatron, which loads the scheduler only together with the optimizer).
    rng_file = iter_dir / RNG_FILE
    if load_rng:
        if not rng_file.is_file():
            raise TrainCheckpointError(f"{rng_file} is missing (saved with --no-save-rng?); "
                                       f"resume with --no-load-rng")
        set_rng_state(_read_json(rng_file))
    data_file = iter_dir / DATA_STATE_FILE
    return LoadedState(iteration=int(train_state["iteration"]),
                       consumed_samples=int(train_state.get("consumed_samples", 0)), release=False,
                       data_state=_read_json(data_file) if data_file.is_file() else None,
                       train_state=train_state, iter_dir=iter_dir, weights_dir=weights_dir,
                       optim_file=optim_file if load_optim else None)


# --- sharded runs: every rank reads and writes its own blocks (ms_mm.parallel.checkpoint) -------------

def _layout_of(layouts, name, shape):
    """The compiled layout of `name`, or whole-tensor on every rank for a parameter the graph left out."""
    from ms_mm.parallel.checkpoint import ParamLayout

    return layouts.get(name) or ParamLayout(full_shape=tuple(shape), dev_matrix=(), tensor_map=())


def graph_unused(model) -> set:
    """Names of the model's weights its compiled graph never uses (``model.graph_unused_prefixes``, e.g.
    DeepSeek-VL2's SigLIP attention-pool head, kept for the checkpoint): no stage compiles them."""
    prefixes = tuple(getattr(model, "graph_unused_prefixes", ()))
    return {p.name for p in model.get_parameters() if prefixes and p.name.startswith(prefixes)}


def sharded_state(model, optimizer, layouts, pipeline: bool = False, ema=(), first_stage: bool = True) -> Dict[str, Any]:
    """{name: Parameter} of this rank's part of a sharded checkpoint: the model's weights, the
    optimizer's own state (moments, step) and the weights' EMA (``ema``: the step's ``ema.<weight>``
    Parameters), without the pipeline's gradient accumulators. Under pipeline parallel every rank builds
    the whole model but compiles only its stage: a weight (and its moments and EMA, ``<prefix>.<weight>``)
    without a compiled layout belongs to another stage and is left out, except the weights no stage's
    graph uses (``graph_unused``), which the first stage's ranks hold whole (``first_stage``)."""
    model_params = {p.name: p for p in model.get_parameters()}
    kept = graph_unused(model) if pipeline and first_stage else set()
    mine = lambda name: name in layouts or not pipeline or name in kept
    out = {n: p for n, p in model_params.items() if mine(n)}
    for p in list(optimizer.get_parameters()) + list(ema):
        if p.name in model_params or p.name.startswith("accu_grads."):
            continue
        weight = p.name.split(".", 1)[-1]
        if mine(p.name) or weight in kept or weight not in model_params:
            out[p.name] = p
    return out


def _is_ema(name: str) -> bool:
    return name.startswith(EMA_PREFIX)


def load_sharded_weights(state: LoadedState, model, optimizer, layouts, rank: int, pipeline: bool = False,
                         ema=(), first_stage: bool = True) -> int:
    """Set each parameter to this rank's block of the checkpoint `state` names (deferred load): model
    weights out of its MM dir (any TP / PP / EP split, re-sliced), optimizer moments out of its
    optim.safetensors, the weights' EMA (``ema``) out of its ``ema/`` (a resumed iteration that has one;
    otherwise the EMA starts at the loaded weights, as ``WeightEMA`` does). Returns the number of tensors
    set; a missing or misshapen tensor names itself."""
    from ms_mm.parallel import checkpoint as shards

    model_names = {p.name for p in model.get_parameters()}
    params = sharded_state(model, optimizer, layouts, pipeline, ema, first_stage)
    averaged = sorted(n for n in params if _is_ema(n))
    sources = [(state.weights_dir, sorted(n for n in params if n in model_names), None)]
    if state.optim_file is not None:
        sources.append((state.optim_file, sorted(n for n in params if n not in model_names and not _is_ema(n)), None))
    if averaged:
        sources.append((saved_ema_dir(state) or state.weights_dir, averaged, lambda n: n[len(EMA_PREFIX):]))
    done = 0
    for where, names, rename in sources:
        lays = {n: _layout_of(layouts, n, params[n].shape) for n in names}
        try:
            blocks = shards.read_rank_slices(where, lays, rank, rename=rename)
        except (shards.ShardedCheckpointError, mmc.CheckpointError) as e:
            raise TrainCheckpointError(f"--load {where}: {e}") from e
        for name, arr in blocks.items():
            p = params[name]
            if tuple(p.shape) not in (tuple(arr.shape), tuple(lays[name].full_shape)):
                raise TrainCheckpointError(f"--load {where}: {name!r} block {list(arr.shape)} does not fit the "
                                           f"compiled parameter {list(p.shape)}")
            p.set_data(ms.Tensor(arr, dtype=p.dtype), slice_shape=True)
            done += 1
    return done


def save_sharded_checkpoint(save_dir: str, iteration: int, model, optimizer, layouts, *, rank: int, family: str,
                            data_state, train_state, save_optim: bool = True, save_rng: bool = True,
                            barrier=None, pipeline: bool = False,
                            layout: Optional["mmc.ParallelLayout"] = None, ema=(),
                            first_stage: bool = True) -> Optional[Path]:
    """Every rank writes the blocks it owns into `SAVE/.shards_iter_N/`; after `barrier()` rank 0
    streams the full tensors out of them into an ordinary iteration dir (one tensor in memory at a
    time: model in the mp_rank layout `layout` - the run's TP / PP / EP split, `run_checkpoint_layout` -
    or unsplit when None, moments in optim.safetensors, the weights' EMA (``ema``, the step's
    ``ema.<weight>`` Parameters) as the model dir ``ema/`` in the same layout, frozen weights there as
    themselves), commits it as `save_checkpoint` does, and removes the blocks. Returns the iteration dir
    on rank 0."""
    import shutil

    from ms_mm.parallel import checkpoint as shards

    model_names = [p.name for p in model.get_parameters()]
    params = sharded_state(model, optimizer, layouts, pipeline, ema, first_stage)
    if not save_optim:
        params = {n: p for n, p in params.items() if n in set(model_names) or _is_ema(n)}
    shard_dir = Path(save_dir) / f".shards_{mmc.iteration_dir(save_dir, iteration).name}"
    lays = {n: _layout_of(layouts, n, p.shape) for n, p in params.items()}
    shards.write_rank_shard(shard_dir, rank, {n: p.asnumpy() for n, p in params.items()}, lays)
    if barrier is not None:
        barrier()
    if rank != 0:
        if barrier is not None:
            barrier()
        return None
    full = shards.assemble(shard_dir)
    layout = layout or mmc.ParallelLayout(family=family)
    with mmc.staged_iteration(save_dir, iteration) as stage:
        mmc.write_model_files(stage, {n: full[n] for n in model_names}, layout)
        if any(_is_ema(n) for n in full):
            mmc.write_model_files(stage / EMA_DIR, {n: full.get(EMA_PREFIX + n, full[n]) for n in model_names}, layout)
        if save_optim:
            mmc.write_safetensors(stage / OPTIM_FILE, {n: t for n, t in full.items()
                                                       if n not in set(model_names) and not _is_ema(n)})
        if save_rng:
            _write_json(stage / RNG_FILE, rng_state())
        _write_json(stage / DATA_STATE_FILE, data_state)
        _write_json(stage / TRAIN_STATE_FILE, train_state)
    shutil.rmtree(shard_dir, ignore_errors=True)
    if barrier is not None:
        barrier()
    return mmc.iteration_dir(save_dir, iteration)


def run_checkpoint_layout(family, config, pc) -> "mmc.ParallelLayout":
    """The converter's mp_rank layout (``mm-convert``'s TP / PP / EP split) of a sharded run's sizes: what its
    checkpoints are saved in, so ``mm_to_hf`` and ``resplit`` read them as they read a converted model.
    Pipeline stages get the run's layer lists (``pc.stage_layers``: the vision tower on stage 0 unless given)."""
    from convert.framework import make_layout

    spec = family.spec()
    pp_layers = {}
    if pc.pp > 1:
        counts = spec.layer_counts(config)
        for key, (count_key, _) in spec.pp_modules.items():
            pp_layers[key] = pc.stage_layers(f"{key}_pp_layers", counts[count_key], default_all_first=key == "vit")
    return make_layout(spec, config, tp_size=pc.tp, pp_layers=pp_layers, ep_size=pc.ep)


def saved_ema_dir(state: LoadedState) -> Optional[Path]:
    """The ``ema/`` of the iteration ``state`` resumes, or None (a release, a finetune start, none saved):
    the EMA then starts at the loaded weights."""
    if state.iter_dir is None or state.release or not (state.iter_dir / EMA_DIR).is_dir():
        return None
    return state.iter_dir / EMA_DIR


def read_extra_model(iter_dir, name: str) -> Optional[Dict[str, np.ndarray]]:
    """The weights of `iter_dir/<name>` (e.g. the EMA), or None when the checkpoint has none."""
    path = Path(iter_dir) / name
    if not path.is_dir():
        return None
    try:
        return mmc.load_model(str(path), float32=True)
    except mmc.CheckpointError as e:
        raise TrainCheckpointError(f"{path}: {e}") from e


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainCheckpointError(f"{path}: cannot read ({e})") from e


def _maybe_stall(iteration: int, stage: Path) -> None:
    spec = os.environ.get(STALL_ENV)
    if not spec:
        return
    it, _, marker = spec.partition(":")
    if int(it) == int(iteration):
        Path(marker).write_text(str(stage))
        while True:  # wait to be killed
            time.sleep(1)
