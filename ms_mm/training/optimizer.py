"""Learning-rate schedule and AdamW, built from mindformers' implementations.

Megatron semantics: linear warm-up from 0 to --lr over `warmup_iters`, then cosine (or linear)
decay to --min-lr at --lr-decay-iters (default --train-iters), or constant. The schedule is a
function of the optimizer's `global_step` (the number of optimizer steps taken), so restoring that
step restores the schedule. Weight decay skips biases and 1-D parameters (norms), as Megatron does.
AdamW is mindformers' basic implementation on CPU and its fused kernel on Ascend.
"""
from __future__ import annotations

from typing import List

import mindspore as ms
from mindspore import nn


class _LinearDecayWithWarmUp(nn.learning_rate_schedule.LearningRateSchedule):
    """Megatron's 'linear' style: warm-up, then a straight line from lr to min_lr, then min_lr."""

    def __init__(self, lr, min_lr, warmup, decay):
        super().__init__()
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup = float(max(warmup, 0))
        self.span = float(max(decay - warmup, 1))

    def construct(self, global_step):
        step = ms.ops.cast(global_step, ms.float32)
        warm = self.lr * step / max(self.warmup, 1.0)
        frac = ms.ops.clip_by_value((step - self.warmup) / self.span, 0.0, 1.0)
        decayed = self.lr - (self.lr - self.min_lr) * frac
        return ms.ops.select(step < self.warmup, warm, decayed)


def build_lr_schedule(args):
    from mindformers.core.lr import ConstantWarmUpLR, CosineWithWarmUpLR

    total = int(args.lr_decay_iters or args.train_iters)
    warmup = int(args.warmup_iters)
    if args.lr_decay_style == "cosine":
        return CosineWithWarmUpLR(learning_rate=float(args.lr), warmup_steps=warmup, total_steps=max(total, 1),
                                  lr_end=float(args.min_lr))
    if args.lr_decay_style == "constant":
        return ConstantWarmUpLR(learning_rate=float(args.lr), warmup_steps=warmup, total_steps=max(total, 1))
    return _LinearDecayWithWarmUp(args.lr, args.min_lr, warmup, total)


def split_decay_groups(params: List[ms.Parameter], weight_decay: float):
    """Megatron's parameter groups: no weight decay on biases and 1-D tensors (norm weights)."""
    if not weight_decay:
        return list(params)
    decay = [p for p in params if len(p.shape) > 1 and not p.name.endswith(".bias")]
    no_decay = [p for p in params if not (len(p.shape) > 1 and not p.name.endswith(".bias"))]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(args, params: List[ms.Parameter], device_target: str):
    from mindformers.core.optim import AdamW

    return AdamW(split_decay_groups(params, args.weight_decay), learning_rate=build_lr_schedule(args),
                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                 weight_decay=float(args.weight_decay), use_fused=device_target.upper() == "ASCEND")


def current_lr(optimizer) -> float:
    """The LR the next optimizer step will use (the schedule at the current global_step)."""
    lr = optimizer.learning_rate
    if isinstance(lr, nn.learning_rate_schedule.LearningRateSchedule):
        return float(lr(optimizer.global_step.value()).asnumpy().reshape(-1)[0])
    return float(lr.asnumpy().reshape(-1)[0])
