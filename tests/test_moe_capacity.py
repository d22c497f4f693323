"""The capacity dispatch of ``RoutedExperts`` (Megatron's drop and pad, ``--moe-expert-capacity-factor``):
which choices it keeps, and that the kept ones compute what the portable per-expert loop computes,
forward and backward.

The reference for which choices are kept is written here from Megatron's definition (per token group
and expert: the C chosen tokens of highest routing weight for "probs", the first C for "position",
C = ceil(tokens * k / E * factor)); the maths of a kept choice is the portable path's, checked against
the fixtures by the DeepSeek-VL2 parity tests.
"""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_mm.ops.moe import CapacityDispatch, RoutedExperts, expert_capacity

E, H, I, K = 4, 16, 8, 2


def _experts(capacity_factor=None, drop_policy="probs", groups=1):
    ms.set_seed(0)
    experts = RoutedExperts(E, H, I, capacity_factor=capacity_factor, drop_policy=drop_policy)
    if experts.capacity is not None:
        experts.capacity.groups = groups
    return experts


def _run(experts, x, idx, w):
    params = experts.trainable_params()

    def objective(a, b):  # a def, not a lambda: graph mode (set by other tests) parses it from source
        y = experts(a, idx, b)
        return y.sum() * 0.5 + (y ** 2).sum()

    grad_fn = ms.value_and_grad(objective, grad_position=(0, 1), weights=params)
    out = experts(x, idx, w).asnumpy()
    _, ((gx, gw), gp) = grad_fn(x, w)
    return out, gx.asnumpy(), gw.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, gp)}


def _kept(idx, w, groups, capacity, policy):
    """[T, k] bool: the choices Megatron's drop policy keeps, per group of T / groups tokens."""
    t, k = idx.shape
    n = t // groups
    kept = np.zeros((t, k), bool)
    for g in range(groups):
        for e in range(E):
            rows = [(r, j) for r in range(g * n, (g + 1) * n) for j in range(k) if idx[r, j] == e]
            if policy == "probs":  # highest weight first, ties to the earlier token
                rows = sorted(rows, key=lambda rj: (-w[rj], rj[0]))
            for r, j in rows[:capacity]:
                kept[r, j] = True
    return kept


def _inputs(t, seed, ties=False):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(t)]).astype(np.int32)
    w = (rng.random((t, K)) * 0.9).astype(np.float32)
    if ties:  # padding-like rows: every other token has the same choice and the highest weight
        idx[::2] = idx[0]
        w[::2] = 0.95
    x = rng.standard_normal((t, H)).astype(np.float32)
    return x, idx, w


def test_capacity_formula():
    # Megatron's get_capacity(num_tokens * topk, num_experts, capacity_factor)
    assert expert_capacity(4096, 6, 64, 1.0) == math.ceil(4096 * 6 / 64)
    assert expert_capacity(10, 2, 4, 1.25) == math.ceil(10 * 2 / 4 * 1.25)
    assert expert_capacity(10, 2, 4, 100.0) == 10      # never more than the group's tokens
    with pytest.raises(ValueError, match="moe_token_drop_policy='lowest'"):
        CapacityDispatch(E, 1.0, "lowest")
    with pytest.raises(ValueError, match="must be > 0"):
        CapacityDispatch(E, 0.0)


@pytest.mark.parametrize("groups", [1, 2])
def test_nothing_dropped_equals_portable(groups):
    x, idx, w = _inputs(12, 1)
    ref = _run(_experts(), Tensor(x), Tensor(idx), Tensor(w))
    got = _run(_experts(capacity_factor=E / K, groups=groups), Tensor(x), Tensor(idx), Tensor(w))
    for a, b, what in zip(got[:3], ref[:3], ("output", "grad x", "grad routing weights")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)
    assert got[3].keys() == ref[3].keys() and len(ref[3]) == 2
    for name in ref[3]:
        np.testing.assert_allclose(got[3][name], ref[3][name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("policy,groups,ties,factor", [("probs", 1, False, 0.75), ("probs", 2, True, 0.5),
                                                       ("position", 1, False, 0.75), ("position", 2, True, 0.5)])
def test_dropped_choices_as_megatron(policy, groups, ties, factor):
    """(ties: 3 tokens per group with the same weight on an expert with 2 slots: the earlier win)"""
    t = 12
    x, idx, w = _inputs(t, 2, ties)
    capacity = expert_capacity(t // groups, K, E, factor)
    kept = _kept(idx, w, groups, capacity, policy)
    assert 0 < kept.sum() < kept.size        # some choices dropped, some kept
    # the kept choices through the portable loop = the capacity path; dropped ones get no gradient
    ref = _run(_experts(), Tensor(x), Tensor(idx), Tensor(w * kept))
    got = _run(_experts(capacity_factor=factor, drop_policy=policy, groups=groups),
               Tensor(x), Tensor(idx), Tensor(w))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6, err_msg="output")
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6, err_msg="grad x")
    np.testing.assert_allclose(got[2], ref[2] * kept, rtol=1e-5, atol=1e-6, err_msg="grad routing weights")
    for name in ref[3]:
        np.testing.assert_allclose(got[3][name], ref[3][name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_dispatch_indices():
    """src lists each expert's kept tokens in token order then empty slots; slot points each kept
    choice at its own row and each dropped one at its expert's zero row."""
    groups, t, factor, policy = 2, 12, 0.75, "position"
    _, idx, w = _inputs(t, 3)
    n = t // groups
    capacity = expert_capacity(n, K, E, factor)
    src, slot, weight = CapacityDispatch(E, factor, policy)(
        Tensor(idx.reshape(groups, n, K)), Tensor(w.reshape(groups, n, K)), capacity)
    src, slot, weight = src.asnumpy(), slot.asnumpy(), weight.asnumpy()
    kept = _kept(idx, w, groups, capacity, policy).reshape(groups, n, K)
    idx3 = idx.reshape(groups, n, K)
    for g in range(groups):
        for e in range(E):
            tokens = [r for r in range(n) for j in range(K) if idx3[g, r, j] == e and kept[g, r, j]]
            assert list(src[g, e]) == [r + 1 for r in tokens] + [0] * (capacity - len(tokens))
            for r, j in zip(*np.nonzero((idx3[g] == e) & kept[g])):
                assert slot[g, r, j] == e * (capacity + 1) + 1 + tokens.index(r)
            for r, j in zip(*np.nonzero((idx3[g] == e) & ~kept[g])):
                assert slot[g, r, j] == e * (capacity + 1)
    np.testing.assert_array_equal(weight, w.reshape(groups, n, K) * kept)


def test_family_flags_set_the_capacity():
    """``--moe-expert-capacity-factor`` / ``--moe-token-drop-policy`` on the trainer's command line (Megatron's
    flags) reach the DeepSeek-VL2 config and its MoE layers; bad values are refused naming the key."""
    from ms_mm import registry
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config
    from ms_mm.models.deepseek_vl2.modeling import MoELayer
    from ms_mm.training.arguments import ArgumentError, parse_args, parse_family_flags

    family = registry.get("deepseek_vl2")
    args = parse_args(["--mm-data", "d.json", "--mm-model", "m.json", "--moe-expert-capacity-factor", "1.25",
                       "--moe-token-drop-policy", "position", "--moe-pad-expert-input-to-capacity"])
    options = parse_family_flags(family, args.family_argv)
    config = family.apply_flags(DeepseekVL2Config.preset("tiny"), options)
    lc = config.language_config
    assert (lc.moe_expert_capacity_factor, lc.moe_token_drop_policy) == (1.25, "position")
    layer = MoELayer(lc)
    assert layer.experts.dispatch == "capacity" and layer.experts.capacity.drop_policy == "position"
    assert MoELayer(DeepseekVL2Config.preset("tiny").language_config).experts.dispatch == "blocked"
    with pytest.raises(ValueError, match="moe_token_drop_policy='first'"):
        family.apply_flags(DeepseekVL2Config.preset("tiny"), {"moe_token_drop_policy": "first"})
    with pytest.raises(ValueError, match="moe_expert_capacity_factor=-1.0"):
        family.apply_flags(DeepseekVL2Config.preset("tiny"), {"moe_expert_capacity_factor": -1.0})
    with pytest.raises(ArgumentError, match="--moe-expert-capacity-factor"):
        parse_family_flags(family, ["--moe-expert-capacity-factor", "lots"])
