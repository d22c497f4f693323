"""Exponential moving average of the model weights (upstream BAGEL's `ema_model`), kept beside training.

    ema = decay * ema + (1 - decay) * weight        after every optimizer step, every parameter

Frozen parameters (requires_grad False) are not averaged: their EMA is the weight itself. The average lives on the
device as its own Parameters (one `ms.jit` update for all of them), is saved as a full model state
under `ema/` of each checkpoint iteration (`checkpointing.EMA_DIR`, the same layout as the model, so
`mm-convert ... mm_to_hf` and `--load` read it), restored on resume, and `--finetune-from-ema` starts
a run from it. The decay comes from `--ema` or, by default, the family record (`Family.ema_decay`).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

import mindspore as ms
from mindspore import nn, ops


def average_into(decay, avg, weight):
    """``avg <- decay * avg + (1 - decay) * weight`` in fp32 (one parameter's step; also the sharded step's)."""
    new = decay * ops.cast(avg, ms.float32) + (1.0 - decay) * ops.cast(weight, ms.float32)
    return ops.assign(avg, ops.cast(new, avg.dtype))


class _EMAUpdate(nn.Cell):
    """Holds both parameter tuples (as an optimizer does), so one graph updates every average."""

    def __init__(self, averages, params, decay):
        super().__init__(auto_prefix=False)
        self.averages, self.weights = averages, params
        self.decay = float(decay)
        self.hyper_map = ops.HyperMap()

    def construct(self):
        return self.hyper_map(ops.partial(average_into, self.decay), self.averages, self.weights)


class WeightEMA:
    def __init__(self, model, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.all_params = list(model.get_parameters())
        # frozen parameters never change: their "average" is the weight itself (no rounding drift)
        self.params = [p for p in self.all_params if p.requires_grad]
        self.averages = ms.ParameterTuple([ms.Parameter(p.value().copy(), name=f"ema.{p.name}", requires_grad=False)
                                           for p in self.params])
        self.steps = 0
        self._cell = _EMAUpdate(self.averages, ms.ParameterTuple(self.params), self.decay)

    def update(self) -> None:
        self._cell()
        self.steps += 1

    def state(self) -> Dict[str, np.ndarray]:
        """{model parameter name: averaged weight} (the model's names: a loadable model state)."""
        averaged = {p.name: a.asnumpy() for p, a in zip(self.params, self.averages)}
        return {p.name: averaged[p.name] if p.name in averaged else p.asnumpy() for p in self.all_params}

    def load(self, weights: Dict[str, np.ndarray], where: str) -> None:
        missing = [p.name for p in self.params if p.name not in weights]
        if missing:
            raise KeyError(f"{where}: EMA weights lack {len(missing)} parameter(s), e.g. {missing[:3]}")
        for p, a in zip(self.params, self.averages):
            arr = weights[p.name]
            if tuple(arr.shape) != tuple(a.shape):
                raise ValueError(f"{where}: EMA tensor {p.name!r} has shape {list(arr.shape)}, expected {list(a.shape)}")
            a.set_data(ms.Tensor(arr, dtype=a.dtype))
