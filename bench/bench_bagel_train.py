"""Benchmark of BAGEL's packed train step on the embedded default (tiny BAGEL + demo data), or any
model / data json: step time, tokens/s (real packed tokens), peak host RSS, packing efficiency, and the
data loader's samples/s against what the step consumes.

    python bench/bench_bagel_train.py [--steps 20] [--warmup 3] [--mm-model J --mm-data J --load DIR]

Not a test. The loader is timed on its own (a fresh loader pulling batches as fast as it can) and
alongside the step (how often the step found no batch ready: `waits`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mm-model")
    p.add_argument("--mm-data")
    p.add_argument("--load")
    p.add_argument("--loader-batches", type=int, default=60)
    args = p.parse_args(argv)

    import mindspore as ms

    from ms_mm import registry
    from ms_mm.training.arguments import parse_args
    from ms_mm.training.checkpointing import load_model_weights
    from ms_mm.training.launch import prepare_embedded_default
    from ms_mm.training.optimizer import build_optimizer
    from ms_mm.training.train_step import TrainStep
    from ms_mm.training.trainer import apply_freeze

    work = Path(tempfile.mkdtemp(prefix="bench_bagel_"))
    if not args.mm_model:
        emb = prepare_embedded_default("bagel", {}, work)
        args.mm_model, args.mm_data, args.load = emb["mm_model"], emb["mm_data"], emb["load"]
    model_json = json.loads(Path(args.mm_model).read_text())
    data_json = json.loads(Path(args.mm_data).read_text())
    family = registry.get(model_json["model_id"])
    config = family.config_from_json(model_json)
    ms.set_context(mode=ms.GRAPH_MODE)

    # 1. the loader alone
    loader = family.build_dataloader(data_json, config, 1, 1234, 0, 1, 1, False)
    next(loader)
    t0 = time.perf_counter()
    for _ in range(args.loader_batches):
        next(loader)
    dt = time.perf_counter() - t0
    st = loader.stats
    loader_batches_s = args.loader_batches / dt
    loader_samples_s = (st["samples"] - 0) / dt
    efficiency = st["real_tokens"] / st["budget_tokens"]
    samples_per_batch = st["samples"] / st["batches"]
    loader.close()

    # 2. the train step (+ the loader in the background, as in training)
    targs = parse_args(["--mm-model", args.mm_model, "--mm-data", args.mm_data, "--lr", "1e-4"])
    targs.validate(1, "CPU")
    model = family.build_model(config, ms.float32)
    load_model_weights(model, str(Path(args.load) / "release") if (Path(args.load) / "release").is_dir() else args.load)
    trainable = apply_freeze(model, model_json, family, lambda m: None)
    opt = build_optimizer(targs, trainable, "CPU")
    step = TrainStep(model, opt, clip_grad=1.0, extra_outputs=family.metric_outputs)
    loader = family.build_dataloader(data_json, config, 1, 1234, 0, 1, 1, False)
    times, tokens, waits = [], [], 0
    for i in range(args.warmup + args.steps):
        if loader.prefetched == 0 and i > 0:
            waits += 1
        batch = next(loader)
        t = time.perf_counter()
        step([tuple(ms.Tensor(np.asarray(batch[k])) for k in family.input_names)])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            tokens.append(batch["num_real_tokens"])
    loader.close()
    step_s = float(np.mean(times))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    report = {
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
        "budget_tokens": int(batch["token_budget"]),
        "step_time_ms": round(step_s * 1000, 1), "step_time_ms_p90": round(float(np.percentile(times, 90)) * 1000, 1),
        "tokens_per_s": round(float(np.sum(tokens) / np.sum(times)), 1),
        "peak_rss_gib": round(rss_gb, 3),
        "packing_efficiency": round(efficiency, 3), "samples_per_packed_batch": round(samples_per_batch, 2),
        "loader_batches_per_s": round(loader_batches_s, 1), "loader_samples_per_s": round(loader_samples_s, 1),
        "step_consumes_samples_per_s": round(samples_per_batch / step_s, 1),
        "steps_that_waited_for_data": waits,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
