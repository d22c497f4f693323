"""BAGEL-MoT in MindSpore: Qwen2 Mixture-of-Transformers decoder, SigLIP NaViT tower + connector,
latent (FLUX VAE) input/output heads, timestep embedder and the rectified-flow + CE objective.

Token routing. The packed sequence is held in *model row order*: every text token (including the
special ones), then every ViT patch token, then every VAE-latent token (`inputs.build_model_inputs`
computes the permutation from the packed positions, host-side). Text + ViT rows are the
"understanding" tokens (und weights), latent rows the "generation" tokens (`*_moe_gen` weights), so the
MoT routing is two static slices and the scatter back to packed positions happens only host-side.
Attention is permutation-equivariant: ONE joint attention runs over all rows with the RoPE positions
and the additive mask (per-split causal / full / noise, block-diagonal per sample) permuted alike.

`llm.freeze_und` (upstream's training flag, qwen2_navit.py): the und rows carry no gradient. They are
cut where upstream detaches them: the decoder input, the und values, the normed und queries and keys,
the und attention and MLP outputs of every layer and the und final norm. So the und weights, the text
embedding, the ViT and the connector get exactly zero gradient, the latents attend to constant und
keys / values, and lm_head still learns from CE. A construct-time constant: one graph either way.

Parameter names are the MM checkpoint names (table in `adapters/bagel.py`). Everything that
depends on the data (orders, masks, gather indices) arrives as inputs: `construct` has static shapes
and compiles in graph mode. The VAE is frozen (upstream encodes under no_grad before the forward) and
runs separately: `AutoEncoder` gives the posterior moments and the latent, `LatentDecoder` decodes.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ms_mm.ops import CoreAttention, Embedding, GatedMLP, LayerNorm, Linear, RMSNorm, apply_rotary, gelu
from ms_mm.ops import Conv2d, GroupNorm, upsample_nearest
from ms_mm.ops.functional import mul, permute

__all__ = ["Bagel", "BagelForTraining", "AutoEncoder", "LatentDecoder", "sincos_2d_table", "timestep_frequencies", "rope_inv_freq"]


# ------------------------------------------------------------------------------ constant tables
def sincos_2d_table(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's frozen 2-D sin-cos table [grid_size**2, embed_dim] (row = h * grid_size + w).

    First half of the channels encodes h, second half w; each half is [sin(pos*omega), cos(pos*omega)]
    with omega = 10000^(-k / (dim/4)), computed in float64 and stored as float32 (as upstream).
    """
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
    coords = np.arange(grid_size, dtype=np.float32)
    h = np.repeat(coords, grid_size).astype(np.float64)   # row-major grid: h changes slowest
    w = np.tile(coords, grid_size).astype(np.float64)

    def one_axis(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(h), one_axis(w)], axis=1).astype(np.float32)


def timestep_frequencies(dim: int, max_period: float) -> np.ndarray:
    """exp(-ln(max_period) * k / (dim/2)) for k < dim/2, in float32 like torch's arange/exp."""
    half = dim // 2
    k = np.arange(half, dtype=np.float32)
    return np.exp(np.float32(-math.log(max_period)) * k / np.float32(half)).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Qwen2's default RoPE: 1 / theta^(2i / head_dim), fp32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def _act(name):
    return "tanh" if name == "gelu_pytorch_tanh" else "none"


class PositionTable(nn.Cell):
    """A frozen [side*side, hidden] 2-D sin-cos table looked up by flattened position id."""

    def __init__(self, side, hidden_size):
        super().__init__()
        self.pos_embed = Parameter(Tensor(sincos_2d_table(hidden_size, side)), name="pos_embed", requires_grad=False)

    def construct(self, position_ids):
        return ops.gather(self.pos_embed, position_ids, 0)


# ------------------------------------------------------------------------------------ LLM (MoT)
class MoTAttention(nn.Cell):
    """Joint GQA attention over und + gen rows, each group projected by its own q/k/v/o and q/k-norms.

    ``linear_qkv`` rows are grouped per KV head g: [q heads g*r .. g*r+r-1; k_g; v_g] (Megatron layout).
    """

    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = c.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.linear_qkv = Linear(c.hidden_size, qkv_out, has_bias=True)
        self.linear_qkv_moe_gen = Linear(c.hidden_size, qkv_out, has_bias=True)
        self.qk_norm = c.qk_norm
        if c.qk_norm:
            self.q_layernorm = RMSNorm(self.head_dim, eps=c.rms_norm_eps)
            self.k_layernorm = RMSNorm(self.head_dim, eps=c.rms_norm_eps)
            self.q_layernorm_moe_gen = RMSNorm(self.head_dim, eps=c.rms_norm_eps)
            self.k_layernorm_moe_gen = RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.linear_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, has_bias=False)
        self.linear_proj_moe_gen = Linear(self.num_heads * self.head_dim, c.hidden_size, has_bias=False)
        self.core_attention = CoreAttention(self.num_heads, self.num_kv_heads, head_dim=self.head_dim)
        self.freeze_und = bool(c.freeze_und)

    def _split_qkv(self, qkv):
        b, n = qkv.shape[0], qkv.shape[1]
        qkv = ops.reshape(qkv, (b, n, self.num_kv_heads, self.group + 2, self.head_dim))
        q = ops.reshape(qkv[:, :, :, :self.group], (b, n, self.num_heads, self.head_dim))
        return q, qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]

    def construct(self, x_und, x_gen, cos, sin, mask):
        """x_und [B, n_und, H], x_gen [B, n_gen, H] (B packed sequences), mask [B or 1, 1, S, S]."""
        n_und = x_und.shape[1]
        q_u, k_u, v_u = self._split_qkv(self.linear_qkv(x_und))
        q_g, k_g, v_g = self._split_qkv(self.linear_qkv_moe_gen(x_gen))
        if self.freeze_und:
            v_u = ops.stop_gradient(v_u)
        if self.qk_norm:
            q_u, k_u = self.q_layernorm(q_u), self.k_layernorm(k_u)
            q_g, k_g = self.q_layernorm_moe_gen(q_g), self.k_layernorm_moe_gen(k_g)
        if self.freeze_und:     # the gen rows still attend to the und keys / values, as constants
            q_u, k_u = ops.stop_gradient(q_u), ops.stop_gradient(k_u)
        # [B, S, heads, hd] -> [B, heads, S, hd]
        q = permute(ops.cat((q_u, q_g), 1), (0, 2, 1, 3))
        k = permute(ops.cat((k_u, k_g), 1), (0, 2, 1, 3))
        v = permute(ops.cat((v_u, v_g), 1), (0, 2, 1, 3))
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = self.core_attention(q, k, v, mask)
        out = ops.reshape(permute(out, (0, 2, 1, 3)), (out.shape[0], -1, self.num_heads * self.head_dim))
        return self.linear_proj(out[:, :n_und]), self.linear_proj_moe_gen(out[:, n_und:])


class MoTDecoderLayer(nn.Cell):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attention = MoTAttention(c)
        self.pre_mlp_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.pre_mlp_layernorm_moe_gen = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, has_bias=False)
        self.mlp_moe_gen = GatedMLP(c.hidden_size, c.intermediate_size, has_bias=False)
        self.freeze_und = bool(c.freeze_und)

    def construct(self, h_und, h_gen, cos, sin, mask):
        a_und, a_gen = self.self_attention(self.input_layernorm(h_und), self.input_layernorm_moe_gen(h_gen),
                                           cos, sin, mask)
        if self.freeze_und:
            a_und = ops.stop_gradient(a_und)
        h_und = h_und + a_und
        h_gen = h_gen + a_gen
        m_und = self.mlp(self.pre_mlp_layernorm(h_und))
        if self.freeze_und:
            m_und = ops.stop_gradient(m_und)
        h_und = h_und + m_und
        h_gen = h_gen + self.mlp_moe_gen(self.pre_mlp_layernorm_moe_gen(h_gen))
        return h_und, h_gen


class MoTDecoder(nn.Cell):
    def __init__(self, c):
        super().__init__()
        self.num_layers = c.num_hidden_layers
        self.layers = nn.CellList([MoTDecoderLayer(c) for _ in range(c.num_hidden_layers)])
        self.final_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.final_layernorm_moe_gen = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.freeze_und = bool(c.freeze_und)

    def construct(self, h_und, h_gen, cos, sin, mask):
        if self.freeze_und:
            h_und = ops.stop_gradient(h_und)
        for i in range(self.num_layers):
            h_und, h_gen = self.layers[i](h_und, h_gen, cos, sin, mask)
        out_und = self.final_layernorm(h_und)
        if self.freeze_und:
            out_und = ops.stop_gradient(out_und)
        return out_und, self.final_layernorm_moe_gen(h_gen)


class TextEmbedding(nn.Cell):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)

    def construct(self, ids):
        return self.word_embeddings(ids)


class TextDecoder(nn.Cell):
    """Embedding, MoT decoder stack (+ its RoPE tables) and the LM head."""

    def __init__(self, c):
        super().__init__()
        self.embedding = TextEmbedding(c)
        self.decoder = MoTDecoder(c)
        self.output_layer = Linear(c.hidden_size, c.vocab_size, has_bias=False)
        self.inv_freq = Tensor(rope_inv_freq(c.head_dim, c.rope_theta))

    def rope(self, position_ids):
        """position_ids [B, S] -> cos, sin [B, 1, S, hd]."""
        freqs = ops.expand_dims(ops.cast(position_ids, ms.float32), -1) * self.inv_freq
        emb = ops.expand_dims(ops.cat((freqs, freqs), -1), 1)  # [B, 1, S, hd]
        return ops.cos(emb), ops.sin(emb)


# ----------------------------------------------------------------------------------- ViT (NaViT)
class VisionAttention(nn.Cell):
    """SigLIP attention; ``linear_qkv`` rows per head [q_h; k_h; v_h]. Images attend only to themselves
    (the additive mask is block-diagonal per image, the cu_seqlens of upstream's varlen call)."""

    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.head_dim = c.head_dim
        self.linear_qkv = Linear(c.hidden_size, 3 * c.hidden_size, has_bias=True)
        self.linear_proj = Linear(c.hidden_size, c.hidden_size, has_bias=True)
        self.core_attention = CoreAttention(self.num_heads, self.num_heads, head_dim=self.head_dim)

    def construct(self, x, mask):
        """x [B, N, C] (each packed sequence's patches), mask [B or 1, 1, N, N]."""
        b, n = x.shape[0], x.shape[1]
        qkv = ops.reshape(self.linear_qkv(x), (b, n, self.num_heads, 3, self.head_dim))
        qkv = permute(qkv, (0, 3, 2, 1, 4))  # [B, 3, heads, N, hd]: the sequence axis stays first
        out = self.core_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], mask)
        out = ops.reshape(permute(out, (0, 2, 1, 3)), (b, n, self.num_heads * self.head_dim))
        return self.linear_proj(out)


class VisionMLP(nn.Cell):
    def __init__(self, in_dim, hidden_dim, out_dim, act):
        super().__init__()
        self.approximate = _act(act)
        self.linear_fc1 = Linear(in_dim, hidden_dim, has_bias=True)
        self.linear_fc2 = Linear(hidden_dim, out_dim, has_bias=True)

    def construct(self, x):
        return self.linear_fc2(gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Cell):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attention = VisionAttention(c)
        self.pre_mlp_layernorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_size, c.hidden_act)

    def construct(self, x, mask):
        x = x + self.self_attention(self.input_layernorm(x), mask)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class VisionBlocks(nn.Cell):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.CellList([VisionBlock(c) for _ in range(c.num_hidden_layers)])


class PatchEmbed(nn.Cell):
    """The Conv2d patch embedding in its Linear form (upstream's convert_conv2d_to_linear): input rows
    are patches flattened as (p, q, c)."""

    def __init__(self, c):
        super().__init__()
        self.proj = Linear(c.patch_dim, c.hidden_size, has_bias=True)

    def construct(self, x):
        return self.proj(x)


class VisionEncoder(nn.Cell):
    """Patch embedding + learned position embedding, the used SigLIP layers, then post_layernorm."""

    def __init__(self, c):
        super().__init__()
        self.depth = c.num_hidden_layers
        self.patch_embed = PatchEmbed(c)
        self.position_embedding = Embedding(c.num_positions, c.hidden_size)
        self.blocks = VisionBlocks(c)
        self.post_layernorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def construct(self, pixels, position_ids, mask):
        x = self.patch_embed(pixels)
        x = x + ops.cast(self.position_embedding(position_ids), x.dtype)   # the fp32 table must not promote x
        for i in range(self.depth):
            x = self.blocks.layers[i](x, mask)
        return self.post_layernorm(x)


class Connector(nn.Cell):
    def __init__(self, in_dim, out_dim, act):
        super().__init__()
        self.encoder = VisionMLP(in_dim, out_dim, out_dim, act)

    def construct(self, x):
        return self.encoder(x)


class ImageEncoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.encoder = VisionEncoder(config.vit)
        self.projector = Connector(config.vit.hidden_size, config.llm.hidden_size, config.connector_act)

    def construct(self, pixels, position_ids, mask):
        return self.projector(self.encoder(pixels, position_ids, mask))


# ------------------------------------------------------------------------------ generation heads
class TimestepEmbedder(nn.Cell):
    """Sinusoidal [cos, sin] features of t (no x1000 scaling) -> Linear -> SiLU -> Linear.
    Sub-cell names `mlp.0` / `mlp.2` as upstream's nn.Sequential."""

    def __init__(self, hidden_size, frequency_dim, max_period):
        super().__init__()
        self.freqs = Tensor(timestep_frequencies(frequency_dim, max_period))
        self.mlp = nn.CellList([Linear(frequency_dim, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size)])

    def construct(self, t):
        args = ops.expand_dims(t, -1) * self.freqs
        feats = ops.cat((ops.cos(args), ops.sin(args)), -1)
        return self.mlp[2](ops.silu(self.mlp[0](feats)))


# ----------------------------------------------------------------------------------------- BAGEL
class Bagel(nn.Cell):
    """The BAGEL train forward (upstream `Bagel.forward` + the training loop's loss reduction).

    Inputs (`inputs.MODEL_INPUT_NAMES`, in order): text ids; ViT patch pixels, their position ids and
    the per-image ViT mask; the padded VAE latents with the patchify gather index, latent position ids,
    RAW timesteps and the flow noise; RoPE position ids and the joint additive mask (model row order);
    CE rows / labels / weights; MSE rows, the latent rows of their targets, and their weights.

    Returns ``(loss, ce, mse, ce_per_token, ce_logits, velocity_pred, velocity_target,
    mse_elementwise, packed_latent_clean, timesteps_effective, last_hidden_state (model row order),
    vit_connector_out)``; ``loss`` is the training objective.
    """

    def __init__(self, config, compute_dtype=ms.float32):
        super().__init__()
        config.validate()
        c = config.llm
        self.config = config
        self.compute_dtype = compute_dtype
        self.hidden_size = c.hidden_size
        self.timestep_shift = float(config.timestep_shift)
        self.ce_weight = float(config.ce_weight)
        self.mse_weight = float(config.mse_weight)
        self.text_decoder = TextDecoder(c)
        self.image_encoder = ImageEncoder(config)
        self.vit_pos_embed = PositionTable(config.vit_max_num_patch_per_side, c.hidden_size)
        self.latent_pos_embed = PositionTable(config.max_latent_size, c.hidden_size)
        self.time_embedder = TimestepEmbedder(c.hidden_size, config.timestep_frequency_dim, config.timestep_max_period)
        self.vae2llm = Linear(config.patch_latent_dim, c.hidden_size, has_bias=True)
        self.llm2vae = Linear(c.hidden_size, config.patch_latent_dim, has_bias=True)
        self.vae = AutoEncoder(config.vae)
        for p in self.vae.get_parameters():
            p.requires_grad = False

    def effective_timesteps(self, raw):
        s = ops.sigmoid(raw)
        shift = self.timestep_shift
        return shift * s / (1.0 + (shift - 1.0) * s)

    # ------------------------------------------------------------------ shared pieces
    # Internally every packed input has a leading axis of B packed sequences (the per-rank form of the
    # sharded path: one sequence per data-parallel rank, axis 0 split over dp); the public entry points
    # also take the single-sequence form without that axis (B = 1), which is what one card trains on.
    def embed_und(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask):
        """Understanding rows [B, n_text + n_vit, H]: text embeddings, then connector(ViT(patches)) + ViT
        position table."""
        dt = self.compute_dtype
        text_emb = ops.cast(self.text_decoder.embedding(text_ids), dt)
        vit_out = self.image_encoder(ops.cast(vit_pixels, dt), vit_position_ids, vit_attention_mask)
        vit_emb = vit_out + ops.cast(self.vit_pos_embed(vit_position_ids), dt)
        return ops.cat((text_emb, vit_emb), 1), vit_out

    def embed_gen(self, x_t, t, latent_position_ids):
        """Generation rows: vae2llm(x_t) + timestep embedding (t effective, in [0, 1]) + latent table."""
        dt = self.compute_dtype
        return (self.vae2llm(ops.cast(x_t, dt)) + ops.cast(self.time_embedder(t), dt)
                + ops.cast(self.latent_pos_embed(latent_position_ids), dt))

    def decode(self, h_und, h_gen, position_ids, attention_mask):
        """The MoT decoder over [und rows; gen rows] -> last hidden state [B, S, H] (model row order)."""
        dt = self.compute_dtype
        cos, sin = self.text_decoder.rope(position_ids)
        h_und, h_gen = self.text_decoder.decoder(h_und, h_gen, ops.cast(cos, dt), ops.cast(sin, dt), attention_mask)
        return ops.cat((h_und, h_gen), 1)

    @staticmethod
    def _rows(x, rows):
        """x [B, S, ...] at rows [B, n] of each sequence -> [B, n, ...]."""
        return ops.gather(x, rows, 1, 1)

    def _hidden(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask, x_t, t, latent_position_ids,
                position_ids, attention_mask):
        h_und, _ = self.embed_und(text_ids, vit_pixels, vit_position_ids, vit_attention_mask)
        return self.decode(h_und, self.embed_gen(x_t, t, latent_position_ids), position_ids, attention_mask)

    # ------------------------------------------------------------------ inference entry points
    def velocity(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask, x_t, t, latent_position_ids,
                 position_ids, attention_mask, rows):
        """The flow's velocity llm2vae(hidden[rows]) at latent tokens `x_t` [n, p*p*z] and times `t` [n]
        (effective, the sampler's schedule): the training forward's prediction without the noising.
        One packed sequence (no leading axis) -> [len(rows), p*p*z]."""
        e = ops.expand_dims
        hidden = self._hidden(e(text_ids, 0), e(vit_pixels, 0), e(vit_position_ids, 0), vit_attention_mask,
                              e(x_t, 0), e(t, 0), e(latent_position_ids, 0), e(position_ids, 0), attention_mask)
        return ops.cast(self.llm2vae(self._rows(hidden, e(rows, 0))), ms.float32)[0]

    def text_logits(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask, x_t, t, latent_position_ids,
                    position_ids, attention_mask, rows):
        """LM-head logits [len(rows), vocab] at the given rows (next-token prediction), one packed sequence."""
        e = ops.expand_dims
        hidden = self._hidden(e(text_ids, 0), e(vit_pixels, 0), e(vit_position_ids, 0), vit_attention_mask,
                              e(x_t, 0), e(t, 0), e(latent_position_ids, 0), e(position_ids, 0), attention_mask)
        return ops.cast(self.text_decoder.output_layer(self._rows(hidden, e(rows, 0))), ms.float32)[0]

    # ------------------------------------------------------------------ training forward
    def construct(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask, padded_latent,
                  latent_gather_index, latent_position_ids, timesteps, noise, position_ids, attention_mask,
                  ce_rows, ce_labels, ce_weights, mse_rows, mse_latent_rows, mse_weights):
        return self.train_forward(text_ids, vit_pixels, vit_position_ids, vit_attention_mask, padded_latent,
                                  latent_gather_index, latent_position_ids, timesteps, noise, position_ids,
                                  attention_mask, ce_rows, ce_labels, ce_weights, mse_rows, mse_latent_rows,
                                  mse_weights)

    def train_forward(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask, padded_latent,
                      latent_gather_index, latent_position_ids, timesteps, noise, position_ids, attention_mask,
                      ce_rows, ce_labels, ce_weights, mse_rows, mse_latent_rows, mse_weights):
        """One packed sequence (`text_ids` [n_text], the loader's form) or B of them (`text_ids` [B, n_text],
        every packed input with a leading axis of B, the masks [B, 1, ., .], `padded_latent` [B * n_images,
        ...]): the loss is the mean over the sequences of each one's loss (as data parallel averages its
        ranks'), and the per-row outputs keep the input's form."""
        single = text_ids.ndim == 1
        if single:
            e = ops.expand_dims
            text_ids, vit_pixels, vit_position_ids = e(text_ids, 0), e(vit_pixels, 0), e(vit_position_ids, 0)
            latent_gather_index, latent_position_ids = e(latent_gather_index, 0), e(latent_position_ids, 0)
            timesteps, noise, position_ids = e(timesteps, 0), e(noise, 0), e(position_ids, 0)
            ce_rows, ce_labels, ce_weights = e(ce_rows, 0), e(ce_labels, 0), e(ce_weights, 0)
            mse_rows, mse_latent_rows, mse_weights = e(mse_rows, 0), e(mse_latent_rows, 0), e(mse_weights, 0)
        n_seq = text_ids.shape[0]
        h_und, vit_out = self.embed_und(text_ids, vit_pixels, vit_position_ids, vit_attention_mask)

        # rectified flow: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0
        x0 = self._rows(ops.reshape(padded_latent, (n_seq, -1)), latent_gather_index)  # [B, (h w), (p q c)]
        t = self.effective_timesteps(ops.cast(timesteps, ms.float32))
        t_col = ops.expand_dims(t, -1)
        x_t = mul(1.0 - t_col, x0) + mul(t_col, noise)
        hidden = self.decode(h_und, self.embed_gen(x_t, t, latent_position_ids), position_ids, attention_mask)

        logits = ops.cast(self.text_decoder.output_layer(self._rows(hidden, ce_rows)), ms.float32)
        log_probs = ops.log_softmax(logits, -1)
        one_hot = ops.one_hot(ce_labels, logits.shape[-1], Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        ce_per_token = -ops.reduce_sum(log_probs * one_hot, -1)
        ce = ops.reduce_sum(ce_per_token * ce_weights) / n_seq

        velocity_pred = ops.cast(self.llm2vae(self._rows(hidden, mse_rows)), ms.float32)
        velocity_target = noise - x0
        diff = velocity_pred - self._rows(velocity_target, mse_latent_rows)
        mse_elementwise = diff * diff
        mse = ops.reduce_sum(ops.mean(mse_elementwise, -1) * mse_weights) / n_seq

        loss = self.ce_weight * ce + self.mse_weight * mse
        if single:
            return (loss, ce, mse, ce_per_token[0], logits[0], velocity_pred[0], velocity_target[0],
                    mse_elementwise[0], x0[0], t[0], hidden[0], vit_out[0])
        return (loss, ce, mse, ce_per_token, logits, velocity_pred, velocity_target, mse_elementwise, x0, t,
                hidden, vit_out)


class BagelForTraining(Bagel):
    """The train step's Cell: the frozen VAE encodes the (budget-padded) images inside the step, as
    upstream's loop does before the forward, then the BAGEL forward (`processing.TRAIN_INPUT_NAMES`:
    `padded_images` [n_images, 3, H, W] and `posterior_noise` [n_images, z, H/8, W/8] in place of
    `padded_latent`; with a leading axis of B packed sequences, [B, n_images, ...], on the sharded path).

    The latent is a posterior sample, as upstream's `vae_model.encode` (DiagonalGaussian(sample=True)):
    mean + exp(logvar / 2) * posterior_noise, the noise drawn host-side from the data position's seed so a
    resumed run sees the same latents. ``config.vae_sample_posterior = False`` uses the mean instead
    (what the parity fixture was made with). Returns ``(loss, ce, mse)``. Parameter names are `Bagel`'s."""

    def __init__(self, config, compute_dtype=ms.float32):
        super().__init__(config, compute_dtype)
        self.sample_posterior = bool(config.vae_sample_posterior)

    def construct(self, text_ids, vit_pixels, vit_position_ids, vit_attention_mask, padded_images, posterior_noise,
                  latent_gather_index, latent_position_ids, timesteps, noise, position_ids, attention_mask,
                  ce_rows, ce_labels, ce_weights, mse_rows, mse_latent_rows, mse_weights):
        if padded_images.ndim == 5:     # [B, n_images, 3, H, W] -> [B * n_images, 3, H, W]
            padded_images = ops.reshape(padded_images, (-1,) + padded_images.shape[2:])
            posterior_noise = ops.reshape(posterior_noise, (-1,) + posterior_noise.shape[2:])
        if self.sample_posterior:
            latent = self.vae.sample(padded_images, posterior_noise)
        else:
            _, latent = self.vae(padded_images)
        latent = ops.stop_gradient(latent)
        out = self.train_forward(text_ids, vit_pixels, vit_position_ids, vit_attention_mask, latent,
                                 latent_gather_index, latent_position_ids, timesteps, noise, position_ids,
                                 attention_mask, ce_rows, ce_labels, ce_weights, mse_rows, mse_latent_rows,
                                 mse_weights)
        return out[0], out[1], out[2]


# -------------------------------------------------------------------------------------- FLUX VAE
class ResnetBlock(nn.Cell):
    def __init__(self, in_ch, out_ch, groups, eps):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_ch, eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.has_shortcut = in_ch != out_ch
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(in_ch, out_ch, 1)

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels, 1x1-conv q/k/v/proj_out, residual."""

    def __init__(self, ch, groups, eps):
        super().__init__()
        self.norm = GroupNorm(groups, ch, eps)
        self.q = Conv2d(ch, ch, 1)
        self.k = Conv2d(ch, ch, 1)
        self.v = Conv2d(ch, ch, 1)
        self.proj_out = Conv2d(ch, ch, 1)
        self.core_attention = CoreAttention(1, 1, head_dim=ch)

    def construct(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t):  # b c h w -> b 1 (h w) c
            return ops.expand_dims(permute(ops.reshape(t, (b, c, h * w)), (0, 2, 1)), 1)

        out = self.core_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = ops.reshape(permute(out[:, 0], (0, 2, 1)), (b, c, h, w))
        return x + self.proj_out(out)


class Downsample(nn.Cell):
    """Pad right/bottom by one, then a stride-2 3x3 conv (FLUX's asymmetric padding)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=0)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def construct(self, x):
        return self.conv(upsample_nearest(x, 2, 2))


class _Level(nn.Cell):
    """One resolution level (`down.{i}` / `up.{i}`): res blocks, then an optional resampler."""

    def __init__(self, blocks, resample=None, resample_name="downsample"):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.has_resample = resample is not None
        if resample is not None:
            setattr(self, resample_name, resample)


class Encoder(nn.Cell):
    def __init__(self, c):
        super().__init__()
        g, eps = c.num_groups, c.norm_eps
        self.num_levels = len(c.ch_mult)
        self.conv_in = Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_mult = (1,) + tuple(c.ch_mult)
        levels = []
        block_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            block_in = c.ch * in_mult[i]
            block_out = c.ch * mult
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g, eps))
                block_in = block_out
            last = i == self.num_levels - 1
            levels.append(_Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.down = nn.CellList(levels)
        self.mid = _Mid(block_in, g, eps)
        self.norm_out = GroupNorm(g, block_in, eps)
        self.conv_out = Conv2d(block_in, 2 * c.z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for i in range(self.num_levels):
            level = self.down[i]
            for blk in level.block:
                h = blk(h)
            if level.has_resample:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class _Mid(nn.Cell):
    def __init__(self, ch, groups, eps):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, eps)
        self.attn_1 = AttnBlock(ch, groups, eps)
        self.block_2 = ResnetBlock(ch, ch, groups, eps)

    def construct(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Decoder(nn.Cell):
    def __init__(self, c):
        super().__init__()
        g, eps = c.num_groups, c.norm_eps
        self.num_levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, eps)
        levels = [None] * self.num_levels
        for i in reversed(range(self.num_levels)):
            block_out = c.ch * c.ch_mult[i]
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, g, eps))
                block_in = block_out
            levels[i] = _Level(blocks, Upsample(block_in) if i != 0 else None, "upsample")
        self.up = nn.CellList(levels)
        self.norm_out = GroupNorm(g, block_in, eps)
        self.conv_out = Conv2d(block_in, c.out_ch, 3, padding=1)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(self.num_levels - 1, -1, -1):
            level = self.up[i]
            for blk in level.block:
                h = blk(h)
            if level.has_resample:
                h = level.upsample(h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class AutoEncoder(nn.Cell):
    """FLUX VAE. ``construct(images)`` -> (moments [B, 2z, h, w] = [mean; logvar], latent =
    scale * (mean - shift)): the posterior mean, as the fixture. ``sample(images, eps)``: the latent of the
    posterior sample mean + exp(logvar / 2) * eps (upstream `DiagonalGaussian(sample=True)`, its training)."""

    def __init__(self, c):
        super().__init__()
        self.z_channels = c.z_channels
        self.scale_factor = float(c.scale_factor)
        self.shift_factor = float(c.shift_factor)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)

    def construct(self, images):
        moments = self.encoder(images)
        mean = moments[:, :self.z_channels]
        return moments, self.scale_factor * (mean - self.shift_factor)

    def sample(self, images, eps):
        moments = self.encoder(images)
        mean, logvar = moments[:, :self.z_channels], moments[:, self.z_channels:]
        z = mean + ops.exp(0.5 * logvar) * eps
        return self.scale_factor * (z - self.shift_factor)


class LatentDecoder(nn.Cell):
    """latent -> image: decoder(z / scale + shift). Shares the `AutoEncoder`'s decoder."""

    def __init__(self, vae):
        super().__init__(auto_prefix=False)       # keep the shared decoder's parameter names (vae.decoder.*)
        self.scale_factor = vae.scale_factor
        self.shift_factor = vae.shift_factor
        self.decoder = vae.decoder

    def construct(self, z):
        return self.decoder(z / self.scale_factor + self.shift_factor)
