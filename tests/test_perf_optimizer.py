"""The cheap update (issue 9, point 2): FusedAdamW + bucketed grad norm + one-scalar clipping give
the numbers of PyTorch's AdamW (a float64 numpy transcription of torch.optim.AdamW, written out
below) and of mindformers' AdamW, to fp32 noise. No timings here."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ms_mm.training.optimizer import FusedAdamW, split_decay_groups
from ms_mm.training.train_step import TrainStep, global_norm, grad_buckets

SHAPES = [(16, 8), (16,), (4, 16), (32, 4, 3), (5,)]
LR, BETAS, EPS, WD = 3e-3, (0.9, 0.95), 1e-8, 0.1


class _Params(nn.Cell):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.ps = ms.ParameterTuple(Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"w{i}")
                                    for i, s in enumerate(SHAPES))

    def construct(self, x):
        return (x * 0.0).sum()


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return [(rng.standard_normal(s) * 10 ** rng.uniform(-3, 0)).astype(np.float32) for s in SHAPES]


def _in_optimizer_order(opt, grads):
    """Gradients (given in SHAPES order, params named w{i}) in the order of opt.parameters (grouped)."""
    return ms.mutable(tuple(Tensor(grads[int(p.name.split("w")[-1])]) for p in opt.parameters))


def _jitted(fn):
    def run(gs):
        return fn(gs)
    return ms.jit(run)


def _torch_adamw(params, grads_per_step, lr_at, clip=0.0):
    """torch.optim.AdamW (amsgrad off, maximize off) + torch.nn.utils.clip_grad_norm_-style clipping
    (coef clip / max(norm, clip)), float64; weight decay only on >1-D params (Megatron's groups)."""
    p = [a.astype(np.float64) for a in params]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    norms = []
    for t, grads in enumerate(grads_per_step, start=1):
        g = [a.astype(np.float64) for a in grads]
        norm = np.sqrt(sum((x * x).sum() for x in g))
        norms.append(norm)
        if clip > 0:
            g = [x * (clip / max(norm, clip)) for x in g]
        lr = lr_at(t - 1)
        for i in range(len(p)):
            wd = WD if p[i].ndim > 1 else 0.0
            p[i] = p[i] * (1 - lr * wd)
            m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * g[i]
            v[i] = BETAS[1] * v[i] + (1 - BETAS[1]) * g[i] * g[i]
            bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
            p[i] = p[i] - (lr / bc1) * m[i] / (np.sqrt(v[i]) / np.sqrt(bc2) + EPS)
    return p, m, v, norms


class _Warmup(nn.learning_rate_schedule.LearningRateSchedule):
    """lr * step / 2 for the first two steps (so the first step has lr 0), then lr."""

    def construct(self, global_step):
        step = ms.ops.cast(global_step, ms.float32)
        return ms.ops.minimum(step / 2.0, 1.0) * LR


def _lr_at(step):
    return min(step / 2.0, 1.0) * LR


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fused_adamw_train_step_update_matches_torch_adamw(clip):
    net = _Params()
    init = [p.asnumpy().copy() for p in net.ps]
    opt = FusedAdamW(split_decay_groups(list(net.ps), WD), learning_rate=_Warmup(), betas=BETAS, eps=EPS,
                     weight_decay=WD)
    step = TrainStep(net, opt, clip_grad=clip)
    grads = [_grads(s) for s in range(5)]
    norms = []
    for g in grads:
        norm, finite = step._apply(_in_optimizer_order(opt, g))
        assert bool(finite.asnumpy())
        norms.append(float(norm.asnumpy()))
    ref_p, ref_m, ref_v, ref_norms = _torch_adamw(init, grads, _lr_at, clip)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6)
    if clip:
        assert max(ref_norms) > clip   # clipping really happened
    for i, p in enumerate(net.ps):
        np.testing.assert_allclose(p.asnumpy(), ref_p[i], rtol=1e-5, atol=1e-6, err_msg=p.name)
    for j, p in enumerate(opt.parameters):
        i = int(p.name.split("w")[-1])
        np.testing.assert_allclose(opt.exp_avg[j].asnumpy(), ref_m[i], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(opt.exp_avg_sq[j].asnumpy(), ref_v[i], rtol=1e-5, atol=1e-12)
    assert int(opt.global_step.asnumpy().reshape(-1)[0]) == 5


def test_fused_adamw_matches_mindformers_adamw_and_keeps_its_state_names():
    from mindformers.core.optim import AdamW

    nets = [_Params(), _Params()]
    opts = [AdamW(split_decay_groups(list(nets[0].ps), WD), learning_rate=LR, betas=BETAS, eps=EPS,
                  weight_decay=WD),
            FusedAdamW(split_decay_groups(list(nets[1].ps), WD), learning_rate=LR, betas=BETAS, eps=EPS,
                       weight_decay=WD)]
    names = [sorted(p.name for p in o.get_parameters() if not p.name.startswith("w")) for o in opts]
    assert names[0] == names[1] and "adam_m.w0" in names[1]
    steps = [_jitted(o) for o in opts]
    for s in range(4):
        for o, run in zip(opts, steps):
            run(_in_optimizer_order(o, _grads(s)))
    for a, b in zip(nets[0].ps, nets[1].ps):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)


def test_bucketed_global_norm_equals_float64_norm():
    grads = _grads(0) + _grads(1)
    shapes = [g.shape for g in grads]
    ref = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    buckets = grad_buckets(shapes, limit=200)
    assert len(buckets) > 2 and buckets[0][0] == 0 and buckets[-1][1] == len(shapes)
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))
    for b in (None, buckets, grad_buckets(shapes)):
        def norm_of(gs, b=b):
            return global_norm(gs, b)
        norm = ms.jit(norm_of)(ms.mutable(tuple(Tensor(g) for g in grads)))
        np.testing.assert_allclose(float(norm.asnumpy()), ref, rtol=1e-6)


def test_overflowing_gradients_skip_the_update_and_lower_the_scale():
    net = _Params()
    before = [p.asnumpy().copy() for p in net.ps]
    opt = FusedAdamW(list(net.ps), learning_rate=LR, betas=BETAS, eps=EPS)
    scaler = ms.amp.DynamicLossScaler(1024.0, 2, 1000)
    step = TrainStep(net, opt, loss_scaler=scaler, clip_grad=1.0)
    g = _grads(0)
    g[2][1, 3] = np.inf
    norm, finite = step._apply(ms.mutable(tuple(Tensor(a) for a in g)))
    assert not bool(finite.asnumpy())
    assert float(scaler.scale_value.asnumpy()) == 512.0
    for p, b in zip(net.ps, before):
        np.testing.assert_array_equal(p.asnumpy(), b)
    # finite scaled gradients: unscaled by the loss scale before norm, clip and update
    g = _grads(1)
    norm, finite = step._apply(ms.mutable(tuple(Tensor(a * 512.0) for a in g)))
    assert bool(finite.asnumpy())
    ref_norm = np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in g))
    np.testing.assert_allclose(float(norm.asnumpy()), ref_norm, rtol=1e-6)
    ref_p, *_ = _torch_adamw_nowd(before, g, clip=1.0)   # this optimizer has no weight decay
    for i, p in enumerate(net.ps):
        np.testing.assert_allclose(p.asnumpy(), ref_p[i], rtol=1e-5, atol=1e-6)


def _torch_adamw_nowd(params, grads, clip):
    global WD
    saved, WD = WD, 0.0
    try:
        return _torch_adamw(params, [grads], lambda t: LR, clip)
    finally:
        WD = saved


class _TinyLM(nn.Cell):
    """Two dense layers and a CE-like loss; outputs (loss, logits' mean) so extra outputs are exercised."""

    def __init__(self, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w1 = Parameter(Tensor(rng.standard_normal((12, 16)).astype(np.float32) * 0.3), name="w1")
        self.b1 = Parameter(Tensor(np.zeros(16, np.float32)), name="b1")
        self.w2 = Parameter(Tensor(rng.standard_normal((16, 5)).astype(np.float32) * 0.3), name="w2")

    def construct(self, x, y):
        h = ms.ops.tanh(ms.ops.matmul(x, self.w1) + self.b1)
        logits = ms.ops.matmul(h, self.w2)
        logp = logits - ms.ops.logsumexp(logits, -1, True)
        loss = -(logp * y).sum() / x.shape[0]
        return loss, logits.mean()


@pytest.mark.parametrize("fp16_scale", [None, 2.0 ** 65])
def test_fused_step_equals_the_two_graph_step(fp16_scale):
    """accum 1 runs forward, backward and update in one graph: the same losses, norms, extra outputs,
    weights and loss scale as the separate micro-batch and update graphs, step for step; with a loss
    scale that overflows, both skip the same steps and halve the scale alike."""
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(4):
        x = rng.standard_normal((6, 12)).astype(np.float32)
        y = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 6)]
        batches.append((Tensor(x), Tensor(y)))
    results = []
    for fuse in (True, False):
        net = _TinyLM(3)
        opt = FusedAdamW(split_decay_groups(list(net.get_parameters()), WD), learning_rate=LR, betas=BETAS,
                         eps=EPS, weight_decay=WD)
        scaler = ms.amp.DynamicLossScaler(fp16_scale, 2, 1000) if fp16_scale else None
        step = TrainStep(net, opt, clip_grad=0.05, extra_outputs=(1,), loss_scaler=scaler, fuse_update=fuse)
        assert step.fused is fuse
        trace = [step([b]) + (float(step.last_extra_outputs[0][0]),) for b in batches]
        results.append((trace, [p.asnumpy() for p in net.get_parameters()],
                        float(scaler.scale_value.asnumpy()) if scaler else None))
    (fused, fused_p, fused_scale), (two, two_p, two_scale) = results
    np.testing.assert_allclose(np.array(fused, np.float64), np.array(two, np.float64), rtol=1e-6, atol=1e-7)
    assert [t[2] for t in fused] == [t[2] for t in two]          # same steps finite / skipped
    for a, b in zip(fused_p, two_p):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert fused_scale == two_scale
    if fp16_scale:
        assert [t[2] for t in fused] == [False, False, True, True] and fused_scale == 2.0 ** 63  # 2^65 and 2^64 overflow
    else:
        assert all(t[2] for t in fused) and max(t[1] for t in fused) > 0.05   # clipping was active
    assert not np.allclose(fused_p[0], _TinyLM(3).w1.asnumpy())  # the weights did move
