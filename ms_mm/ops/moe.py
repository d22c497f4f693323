"""MoE building blocks: the routed experts, stacked, and how tokens reach them.

Owns how tokens reach their top-k experts and how the expert outputs are combined; the router
(scores, top-k choice, aux loss) belongs to the model. The experts' weights are stacked, as the MM
checkpoint stores them: ``linear_fc1.weight [E, 2I, H]`` (per expert the rows [gate; up]) and
``linear_fc2.weight [E, H, I]``. Dim 0 is the expert axis, which expert parallel splits: an EP rank
holds whole experts (the converter's EP split cuts the same dim, ``mm_checkpoint.EXPERT_PATTERN``).

Five dispatch paths (``RoutedExperts.dispatch``), the default chosen once from ``kernels()`` (or
"capacity" when a capacity factor is given):
- blocked (the portable default: CPU and anything without grouped matmul): the T * k (token, expert)
  choices sorted by expert into rows of a static buffer, each expert's rows padded up to whole blocks
  of B rows, so that every block belongs to one expert; the experts then run as batch matmuls over the
  blocks (each block against its expert's weights) and each token gathers back its k outputs. Only
  the chosen pairs (plus at most B - 1 padding rows per expert) are computed, and shapes stay static
  (the buffer's size is the bound ``T * k + E * (B - 1)``), so graph mode compiles one graph for any
  routing. ``_BlockMatmul`` takes each block's expert weights in its backward again instead of keeping
  the gathered copies. MegaBlocks' block-sparse layout, written with batch matmuls.
- portable (the fallback where the token count is unknown at compile time): every expert runs on every
  token and the outputs are combined with a dense ``[T, E]`` weight matrix scattered from the top-k
  (zero where not chosen): E / k times the expert FLOPs.
- ascend: sort tokens by expert (``moe_token_permute``), one grouped matmul per projection over the
  stacked expert weights (``gmm`` with per-expert row counts), and ``moe_token_unpermute`` to scatter
  back with the routing weights. It runs only the chosen (token, expert) pairs.
- batched (what the expert-parallel plan selects, ``ms_mm.models.deepseek_vl2.parallelize``): the same
  maths as portable, written as two batch matmuls over the expert axis of the stacked weights, so
  semi-auto parallel can split the expert axis over EP ranks: each rank holds and runs only its own
  experts, MindSpore moves the tokens of the EP group to them and reduces the weighted combine over
  the expert axis.
- capacity (``capacity_factor`` set: Megatron's ``--moe-expert-capacity-factor``, drop and pad): each
  expert takes at most ``C = ceil(T_group * k / E * capacity_factor)`` tokens of each token group (a
  data-parallel rank's tokens: ``groups``), the rest of its tokens are dropped (as Megatron drops them:
  ``drop_policy`` "probs" keeps the C highest routing weights, "position" the first C tokens). The
  kept tokens are gathered into a static [groups, E, C, H] buffer (empty slots read a zero row), the
  experts run on [E, groups * C, H] (two batch matmuls over the stacked weights) and each token gathers
  its k outputs back. Under expert parallel the buffer's move from the token groups' ranks to the
  experts' ranks and back is an all-to-all within the EP group, carrying C tokens per expert, not every
  token. With a factor large enough that nothing drops (C = T_group at ``E / k``) it is the dense result.
"""
import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops.auto_generate.gen_ops_prim import SiLU
from mindspore.ops.functional_overload import gmm

from ms_mm.ops.functional import mul
from ms_mm.ops.switch import use_fused

DROP_POLICIES = ("probs", "position")


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert for one group of ``tokens`` tokens (Megatron's ``get_capacity`` on
    tokens * top_k choices), at most ``tokens``: a token chooses an expert once."""
    return max(1, min(tokens, int(math.ceil(tokens * top_k / num_experts * capacity_factor))))


def dense_combine_weights(topk_idx, topk_weight, num_experts):
    """[T, k] expert ids + weights -> [T, E] weights (sum over the k slots; zero for unchosen experts)."""
    # built in fp32: OneHot takes no bf16 on/off values, and the k-slot sum stays in fp32
    one_hot = ops.one_hot(topk_idx, num_experts, ops.ones((), ms.float32), ops.zeros((), ms.float32))  # [T, k, E]
    return mul(one_hot, ops.expand_dims(topk_weight.astype(ms.float32), -1)).sum(axis=1).astype(topk_weight.dtype)


class StackedWeight(nn.Cell):
    """One ``weight`` Parameter of ``shape`` (the stacked experts' [E, out, in]), N(0, sigma) init."""

    def __init__(self, shape, sigma=0.02, param_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer(Normal(sigma=sigma), tuple(shape), param_dtype), name="weight")


class RoutedExperts(nn.Cell):
    """E SwiGLU experts; ``construct(x [T, H], topk_idx [T, k] int, topk_weight [T, k]) -> [T, H]``
    = sum_k topk_weight[t, k] * expert_{topk_idx[t, k]}(x[t]), expert e being
    ``fc2[e] @ (silu(gate_e x) * up_e x)`` with [gate_e; up_e] = ``fc1[e]``."""

    def __init__(self, num_experts, hidden_size, intermediate_size, capacity_factor=None, drop_policy="probs"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.linear_fc1 = StackedWeight((num_experts, 2 * intermediate_size, hidden_size))
        self.linear_fc2 = StackedWeight((num_experts, hidden_size, intermediate_size))
        self.dispatch = "grouped" if use_fused() else "blocked"
        self.block_fc1 = _BlockMatmul(num_experts)
        self.block_fc2 = _BlockMatmul(num_experts)
        self.unstack = ops.Unstack(axis=0)                 # [E, ...] -> E tensors (backward: one Stack)
        self.matmul = ops.MatMul(transpose_b=True)
        self.split = ops.Split(axis=-1, output_num=2)      # [T, 2I] -> gate, up
        self.broadcast = ops.BroadcastTo((num_experts, -1, hidden_size))
        self.bmm_fc1 = ops.BatchMatMul(transpose_b=True)   # [E, T, H] x [E, 2I, H] -> [E, T, 2I]
        self.split_gate_up = ops.Split(axis=2, output_num=2)  # [E, T, 2I] -> gate, up
        self.silu = SiLU()
        self.swiglu_mul = ops.Mul()
        self.bmm_fc2 = ops.BatchMatMul(transpose_b=True)   # [E, T, I] x [E, H, I] -> [E, T, H]
        self.combine_mul = ops.Mul()                       # [E, T, H] * [E, T, 1]
        self.combine_sum = ops.ReduceSum(keep_dims=False)  # over the expert axis
        self.capacity = None
        if capacity_factor is not None:
            self.capacity = CapacityDispatch(num_experts, float(capacity_factor), drop_policy)
            self.dispatch = "capacity"

    def construct(self, x, topk_idx, topk_weight):
        if self.dispatch == "grouped":
            return self._grouped(x, topk_idx, topk_weight)
        if self.dispatch == "batched":
            return self._batched(x, topk_idx, topk_weight)
        if self.dispatch == "capacity":
            return self._capacity(x, topk_idx, topk_weight)
        if self.dispatch == "blocked" and x.shape[0] > 0:
            return self._blocked(x, topk_idx, topk_weight)
        combine = dense_combine_weights(topk_idx, topk_weight, self.num_experts).astype(x.dtype)  # [T, E]
        w1 = self.unstack(self.linear_fc1.weight.astype(x.dtype))
        w2 = self.unstack(self.linear_fc2.weight.astype(x.dtype))
        out = ops.zeros_like(x)
        for e in range(self.num_experts):
            gate, up = self.split(self.matmul(x, w1[e]))
            out = out + mul(combine[:, e:e + 1], self.matmul(ops.silu(gate) * up, w2[e]))
        return out

    def _blocked(self, x, topk_idx, topk_weight):
        t, hidden = x.shape
        k, e = topk_idx.shape[-1], self.num_experts
        n = t * k
        b = block_rows(n, e)
        rows = -(-(n + e * (b - 1)) // b) * b                 # every expert's rows padded to whole blocks
        f32 = ms.float32
        flat = ops.stop_gradient(topk_idx.reshape(-1).astype(ms.int32))                     # [n] token-major
        hot = ops.one_hot(flat, e, ops.ones((), f32), ops.zeros((), f32))                    # [n, E]
        counts = hot.sum(axis=0)
        padded = ops.floor((counts + float(b - 1)) / float(b)) * float(b)
        ends = ops.cumsum(padded, 0)                                                         # [E]
        rank = (ops.cumsum(hot, 0) * hot).sum(axis=1) - 1.0                                  # among its expert's
        dest = ops.stop_gradient((ops.gather(ends - padded, flat, 0) + rank).astype(ms.int32))  # [n] its row
        # each row's token (+ 1; 0: the zero row in front, for padding), each block's expert
        token = ops.arange(1, t + 1, dtype=ms.int32).reshape(t, 1).tile((1, k)).reshape(n, 1)
        src = ops.stop_gradient(ops.scatter_nd(ops.expand_dims(dest, -1), token.reshape(n), (rows,)))
        starts = ops.arange(0, rows, b, dtype=f32).reshape(rows // b, 1).tile((1, e))
        owner = (starts >= ends.reshape(1, e).tile((rows // b, 1))).astype(f32).sum(axis=1)
        block_expert = ops.stop_gradient(ops.minimum(owner, float(e - 1)).astype(ms.int32))  # [rows / b]
        xin = ops.gather(ops.concat((ops.zeros((1, hidden), x.dtype), x), 0), src, 0).reshape(rows // b, b, hidden)
        h = self.block_fc1(xin, self.linear_fc1.weight.astype(x.dtype), block_expert)         # [blocks, b, 2I]
        gate, up = self.split_gate_up(h)
        y = self.block_fc2(self.swiglu_mul(self.silu(gate), up), self.linear_fc2.weight.astype(x.dtype),
                           block_expert).reshape(rows, hidden)
        yk = ops.gather(y, dest, 0).reshape(t, k, hidden)
        return mul(yk, ops.expand_dims(topk_weight.astype(x.dtype), -1)).sum(axis=1)

    def _batched(self, x, topk_idx, topk_weight):
        combine = dense_combine_weights(topk_idx, topk_weight, self.num_experts).astype(x.dtype)  # [T, E]
        y = self._expert_ffn(self.broadcast(ops.expand_dims(x, 0)))
        weights = ops.expand_dims(ops.transpose(combine, (1, 0)), -1)  # [E, T, 1]
        return self.combine_sum(self.combine_mul(y, weights), 0)

    def _expert_ffn(self, x):
        """[E, N, H] (N tokens for each expert) -> [E, N, H] through each expert's SwiGLU."""
        gate, up = self.split_gate_up(self.bmm_fc1(x, self.linear_fc1.weight.astype(x.dtype)))
        return self.bmm_fc2(self.swiglu_mul(self.silu(gate), up), self.linear_fc2.weight.astype(x.dtype))

    def _capacity(self, x, topk_idx, topk_weight):
        d = self.capacity
        groups, (t, hidden), k = d.groups, x.shape, topk_idx.shape[-1]
        per_group, e = t // groups, self.num_experts
        cap = expert_capacity(per_group, k, e, d.capacity_factor)
        src, slot, weight = d(topk_idx.reshape(groups, per_group, k), topk_weight.reshape(groups, per_group, k),
                              cap)
        xg = d.pad_tokens((d.zeros_tokens((groups, 1, hidden), x.dtype), x.reshape(groups, per_group, hidden)))
        # to the experts: [G, E, C, H] -> [E, G*C, H], the groups as (ep, G / ep) and put in the order
        # (G / ep, ep) on the token axis, so that under expert parallel an EP rank's token slice is its
        # EP group's slots for its experts (the move is one all-to-all over the EP group, each way)
        ep = d.ep
        xin = d.dispatch_gather(xg, src, 1).reshape(ep, groups // ep, e, cap, hidden)
        xe = d.to_experts(xin, (2, 1, 0, 3, 4)).reshape(e, groups * cap, hidden)
        y = self._expert_ffn(xe).reshape(e, groups // ep, ep, cap, hidden)
        y = d.from_experts(y, (2, 1, 0, 3, 4)).reshape(groups, e, cap, hidden)  # [G, E, C, H]
        y = d.pad_slots((d.zeros_slots((groups, e, 1, hidden), y.dtype), y)).reshape(groups, e * (cap + 1), hidden)
        yk = d.combine_gather(y, slot, 1)                                       # [G, T/G, k, H]
        out = d.combine_sum(d.combine_mul(yk, ops.expand_dims(weight.astype(y.dtype), -1)), 2)
        return out.reshape(t, hidden)

    def _grouped(self, x, topk_idx, topk_weight):
        # Ascend path: only the chosen (token, expert) pairs are computed.
        idx = topk_idx.astype(ms.int32)
        permuted, sorted_indices = ops.moe_token_permute(x, idx)
        counts = ops.one_hot(idx.reshape(-1), self.num_experts, ops.ones((), ms.float32),
                             ops.zeros((), ms.float32)).sum(axis=0).astype(ms.int64)  # tokens per expert
        w1 = ops.transpose(self.linear_fc1.weight.astype(x.dtype), (0, 2, 1))  # [E, H, 2I]
        w2 = ops.transpose(self.linear_fc2.weight.astype(x.dtype), (0, 2, 1))  # [E, I, H]
        h = gmm([permuted], [w1], group_list=counts, group_type=0, group_list_type=1)[0]
        h = ops.silu(h[:, :self.intermediate_size]) * h[:, self.intermediate_size:]
        y = gmm([h], [w2], group_list=counts, group_type=0, group_list_type=1)[0]
        return ops.moe_token_unpermute(y, sorted_indices, probs=topk_weight.astype(x.dtype))


def block_rows(choices: int, num_experts: int) -> int:
    """Rows per block of the blocked dispatch: a power of two near half an expert's mean share of the
    ``choices`` (token, expert) pairs, in [8, 256] (padding costs at most B - 1 rows per expert)."""
    mean = max(1, choices // (2 * num_experts))
    return int(min(256, max(8, 2 ** int(math.floor(math.log2(mean))))))


class _BlockMatmul(nn.Cell):
    """``construct(x [blocks, B, in], w [E, out, in], block_expert [blocks]) -> [blocks, B, out]``: each
    block times its expert's weight. Its backward takes the blocks' weights out of ``w`` again rather
    than keeping the gathered [blocks, out, in] copy alive, and sums the blocks' weight gradients into
    their experts."""

    def __init__(self, num_experts):
        super().__init__()
        self.num_experts = num_experts
        self.bmm = ops.BatchMatMul(transpose_b=True)
        self.bmm_dx = ops.BatchMatMul()
        self.bmm_dw = ops.BatchMatMul(transpose_a=True)
        self.segment_sum = ops.UnsortedSegmentSum()

    def construct(self, x, w, block_expert):
        return self.bmm(x, ops.gather(w, block_expert, 0))

    def bprop(self, x, w, block_expert, out, dout):
        dx = self.bmm_dx(dout, ops.gather(w, block_expert, 0))          # [blocks, B, in]
        dw = self.segment_sum(self.bmm_dw(dout, x), block_expert, self.num_experts)   # [E, out, in]
        return dx, dw, ops.zeros_like(block_expert)


class CapacityDispatch(nn.Cell):
    """Where each token goes under a per-expert capacity (``RoutedExperts`` "capacity" dispatch).

    ``construct(topk_idx [G, N, k] int32, topk_weight [G, N, k], capacity C) -> (src, slot, weight)``
    per token group g (N tokens each):
    - ``src [G, E, C]`` int32: for each expert's slots the kept tokens' positions + 1, in token order,
      then 0 for empty slots (the zero row in front of the group's tokens);
    - ``slot [G, N, k]`` int32: where each choice's output lies in the [E * (C + 1)] padded expert
      outputs (``expert * (C + 1) + position``, position 0 = the zero row for a dropped choice);
    - ``weight [G, N, k]``: the routing weights, zero for dropped choices (so they get no gradient).
    A choice is kept when its expert has room: "probs" keeps the C choices with the highest weight
    (ties to the earlier token), "position" the first C tokens. The index work runs on the group axis
    only (each data-parallel rank its own tokens); the primitives are attributes so a plan can shard
    that axis (``ms_mm.models.deepseek_vl2.parallelize``).
    """

    def __init__(self, num_experts, capacity_factor, drop_policy="probs"):
        super().__init__()
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"moe_token_drop_policy={drop_policy!r}: expected one of {DROP_POLICIES}")
        if not capacity_factor > 0:
            raise ValueError(f"moe_expert_capacity_factor={capacity_factor}: must be > 0")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.groups = 1                                    # token groups (the plan sets dp)
        self.ep = 1                                        # expert-parallel size (the plan sets it; divides groups)
        self.one_hot = ops.OneHot()                        # [G, N, k] -> [G, N, k, E]
        self.sum_choices = ops.ReduceSum(keep_dims=False)  # over k: [G, N, E] chosen (0 / 1)
        self.mul_weight = ops.Mul()                        # one-hot * weight: [G, N, k, E]
        self.sum_weights = ops.ReduceSum(keep_dims=False)  # over k: [G, N, E] dense weights
        self.transpose_chosen = ops.Transpose()            # [G, N, E] -> [G, E, N]
        self.transpose_weights = ops.Transpose()
        self.top_weights = ops.TopK(sorted=True)           # the C-th weight of each expert
        self.at_least = ops.GreaterEqual()
        self.mul_keep = ops.Mul()
        self.cumsum = ops.CumSum()                         # 1-based position among an expert's kept tokens
        self.mul_pos = ops.Mul()
        self.within = ops.LessEqual()
        self.mul_within = ops.Mul()
        self.mul_pos_kept = ops.Mul()
        self.transpose_pos = ops.Transpose()               # [G, E, N] -> [G, N, E]
        self.mul_choice_pos = ops.Mul()                    # one-hot * position: [G, N, k, E]
        self.sum_choice_pos = ops.ReduceSum(keep_dims=False)
        self.key_mul = ops.Mul()                           # (1 - kept) * N: not kept sorts after every kept
        self.key_add = ops.Add()
        self.first_kept = ops.TopK(sorted=True)            # the C smallest keys per expert
        self.slot_mul = ops.Mul()
        self.slot_add = ops.Add()
        self.kept_choice = ops.Greater()
        self.mul_kept_weight = ops.Mul()
        # the gathers and the move to / from the experts (``RoutedExperts._capacity``)
        self.zeros_tokens = ops.Zeros()
        self.pad_tokens = ops.Concat(axis=1)               # [G, 1 + N, H]
        self.dispatch_gather = ops.Gather(batch_dims=1)    # [G, 1 + N, H] x [G, E, C] -> [G, E, C, H]
        self.to_experts = ops.Transpose()                  # [ep, G/ep, E, C, H] -> [E, G/ep, ep, C, H]
        self.from_experts = ops.Transpose()
        self.zeros_slots = ops.Zeros()
        self.pad_slots = ops.Concat(axis=2)                # [G, E, 1 + C, H]
        self.combine_gather = ops.Gather(batch_dims=1)     # [G, E * (1 + C), H] x [G, N, k] -> [G, N, k, H]
        self.combine_mul = ops.Mul()
        self.combine_sum = ops.ReduceSum(keep_dims=False)  # over k

    def construct(self, topk_idx, topk_weight, capacity):
        groups, n, _ = topk_idx.shape
        f32 = ms.float32
        idx = ops.stop_gradient(topk_idx.astype(ms.int32))
        hot = self.one_hot(idx, self.num_experts, ops.ones((), f32), ops.zeros((), f32))   # [G, N, k, E]
        chosen = self.transpose_chosen(self.sum_choices(hot, 2), (0, 2, 1))                 # [G, E, N]
        if self.drop_policy == "probs":
            w = ops.stop_gradient(topk_weight.astype(f32))
            dense = self.transpose_weights(self.sum_weights(self.mul_weight(hot, ops.expand_dims(w, -1)), 2),
                                           (0, 2, 1))                                     # [G, E, N]
            threshold = self.top_weights(dense, capacity)[0][:, :, capacity - 1:capacity]  # [G, E, 1]
            keep = self.mul_keep(chosen, self.at_least(dense, threshold).astype(f32))
        else:
            keep = chosen
        pos = self.mul_pos(self.cumsum(keep, 2), keep)
        keep = self.mul_within(keep, self.within(pos, float(capacity)).astype(f32))
        pos = self.mul_pos_kept(pos, keep)                                                  # [G, E, N], 0 = not kept
        choice_pos = self.sum_choice_pos(
            self.mul_choice_pos(hot, ops.expand_dims(self.transpose_pos(pos, (0, 2, 1)), 2)), 3)  # [G, N, k]
        slot = self.slot_add(self.slot_mul(idx, capacity + 1), choice_pos.astype(ms.int32))
        weight = self.mul_kept_weight(topk_weight, self.kept_choice(choice_pos, 0.0).astype(topk_weight.dtype))
        # kept tokens first, in token order: key = position (kept) or position + N (not kept)
        key = self.key_add(self.key_mul(1.0 - keep, float(n)), ops.arange(n, dtype=f32).reshape(1, 1, n))
        neg_key, first = self.first_kept(-key, capacity)                                   # [G, E, C]
        src = (first.astype(ms.int32) + 1) * (neg_key > -float(n)).astype(ms.int32)
        return ops.stop_gradient(src), ops.stop_gradient(slot), weight
