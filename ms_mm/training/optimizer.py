"""Learning-rate schedule and AdamW, built from mindformers' implementations.

Megatron semantics: linear warm-up from 0 to --lr over `warmup_iters`, then cosine (or linear)
decay to --min-lr at --lr-decay-iters (default --train-iters), or constant. The schedule is a
function of the optimizer's `global_step` (the number of optimizer steps taken), so restoring that
step restores the schedule. Weight decay skips biases and 1-D parameters (norms), as Megatron does.

AdamW is PyTorch's (decoupled weight decay, bias-corrected moments). On Ascend it is mindformers'
fused kernel; elsewhere `FusedAdamW` below: MindSpore's one-kernel-per-parameter `AdamWeightDecay`
primitive, whose update has no bias correction, driven with a per-step learning rate, epsilon and
weight decay chosen so that its update *is* the bias-corrected one (see `FusedAdamW`). That is one
kernel per parameter instead of mindformers' basic path's ~9 (Mul, Assign, Div, Addcmul, Pow, ...).
"""
from __future__ import annotations

from typing import List

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import operations as P


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


_fused_adamw = ops.MultitypeFuncGraph("ms_mm_fused_adamw")


@_fused_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor")
def _fused_adamw_param(opt, beta1, beta2, lr_t, eps_t, decay_ratio, weight_decay, param, exp_avg, exp_avg_sq, grad):
    return opt(param, exp_avg, exp_avg_sq, lr_t, beta1, beta2, eps_t, weight_decay * decay_ratio,
               ops.cast(grad, param.dtype))


class FusedAdamW(nn.Optimizer):
    """PyTorch's AdamW (bias-corrected, decoupled weight decay) in one kernel per parameter.

    At step t (bc1 = 1 - beta1^t, bc2 = 1 - beta2^t) PyTorch / mindformers update

        p <- p * (1 - lr * wd) - (lr / bc1) * m / (sqrt(v / bc2) + eps)

    and MindSpore's `AdamWeightDecay` primitive (same m, v recurrences, no bias correction) does
    p <- p - lr' * (m / (sqrt(v) + eps') + wd' * p). Multiplying the first form's fraction by
    sqrt(bc2) / sqrt(bc2) shows the two agree for lr' = lr * sqrt(bc2) / bc1, eps' = eps * sqrt(bc2)
    and wd' = wd * bc1 / sqrt(bc2) (so lr' * wd' = lr * wd): three scalars per step, exact up to fp32
    rounding (checked against mindformers' AdamW by tests/test_perf_optimizer.py). Moments are named
    `adam_m.<param>` / `adam_v.<param>`, as mindformers' AdamW names them, so checkpoints carry over.
    """

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(learning_rate, params, weight_decay=weight_decay)
        if self.dynamic_weight_decay:
            raise ValueError("FusedAdamW: a weight-decay schedule is not supported (give a float)")
        if getattr(self, "is_group_lr", False):
            raise ValueError("FusedAdamW: per-group learning rates are not supported")
        self.beta1 = Tensor(np.array([betas[0]], np.float32))
        self.beta2 = Tensor(np.array([betas[1]], np.float32))
        self.eps = Tensor(np.array([eps], np.float32))
        self.exp_avg = self._parameters.clone(prefix="adam_m", init="zeros")
        self.exp_avg_sq = self._parameters.clone(prefix="adam_v", init="zeros")
        self.fused_opt = P.AdamWeightDecay()

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = ops.cast(self.global_step, ms.float32)
        bc1 = 1.0 - ops.pow(self.beta1, step)
        sqrt_bc2 = ops.sqrt(1.0 - ops.pow(self.beta2, step))
        lr_t = ops.reshape(lr, (1,)) * sqrt_bc2 / bc1
        eps_t = self.eps * sqrt_bc2
        decay_ratio = bc1 / sqrt_bc2
        if self.is_group:
            return self.hyper_map(ops.partial(_fused_adamw, self.fused_opt, self.beta1, self.beta2, lr_t, eps_t,
                                              decay_ratio),
                                  weight_decay, self._parameters, self.exp_avg, self.exp_avg_sq, gradients)
        return self.hyper_map(ops.partial(_fused_adamw, self.fused_opt, self.beta1, self.beta2, lr_t, eps_t,
                                          decay_ratio, weight_decay),
                              self._parameters, self.exp_avg, self.exp_avg_sq, gradients)


def build_optimizer(args, params: List[ms.Parameter], device_target: str):
    groups = split_decay_groups(params, args.weight_decay)
    if device_target.upper() == "ASCEND":
        from mindformers.core.optim import AdamW

        return AdamW(groups, learning_rate=build_lr_schedule(args), betas=(args.adam_beta1, args.adam_beta2),
                     eps=args.adam_eps, weight_decay=float(args.weight_decay), use_fused=True)
    return FusedAdamW(groups, learning_rate=build_lr_schedule(args), betas=(args.adam_beta1, args.adam_beta2),
                      eps=float(args.adam_eps), weight_decay=float(args.weight_decay))


def current_lr(optimizer) -> float:
    """The LR the next optimizer step will use (the schedule at the current global_step)."""
    lr = optimizer.learning_rate
    if isinstance(lr, nn.learning_rate_schedule.LearningRateSchedule):
        return float(lr(optimizer.global_step.value()).asnumpy().reshape(-1)[0])
    return float(lr.asnumpy().reshape(-1)[0])
