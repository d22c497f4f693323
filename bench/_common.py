"""What the train-step benchmarks share: memory probes, one process per side, the report.

Each side (PyTorch reference, ms-mm) runs in its own subprocess so that its peak RSS is its own;
the worker writes `{"times", "losses", "base_rss_mb", "peak_rss_mb", ...}` as JSON.
"""
from __future__ import annotations

import collections
import csv
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_mb() -> float:
    """High-water mark of this process's resident set size, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


TORCH_PYTHON_ENV = "MS_MM_BENCH_TORCH_PYTHON"


def interpreter(side: str) -> str:
    """The Python of a side: the PyTorch side may live in its own venv (`MS_MM_BENCH_TORCH_PYTHON`,
    e.g. /tmp/torchvenv/bin/python, which needs numpy, torch, transformers and safetensors)."""
    if side == "torch":
        return os.environ.get(TORCH_PYTHON_ENV) or sys.executable
    return sys.executable


def run_worker(script: str, side: str, args: List[str], threads: int, out: Path) -> Dict:
    """Run `script --worker side ARGS --out OUT` in a fresh interpreter and read its JSON result."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(threads))
    cmd = [interpreter(side), script, "--worker", side, *args, "--threads", str(threads), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=out.parent)
    return json.loads(out.read_text())


def torch_available() -> bool:
    ok = subprocess.run([interpreter("torch"), "-c", "import torch"], capture_output=True).returncode == 0
    if not ok:
        print("this benchmark needs PyTorch: pip install torch==2.13.0 (CPU build; do not install torchvision), "
              f"here or in a venv named by {TORCH_PYTHON_ENV}")
    return ok


def torch_matmul_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of PyTorch (MKL/oneDNN) on this machine, GFLOP/s (n^3 matmul)."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def ms_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of MindSpore's CPU MatMul (graph mode), GFLOP/s."""
    import time

    import mindspore as ms
    import numpy as np

    mm = ms.jit(ms.ops.matmul)
    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    b = ms.Tensor(np.random.default_rng(1).standard_normal((n, n)).astype(np.float32))
    mm(a, b).asnumpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).asnumpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def linear_flops(weight_shapes_tokens) -> float:
    """Train-step FLOPs of the matmuls of [(weight shape [out, in, ...], tokens it is applied to)]:
    forward 2*out*in per token, backward twice that (input and weight gradients)."""
    total = 0.0
    for shape, tokens in weight_shapes_tokens:
        macs = 1
        for d in shape:
            macs *= int(d)
        total += 6.0 * macs * tokens
    return total


def attention_flops(layers: int, groups: int, seq: int, width: int) -> float:
    """Train-step FLOPs of softmax(QK^T)V for `groups` sequences of `seq` over `width` = heads*head_dim
    (both bmm's, forward + backward = 3x forward; masked entries counted: they are computed)."""
    return 3.0 * layers * groups * 4.0 * seq * seq * width


def report(title: str, res: Dict[str, Dict], warmup: int, tokens: int, flops: float | None = None,
           peak_gflops: float | None = None) -> Dict[str, float]:
    """Print the PyTorch vs ms-mm table (median step time after warm-up, peak and step RSS, ratios)."""
    def summary(r):
        med = statistics.median(r["times"][warmup:])
        cpu = statistics.median(r["cpu_times"][warmup:]) if r.get("cpu_times") else float("nan")
        return med, cpu, r["peak_rss_mb"], r["peak_rss_mb"] - r["base_rss_mb"]

    t_pt, c_pt, peak_pt, step_pt = summary(res["torch"])
    t_ms, c_ms, peak_ms, step_ms = summary(res["ms"])
    print(title)
    print(f"{'':24}{'step s':>10}{'cpu s':>10}{'tokens/s':>10}{'peak RSS MB':>13}{'step RSS MB':>13}")
    print(f"{'PyTorch eager (HF)':24}{t_pt:10.3f}{c_pt:10.3f}{tokens / t_pt:10.0f}{peak_pt:13.0f}{step_pt:13.0f}")
    print(f"{'ms-mm graph mode':24}{t_ms:10.3f}{c_ms:10.3f}{tokens / t_ms:10.0f}{peak_ms:13.0f}{step_ms:13.0f}")
    print(f"ratio ms-mm / PyTorch: time {t_ms / t_pt:.2f}x (cpu {c_ms / c_pt:.2f}x), "
          f"peak RSS {peak_ms / peak_pt:.2f}x, step RSS {step_ms / max(step_pt, 1e-9):.2f}x")
    print(f"(step s: median wall time per step; cpu s: process CPU time per step, less sensitive to other load; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    parts = [("host input prep", "host"), ("forward+backward", "fwd_bwd"), ("update (norm, clip, AdamW)", "update")]
    pieces = "ms_pieces" in res
    print(f"{'breakdown, median s':24}{'PyTorch':>10}{'ms-mm':>10}"
          + ("   (ms-mm: a separate run of its step as two graphs, micro batch then update)" if pieces else ""))
    for label, key in parts:
        vals = [statistics.median(res[side][key][warmup:]) if res[side].get(key) else float("nan")
                for side in ("torch", "ms_pieces" if pieces else "ms")]
        print(f"{label:24}{vals[0]:10.4f}{vals[1]:10.4f}")
    if pieces:
        t_two = statistics.median(res["ms_pieces"]["times"][warmup:])
        print(f"{'total, two graphs':24}{'':10}{t_two:10.4f}   (one graph, as the trainer runs it: {t_ms:.4f}; "
              f"the two-graph run's peak RSS {res['ms_pieces']['peak_rss_mb']:.0f} MB)")
    if flops and peak_gflops:
        print(f"model FLOPs per step {flops / 1e9:.2f} G; fp32 matmul peak measured here {peak_gflops:.0f} GFLOP/s "
              f"(best of PyTorch {res['torch'].get('matmul_gflops', float('nan')):.0f} / MindSpore "
              f"{res['ms'].get('matmul_gflops', float('nan')):.0f}, 2048^3 GEMM)")
        for side, t in (("PyTorch", t_pt), ("ms-mm", t_ms)):
            rate = flops / t / 1e9
            print(f"  {side:8} {rate:7.1f} GFLOP/s = {100.0 * rate / peak_gflops:5.1f} % of the matmul peak")
    return {"time_ratio": t_ms / t_pt, "peak_ratio": peak_ms / peak_pt}


def ms_timed_steps(step, prepare, steps: int, pieces: bool) -> Dict:
    """Run and time ``steps`` train steps of a ms-mm ``TrainStep`` (one micro batch each), every one to
    completion. ``prepare()`` builds the step's input Tensors (host input preparation, timed apart).

    ``pieces=False``: the step the trainer runs, forward + backward + update in one graph (TrainStep's
    fused path); ``pieces=True``: the same step as two graphs (micro batch, then update; a TrainStep
    built with ``fuse_update=False``), which is what the forward + backward / update breakdown is
    timed on. Returns the per-step lists (``outputs``: each step's model outputs, loss then extra
    outputs, as floats) and ``first_outputs`` (the first step's model outputs as lists, computed with the
    weights before any update)."""
    import mindspore as ms

    times, cpu, losses, host, fwd_bwd, update, first, every = [], [], [], [], [], [], None, []
    profile = OpProfile()  # MS_MM_BENCH_PROFILE=DIR: op-type shares of the steps after the first two
    for i in range(steps):
        profile.step(i)
        t0, c0 = time.perf_counter(), time.process_time()
        inputs = prepare()
        t1 = time.perf_counter()
        if pieces:
            out, grads = step._micro_step(*inputs)
            for g in grads:   # the loss is ready before the backward ends: wait for every gradient too
                g.asnumpy()
            t2 = time.perf_counter()
            norm, _ = step._apply(ms.mutable(grads))
        else:
            out, norm, _ = step._fused_step(*inputs)
        norm.asnumpy()   # (the next step's graph starts after this one's updates: the medians include them)
        t3 = time.perf_counter()
        outputs = [o.asnumpy() for o in out]
        first = outputs if first is None else first
        losses.append(float(outputs[0]))
        every.append([float(o) if o.size == 1 else float("nan") for o in outputs])
        times.append(t3 - t0)
        cpu.append(time.process_time() - c0)
        host.append(t1 - t0)
        if pieces:
            fwd_bwd.append(t2 - t1)
            update.append(t3 - t2)
    profile.finish()
    return {"times": times, "cpu_times": cpu, "losses": losses, "host": host, "fwd_bwd": fwd_bwd,
            "update": update, "outputs": every, "first_outputs": [o.tolist() for o in first]}


PROFILE_ENV = "MS_MM_BENCH_PROFILE"


class OpProfile:
    """With ``MS_MM_BENCH_PROFILE=DIR``, MindSpore's profiler records the ms-mm worker's steps from
    ``start_step`` on (after the compiling ones) into DIR and the worker prints kernel time per step
    by op type at the end (the full per-op table is ``DIR/*/FRAMEWORK/cpu_op_detail_info_0.csv``).
    Profiling slows the steps: a profiled run's timings are not results. Call ``step(i)`` at the top
    of each step and ``finish()`` after the last."""

    def __init__(self, start_step: int = 2):
        self.dir = os.environ.get(PROFILE_ENV)
        self.start_step, self.profiler, self.steps = start_step, None, 0

    def step(self, i: int) -> None:
        if self.dir and i == self.start_step:
            import mindspore as ms

            self.profiler = ms.Profiler(output_path=self.dir)
        if self.profiler is not None:
            self.steps += 1

    def finish(self, top: int = 20) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler.analyse()
        print_op_shares(self.dir, self.steps, top)


def print_op_shares(profile_dir: str, steps: int, top: int = 20) -> None:
    """Kernel time and count per step by op type, from a MindSpore CPU profile."""
    files = glob.glob(os.path.join(profile_dir, "*", "FRAMEWORK", "cpu_op_detail_info_0.csv"))
    if not files:
        print(f"no cpu_op_detail_info_0.csv under {profile_dir}")
        return
    time_of, count_of = collections.Counter(), collections.Counter()
    with open(files[0]) as f:
        for row in csv.DictReader(f):
            time_of[row["op_type"]] += float(row["op_total_time(ms)"]) / steps
            count_of[row["op_type"]] += int(row["op_occurrences"]) / steps
    total = sum(time_of.values())
    print(f"ms-mm kernels per step: {sum(count_of.values()):.0f}, {total:.1f} ms (profiled over {steps} steps, "
          f"load average {os.getloadavg()[0]:.1f})")
    for op, ms_ in time_of.most_common(top):
        print(f"  {op:32}{ms_:9.2f} ms {100.0 * ms_ / total:5.1f} %  x{count_of[op]:.0f}")
