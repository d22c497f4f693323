"""What the train-step benchmarks share: memory probes, one process per side, the report.

Each side (PyTorch reference, ms-mm) runs in its own subprocess so that its peak RSS is its own;
the worker writes `{"times", "losses", "base_rss_mb", "peak_rss_mb", ...}` as JSON.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
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


def run_worker(script: str, side: str, args: List[str], threads: int, out: Path) -> Dict:
    """Run `script --worker side ARGS --out OUT` in a fresh interpreter and read its JSON result."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, script, "--worker", side, *args, "--threads", str(threads), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=out.parent)
    return json.loads(out.read_text())


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("this benchmark needs PyTorch: pip install torch==2.13.0 (CPU build; do not install torchvision)")
        return False
    return True


def report(title: str, res: Dict[str, Dict], warmup: int, tokens: int) -> Dict[str, float]:
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
    return {"time_ratio": t_ms / t_pt, "peak_ratio": peak_ms / peak_pt}
