"""Lumina-mGPT 2.0 decoder (Chameleon with per-head q/k LayerNorm, swin_norm, z-loss, image-logit mask).

`LuminaMGPT2ForCausalLM(config).construct(input_ids [B,S], labels [B,S], position_ids [B,S])` returns
``(loss, logits, ce_loss, z_loss)``: ``loss = ce_loss + z_loss_weight * z_loss`` is the training
objective (xllmx finetune.py), ``logits`` [B, S, V] fp32, ``ce_loss`` the mean CE over shifted targets
!= -100 (upstream's ``c_loss``), ``z_loss`` the mean of logsumexp(shift_logits)^2 over the same targets.
Attention is causal over the whole row (as upstream: no padding mask; padded tail positions are
computed and ignored through their -100 labels). Dropout (``config.dropout``, on both residual
branches) is active only in training mode (``net.set_train(True)``).

Parameter names are MindSpeed-MM-style (see adapters/lumina_mgpt2.py for the HF table):
``text_decoder.embedding.word_embeddings``, ``text_decoder.decoder.layers.{i}.{input_layernorm,
self_attention.{linear_qkv, q_layernorm, k_layernorm, linear_proj}, pre_mlp_layernorm,
mlp.{linear_fc1, linear_fc2}}``, ``text_decoder.decoder.final_layernorm``, ``text_decoder.output_layer``.
With ``swin_norm`` the two layer norms keep their names but sit after attention / MLP.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import One, Zero, initializer

from ms_mm.ops import CoreAttention, Embedding, GatedMLP, Linear, RMSNorm, apply_rotary, logsumexp
from ms_mm.ops.functional import add, expand_to, mul, permute
from ms_mm.models.lumina_mgpt2.config import QK_NORM_EPS, LuminaMGPT2Config

__all__ = ["LuminaMGPT2ForCausalLM", "LuminaDecoder", "GroupedHeadLayerNorm", "causal_lm_losses", "cache_step_inputs",
           "LuminaGenerationStep"]

_FP32_MIN = float(np.finfo(np.float32).min)


class GroupedHeadLayerNorm(nn.Cell):
    """LayerNorm over head_dim of x [..., heads, head_dim] (no affine in the statistics), then the
    affine of row ``h // (heads / groups)`` of ``weight`` / ``bias`` [groups, head_dim] for head h
    (upstream ChameleonLayerNorm's repeat_interleave over model-parallel groups)."""

    def __init__(self, num_heads, groups, head_dim, eps=QK_NORM_EPS):
        super().__init__()
        self.num_heads = num_heads
        self.groups = groups
        self.per_group = num_heads // groups
        self.head_dim = head_dim
        self.weight = Parameter(initializer(One(), (groups, head_dim), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (groups, head_dim), ms.float32), name="bias")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=float(eps))
        self.ones = Tensor(np.ones(head_dim, np.float32))
        self.zeros = Tensor(np.zeros(head_dim, np.float32))

    def _per_head(self, p):
        p = ops.broadcast_to(ops.expand_dims(p, 1), (self.groups, self.per_group, self.head_dim))
        return p.reshape(self.num_heads, self.head_dim)

    def construct(self, x):
        y = self.layer_norm(x.astype(ms.float32), self.ones, self.zeros)[0]
        y = add(mul(y, self._per_head(self.weight)), self._per_head(self.bias))
        return y.astype(x.dtype)


def _rope_cos_sin(position_ids, inv_freq):
    """position_ids [B, S] -> cos, sin [B, 1, S, D] (rotate-half layout: the halves repeat)."""
    freqs = ops.expand_dims(position_ids.astype(ms.float32), -1) * inv_freq
    emb = ops.cat((freqs, freqs), -1)
    return ops.expand_dims(ops.cos(emb), 1), ops.expand_dims(ops.sin(emb), 1)


class LuminaAttention(nn.Cell):
    """Causal GQA with q/k grouped-head LayerNorm before RoPE. ``linear_qkv`` rows in Megatron layout:
    per KV group [q heads of the group; k; v] (as Qwen's LLM, docs/internals.md)."""

    def __init__(self, c: LuminaMGPT2Config):
        super().__init__()
        self.heads = c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.rep = self.heads // self.kv_heads
        self.head_dim = d = c.head_dim
        self.linear_qkv = Linear(c.hidden_size, (self.heads + 2 * self.kv_heads) * d, has_bias=c.attention_bias)
        self.q_layernorm = GroupedHeadLayerNorm(self.heads, c.model_parallel_size, d)
        self.k_layernorm = GroupedHeadLayerNorm(self.kv_heads, c.model_parallel_size, d)
        self.linear_proj = Linear(self.heads * d, c.hidden_size, has_bias=c.attention_bias)
        self.core_attention = CoreAttention(self.heads, self.kv_heads, head_dim=d)
        scale = float(c.rope_scaling["factor"]) if c.rope_scaling else 1.0
        inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
        self.inv_freq = Tensor((inv / scale).astype(np.float32))  # linear scaling = positions / factor

    def _qkv(self, x, position_ids):
        """x [B, S, H] -> q [B, N, S, D], k / v [B, Nkv, S, D] (normed, rotated)."""
        b, s, _ = x.shape
        d = self.head_dim
        qkv = self.linear_qkv(x).reshape(b, s, self.kv_heads, (self.rep + 2) * d)
        q = self.q_layernorm(qkv[..., :self.rep * d].reshape(b, s, self.heads, d))
        k = self.k_layernorm(qkv[..., self.rep * d:(self.rep + 1) * d])
        v = qkv[..., (self.rep + 1) * d:]
        q, k, v = (permute(t, (0, 2, 1, 3)) for t in (q, k, v))
        cos, sin = _rope_cos_sin(position_ids, self.inv_freq)
        cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _out(self, out, b, s):
        return self.linear_proj(permute(out, (0, 2, 1, 3)).reshape(b, s, self.heads * self.head_dim))

    def construct(self, x, position_ids, mask):
        q, k, v = self._qkv(x, position_ids)
        return self._out(self.core_attention(q, k, v, mask), x.shape[0], x.shape[1])

    def construct_cached(self, x, position_ids, mask, write, k_cache, v_cache):
        """Generation: the new tokens' k / v are placed into the fixed-size caches k / v
        [B, Nkv, L, D] at the slots ``write`` [S, L] (one-hot rows) marks; the queries attend to the
        whole cache under ``mask`` [1, 1, S, L] (future and unwritten slots masked), so a token costs
        the same at any position. Returns (out, k_cache, v_cache) (functional: graph-mode safe)."""
        q, k, v = self._qkv(x, position_ids)
        w = write.astype(k_cache.dtype)
        keep = (1.0 - w.sum(0)).reshape(1, 1, -1, 1)
        w_t = permute(w, (1, 0))                                   # [L, S]
        k_cache = k_cache * keep + ops.matmul(w_t, k.astype(k_cache.dtype))
        v_cache = v_cache * keep + ops.matmul(w_t, v.astype(v_cache.dtype))
        out = self.core_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
        return self._out(out, x.shape[0], x.shape[1]), k_cache, v_cache


class LuminaDecoderLayer(nn.Cell):
    """Pre-norm: x + attn(norm(x)), x + mlp(norm(x)). swin_norm: x + norm(attn(x)), x + norm(mlp(x))."""

    def __init__(self, c: LuminaMGPT2Config):
        super().__init__()
        self.swin_norm = c.swin_norm
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attention = LuminaAttention(c)
        self.pre_mlp_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, has_bias=c.mlp_bias)
        self.dropout = nn.Dropout(p=c.dropout) if c.dropout > 0 else None

    def _drop(self, x):
        return x if self.dropout is None else self.dropout(x)

    def construct(self, x, position_ids, mask):
        if self.swin_norm:
            x = x + self._drop(self.input_layernorm(self.self_attention(x, position_ids, mask)))
            return x + self._drop(self.pre_mlp_layernorm(self.mlp(x)))
        x = x + self._drop(self.self_attention(self.input_layernorm(x), position_ids, mask))
        return x + self._drop(self.mlp(self.pre_mlp_layernorm(x)))

    def construct_cached(self, x, position_ids, mask, write, k_cache, v_cache):
        attn = self.self_attention.construct_cached
        if self.swin_norm:
            a, k_cache, v_cache = attn(x, position_ids, mask, write, k_cache, v_cache)
            x = x + self._drop(self.input_layernorm(a))
            return x + self._drop(self.pre_mlp_layernorm(self.mlp(x))), k_cache, v_cache
        a, k_cache, v_cache = attn(self.input_layernorm(x), position_ids, mask, write, k_cache, v_cache)
        x = x + self._drop(a)
        return x + self._drop(self.mlp(self.pre_mlp_layernorm(x))), k_cache, v_cache


class _Embedding(nn.Cell):
    def __init__(self, c: LuminaMGPT2Config):
        super().__init__()
        self.word_embeddings = Embedding(c.padded_vocab_size, c.hidden_size, weight_init=0.02)


class _Blocks(nn.Cell):
    def __init__(self, c: LuminaMGPT2Config):
        super().__init__()
        self.layers = nn.CellList([LuminaDecoderLayer(c) for _ in range(c.num_hidden_layers)])
        self.final_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def construct(self, x, position_ids, mask):
        for layer in self.layers:
            x = layer(x, position_ids, mask)
        return self.final_layernorm(x)

    def construct_cached(self, x, position_ids, mask, write, k_caches, v_caches):
        new_k, new_v = (), ()
        for i, layer in enumerate(self.layers):
            x, k, v = layer.construct_cached(x, position_ids, mask, write, k_caches[i], v_caches[i])
            new_k += (k,)
            new_v += (v,)
        return self.final_layernorm(x), new_k, new_v


class LuminaDecoder(nn.Cell):
    """Embedding -> layers -> final norm -> lm head (fp32 logits, image-token mask if configured)."""

    def __init__(self, c: LuminaMGPT2Config, compute_dtype=ms.float32):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.pad_token_id = c.pad_token_id
        self.tie = c.tie_word_embeddings
        self.embedding = _Embedding(c)
        self.decoder = _Blocks(c)
        if not self.tie:
            self.output_layer = Linear(c.hidden_size, c.padded_vocab_size, has_bias=False)
        self.matmul = ops.MatMul(transpose_b=True)
        # logits forced to the fp32 minimum (out of softmax, CE and z-loss, no gradient): the padded
        # vocabulary rows, and the IMGIMG ids when mask_image_logits
        m = np.zeros(c.padded_vocab_size, np.bool_)
        m[c.vocab_size:] = True
        if c.mask_image_logits:
            m[list(c.masked_image_token_ids)] = True
        self.mask_logits = bool(m.any())
        if self.mask_logits:
            # added, not selected: x + fp32 min rounds to the fp32 minimum for any logit, and a broadcast
            # Add shards under semi-auto parallel where a broadcast Select does not; softmax gives those
            # columns probability 0, so no gradient reaches their rows either
            self.logit_bias = Tensor(np.where(m, _FP32_MIN, 0.0).astype(np.float32))

    def embed(self, input_ids):
        x = self.embedding.word_embeddings(input_ids)
        if self.pad_token_id is not None:
            # torch nn.Embedding(padding_idx): the pad row is read but never receives a gradient
            x = ops.where(expand_to(ops.expand_dims(input_ids == self.pad_token_id, -1), x.shape), ops.stop_gradient(x), x)
        return x.astype(self.compute_dtype)

    def construct(self, input_ids, position_ids):
        x = self.embed(input_ids)
        s = input_ids.shape[1]
        causal = ops.triu(ops.ones((s, s), ms.float32), 1) * _FP32_MIN
        return self.head(self.decoder(x, position_ids, causal.reshape(1, 1, s, s)))

    def new_cache(self, batch_size: int, max_len: int):
        """Empty per-layer KV caches for `construct_cached`: (k tuple, v tuple) of [B, Nkv, max_len, D] zeros."""
        attn = self.decoder.layers[0].self_attention
        shape = (batch_size, attn.kv_heads, max_len, attn.head_dim)
        n = len(self.decoder.layers)
        return (tuple(ops.zeros(shape, self.compute_dtype) for _ in range(n)),
                tuple(ops.zeros(shape, self.compute_dtype) for _ in range(n)))

    def construct_cached(self, input_ids, position_ids, mask, write, k_caches, v_caches):
        """Generation: logits [B, S, V] of ``input_ids`` [B, S] (at ``position_ids``), attending to the
        caches (filled by earlier calls) under ``mask`` [1, 1, S, L]; the new k / v go to the slots of
        ``write`` [S, L]. -> (logits, k_caches, v_caches). The same Cells and weights as `construct`;
        `cache_step_inputs` makes the host-side arrays."""
        h, k_caches, v_caches = self.decoder.construct_cached(self.embed(input_ids), position_ids, mask, write,
                                                              k_caches, v_caches)
        return self.head(h), k_caches, v_caches

    def head(self, h):
        """Final hidden states [B, S, H] -> fp32 logits (image-token mask if configured)."""
        s = h.shape[1]
        if self.tie:
            b = h.shape[0]
            w = self.embedding.word_embeddings.weight.astype(h.dtype)
            logits = self.matmul(h.reshape(b * s, -1), w).reshape(b, s, -1)
        else:
            logits = self.output_layer(h)
        logits = logits.astype(ms.float32)
        if self.mask_logits:
            logits = logits + self.logit_bias
        return logits




def cache_step_inputs(start: int, length: int, batch_size: int, max_len: int):
    """Host-side inputs of `LuminaDecoder.construct_cached` for positions [start, start + length) of
    a cache of `max_len` slots: position_ids [B, S] int32, mask [1, 1, S, L] fp32 (0 where the key
    slot is at or before the query's position), write [S, L] fp32 one-hot."""
    if start + length > max_len:
        raise ValueError(f"cache_step_inputs: positions up to {start + length} exceed the cache length {max_len}")
    pos = np.arange(start, start + length, dtype=np.int32)
    slots = np.arange(max_len)
    mask = np.where(slots[None, :] <= pos[:, None], 0.0, _FP32_MIN).astype(np.float32).reshape(1, 1, length, max_len)
    write = (slots[None, :] == pos[:, None]).astype(np.float32)
    return np.broadcast_to(pos, (batch_size, length)).copy(), mask, write


class LuminaGenerationStep(nn.Cell):
    """The decoder's cached forward as one Cell (graph mode: one compile per (S, L)); the sampler's
    prefill (S = prompt length) and decode (S = 1) steps."""

    def __init__(self, decoder: "LuminaDecoder"):
        super().__init__()
        self.decoder = decoder

    def construct(self, input_ids, position_ids, mask, write, k_caches, v_caches):
        return self.decoder.construct_cached(input_ids, position_ids, mask, write, k_caches, v_caches)


def causal_lm_losses(logits, labels):
    """(CE, z-loss) over logits[:, t] vs labels[:, t+1] for targets != -100, both means over those
    targets: CE = lse - logit[target], z = lse^2 (lse = logsumexp over the vocabulary, fp32)."""
    v = logits.shape[-1]
    shift_logits = logits[:, :-1].reshape(-1, v)
    shift_labels = labels[:, 1:].reshape(-1)
    valid = shift_labels != -100
    safe = ops.where(valid, shift_labels, ops.zeros_like(shift_labels))
    lse = logsumexp(shift_logits)
    picked = ops.gather_elements(shift_logits, 1, ops.expand_dims(safe, -1)).squeeze(-1)
    w = valid.astype(ms.float32)
    n = ops.maximum(w.sum(), 1.0)
    return ((lse - picked) * w).sum() / n, (lse * lse * w).sum() / n


class LuminaMGPT2ForCausalLM(nn.Cell):
    def __init__(self, config: LuminaMGPT2Config, compute_dtype=ms.float32):
        super().__init__()
        config.validate()
        self.config = config
        self.z_loss_weight = float(config.z_loss_weight)
        self.text_decoder = LuminaDecoder(config, compute_dtype)

    def construct(self, input_ids, labels, position_ids):
        logits = self.text_decoder(input_ids, position_ids)
        ce, z = causal_lm_losses(logits, labels)
        return ce + self.z_loss_weight * z, logits, ce, z
