"""MoE building blocks: the routed experts, stacked, and how tokens reach them.

Owns how tokens reach their top-k experts and how the expert outputs are combined; the router
(scores, top-k choice, aux loss) belongs to the model. The experts' weights are stacked, as the MM
checkpoint stores them: ``linear_fc1.weight [E, 2I, H]`` (per expert the rows [gate; up]) and
``linear_fc2.weight [E, H, I]``. Dim 0 is the expert axis, which expert parallel splits: an EP rank
holds whole experts (the converter's EP split cuts the same dim, ``mm_checkpoint.EXPERT_PATTERN``).

Three dispatch paths (``RoutedExperts.dispatch``), the default chosen once from ``kernels()``:
- portable (CPU and anything else): every expert runs on every token and the outputs are combined
  with a dense ``[T, E]`` weight matrix scattered from the top-k (zero where not chosen). Shapes stay
  static, so graph mode compiles one graph for any routing; the price is E/k times the expert FLOPs,
  which is the right trade for the small shapes the portable path exists for (tests, parity, demos).
- ascend: sort tokens by expert (``moe_token_permute``), one grouped matmul per projection over the
  stacked expert weights (``gmm`` with per-expert row counts), and ``moe_token_unpermute`` to scatter
  back with the routing weights. It runs only the chosen (token, expert) pairs.
- batched (what the expert-parallel plan selects, ``ms_mm.models.deepseek_vl2.parallelize``): the same
  maths as portable, written as two batch matmuls over the expert axis of the stacked weights, so
  semi-auto parallel can split the expert axis over EP ranks: each rank holds and runs only its own
  experts, MindSpore moves the tokens of the EP group to them and reduces the weighted combine over
  the expert axis.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.ops.functional_overload import gmm

from ms_mm.ops.switch import use_fused


def dense_combine_weights(topk_idx, topk_weight, num_experts):
    """[T, k] expert ids + weights -> [T, E] weights (sum over the k slots; zero for unchosen experts)."""
    # built in fp32: OneHot takes no bf16 on/off values, and the k-slot sum stays in fp32
    one_hot = ops.one_hot(topk_idx, num_experts, ops.ones((), ms.float32), ops.zeros((), ms.float32))  # [T, k, E]
    return (one_hot * ops.expand_dims(topk_weight.astype(ms.float32), -1)).sum(axis=1).astype(topk_weight.dtype)


class StackedWeight(nn.Cell):
    """One ``weight`` Parameter of ``shape`` (the stacked experts' [E, out, in]), N(0, sigma) init."""

    def __init__(self, shape, sigma=0.02, param_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer(Normal(sigma=sigma), tuple(shape), param_dtype), name="weight")


class RoutedExperts(nn.Cell):
    """E SwiGLU experts; ``construct(x [T, H], topk_idx [T, k] int, topk_weight [T, k]) -> [T, H]``
    = sum_k topk_weight[t, k] * expert_{topk_idx[t, k]}(x[t]), expert e being
    ``fc2[e] @ (silu(gate_e x) * up_e x)`` with [gate_e; up_e] = ``fc1[e]``."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.linear_fc1 = StackedWeight((num_experts, 2 * intermediate_size, hidden_size))
        self.linear_fc2 = StackedWeight((num_experts, hidden_size, intermediate_size))
        self.dispatch = "grouped" if use_fused() else "portable"
        self.unstack = ops.Unstack(axis=0)                 # [E, ...] -> E tensors (backward: one Stack)
        self.matmul = ops.MatMul(transpose_b=True)
        self.split = ops.Split(axis=-1, output_num=2)      # [T, 2I] -> gate, up
        self.broadcast = ops.BroadcastTo((num_experts, -1, hidden_size))
        self.bmm_fc1 = ops.BatchMatMul(transpose_b=True)   # [E, T, H] x [E, 2I, H] -> [E, T, 2I]
        self.bmm_fc2 = ops.BatchMatMul(transpose_b=True)   # [E, T, I] x [E, H, I] -> [E, T, H]
        self.combine_mul = ops.Mul()                       # [E, T, H] * [E, T, 1]
        self.combine_sum = ops.ReduceSum(keep_dims=False)  # over the expert axis

    def construct(self, x, topk_idx, topk_weight):
        if self.dispatch == "grouped":
            return self._grouped(x, topk_idx, topk_weight)
        if self.dispatch == "batched":
            return self._batched(x, topk_idx, topk_weight)
        combine = dense_combine_weights(topk_idx, topk_weight, self.num_experts).astype(x.dtype)  # [T, E]
        w1 = self.unstack(self.linear_fc1.weight.astype(x.dtype))
        w2 = self.unstack(self.linear_fc2.weight.astype(x.dtype))
        out = ops.zeros_like(x)
        for e in range(self.num_experts):
            gate, up = self.split(self.matmul(x, w1[e]))
            out = out + combine[:, e:e + 1] * self.matmul(ops.silu(gate) * up, w2[e])
        return out

    def _batched(self, x, topk_idx, topk_weight):
        combine = dense_combine_weights(topk_idx, topk_weight, self.num_experts).astype(x.dtype)  # [T, E]
        h = self.bmm_fc1(self.broadcast(ops.expand_dims(x, 0)), self.linear_fc1.weight.astype(x.dtype))
        h = ops.silu(h[..., :self.intermediate_size]) * h[..., self.intermediate_size:]
        y = self.bmm_fc2(h, self.linear_fc2.weight.astype(x.dtype))
        weights = ops.expand_dims(ops.transpose(combine, (1, 0)), -1)  # [E, T, 1]
        return self.combine_sum(self.combine_mul(y, weights), 0)

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
