"""One optimizer step in graph mode: micro-batch forward/backward, accumulation, reduction, update.

    micro batch  -> value_and_grad(loss * scale / accum)          (jit, one graph per input shape)
    accumulate   -> grads += micro grads                          (jit, accum > 1 only)
    apply        -> DP all-reduce (mean) -> grad norm (+ finite check) -> one scale for unscale and
                    clip -> AdamW                                 (jit, once per step)
    accum 1      -> micro batch + apply in one graph               (`fuse_update`, the default)

The pieces are MindSpore's own: `ms.value_and_grad`, `nn.DistributedGradReducer(mean=True)`,
`ms.amp.DynamicLossScaler` / `StaticLossScaler` (the fused TrainOneStep cells need NPU float-status
ops that CPU lacks). A step whose gradients overflow (fp16) leaves the parameters untouched and
lowers the loss scale.

The update is a handful of kernels plus one per parameter, not a handful per parameter: the
gradient norm concatenates the gradients into flat buckets (`GRAD_BUCKET_NUMEL` elements at most,
Megatron's grad buckets) and takes one dot product per bucket; the finite check is that norm's
(an inf or nan anywhere makes it non-finite); loss-scale unscaling and clipping are one multiply
per gradient with one scalar; the optimizer (`ms_mm.training.optimizer.FusedAdamW` off Ascend)
is one kernel per parameter.

Shapes: by default every distinct input shape gets its own compiled graph, cached by MindSpore
and reused (the data loader pads batches to a few shape buckets, so there are few).
`dynamic_shapes=True` compiles one graph with every dimension unknown instead, which is
~1.7x slower per step on CPU.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import nn, ops

_hyper_map = ops.HyperMap()
GRAD_BUCKET_NUMEL = 1 << 24      # 16M elements (64 MB fp32): the temporary of one norm bucket

_dot = ops.MatMul(transpose_b=True)


def _square_sum(g):
    return ops.reduce_sum(ops.square(ops.cast(g, ms.float32)))


def grad_buckets(shapes, limit: int = GRAD_BUCKET_NUMEL):
    """Consecutive index ranges of parameters whose sizes add up to at most `limit` (a larger
    parameter is a bucket of its own)."""
    buckets, start, size = [], 0, 0
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape)) if len(shape) else 1
        if i > start and size + n > limit:
            buckets.append((start, i))
            start, size = i, 0
        size += n
    if shapes:
        buckets.append((start, len(shapes)))
    return tuple(buckets)


def global_norm(grads, buckets=None):
    """sqrt(sum of squares) of all gradients, in fp32. With `buckets` (from `grad_buckets`): one
    concatenation and one dot product per bucket instead of three kernels per gradient."""
    if buckets is None:
        return ops.sqrt(ops.addn(_hyper_map(_square_sum, grads)))
    parts = []
    for start, stop in buckets:
        flat = [ops.reshape(ops.cast(grads[i], ms.float32), (1, -1)) for i in range(start, stop)]
        row = flat[0] if len(flat) == 1 else ops.cat(flat, 1)
        parts.append(ops.reshape(_dot(row, row), ()))
    total = parts[0] if len(parts) == 1 else ops.addn(parts)
    return ops.sqrt(total)


def _scale_grad(coef, g):
    return g * ops.cast(coef, g.dtype)


class _FusedStep(nn.Cell):
    def __init__(self, grad_fn, apply_update):
        super().__init__(auto_prefix=False)
        self.grad_fn = grad_fn
        self.apply_update = apply_update

    def construct(self, *inputs):
        out, grads = self.grad_fn(*inputs)
        norm, finite = self.apply_update(grads)
        return out[1:], norm, finite


class _MicroStep(nn.Cell):
    def __init__(self, grad_fn):
        super().__init__(auto_prefix=False)
        self.grad_fn = grad_fn

    def construct(self, *inputs):
        out, grads = self.grad_fn(*inputs)
        return out[1:], grads      # (loss, *extra outputs), grads


class TrainStep:
    """Call with a list of micro-batches (tuples of Tensors in the model's input order).

    Returns (mean loss over the micro-batches, grad norm before clipping, finite flag).
    `extra_outputs` names further outputs of the model's construct (indices; 0 is the loss): they
    come back, per micro-batch, as numpy arrays in `last_extra_outputs` (no gradient flows into them).
    """

    def __init__(self, model: nn.Cell, optimizer: nn.Optimizer, *, accum_steps: int = 1, clip_grad: float = 0.0,
                 loss_scaler=None, data_parallel: bool = False, dynamic_shapes: bool = False,
                 extra_outputs: Sequence[int] = (), fuse_update: bool = True):
        self.model, self.optimizer = model, optimizer
        self.params = optimizer.parameters
        self.accum_steps = int(accum_steps)
        self.loss_scaler = loss_scaler
        inv_accum = 1.0 / self.accum_steps
        scaler = loss_scaler
        extra_idx = tuple(int(i) for i in extra_outputs)
        self.last_extra_outputs = []

        def forward(*inputs):
            outputs = model(*inputs)
            loss = outputs[0]
            scaled = loss * inv_accum
            if scaler is not None:
                scaled = scaler.scale(scaled)
            result = (scaled, loss)
            for i in extra_idx:
                result = result + (outputs[i],)
            return result

        grad_fn = ms.value_and_grad(forward, None, self.params, has_aux=True)

        # One graph per input shape (the loader's shape buckets keep them few); dynamic_shapes=True
        # declares every dim unknown on the first call instead (one graph, slower steps).
        self._micro_cell = _MicroStep(grad_fn)
        self._dynamic_shapes = dynamic_shapes
        self._inputs_declared = set()   # ids of the cells whose dynamic inputs are declared
        # input-shape signature -> micro-batches run with it; each new one costs one compile
        self.graph_shapes: dict = {}
        self.new_shapes: list = []      # signatures first seen in the last call

        @ms.jit
        def accumulate(acc, grads):
            return _hyper_map(ops.add, acc, grads)

        reducer = nn.DistributedGradReducer(self.params, mean=True) if data_parallel else None
        clip = float(clip_grad)
        buckets = grad_buckets([p.shape for p in self.params])

        def apply_update(grads):
            if reducer is not None:
                grads = reducer(grads)
            norm = global_norm(grads, buckets)
            coef = None
            if scaler is not None:
                inv_scale = 1.0 / scaler.scale_value
                finite = ops.isfinite(norm)
                norm = norm * inv_scale
                scaler.adjust(finite)
                coef = inv_scale
            else:
                finite = ms.Tensor(True)
            if clip > 0:
                clip_coef = clip / ops.maximum(norm, clip)
                coef = clip_coef if coef is None else coef * clip_coef
            if coef is not None:
                grads = _hyper_map(ops.partial(_scale_grad, coef), grads)
            if finite:
                optimizer(grads)
            return norm, finite

        self._accumulate, self._apply = accumulate, ms.jit(apply_update)
        # accum 1: forward, backward and update in one graph (the gradients never leave it as outputs; on
        # the CPU benches 6-27 % faster than two graphs in four runs of six, docs/performance.md)
        self.fused = self.accum_steps == 1 and fuse_update
        self._fused_cell = _FusedStep(grad_fn, apply_update) if self.fused else None
        self._data_parallel = data_parallel
        if data_parallel:
            from mindspore.communication import get_group_size

            all_reduce = ops.AllReduce()
            inv_world = 1.0 / get_group_size()

            @ms.jit
            def dp_mean(x):
                return all_reduce(x) * inv_world

            self._dp_mean = dp_mean

    def _micro_step(self, *inputs):
        return self._run(self._micro_cell, inputs)

    def _fused_step(self, *inputs):
        """accum 1: ((loss, *extra outputs), grad norm, finite) of one forward + backward + update."""
        return self._run(self._fused_cell, inputs)

    def _run(self, cell, inputs):
        signature = tuple(tuple(t.shape) for t in inputs) if not self._dynamic_shapes else ()
        if signature not in self.graph_shapes:
            self.graph_shapes[signature] = 0
            self.new_shapes.append(signature)
        self.graph_shapes[signature] += 1
        if self._dynamic_shapes and id(cell) not in self._inputs_declared:
            cell.set_inputs(*[ms.Tensor(shape=[None] * t.ndim, dtype=t.dtype) for t in inputs])
            self._inputs_declared.add(id(cell))
        return cell(*inputs)

    def __call__(self, micro_batches: Sequence[Sequence[ms.Tensor]]):
        if len(micro_batches) != self.accum_steps:
            raise ValueError(f"expected {self.accum_steps} micro-batches per step, got {len(micro_batches)}")
        losses, acc, extras = [], None, []
        self.new_shapes = []
        if self.fused:
            out, norm, finite = self._fused_step(*micro_batches[0])
            losses.append(out[0])
            extras.append(tuple(t.asnumpy() for t in out[1:]))
        else:
            for inputs in micro_batches:
                out, grads = self._micro_step(*inputs)
                losses.append(out[0])
                extras.append(tuple(t.asnumpy() for t in out[1:]))
                acc = grads if acc is None else self._accumulate(ms.mutable(acc), ms.mutable(grads))
            # mutable: a tuple of tensors passed to a jit function is otherwise a constant (recompiles)
            norm, finite = self._apply(ms.mutable(acc))
        self.last_extra_outputs = extras
        mean_loss = sum(losses) / len(losses)
        if self._data_parallel:  # log the global-batch loss, as Megatron does
            mean_loss = self._dp_mean(mean_loss)
        return float(mean_loss.asnumpy()), float(norm.asnumpy()), bool(finite.asnumpy())

    def data_parallel_mean(self, values):
        """Mean over the data-parallel ranks of a float vector (the vector itself without DP)."""
        import numpy as np

        values = np.asarray(values, np.float32)
        if not self._data_parallel or values.size == 0:
            return values
        return self._dp_mean(ms.Tensor(values)).asnumpy()


def build_loss_scaler(args) -> Optional[object]:
    """fp16 needs a loss scale; fp32 does not; bf16 (Ascend) keeps fp32 range and needs none."""
    if not args.fp16:
        return None
    if args.loss_scale:
        return ms.amp.StaticLossScaler(float(args.loss_scale))
    return ms.amp.DynamicLossScaler(float(args.initial_loss_scale), 2, int(args.loss_scale_window))
