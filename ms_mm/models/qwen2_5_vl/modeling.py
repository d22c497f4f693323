"""Qwen2.5-VL in MindSpore: window-attention ViT with 2-D RoPE, patch merger, Qwen2 decoder with M-RoPE.

Parameter names are the MM checkpoint names (docs/internals.md): ``image_encoder.encoder.*``,
``image_encoder.projector.*``, ``text_decoder.*``; q/k/v and gate/up projections are fused
(``linear_qkv`` in Megatron per-head / per-KV-group layout, ``linear_fc1`` = [gate; up]).
All data-dependent index work (positions, windows, image-token slots) comes precomputed from
``inputs.build_model_inputs``, so ``construct`` is static-shape and compiles in graph mode.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ms_mm.ops import (CoreAttention, Embedding, GatedMLP, Linear, RMSNorm, apply_rotary, broadcast_pair, cross_entropy_sum,
                       gelu)
from ms_mm.ops.functional import permute

# Additive mask value: exp() of it underflows to exactly 0 in fp32, and adding it to a score
# never overflows (unlike finfo.min + a negative score).
MASK_VALUE = -1e30


def _rotary_inv_freq(dim, theta):
    """1 / theta^(2i/dim) for i < dim/2, computed in fp32 as upstream does."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def _segment_mask(segments, groups=1):
    """[N] segment ids -> additive [groups, 1, N/groups, N/groups] mask allowing attention only inside a
    segment (within each of ``groups`` equal runs of the patches, which no segment crosses)."""
    # float arithmetic only (ids < 2^24 are exact): a boolean mask would be redistributed by semi-auto
    # parallel as uint8, which Ascend's collectives refuse
    seg = ops.cast(ops.reshape(segments, (groups, -1)), ms.float32)
    rows, cols = broadcast_pair(ops.expand_dims(seg, 2), ops.expand_dims(seg, 1))
    apart = ops.minimum(ops.abs(rows - cols), 1.0)   # 0 or 1
    return ops.expand_dims(apart * MASK_VALUE, 1)


# ----------------------------------------------------------------------------------------- vision
class PatchProjection(nn.Cell):
    """The Conv3d patch embedding, kept in Conv3d weight layout [C_out, C, T, P, P].

    Kernel == stride == the whole input patch, so the convolution is exactly a matmul of the
    flattened (C, T, P, P) patch with the flattened kernel: one GEMM, no conv3d kernel needed.
    """

    def __init__(self, in_channels, temporal_patch_size, patch_size, embed_dim):
        super().__init__()
        shape = (embed_dim, in_channels, temporal_patch_size, patch_size, patch_size)
        self.patch_dim = in_channels * temporal_patch_size * patch_size * patch_size
        self.embed_dim = embed_dim
        self.weight = Parameter(initializer(Normal(0.02), shape, ms.float32), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        kernel = ops.reshape(ops.cast(self.weight, x.dtype), (self.embed_dim, self.patch_dim))
        return self.matmul(x, kernel)


class PatchEmbed(nn.Cell):
    def __init__(self, vc):
        super().__init__()
        self.proj = PatchProjection(vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.hidden_size)

    def construct(self, pixel_values):
        return self.proj(pixel_values)


class VisionAttention(nn.Cell):
    """Bidirectional attention over all patches with a segment mask (window or per-frame) and 2-D RoPE.

    ``linear_qkv`` rows are per head [q_h; k_h; v_h] (Megatron layout). The patches are ``G`` equal runs
    that attend only within themselves (``cos`` / ``sin`` are [G, 1, N/G, hd], the mask [G, 1, N/G, N/G]):
    one window or frame each when they are all of one size, each data-parallel rank's own images under
    the parallel plan, or G = 1; attention runs as a batch of G sequences.
    """

    def __init__(self, vc):
        super().__init__()
        self.num_heads = vc.num_heads
        self.head_dim = vc.head_dim
        self.linear_qkv = Linear(vc.hidden_size, 3 * vc.hidden_size, has_bias=True)
        self.linear_proj = Linear(vc.hidden_size, vc.hidden_size, has_bias=True)
        self.core_attention = CoreAttention(vc.num_heads, vc.num_heads, head_dim=vc.head_dim)

    def construct(self, x, cos, sin, mask):
        n = x.shape[0]
        g = cos.shape[0]   # attention groups: [groups, 1, N/groups, hd] rotary tables
        qkv = ops.reshape(self.linear_qkv(x), (g, n // g, self.num_heads, 3, self.head_dim))
        qkv = permute(qkv, (3, 0, 2, 1, 4))  # [3, groups, heads, N/groups, hd]
        q, k, v = ops.unstack(qkv, 0)  # one Unstack: CPU StridedSlice costs ~1 ms per [1, heads, N, hd] slice
        # upstream rotates the vision q/k in fp32 whatever the compute dtype
        q = ops.cast(apply_rotary(ops.cast(q, ms.float32), cos, sin), x.dtype)
        k = ops.cast(apply_rotary(ops.cast(k, ms.float32), cos, sin), x.dtype)
        out = self.core_attention(q, k, v, mask)  # [groups, heads, N/groups, hd]
        out = ops.reshape(permute(out, (0, 2, 1, 3)), (n, self.num_heads * self.head_dim))
        return self.linear_proj(out)


class VisionBlock(nn.Cell):
    def __init__(self, vc):
        super().__init__()
        self.input_layernorm = RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.self_attention = VisionAttention(vc)
        self.pre_mlp_layernorm = RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.mlp = GatedMLP(vc.hidden_size, vc.intermediate_size, has_bias=True)

    def construct(self, x, cos, sin, mask):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class VisionBlocks(nn.Cell):
    def __init__(self, vc):
        super().__init__()
        self.layers = nn.CellList([VisionBlock(vc) for _ in range(vc.depth)])


class VisionEncoder(nn.Cell):
    """Patch embedding + ViT blocks; works in window order (patches permuted so windows are contiguous)."""

    def __init__(self, vc):
        super().__init__()
        self.depth = vc.depth
        self.full_attention = tuple(i in set(vc.fullatt_block_indexes) for i in range(vc.depth))
        self.patch_embed = PatchEmbed(vc)
        self.blocks = VisionBlocks(vc)
        # the 2-D rotary gives head_dim/4 frequencies to h and head_dim/4 to w
        self.inv_freq = Tensor(_rotary_inv_freq(vc.head_dim // 2, vc.rope_theta))
        self.groups = 1

    def set_groups(self, groups: int) -> None:
        """Attention as ``groups`` independent equal runs of the patches: each data-parallel rank's own
        images, when every rank is fed its own samples with the same patch count (the parallel plan)."""
        self.groups = int(groups)

    def _rotary(self, freqs, groups):
        # [groups, 1, N/groups, head_dim]: the [B, N, S, D] layout the attention (and the fused RoPE kernel) uses
        emb = ops.reshape(freqs, (groups, 1, freqs.shape[0] // groups, -1))
        return ops.cos(emb), ops.sin(emb)

    def _attention_groups(self, segments):
        """[G, N/G] segment ids (every segment G equal runs: ``inputs.build_model_inputs`` gives that form
        when the windows / frames are all of one size) -> G, attention runs per segment, a batch of G
        sequences of N/G patches; [N] ids -> the plan's groups, with a mask inside each."""
        return segments.shape[0] if len(segments.shape) == 2 else self.groups

    def construct(self, pixel_values, pos_ids, window_index, window_seg, frame_seg):
        x = ops.gather(self.patch_embed(pixel_values), window_index, 0)
        pos = ops.cast(pos_ids, ms.float32)
        freqs_h = ops.expand_dims(pos[:, 0], 1) * self.inv_freq
        freqs_w = ops.expand_dims(pos[:, 1], 1) * self.inv_freq
        freqs = ops.cat((freqs_h, freqs_w, freqs_h, freqs_w), -1)
        g_window, g_full = self._attention_groups(window_seg), self._attention_groups(frame_seg)
        window = self._rotary(freqs, g_window) + (_segment_mask(ops.reshape(window_seg, (-1,)), g_window),)
        full = self._rotary(freqs, g_full) + (_segment_mask(ops.reshape(frame_seg, (-1,)), g_full),)
        for i in range(self.depth):
            cos, sin, mask = full if self.full_attention[i] else window
            x = self.blocks.layers[i](x, cos, sin, mask)
        return x


class MergerMLP(nn.Cell):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear_fc1 = Linear(in_dim, in_dim, has_bias=True)
        self.linear_fc2 = Linear(in_dim, out_dim, has_bias=True)

    def construct(self, x):
        return self.linear_fc2(gelu(self.linear_fc1(x), approximate="none"))


class PatchMerger(nn.Cell):
    """RMSNorm each patch, concatenate each 2x2 group, then Linear -> GELU(erf) -> Linear."""

    def __init__(self, vc):
        super().__init__()
        self.merged_dim = vc.hidden_size * vc.merge_unit
        self.layernorm = RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.encoder = MergerMLP(self.merged_dim, vc.out_hidden_size)

    def construct(self, x):
        x = ops.reshape(self.layernorm(x), (-1, self.merged_dim))
        return self.encoder(x)


class ImageEncoder(nn.Cell):
    """pixel patches -> one embedding per merged 2x2 group, in the processor's (raster-merge) order."""

    def __init__(self, vc, compute_dtype=ms.float32):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.encoder = VisionEncoder(vc)
        self.projector = PatchMerger(vc)

    def construct(self, pixel_values, pos_ids, window_index, reverse_index, window_seg, frame_seg):
        pixel_values = ops.cast(pixel_values, self.compute_dtype)
        x = self.encoder(pixel_values, pos_ids, window_index, window_seg, frame_seg)
        return ops.gather(self.projector(x), reverse_index, 0)


# ------------------------------------------------------------------------------------------- text
class TextAttention(nn.Cell):
    """GQA self-attention with q/k/v bias and M-RoPE.

    ``linear_qkv`` rows are grouped per KV head g: [q heads g*r .. g*r+r-1; k_g; v_g], r = N / Nkv.
    """

    def __init__(self, tc):
        super().__init__()
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = tc.num_key_value_heads
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = tc.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.linear_qkv = Linear(tc.hidden_size, qkv_out, has_bias=True)
        self.linear_proj = Linear(self.num_heads * self.head_dim, tc.hidden_size, has_bias=False)
        self.core_attention = CoreAttention(self.num_heads, self.num_kv_heads, head_dim=self.head_dim)

    def construct(self, x, cos, sin, mask):
        b, s, _ = x.shape
        qkv = ops.reshape(self.linear_qkv(x), (b, s, self.num_kv_heads, self.group + 2, self.head_dim))
        # one Transpose to [B, Nkv, group+2, S, hd], one Unstack and one Stack (of the q heads), instead
        # of three StridedSlices + three Transposes (a StridedSlice's backward is a full-size zero tensor)
        parts = ops.unstack(permute(qkv, (0, 2, 3, 1, 4)), 2)
        q = parts[0] if self.group == 1 else ops.stack(parts[:self.group], 2)
        q = apply_rotary(ops.reshape(q, (b, self.num_heads, s, self.head_dim)), cos, sin)
        k = apply_rotary(parts[self.group], cos, sin)
        v = parts[self.group + 1]
        out = self.core_attention(q, k, v, mask)  # [B, N, S, hd]
        out = ops.reshape(permute(out, (0, 2, 1, 3)), (b, s, self.num_heads * self.head_dim))
        return self.linear_proj(out)


class TextLayer(nn.Cell):
    def __init__(self, tc):
        super().__init__()
        self.input_layernorm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.self_attention = TextAttention(tc)
        self.pre_mlp_layernorm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.mlp = GatedMLP(tc.hidden_size, tc.intermediate_size, has_bias=False)

    def construct(self, x, cos, sin, mask):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class TextEmbedding(nn.Cell):
    def __init__(self, tc):
        super().__init__()
        self.word_embeddings = Embedding(tc.vocab_size, tc.hidden_size, weight_init=0.02)

    def construct(self, input_ids):
        return self.word_embeddings(input_ids)


class TextDecoderStack(nn.Cell):
    def __init__(self, tc):
        super().__init__()
        self.num_layers = tc.num_hidden_layers
        self.layers = nn.CellList([TextLayer(tc) for _ in range(tc.num_hidden_layers)])
        self.final_layernorm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)

    def construct(self, x, cos, sin, mask):
        for i in range(self.num_layers):
            x = self.layers[i](x, cos, sin, mask)
        return self.final_layernorm(x)


class TextDecoder(nn.Cell):
    """Qwen2 decoder: embeddings in, hidden states and logits out (M-RoPE from 3-D position ids)."""

    def __init__(self, tc):
        super().__init__()
        self.tie_word_embeddings = tc.tie_word_embeddings
        self.embedding = TextEmbedding(tc)
        self.decoder = TextDecoderStack(tc)
        if not tc.tie_word_embeddings:
            self.output_layer = Linear(tc.hidden_size, tc.vocab_size, has_bias=False)
        self.inv_freq = Tensor(_rotary_inv_freq(tc.head_dim, tc.rope_theta))
        # frequency pair j takes its position from axis t, h or w per mrope_section
        self.mrope_axis = Tensor(np.repeat(np.arange(3), tc.mrope_section).astype(np.int32))
        self.logits_matmul = ops.MatMul(transpose_b=True)

    def rotary(self, position_ids, dtype):
        """position_ids [3, B, S] -> cos, sin [B, 1, S, head_dim]."""
        pos = permute(ops.cast(position_ids, ms.float32), (1, 2, 0))  # [B, S, 3]
        freqs = ops.gather(pos, self.mrope_axis, 2) * self.inv_freq      # [B, S, head_dim/2]
        emb = ops.expand_dims(ops.cat((freqs, freqs), -1), 1)
        return ops.cast(ops.cos(emb), dtype), ops.cast(ops.sin(emb), dtype)

    def causal_mask(self, attention_mask):
        """[B, S] 1/0 -> additive [B, 1, S, S]: key j visible to query i iff j <= i and j is real."""
        s = attention_mask.shape[1]
        idx = ops.arange(s)
        causal = ops.less_equal(*broadcast_pair(ops.expand_dims(idx, 0), ops.expand_dims(idx, 1)))   # [S, S]
        keep = ops.logical_and(*broadcast_pair(ops.expand_dims(causal, 0),
                                               ops.expand_dims(attention_mask > 0, 1)))             # [B, S, S]
        zeros = ops.zeros(keep.shape, ms.float32)
        return ops.expand_dims(ops.select(keep, zeros, zeros + MASK_VALUE), 1)

    def construct(self, hidden, attention_mask, position_ids):
        cos, sin = self.rotary(position_ids, hidden.dtype)
        hidden = self.decoder(hidden, cos, sin, self.causal_mask(attention_mask))
        if self.tie_word_embeddings:
            b, s, h = hidden.shape
            weight = ops.cast(self.embedding.word_embeddings.weight, hidden.dtype)
            logits = ops.reshape(self.logits_matmul(ops.reshape(hidden, (b * s, h)), weight), (b, s, -1))
        else:
            logits = self.output_layer(hidden)
        return logits


class Qwen2_5_VLForConditionalGeneration(nn.Cell):
    """Image encoder + text decoder; ``construct(*inputs[MODEL_INPUT_NAMES])`` -> (loss, logits).

    ``compute_dtype`` is the activation dtype (fp32, fp16; bf16 on Ascend); parameters stay in
    the dtype they were created in. Loss and logits are fp32. ``image_encoder(pixel_values,
    vision_pos_ids, vision_window_index, vision_reverse_index, vision_window_seg,
    vision_frame_seg)`` alone gives the image embeddings (one row per <|image_pad|> token).
    """

    def __init__(self, config, compute_dtype=ms.float32):
        super().__init__()
        config.validate()
        self.config = config
        self.compute_dtype = compute_dtype
        self.image_encoder = ImageEncoder(config.vision, compute_dtype)
        self.text_decoder = TextDecoder(config.text)

    def lm_loss(self, logits, labels):
        """Mean cross-entropy of next-token prediction over labels != -100 (0 when there are none).

        The labels are shifted (the last position gets -100), not the logits: no [B, S-1, V] slice
        of the logits and no scatter of its gradient back."""
        b, s, v = logits.shape
        shift_labels = ops.cat((labels[:, 1:], ops.full_like(labels[:, :1], -100)), 1)
        total, count = cross_entropy_sum(ops.reshape(logits, (b * s, v)), ops.reshape(shift_labels, (b * s,)))
        return total / ops.maximum(count, 1.0)

    def construct(self, input_ids, attention_mask, position_ids, labels, pixel_values, image_gather_index,
                  vision_pos_ids, vision_window_index, vision_reverse_index, vision_window_seg,
                  vision_frame_seg):
        image_embeds = self.image_encoder(pixel_values, vision_pos_ids, vision_window_index,
                                          vision_reverse_index, vision_window_seg, vision_frame_seg)
        b, s = input_ids.shape
        tokens = ops.cast(self.text_decoder.embedding(input_ids), self.compute_dtype)
        # image embeddings replace the <|image_pad|> slots: one gather over [tokens; images]
        table = ops.cat((ops.reshape(tokens, (b * s, -1)), ops.cast(image_embeds, self.compute_dtype)), 0)
        hidden = ops.reshape(ops.gather(table, ops.reshape(image_gather_index, (-1,)), 0), (b, s, -1))
        logits = ops.cast(self.text_decoder(hidden, attention_mask, position_ids), ms.float32)
        return self.lm_loss(logits, labels), logits
