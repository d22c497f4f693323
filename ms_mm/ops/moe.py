"""MoE building blocks: the SwiGLU expert MLP and the routed-expert dispatch.

Owns how tokens reach their top-k experts and how the expert outputs are combined; the router
(scores, top-k choice, aux loss) belongs to the model. Parameter names follow the MM checkpoint:
``linear_fc1.weight [2*I, H]`` (rows = [gate; up]) and ``linear_fc2.weight [H, I]`` per expert,
under ``local_experts.{e}``.

Three dispatch paths (``RoutedExperts.dispatch``), the default chosen once from ``kernels()``:
- portable (CPU and anything else): every expert runs on every token and the outputs are combined
  with a dense ``[T, E]`` weight matrix scattered from the top-k (zero where not chosen). Shapes stay
  static, so graph mode compiles one graph for any routing; the price is E/k times the expert FLOPs,
  which is the right trade for the small shapes the portable path exists for (tests, parity, demos).
- ascend: sort tokens by expert (``moe_token_permute``), one grouped matmul per projection over the
  stacked expert weights (``gmm`` with per-expert row counts), and ``moe_token_unpermute`` to scatter
  back with the routing weights. It runs only the chosen (token, expert) pairs.
- batched (what the expert-parallel plan selects, ``ms_mm.models.deepseek_vl2.parallelize``): the same maths
  as portable, written as two batch matmuls over the expert axis of the stacked expert weights
  ``[E, 2I, H]`` / ``[E, H, I]`` (held by ``self.bmm_fc1`` / ``self.bmm_fc2``), so semi-auto
  parallel can split the expert axis over EP ranks: each rank runs only its experts, MindSpore
  derives the token exchange into the expert axis and the reduction of the combine over it.
  The per-expert parameters stay separate (they are the checkpoint names), stacked on use.
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.functional_overload import gmm

from ms_mm.ops.layers import GatedMLP
from ms_mm.ops.switch import use_fused


def dense_combine_weights(topk_idx, topk_weight, num_experts):
    """[T, k] expert ids + weights -> [T, E] weights (sum over the k slots; zero for unchosen experts)."""
    # built in fp32: OneHot takes no bf16 on/off values, and the k-slot sum stays in fp32
    one_hot = ops.one_hot(topk_idx, num_experts, ops.ones((), ms.float32), ops.zeros((), ms.float32))  # [T, k, E]
    return (one_hot * ops.expand_dims(topk_weight.astype(ms.float32), -1)).sum(axis=1).astype(topk_weight.dtype)


class RoutedExperts(nn.Cell):
    """E SwiGLU experts; ``construct(x [T, H], topk_idx [T, k] int, topk_weight [T, k]) -> [T, H]``
    = sum_k topk_weight[t, k] * expert_{topk_idx[t, k]}(x[t])."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.local_experts = nn.CellList([GatedMLP(hidden_size, intermediate_size) for _ in range(num_experts)])
        self.dispatch = "grouped" if use_fused() else "portable"
        self.stack_fc1 = ops.Stack(axis=0)   # per-expert [2I, H] -> [E, 2I, H]
        self.stack_fc2 = ops.Stack(axis=0)   # per-expert [H, I] -> [E, H, I]
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
        out = ops.zeros_like(x)
        for e in range(self.num_experts):
            out = out + combine[:, e:e + 1] * self.local_experts[e](x)
        return out

    def _batched(self, x, topk_idx, topk_weight):
        combine = dense_combine_weights(topk_idx, topk_weight, self.num_experts).astype(x.dtype)  # [T, E]
        w1 = self.stack_fc1([m.linear_fc1.weight.astype(x.dtype) for m in self.local_experts])  # [E, 2I, H]
        w2 = self.stack_fc2([m.linear_fc2.weight.astype(x.dtype) for m in self.local_experts])  # [E, H, I]
        h = self.bmm_fc1(self.broadcast(ops.expand_dims(x, 0)), w1)
        h = ops.silu(h[..., :self.intermediate_size]) * h[..., self.intermediate_size:]
        y = self.bmm_fc2(h, w2)
        weights = ops.expand_dims(ops.transpose(combine, (1, 0)), -1)  # [E, T, 1]
        return self.combine_sum(self.combine_mul(y, weights), 0)

    def _grouped(self, x, topk_idx, topk_weight):
        # Ascend path: only the chosen (token, expert) pairs are computed.
        idx = topk_idx.astype(ms.int32)
        permuted, sorted_indices = ops.moe_token_permute(x, idx)
        counts = ops.one_hot(idx.reshape(-1), self.num_experts, ops.ones((), ms.float32),
                             ops.zeros((), ms.float32)).sum(axis=0).astype(ms.int64)  # tokens per expert
        w1 = ops.stack([ops.transpose(m.linear_fc1.weight.astype(x.dtype), (1, 0))
                        for m in self.local_experts])  # [E, H, 2I]
        w2 = ops.stack([ops.transpose(m.linear_fc2.weight.astype(x.dtype), (1, 0))
                        for m in self.local_experts])  # [E, I, H]
        h = gmm([permuted], [w1], group_list=counts, group_type=0, group_list_type=1)[0]
        h = ops.silu(h[:, :self.intermediate_size]) * h[:, self.intermediate_size:]
        y = gmm([h], [w2], group_list=counts, group_type=0, group_list_type=1)[0]
        return ops.moe_token_unpermute(y, sorted_indices, probs=topk_weight.astype(x.dtype))
