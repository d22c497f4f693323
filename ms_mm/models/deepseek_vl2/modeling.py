"""DeepSeek-VL2 in MindSpore: SigLIP tiles -> 2x2 downsample MLP projector -> DeepSeekMoE decoder.

Reads top to bottom like the upstream modeling files (deepseek-ai/DeepSeek-VL2,
``modeling_deepseek_vl_v2.py`` / ``modeling_deepseek.py`` / ``siglip_vit.py``), with parameter
names = MM checkpoint names (MindSpeed-MM's DeepSeek-VL2 renaming, see docs/internals.md).
Everything data-dependent (which tiles are real, where image tokens go, the attention mask) is
computed on the host by ``inputs.build_model_inputs``, so ``construct`` has static shapes and
compiles in graph mode.

Upstream conventions named once here:
- vision: LayerNorm eps 1e-6, GELU tanh in the MLP, qkv bias, learned pos-emb, no class token,
  final ``norm`` applied, attention-pool head present in the checkpoint but unused (ignore_head);
- the embedding row of ``pad_token_id`` gets no gradient (upstream ``padding_idx``);
- projector: zero-pad the patch grid bottom/right to a multiple of the downsample ratio, 2x2
  ``unfold`` with channel order (c, kh, kw), Linear -> GELU (erf) -> Linear;
- MLA rope dims are stored interleaved (pairs 2i, 2i+1) and de-interleaved before rotate-half;
  MHA (``use_mla: false``) is LlamaAttention with plain rotate-half;
- the MoE gate runs in fp32; the aux balance loss is added to the training objective, never to
  the reported CE loss.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ms_mm.ops import CoreAttention, Embedding, LayerNorm, Linear, RMSNorm, cross_entropy_sum, gelu, rotate_half
from ms_mm.ops.functional import add, expand_to, mul, permute
from ms_mm.ops.switch import sharded
from ms_mm.ops.layers import GatedMLP
from ms_mm.ops.moe import RoutedExperts

from .config import DeepseekVL2Config, LanguageConfig
from .inputs import MODEL_INPUT_NAMES  # the order of construct's arguments

__all__ = ["MODEL_INPUT_NAMES", "DeepseekVL2ForCausalLM", "causal_lm_loss"]


# ----------------------------------------------------------------------------- vision (SigLIP)

class PatchEmbed(nn.Cell):
    """Conv2d(3, D, k=p, s=p) with bias: ``proj.weight [D, 3, p, p]``. Kernel == stride, so off the
    parallel planner (CPU) it is computed as what it is, one matmul of the flattened (c, kh, kw) patches
    with the flattened kernel (MindSpore 2.9's CPU Conv2D ran this stride-14 convolution ~100x slower:
    149 ms against 1.3 ms for 6 tiles of 112 px, D 128). Sharded graphs keep the Conv2D primitive, which
    the parallel plans' strategies are written for."""

    def __init__(self, patch_size, width):
        super().__init__()
        self.proj = _Conv2dPatch(3, width, patch_size)
        self.patch_size = patch_size
        self.width = width
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        if sharded():
            x = self.proj(x)  # [N, D, g, g]
            n, d = x.shape[0], x.shape[1]
            return ops.transpose(x.reshape(n, d, -1), (0, 2, 1))  # [N, g*g, D], row-major patches
        n, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        patches = permute(x.reshape(n, c, gh, p, gw, p), (0, 2, 4, 1, 3, 5)).reshape(n * gh * gw, c * p * p)
        kernel = self.proj.weight.astype(x.dtype).reshape(self.width, c * p * p)
        out = self.proj.bias_add(self.matmul(patches, kernel), self.proj.bias.astype(x.dtype))
        return out.reshape(n, gh * gw, self.width)


class _Conv2dPatch(nn.Cell):
    def __init__(self, in_channels, out_channels, patch_size):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (out_channels, in_channels, patch_size, patch_size),
                                            ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), ms.float32), name="bias")
        self.conv = ops.Conv2D(out_channel=out_channels, kernel_size=patch_size, stride=patch_size)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        return self.bias_add(self.conv(x, self.weight.astype(x.dtype)), self.bias.astype(x.dtype))


class VisionAttention(nn.Cell):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        self.core_attention = CoreAttention(heads, head_dim=self.head_dim)

    def construct(self, x):
        n, p, d = x.shape
        qkv = permute(self.qkv(x).reshape(n, p, 3, self.heads, self.head_dim), (2, 0, 3, 1, 4))
        q, k, v = ops.unstack(qkv, 0)  # one Unstack: CPU StridedSlice is slow on these slices
        out = self.core_attention(q, k, v, None)  # [N, heads, P, hd]
        return self.proj(permute(out, (0, 2, 1, 3)).reshape(n, p, d))


class VisionMlp(nn.Cell):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def construct(self, x):
        return self.fc2(gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg.width, cfg.heads)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg.width, cfg.mlp_hidden)

    def construct(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Cell):
    """timm ``AttentionPoolLatent`` parameters. DeepSeek-VL2 sets ignore_head, so this is never
    called; it exists so the checkpoint round-trips and the names match MindSpeed-MM's."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width
        self.latent = Parameter(initializer(Normal(w ** -0.5), (1, 1, w), ms.float32), name="latent",
                                requires_grad=False)
        self.q = Linear(w, w)
        self.kv = Linear(w, 2 * w)
        self.proj = Linear(w, w)
        self.norm = LayerNorm(w, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(w, cfg.mlp_hidden)
        for p in self.get_parameters():
            p.requires_grad = False


class VisionTransformer(nn.Cell):
    """Patch features of each tile: ``[N, 3, S, S] -> [N, (S/p)^2, width]`` after the final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = Parameter(initializer(Normal(0.02), (1, cfg.num_patches, cfg.width), ms.float32),
                                   name="pos_embed")
        self.blocks = nn.CellList([VisionBlock(cfg) for _ in range(cfg.layers)])
        self.norm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn_pool = AttentionPoolHead(cfg)

    def construct(self, pixel_values):
        x = add(self.patch_embed(pixel_values), self.pos_embed.astype(pixel_values.dtype))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class DownsampleMlpProjector(nn.Cell):
    """``[N, g*g, C] -> [N, ceil(g/r)^2, D]``: r x r neighbourhoods concatenated as (c, kh, kw), then
    Linear -> GELU(erf) -> ... -> Linear. ``layers.{0,2,..}`` are the Linears (nn.Sequential indices)."""

    def __init__(self, cfg, grid):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        self.grid = grid
        self.pad = (-grid) % self.ratio
        # zero rows / columns bottom-right of [N, g, g, C]; the primitive needs no fill scalar (bf16 has none)
        self.pad_grid = ops.Pad(((0, 0), (0, self.pad), (0, self.pad), (0, 0)))
        inner = cfg.n_embed * cfg.mlp_ratio
        cells = [Linear(cfg.input_dim * self.ratio * self.ratio, inner)]
        for _ in range(1, cfg.depth - 1):
            cells += [_Gelu(), Linear(inner, inner)]
        cells += [_Gelu(), Linear(inner, cfg.n_embed)]
        self.layers = nn.SequentialCell(cells)

    def construct(self, x):
        n, _, c = x.shape
        g, r = self.grid, self.ratio
        x = x.reshape(n, g, g, c)
        if self.pad > 0:
            x = self.pad_grid(x)
        s = (g + self.pad) // r
        x = x.reshape(n, s, r, s, r, c)
        x = permute(x, (0, 1, 3, 5, 2, 4)).reshape(n, s * s, c * r * r)  # (c, kh, kw) as F.unfold
        return self.layers(x)


class _Gelu(nn.Cell):
    def construct(self, x):
        return gelu(x, approximate="none")


class ImageEncoder(nn.Cell):
    def __init__(self, config: DeepseekVL2Config):
        super().__init__()
        self.encoder = VisionTransformer(config.vision_config)
        self.projector = DownsampleMlpProjector(config.projector_config, config.vision_config.grid)

    def construct(self, pixel_values):
        return self.projector(self.encoder(pixel_values))


# ----------------------------------------------------------------------------- language (DeepSeekMoE)

def _rope_cos_sin(position_ids, inv_freq):
    """position_ids [B, S] -> cos, sin [B, 1, S, d] (halves duplicated: rotate-half layout)."""
    freqs = ops.expand_dims(position_ids.astype(ms.float32), -1) * inv_freq  # [B, S, d/2]
    emb = ops.cat((freqs, freqs), -1)
    return ops.expand_dims(ops.cos(emb), 1), ops.expand_dims(ops.sin(emb), 1)


def _inv_freq(dim, theta):
    return Tensor(1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)), ms.float32)


class MLAttention(nn.Cell):
    """Multi-head latent attention. ``linear_qkv`` = [q_proj (or q_a_proj); kv_a_proj_with_mqa] rows:
    q (or the q latent), the kv latent (kv_lora_rank) and one rope key shared by all heads."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.q_head_dim = cfg.q_head_dim
        q_out = self.heads * self.q_head_dim if cfg.q_lora_rank is None else cfg.q_lora_rank
        self.q_out = q_out
        self.linear_qkv = Linear(cfg.hidden_size, q_out + cfg.kv_lora_rank + self.rope, has_bias=False)
        if cfg.q_lora_rank is not None:
            self.q_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
            self.linear_qb = Linear(cfg.q_lora_rank, self.heads * self.q_head_dim, has_bias=False)
        self.k_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps)
        self.linear_kvb = Linear(cfg.kv_lora_rank, self.heads * (self.nope + self.v_dim), has_bias=False)
        self.linear_proj = Linear(self.heads * self.v_dim, cfg.hidden_size, has_bias=False)
        self.core_attention = CoreAttention(self.heads, scale=self.q_head_dim ** -0.5)
        self.inv_freq = _inv_freq(self.rope, cfg.rope_theta)

    def _deinterleave(self, x):
        # pairs (2i, 2i+1) -> halves [even dims | odd dims], as upstream's view(d/2, 2).transpose
        shape = x.shape
        x = x.reshape(shape[:-1] + (self.rope // 2, 2))
        return permute(x, tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)).reshape(shape)

    def construct(self, x, rope, attention_bias):
        b, s, _ = x.shape
        q, latent, k_pe = ops.split(self.linear_qkv(x), (self.q_out, self.kv_lora_rank, self.rope), -1)
        if self.q_lora_rank is not None:
            q = self.linear_qb(self.q_layernorm(q))

        q = permute(q.reshape(b, s, self.heads, self.q_head_dim), (0, 2, 1, 3))
        q_nope, q_pe = ops.split(q, (self.nope, self.rope), -1)
        kv = self.linear_kvb(self.k_layernorm(latent)).reshape(b, s, self.heads, self.nope + self.v_dim)
        kv = permute(kv, (0, 2, 1, 3))
        k_nope, v = ops.split(kv, (self.nope, self.v_dim), -1)
        k_pe = ops.expand_dims(k_pe, 1)  # [B, 1, S, rope]

        cos, sin = rope
        q_pe = self._deinterleave(q_pe)
        k_pe = self._deinterleave(k_pe)
        q_pe = mul(q_pe, cos.astype(q.dtype)) + mul(rotate_half(q_pe), sin.astype(q.dtype))
        k_pe = mul(k_pe, cos.astype(q.dtype)) + mul(rotate_half(k_pe), sin.astype(q.dtype))

        query = ops.cat((q_nope, q_pe), -1)
        key = ops.cat((k_nope, ops.broadcast_to(k_pe, (b, self.heads, s, self.rope))), -1)
        out = self.core_attention(query, key, v, attention_bias)  # [B, N, S, v]
        return self.linear_proj(permute(out, (0, 2, 1, 3)).reshape(b, s, self.heads * self.v_dim))


class MHAttention(nn.Cell):
    """LlamaAttention (``use_mla: false``). ``linear_qkv`` rows in Megatron layout: per KV group
    [q heads of the group; k; v] (the same layout as the Qwen LLM; see docs/internals.md)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.rep = self.heads // self.kv_heads
        self.head_dim = cfg.head_dim
        self.linear_qkv = Linear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, has_bias=False)
        self.linear_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, has_bias=False)
        self.core_attention = CoreAttention(self.heads, self.kv_heads, head_dim=self.head_dim)
        self.inv_freq = _inv_freq(self.head_dim, cfg.rope_theta)

    def construct(self, x, rope, attention_bias):
        b, s, _ = x.shape
        d = self.head_dim
        qkv = self.linear_qkv(x).reshape(b, s, self.kv_heads, self.rep + 2, d)
        # one Transpose to [B, Nkv, rep+2, S, d], one Unstack and one Stack (of the q heads), instead
        # of three StridedSlices + three Transposes (a StridedSlice's backward is a full-size zero tensor)
        parts = ops.unstack(permute(qkv, (0, 2, 3, 1, 4)), 2)
        q = parts[0] if self.rep == 1 else ops.stack(parts[:self.rep], 2)
        q = q.reshape(b, self.heads, s, d)
        k, v = parts[self.rep], parts[self.rep + 1]
        cos, sin = rope
        cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = self.core_attention(q, k, v, attention_bias)
        return self.linear_proj(permute(out, (0, 2, 1, 3)).reshape(b, s, self.heads * d))


class TopKRouter(nn.Cell):
    """MoEGate: fp32 scores (softmax or sigmoid), top-k choice (greedy, group-limited, noaux_tc),
    weights (optionally renormalised) x routed_scaling_factor, and the balance loss.
    Returns ``(topk_idx [T, k] int32, topk_weight [T, k] fp32, aux_loss [] fp32)``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or 1
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = float(cfg.routed_scaling_factor)
        self.alpha = float(cfg.aux_loss_alpha)
        self.seq_aux = cfg.seq_aux
        self.weight = Parameter(initializer(Normal(0.02), (self.num_experts, cfg.hidden_size), ms.float32),
                                name="weight")
        self.matmul = ops.MatMul(transpose_b=True)  # a primitive attribute, so a parallel plan can shard it
        if self.topk_method == "noaux_tc":
            # e_score_correction_bias: steers the choice only, updated outside the gradient
            self.expert_bias = Parameter(initializer("zeros", (self.num_experts,), ms.float32),
                                         name="expert_bias", requires_grad=False)

    def _group_mask(self, choice, t):
        per_group = self.num_experts // self.n_group
        grouped = choice.reshape(t, self.n_group, per_group)
        if self.topk_method == "noaux_tc":
            group_scores = ops.topk(grouped, 2)[0].sum(-1)
        else:
            group_scores = ops.amax(grouped, -1)
        group_idx = ops.topk(group_scores, self.topk_group)[1]
        group_mask = ops.one_hot(group_idx, self.n_group, ops.ones((), ms.float32),
                                 ops.zeros((), ms.float32)).sum(1)  # [T, n_group]
        mask = ops.broadcast_to(ops.expand_dims(group_mask, -1), (t, self.n_group, per_group))
        return mask.reshape(t, self.num_experts) > 0

    def construct(self, x):
        b, s, h = x.shape
        t = b * s
        logits = self.matmul(x.reshape(t, h).astype(ms.float32), self.weight.astype(ms.float32))
        if self.scoring_func == "softmax":
            scores = ops.softmax(logits, -1)
        else:
            scores = ops.sigmoid(logits)

        if self.topk_method == "greedy":
            topk_weight, topk_idx = ops.topk(scores, self.top_k)
        elif self.topk_method == "group_limited_greedy":
            masked = ops.where(self._group_mask(scores, t), scores, ops.zeros_like(scores))
            topk_weight, topk_idx = ops.topk(masked, self.top_k)
        else:  # noaux_tc
            choice = scores + ops.stop_gradient(self.expert_bias)
            masked = ops.where(self._group_mask(choice, t), choice, ops.zeros_like(choice))
            topk_idx = ops.topk(masked, self.top_k)[1]
            topk_weight = ops.gather_elements(scores, 1, topk_idx)

        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdims=True) + 1e-20) * self.scaling
        else:
            topk_weight = topk_weight * self.scaling

        aux_loss = ops.zeros((), ms.float32)
        if self.alpha > 0.0:
            hits = ops.stop_gradient(ops.one_hot(topk_idx, self.num_experts, ops.ones((), ms.float32),
                                                 ops.zeros((), ms.float32)))  # [T, k, E]
            if self.seq_aux:
                ce = hits.reshape(b, s * self.top_k, self.num_experts).sum(1) / (s * self.top_k / self.num_experts)
                aux_loss = (ce * scores.reshape(b, s, self.num_experts).mean(1)).sum(1).mean() * self.alpha
            else:
                fi = hits.reshape(t * self.top_k, self.num_experts).mean(0) * self.num_experts
                aux_loss = (scores.mean(0) * fi).sum() * self.alpha
        return topk_idx.astype(ms.int32), topk_weight, aux_loss


class MoELayer(nn.Cell):
    """Routed experts (top-k) + shared experts, as DeepseekV2MoE."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.router = TopKRouter(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                     capacity_factor=cfg.moe_expert_capacity_factor,
                                     drop_policy=cfg.moe_token_drop_policy)
        self.has_shared = bool(cfg.n_shared_experts)
        if self.has_shared:
            self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def construct(self, x):
        b, s, h = x.shape
        topk_idx, topk_weight, aux_loss = self.router(x)
        flat = x.reshape(b * s, h)
        y = self.experts(flat, topk_idx, topk_weight.astype(x.dtype)).reshape(b, s, h)
        if self.has_shared:
            y = y + self.shared_experts(x)
        return y, topk_idx, topk_weight, aux_loss


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: LanguageConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attention = MLAttention(cfg) if cfg.use_mla else MHAttention(cfg)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoELayer(cfg) if self.is_moe else GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def construct(self, x, rope, attention_bias):
        x = x + self.self_attention(self.input_layernorm(x), rope, attention_bias)
        h = self.pre_mlp_layernorm(x)
        if self.is_moe:
            h, topk_idx, topk_weight, aux_loss = self.mlp(h)
            return x + h, topk_idx, topk_weight, aux_loss
        return x + self.mlp(h), None, None, None


class TransformerDecoder(nn.Cell):
    """Holds the layers and the final norm under Megatron's names; ``TextDecoder`` drives them."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.layers = nn.CellList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.final_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class TokenEmbedding(nn.Cell):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, weight_init=0.02)


class TextDecoder(nn.Cell):
    """Embedding, decoder layers, final norm and LM head. ``construct`` takes input embeddings and
    returns ``(logits fp32, topk_idx [L_moe, T, k], topk_weight [L_moe, T, k], aux_losses [L_moe])``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.embedding = TokenEmbedding(cfg)
        self.decoder = TransformerDecoder(cfg)
        self.tie = cfg.tie_word_embeddings
        if not self.tie:
            self.output_layer = Linear(cfg.hidden_size, cfg.vocab_size, has_bias=False)
        self.vocab_size = cfg.vocab_size
        self.num_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))

    def construct(self, hidden, position_ids, attention_bias):
        routing, weights, aux = (), (), ()
        # RoPE tables once per step, not once per layer (every layer has the same rope dim and theta)
        rope = _rope_cos_sin(position_ids, self.decoder.layers[0].self_attention.inv_freq)
        for layer in self.decoder.layers:
            hidden, topk_idx, topk_weight, aux_loss = layer(hidden, rope, attention_bias)
            if layer.is_moe:
                routing += (topk_idx,)
                weights += (topk_weight,)
                aux += (aux_loss,)
        hidden = self.decoder.final_layernorm(hidden)
        if self.tie:
            w = self.embedding.word_embeddings.weight.astype(hidden.dtype)
            logits = ops.matmul(hidden, ops.transpose(w, (1, 0)))
        else:
            logits = self.output_layer(hidden)
        if self.num_moe > 0:
            return logits.astype(ms.float32), ops.stack(routing), ops.stack(weights), ops.stack(aux)
        t = hidden.shape[0] * hidden.shape[1]
        return (logits.astype(ms.float32), ops.zeros((0, t, 1), ms.int32), ops.zeros((0, t, 1), ms.float32),
                ops.zeros((0,), ms.float32))


# ----------------------------------------------------------------------------- the whole model

class ImageTokenScatter(nn.Cell):
    """Image features into the image-token positions of the text embeddings, over one gather table
    [tile tokens of all tiles; image_newline; view_seperator] (the host-side ``image_token_index`` already
    encodes the 2D tile layout). A Cell of its own, so that a pipeline plan can place it with the tile
    features; the two tensors stay the model's (their MM names are top-level) and come in as inputs."""

    def __init__(self, pad_token_id=None):
        super().__init__()
        self.pad_token_id = pad_token_id

    def construct(self, text, input_ids, tiles, image_newline, view_seperator, image_token_index, images_seq_mask):
        if self.pad_token_id is not None:
            # upstream nn.Embedding(padding_idx=pad_token_id): the pad row is used but never trained
            is_pad = expand_to(ops.expand_dims(input_ids == self.pad_token_id, -1), text.shape)
            text = ops.where(is_pad, ops.stop_gradient(text), text)
        b, s, d = text.shape
        table = ops.cat((tiles.reshape(-1, d), ops.expand_dims(image_newline.astype(text.dtype), 0),
                         ops.expand_dims(view_seperator.astype(text.dtype), 0)), 0)
        image = ops.gather(table, image_token_index.reshape(-1), 0).reshape(b, s, d)
        return ops.where(expand_to(ops.expand_dims(images_seq_mask, -1), text.shape), image, text)


class DeepseekVL2ForCausalLM(nn.Cell):
    """``construct(*[inputs[k] for k in MODEL_INPUT_NAMES])`` ->
    ``(loss, logits, ce_loss, aux_losses, routing, routing_weights)``:

    - ``loss`` = ``ce_loss`` + sum(aux_losses): the training objective (upstream injects the aux
      gradient with AddAuxiliaryLoss; adding it to the objective gives the same gradient);
    - ``logits`` [B, S, V] fp32; ``ce_loss`` = mean CE over shifted labels != -100 (upstream ``loss``);
    - ``aux_losses`` [L_moe] per MoE layer; ``routing`` [L_moe, B*S, k] int32 chosen experts and
      ``routing_weights`` [L_moe, B*S, k] their gate weights (both in top-k order).
    The first two follow the model-API contract ``(loss, logits)``.
    """

    # SigLIP's attention-pool head: in the checkpoint, never used (ignore_head), so in no compiled graph
    graph_unused_prefixes = ("image_encoder.encoder.attn_pool.",)

    def __init__(self, config: DeepseekVL2Config, compute_dtype=ms.float32):
        super().__init__()
        config.validate()
        self.config = config
        self.compute_dtype = compute_dtype  # activations; parameters stay fp32 (cast on use)
        self.image_encoder = ImageEncoder(config)
        d = config.projector_config.n_embed
        std = 1.0 / math.sqrt(d)
        self.image_newline = Parameter(initializer(Normal(std), (d,), ms.float32), name="image_newline")
        self.view_seperator = Parameter(initializer(Normal(std), (d,), ms.float32), name="view_seperator")
        self.image_scatter = ImageTokenScatter(config.language_config.pad_token_id)
        self.text_decoder = TextDecoder(config.language_config)

    def embed(self, input_ids, pixel_values, image_token_index, images_seq_mask):
        """Text embeddings with image features scattered into the image-token positions."""
        text = self.text_decoder.embedding.word_embeddings(input_ids).astype(self.compute_dtype)
        tiles = self.image_encoder(pixel_values.astype(text.dtype))
        return self.image_scatter(text, input_ids, tiles, self.image_newline, self.view_seperator, image_token_index,
                                  images_seq_mask)

    def construct(self, input_ids, position_ids, attention_bias, pixel_values, image_token_index,
                  images_seq_mask, labels):
        embeds = self.embed(input_ids, pixel_values, image_token_index, images_seq_mask)
        logits, routing, routing_weights, aux = self.text_decoder(embeds, position_ids, attention_bias)
        ce = causal_lm_loss(logits, labels)
        return ce + aux.sum(), logits, ce, aux, routing, routing_weights


def causal_lm_loss(logits, labels):
    """Mean CE of logits[:, t] against labels[:, t+1] over targets != -100 (fp32). The labels are
    shifted (the last position gets -100), not the logits, so [B, S, V] is never sliced."""
    b, s, v = logits.shape
    shift_labels = ops.cat((labels[:, 1:], ops.full_like(labels[:, :1], -100)), 1).reshape(-1)
    total, count = cross_entropy_sum(logits.reshape(b * s, v), shift_labels)
    return total / ops.maximum(count, 1.0)
