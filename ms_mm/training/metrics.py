"""Training log output: Megatron-style iteration lines, a progress bar on terminals, TensorBoard.

The line format is Megatron's (`iteration  N/ T | consumed samples: ... | elapsed time per iteration
(ms): ... | learning rate: ... | lm loss: ... | grad norm: ...`) so the post-processing in
MindSpeed-MM's scripts (grep "elapsed time per iteration", "tokens per sample") works unchanged.
Only rank 0 prints. A family's extra metrics (`Family.step_metrics`: MoE aux loss, expert
load ...) are appended to the line as `name: value` (a list as `[v0 v1 ...]`) and written to
TensorBoard as `name` (a list as `name/0`, `name/1`, ...).
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Metric = Union[float, List[float]]


def mean_metrics(samples: Sequence[Dict[str, Metric]]) -> Dict[str, Metric]:
    """Element-wise mean of named metrics (micro-batches, log window); lists stay lists."""
    samples = [s for s in samples if s]
    if not samples:
        return {}
    out: Dict[str, Metric] = {}
    for name, first in samples[0].items():
        values = np.mean([np.asarray(s[name], np.float64) for s in samples], axis=0)
        out[name] = [float(v) for v in values] if isinstance(first, (list, tuple, np.ndarray)) else float(values)
    return out


def flatten_metrics(metrics: Dict[str, Metric]) -> Tuple[List[Tuple[str, int]], np.ndarray]:
    """(layout, float vector): one vector for a single data-parallel all-reduce."""
    layout, values = [], []
    for name, v in metrics.items():
        arr = np.atleast_1d(np.asarray(v, np.float64)).ravel()
        layout.append((name, -1 if not isinstance(v, (list, tuple, np.ndarray)) else arr.size))
        values.extend(arr.tolist())
    return layout, np.asarray(values, np.float32)


def unflatten_metrics(layout: List[Tuple[str, int]], vector) -> Dict[str, Metric]:
    out, i = {}, 0
    for name, n in layout:
        if n < 0:
            out[name], i = float(vector[i]), i + 1
        else:
            out[name], i = [float(x) for x in vector[i:i + n]], i + n
    return out


def format_metric(value: Metric) -> str:
    if isinstance(value, list):
        return "[" + " ".join(f"{v:.4g}" for v in value) + "]"
    return f"{value:.6E}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.6f}"


def tensorboard_tag(name: str) -> str:
    return name.replace(" ", "-").replace("/", "-over-")


class MetricsLogger:
    def __init__(self, *, train_iters: int, start_iteration: int, global_batch_size: int, log_interval: int,
                 log_tps: bool, tensorboard_dir: Optional[str], is_rank0: bool, stream=None, extra_line=None):
        self.train_iters, self.gbs = train_iters, global_batch_size
        self.log_interval, self.log_tps = max(1, log_interval), log_tps
        self.is_rank0 = is_rank0
        # a family's second line in its upstream format: extra_line(iteration, window metrics, steps/s) -> str
        self.extra_line = extra_line
        self.stream = stream or sys.stdout
        self.writer = None
        if tensorboard_dir and is_rank0:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)
        self.bar = None
        if is_rank0 and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=train_iters, initial=start_iteration, unit="it", dynamic_ncols=True,
                            file=sys.stderr)
        self._window = []        # (loss, step_time, tokens) since the last log line
        self._metric_window = []  # the family's named metrics, same steps
        self.total_time = 0.0
        self._steps_seen = 0
        self.total_tokens = 0
        self.total_samples = 0
        self.skipped_iters = 0
        self.nan_iters = 0

    def print(self, msg: str) -> None:
        if not self.is_rank0:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def step(self, *, iteration: int, consumed_samples: int, loss: float, lr: float, grad_norm: float,
             finite: bool, step_time: float, tokens: int, loss_scale: Optional[float],
             skipped_samples: int = 0, metrics: Optional[Dict[str, Metric]] = None) -> None:
        # the first step of a run includes graph compilation: keep it out of the throughput summary
        if self._steps_seen > 0:
            self.total_time += step_time
            self.total_tokens += tokens
            self.total_samples += self.gbs
        self._steps_seen += 1
        if not finite:
            self.skipped_iters += 1
            if loss != loss:
                self.nan_iters += 1
        self._window.append((loss, step_time, tokens))
        self._metric_window.append(metrics or {})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.writer is not None:
            self.writer.add_scalar("lm-loss", loss, iteration)
            self.writer.add_scalar("learning-rate", lr, iteration)
            self.writer.add_scalar("grad-norm", grad_norm, iteration)
            self.writer.add_scalar("samples-per-second", self.gbs / step_time, iteration)
            if self.log_tps:
                self.writer.add_scalar("tokens-per-second", tokens / step_time, iteration)
            if loss_scale is not None:
                self.writer.add_scalar("loss-scale", loss_scale, iteration)
            for name, value in (metrics or {}).items():
                tag = tensorboard_tag(name)
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{tag}/{i}", v, iteration)
                else:
                    self.writer.add_scalar(tag, value, iteration)
        if iteration % self.log_interval and iteration != self.train_iters:
            return
        n = len(self._window)
        mean_loss = sum(w[0] for w in self._window) / n
        mean_time = sum(w[1] for w in self._window) / n
        mean_tokens = sum(w[2] for w in self._window) / n
        self._window = []
        window_metrics = mean_metrics(self._metric_window)
        self._metric_window = []
        parts = [
            f"iteration {iteration:8d}/{self.train_iters:8d}",
            f"consumed samples: {consumed_samples:12d}",
            f"elapsed time per iteration (ms): {mean_time * 1000:.1f}",
            f"learning rate: {lr:.6E}",
            f"global batch size: {self.gbs:5d}",
            f"lm loss: {mean_loss:.6E}",
        ]
        parts += [f"{name}: {format_metric(value)}" for name, value in window_metrics.items()]
        if loss_scale is not None:
            parts.append(f"loss scale: {loss_scale:.1f}")
        parts += [
            f"grad norm: {grad_norm:.3f}",
            f"number of skipped iterations: {self.skipped_iters:3d}",
            f"number of nan iterations: {self.nan_iters:3d}",
            f"samples per second: {self.gbs / mean_time:.3f}",
        ]
        if self.log_tps:
            parts += [f"tokens per sample: {mean_tokens / self.gbs:.1f}",
                      f"tokens per second: {mean_tokens / mean_time:.1f}"]
        if skipped_samples:
            parts.append(f"skipped bad samples: {skipped_samples}")
        self.print(" " + " | ".join(parts) + " |")
        if self.extra_line is not None:
            self.print(self.extra_line(iteration, window_metrics, 1.0 / mean_time if mean_time > 0 else 0.0))

    def summary(self) -> None:
        """End-of-run throughput (first, compiling step excluded), in MindSpeed-MM's summary lines."""
        if self.total_time <= 0 or self._steps_seen < 2:
            return
        self.print(f"Elapsed Time Per iteration: {self.total_time / (self._steps_seen - 1) * 1000:.1f}")
        self.print(f"Average Samples per Second: {self.total_samples / self.total_time:.3f}")
        if self.log_tps:
            self.print(f"Consumed Tokens per Second: {self.total_tokens / self.total_time:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
