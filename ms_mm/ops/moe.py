"""MoE building blocks: the SwiGLU expert MLP and the routed-expert dispatch.

Owns how tokens reach their top-k experts and how the expert outputs are combined; the router
(scores, top-k choice, aux loss) belongs to the model. Parameter names follow the MM checkpoint:
``linear_fc1.weight [2*I, H]`` (rows = [gate; up]) and ``linear_fc2.weight [H, I]`` per expert,
under ``local_experts.{e}``.

Two dispatch paths, chosen once from ``kernels()``:
- portable (CPU and anything else): every expert runs on every token and the outputs are combined
  with a dense ``[T, E]`` weight matrix scattered from the top-k (zero where not chosen). Shapes stay
  static, so graph mode compiles one graph for any routing; the price is E/k times the expert FLOPs,
  which is the right trade for the small shapes the portable path exists for (tests, parity, demos).
- ascend: sort tokens by expert (``moe_token_permute``), one grouped matmul per projection over the
  stacked expert weights (``gmm`` with per-expert row counts), and ``moe_token_unpermute`` to scatter
  back with the routing weights. It runs only the chosen (token, expert) pairs.
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.functional_overload import gmm

from ms_mm.ops.layers import GatedMLP
from ms_mm.ops.switch import use_fused


def dense_combine_weights(topk_idx, topk_weight, num_experts):
    """[T, k] expert ids + weights -> [T, E] weights (sum over the k slots; zero for unchosen experts)."""
    one_hot = ops.one_hot(topk_idx, num_experts, ops.ones((), topk_weight.dtype),
                          ops.zeros((), topk_weight.dtype))  # [T, k, E]
    return (one_hot * ops.expand_dims(topk_weight, -1)).sum(axis=1)


class RoutedExperts(nn.Cell):
    """E SwiGLU experts; ``construct(x [T, H], topk_idx [T, k] int, topk_weight [T, k]) -> [T, H]``
    = sum_k topk_weight[t, k] * expert_{topk_idx[t, k]}(x[t])."""

    def __init__(self, num_experts, hidden_size, intermediate_size):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.local_experts = nn.CellList([GatedMLP(hidden_size, intermediate_size) for _ in range(num_experts)])
        self.fused = use_fused()

    def construct(self, x, topk_idx, topk_weight):
        if self.fused:
            return self._grouped(x, topk_idx, topk_weight)
        combine = dense_combine_weights(topk_idx, topk_weight, self.num_experts).astype(x.dtype)  # [T, E]
        out = ops.zeros_like(x)
        for e in range(self.num_experts):
            out = out + combine[:, e:e + 1] * self.local_experts[e](x)
        return out

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
