"""Stateless ops: rotary helpers and the activations whose conventions differ between models.

``apply_rotary`` is the rotate-half (non-interleaved) RoPE. It picks its own kernel: with the Ascend
kernels in use (``ms_mm.ops.kernels()``) the ``RotaryPositionEmbedding`` kernel in mode 0, which is
the same rotate-half form, else the portable math. The choice is a compile-time constant
(``constexpr``), so graph mode compiles one branch and callers never see it.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
import mindspore.ops.auto_generate as _gen
from mindspore.ops import constexpr

from ms_mm.ops.switch import sharded, use_fused


@constexpr
def _tile_broadcasts() -> bool:
    """True where broadcasting element-wise kernels should get same-shaped inputs: MindSpore's CPU
    kernels, outside the parallel planner (whose strategies are for the plain primitives)."""
    return str(ms.get_context("device_target")).upper() == "CPU" and not sharded()


@constexpr
def _broadcast_shape(x_shape, y_shape):
    """The common shape of ``x`` and ``y`` when they should be tiled to it (``_tile_broadcasts``, both
    have more than one element, their shapes differ; numpy rules), else ``()`` (also for shapes not
    known at compile time)."""
    if not _tile_broadcasts():
        return ()
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    if x_shape == y_shape or any(d is None or d < 0 for d in x_shape + y_shape):
        return ()
    if int(np.prod(x_shape)) == 1 or int(np.prod(y_shape)) == 1:
        return ()
    return tuple(int(v) for v in np.broadcast_shapes(x_shape, y_shape))


@constexpr
def _differs(shape, target):
    return tuple(shape) != tuple(target)


def _padded(shape, target):
    return (1,) * (len(target) - len(shape)) + tuple(shape)


@constexpr
def _rank_padded(shape, target):
    return _padded(shape, target)


@constexpr
def _multiples(shape, target):
    return tuple(t // s if s == 1 else 1 for s, t in zip(_padded(shape, target), target))


# The branches below test plain bools from constexprs. MindSpore 2.9's graph mode compiles a helper
# called both in a forward and in a custom ``bprop`` with one of its branches empty ("The func graph is
# empty"), so ``_helpers`` makes one independent set for forward code and one for bprops.
def _helpers():
    def expand_to(x, shape):
        """``x`` repeated to ``shape`` by one ``Tile`` kernel (numpy broadcasting rules; backward: one
        row sum). Used on CPU instead of letting an element-wise kernel broadcast (``broadcast_pair``)."""
        if _differs(x.shape, shape):
            x = ops.tile(ops.reshape(x, _rank_padded(x.shape, shape)), _multiples(x.shape, shape))
        return x

    def broadcast_pair(x, y):
        """``(x, y)`` brought to one shape for an element-wise op, where that saves memory, else unchanged.

        MindSpore 2.9's CPU arithmetic kernels broadcast two different-shaped inputs through index
        tables of one 8-byte offset per output element per input, built at the first launch and kept
        as long as the compiled graph: 4x the fp32 output's size, resident, for every such kernel
        instance (a ``[2, 16, 1024, 1024]`` score tensor plus a head-broadcast mask keeps 512 MB beside
        its 128 MB result; the backward of each broadcast op adds another). An explicit ``Tile`` first
        costs one transient copy from the memory pool, and is faster too (25 ms against 37-47 ms at
        that shape). Single-element operands, equal shapes, the parallel planner and other devices:
        unchanged. ``scripts/cpu_broadcasts.py`` lists the broadcasting kernels left in a graph."""
        shape = _broadcast_shape(x.shape, y.shape)
        if len(shape) > 0:
            x = expand_to(x, shape)
            y = expand_to(y, shape)
        return x, y

    def mul(x, y):
        """``x * y`` without a CPU broadcast index table (``broadcast_pair``)."""
        x, y = broadcast_pair(x, y)
        return x * y

    def add(x, y):
        """``x + y`` without a CPU broadcast index table (``broadcast_pair``)."""
        x, y = broadcast_pair(x, y)
        return x + y

    def sub(x, y):
        """``x - y`` without a CPU broadcast index table (``broadcast_pair``)."""
        x, y = broadcast_pair(x, y)
        return x - y

    def div(x, y):
        """``x / y`` without a CPU broadcast index table (``broadcast_pair``)."""
        x, y = broadcast_pair(x, y)
        return x / y

    return expand_to, broadcast_pair, mul, add, sub, div


expand_to, broadcast_pair, mul, add, sub, div = _helpers()
# for custom bprops only (above)
bprop_expand_to, bprop_broadcast_pair, bprop_mul, bprop_add, bprop_sub, bprop_div = _helpers()


_rope_kernel = _gen.RotaryPositionEmbedding()


_split_last_in_two = ops.Split(axis=-1, output_num=2)


def _halves(x):
    """The two halves of the last axis: one Split kernel (backward: one Concat) unsharded; slices
    (StridedSlice, backward a full-size zero tensor per half + AddN) under the parallel planner."""
    if sharded():
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return _split_last_in_two(x)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] along the last axis (halves, not interleaved pairs)."""
    x1, x2 = _halves(x)
    return ops.cat((-x2, x1), -1)


@constexpr
def _fused_rotary() -> bool:
    return use_fused()


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin. ``cos``/``sin`` broadcast to ``x`` ([B, N, S, D] on Ascend).

    Portable form: rotate_half(x) * sin = [x2, x1] * [-sin1, sin2], so the sign goes on ``sin``
    ([B, 1, S, D], shared by every head and, once common-subexpression elimination has merged the
    identical copies, by every layer) instead of a Neg over x, and x is halved by one ``Split`` kernel
    (``ops.split`` / slicing become StridedSlices, whose gradients are full-size zero tensors + AddN)."""
    if _fused_rotary():
        return _rope_kernel(x, ops.cast(cos, x.dtype), ops.cast(sin, x.dtype), 0)
    sin1, sin2 = _halves(sin)
    x1, x2 = _halves(x)
    return mul(x, cos) + mul(ops.cat((x2, x1), -1), ops.cat((-sin1, sin2), -1))


_GELU_TANH_C = float(np.sqrt(2.0 / np.pi))


def gelu(x, approximate="none"):
    """GELU; ``approximate="none"`` is the exact erf form, ``"tanh"`` the tanh approximation.

    On CPU outside the parallel planner the tanh form is spelled out, as x sigmoid(2 c (x + 0.044715 x^3)) (=
    0.5 x (1 + tanh(c (...)))): forward + backward of a [384, 256] tensor takes 0.4-0.6x the time of
    MindSpore 2.9's CPU ``GeLU`` / ``GeLUGrad`` kernels this way, autodiff included (``bench/bench_cpu_kernels.py``,
    docs/performance.md, 8 Dec). The erf form keeps its kernels: spelled out it is only ~10 % faster."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate={approximate!r}, expected 'none' or 'tanh'")
    if approximate == "tanh" and _tile_broadcasts():
        # 0.5 (1 + tanh(z)) = sigmoid(2 z): no cancellation in the negative tail, forward or backward
        inner = x + 0.044715 * (x * x * x)
        return x * ops.sigmoid((2.0 * _GELU_TANH_C) * inner)
    return ops.gelu(x, approximate=approximate)


def silu(x):
    """x * sigmoid(x)."""
    return ops.silu(x)


def swiglu(gate, up):
    """silu(gate) * up, the gated MLP activation of Qwen/LLaMA-style blocks."""
    return ops.silu(gate) * up


_E = Tensor(np.float32(np.e))


def logsumexp(x):
    """log(sum(exp(x))) over the last axis, accurate to about one fp32 ulp. MindSpore's CPU ``exp`` /
    ``log`` / ``logsumexp`` are fast approximations (~1e-5 relative for exp, ~2e-6 absolute for log),
    which puts a z-loss of ~40 off by ~3e-5; ``pow(e, x)`` and ``log1p`` are accurate (the sum is >= 1,
    as the largest term is exactly 1)."""
    m = ops.stop_gradient(x.max(-1, keepdims=True))
    s = ops.pow(_E, sub(x, m)).sum(-1)
    return ops.log1p(s - 1.0) + m.squeeze(-1)


class _SoftmaxCrossEntropy(nn.Cell):
    """``SoftmaxCrossEntropyWithLogits`` with its own backward: MindSpore's multiplies the [T, V]
    gradient by the [T, 1] loss gradient through a broadcasting Mul (a CPU index table of 4x the
    logits' size, see ``broadcast_pair``); here that factor is tiled first."""

    def __init__(self):
        super().__init__()
        self.ce = ops.SoftmaxCrossEntropyWithLogits()

    def construct(self, logits, labels):
        return self.ce(logits, labels)

    def bprop(self, logits, labels, out, dout):
        return bprop_mul(out[1], ops.expand_dims(dout[0], -1)), ops.zeros_like(labels)


_softmax_ce = _SoftmaxCrossEntropy()


def cross_entropy_sum(logits, labels, ignore_index=-100):
    """``(sum of -log softmax(logits)[label] over rows whose label != ignore_index, that row count)``,
    both fp32, for ``logits [T, V]`` fp32 and integer ``labels [T]``.

    Unsharded it is one fused ``SoftmaxCrossEntropyWithLogits`` kernel (loss and gradient in one pass
    over [T, V]; ignored rows get an all-zero one-hot row and weight 0), instead of autodiff through
    max / exp / log / gather, whose backward re-reads [T, V] four times (the max's gradient alone is
    an Equal + Mul over [T, V]). Under semi-auto parallel (vocab-split logits) it is log-softmax times
    that one-hot, ops the parallel planner knows. Same numbers up to fp32 rounding."""
    valid = ops.cast(labels != ignore_index, ms.float32)
    count = valid.sum()
    # index -1 one-hot encodes to an all-zero row: an ignored row's loss is 0, its weight 0 zeroes its gradient
    target = ops.where(labels != ignore_index, ops.cast(labels, ms.int32), ops.full_like(ops.cast(labels, ms.int32), -1))
    one_hot = ops.one_hot(target, logits.shape[-1], ops.ones((), ms.float32), ops.zeros((), ms.float32))
    if sharded():
        # log-softmax times the one-hot. MindSpore's ``cross_entropy`` (nll_loss: a GatherD on the
        # log-probabilities) made the compile allocate host memory the size of the *global* [T, V]
        # logits (measured under DryRun: 17 GB for DeepSeek-VL2 on 8 ranks, a bad_alloc of 68 GB on 32)
        return -(ops.log_softmax(logits, -1) * one_hot).sum(), count
    return (_softmax_ce(logits, one_hot)[0] * valid).sum(), count


# ----------------------------------------------------------------------------- data movement on CPU
# MindSpore 2.9's CPU ``Transpose`` kernel builds, when the graph is built, a table of one 8-byte source
# offset per output element and keeps it for the graph's life (measured: 10 transposes of a [2, 8, 1024,
# 64] fp32 tensor, forward and backward, keep +257 MB of host memory against +93 MB for the same moves as
# row Gathers, and +90 MB as Unstack + Stack; every permutation and rank tried). ``permute`` spells the
# moves without it. (The ``StridedSliceGrad`` behind ``ops.split`` with unequal sizes keeps ~4 bytes per
# element too, but both replacements tried, ``Slice`` + a ``Concat`` bprop and plain ``Slice``s, made
# DeepSeek-VL2's compiled graph ~190 MB bigger than the tables they saved: docs/performance.md, 5 Dec.)

_MAX_PIECES = 64    # an axis moved by Unstack + Stack is cut into this many pieces at most


@constexpr
def _permute_plan(shape, perm):
    """How ``permute`` moves ``x`` of ``shape`` to ``perm`` (None: the ``Transpose`` kernel, for other
    devices, the parallel planner and unknown dims), else ``(kind, data, out_shape)``:
    ``("reshape", ...)`` when only size-1 axes move; ``("rows", rows, ...)`` when the trailing axes stay
    in place, so that whole rows move: ``x`` as ``[R, D]`` gathered by a row index (``_row_index``);
    ``("stack", (reduced_shape, moves), ...)`` otherwise: the (from, to) axis moves of Unstack + Stack
    pairs on ``x`` without its size-1 axes, each along an axis of at most ``_MAX_PIECES`` entries
    (None when there is no such plan)."""
    import heapq

    shape, perm = tuple(int(d) if d is not None else -1 for d in shape), tuple(int(p) for p in perm)
    if not _tile_broadcasts() or any(d < 0 for d in shape):
        return None
    out_shape = tuple(shape[p] for p in perm)
    kept = [p for p in perm if shape[p] != 1]            # the source axes that carry data, in output order
    if kept == sorted(kept):
        return "reshape", (), out_shape
    order = sorted(kept)
    first = _row_block(shape, perm)
    if first is not None:
        return "rows", (int(np.prod(shape[:first])), int(np.prod(shape[first:]))), out_shape
    reduced = tuple(shape[a] for a in order)
    start, goal = tuple(range(len(order))), tuple(order.index(a) for a in kept)
    best, queue = {start: (0, 0)}, [(0, 0, start, ())]
    while queue:
        n_moves, pieces, state, moves = heapq.heappop(queue)
        if state == goal:
            return "stack", (reduced, moves), out_shape
        if (n_moves, pieces) > best.get(state, (n_moves, pieces)):
            continue
        for src in range(len(state)):
            size = reduced[state[src]]
            if size > _MAX_PIECES:
                continue
            for dst in range(len(state)):
                if dst == src:
                    continue
                nxt = list(state)
                nxt.insert(dst, nxt.pop(src))
                nxt, cost = tuple(nxt), (n_moves + 1, pieces + size)
                if cost < best.get(nxt, (len(state) + 1, 0)):
                    best[nxt] = cost
                    heapq.heappush(queue, (cost[0], cost[1], nxt, moves + ((src, dst),)))
    return None


def _row_block(shape, perm):
    """The first source axis of the trailing axes that stay in place and in order in ``perm`` (size-1
    axes aside), or None when the last data axis moves. Rows are everything before it."""
    kept = [p for p in perm if shape[p] != 1]
    order = sorted(kept)
    tail = 0
    while tail < len(kept) and kept[len(kept) - 1 - tail] == order[len(order) - 1 - tail]:
        tail += 1
    return order[len(order) - tail] if tail else None


@constexpr
def _row_index(shape, perm, inverse):
    """int32 [R]: the source row of each output row of ``permute``'s "rows" plan (``inverse``: the
    output row of each source row, for the backward)."""
    shape, perm = tuple(int(d) for d in shape), tuple(int(p) for p in perm)
    first = _row_block(shape, perm)
    index = np.arange(int(np.prod(shape[:first])), dtype=np.int64).reshape(shape[:first])
    index = index.transpose([p for p in perm if p < first]).ravel()
    if inverse:
        index = np.argsort(index)
    return Tensor(index.astype(np.int32))


class _RowGather(nn.Cell):
    """``x [R, D]`` rows reordered by ``index``; backward: the gradient's rows gathered back by the
    inverse index (two ``Gather`` kernels in all: no per-element table, no scatter)."""

    def construct(self, x, index, inverse):
        return ops.gather(x, index, 0)

    def bprop(self, x, index, inverse, out, dout):
        return ops.gather(dout, inverse, 0), ops.zeros_like(index), ops.zeros_like(inverse)


_row_gather = _RowGather()


def permute(x, perm):
    """``ops.transpose(x, perm)``; on CPU outside the parallel planner without the Transpose kernel's
    8-byte-per-element table (see above): a reshape where only size-1 axes move; where the trailing
    axes stay (heads <-> tokens: ``[B, S, N, D] -> [B, N, S, D]``) one row ``Gather`` (backward: one
    more); otherwise ``Unstack`` + ``Stack`` pairs, one per axis moved (backward: the same the other
    way round). Kernel count matters too: the compile's host memory grows with the graph's nodes."""
    plan = _permute_plan(x.shape, perm)
    if plan is None:
        return ops.transpose(x, perm)
    kind, data, out_shape = plan
    if kind == "reshape":
        return ops.reshape(x, out_shape)
    if kind == "rows":
        rows = _row_gather(ops.reshape(x, data), _row_index(x.shape, perm, False), _row_index(x.shape, perm, True))
        return ops.reshape(rows, out_shape)
    reduced, moves = data
    x = ops.reshape(x, reduced)
    for src, dst in moves:
        x = ops.stack(ops.unstack(x, src), dst)
    return ops.reshape(x, out_shape)
