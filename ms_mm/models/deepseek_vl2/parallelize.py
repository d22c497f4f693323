"""Parallelize plan for DeepSeek-VL2: data + tensor parallel, and expert parallel for the routed experts.

Applied from outside to ``DeepseekVL2ForCausalLM`` (``PLAN.check`` then ``PLAN.apply``, or
``ms_mm.parallel.parallelize``). Under MindSpore semi-auto parallel it sets:

language model (tokens split by dp; heads / FFN / vocab split by tp)
    word_embeddings       gather from a vocab-split table
    MLA linear_qkv        replicated (q, the kv latent and the shared rope key: no head axis)
    MLA linear_qb/kvb     column-parallel (rows are per head)
    MHA linear_qkv        column-parallel (rows per KV group, tp splits whole groups)
    core_attention        heads split by tp
    linear_proj           row-parallel
    dense MLP, shared experts    linear_fc1 / fc2 column / row-parallel
    router                replicated (fp32 scores on every rank, as MindSpeed-MM)
    routed experts        expert parallel: the stacked expert weights [E, 2I, H] / [E, H, I] (the MM
                          checkpoint's tensors) are split on the expert axis by ep, so each EP rank
                          holds whole experts (their FFN width split by tp); the two batch matmuls
                          (``RoutedExperts.dispatch = "batched"``) run on experts ep x tokens dp/ep x
                          width tp. MindSpore moves the tokens of the EP group to the experts' ranks
                          and reduces the weighted combine over the expert axis.
    output_layer          column-parallel on the vocabulary
vision tower (SigLIP) and projector (tiles split by dp: each dp rank encodes its own samples' tiles;
heads / FFN by tp)
    qkv / fc1 column-parallel, proj / fc2 row-parallel, heads split by tp; projector first Linear
    column-parallel, last row-parallel.

Expert parallel follows MindSpeed / mindformers: ``ep`` divides ``dp`` (EP groups are carved out
of the data-parallel ranks) and the routed expert count. Known limits: the batched dispatch is dense
(static shapes): each EP rank runs its experts on every token of its EP group, with zero combine
weights where a token did not choose the expert, so the tokens reach the experts as an all-gather
within the EP group and the combine as a reduce-scatter, not as a capacity-bounded all-to-all of the
chosen tokens only (that needs the grouped matmul with per-expert token counts, Ascend's ``gmm``,
under dynamic shapes). Pipeline parallel is not planned for DeepSeek-VL2.
"""
from __future__ import annotations

from ms_mm.parallel import sharding
from ms_mm.parallel.config import Divisibility, ParallelConfig, ParallelConfigError

_LLM = "text_decoder.decoder.layers.*"
_VIT = "image_encoder.encoder.blocks.*"
_EXPERTS = f"{_LLM}.mlp.experts"


class DeepseekVL2Plan:
    family = "deepseek_vl2"

    # ------------------------------------------------------------------------------------ checks
    def tp_requirements(self, config):
        lc, vc, pc = config.language_config, config.vision_config, config.projector_config
        h, n = lc.hidden_size, lc.num_attention_heads
        reqs = []
        if lc.use_mla:
            reqs.append(Divisibility("tp", "language_config.num_attention_heads", n,
                                     f"{_LLM}.self_attention.linear_kvb.weight",
                                     (n * (lc.qk_nope_head_dim + lc.v_head_dim), lc.kv_lora_rank),
                                     "MLA heads are split across tp ranks"))
        else:
            nkv, d = lc.num_key_value_heads, lc.head_dim
            qkv = ((n + 2 * nkv) * d, h)
            reqs += [
                Divisibility("tp", "language_config.num_attention_heads", n,
                             f"{_LLM}.self_attention.linear_qkv.weight", qkv, "attention heads are split across tp"),
                Divisibility("tp", "language_config.num_key_value_heads", nkv,
                             f"{_LLM}.self_attention.linear_qkv.weight", qkv,
                             "its rows are grouped per KV head, and tp splits whole groups"),
            ]
        moe_layers = [lc.is_moe_layer(i) for i in range(lc.num_hidden_layers)]
        if not all(moe_layers):
            reqs.append(Divisibility("tp", "language_config.intermediate_size", lc.intermediate_size,
                                     f"{_LLM}.mlp.linear_fc2.weight", (h, lc.intermediate_size),
                                     "row-parallel on the dense FFN width"))
        if any(moe_layers):
            mi = lc.moe_intermediate_size
            reqs.append(Divisibility("tp", "language_config.moe_intermediate_size", mi,
                                     f"{_EXPERTS}.linear_fc2.weight", (lc.n_routed_experts, h, mi),
                                     "row-parallel on the expert FFN width"))
            if lc.n_shared_experts:
                shared = mi * lc.n_shared_experts
                reqs.append(Divisibility("tp", "shared expert width (moe_intermediate_size * n_shared_experts)",
                                         shared, f"{_LLM}.mlp.shared_experts.linear_fc2.weight", (h, shared),
                                         "row-parallel on the shared expert FFN width"))
        reqs.append(Divisibility("tp", "language_config.vocab_size", lc.vocab_size,
                                 "text_decoder.embedding.word_embeddings.weight", (lc.vocab_size, h),
                                 "the vocabulary is split across tp ranks"))
        w = vc.width
        reqs += [
            Divisibility("tp", "vision_config.heads", vc.heads, f"{_VIT}.attn.qkv.weight", (3 * w, w),
                         "vision attention heads are split across tp ranks"),
            Divisibility("tp", "vision_config MLP width (width * mlp_ratio)", vc.mlp_hidden,
                         f"{_VIT}.mlp.fc2.weight", (w, vc.mlp_hidden), "row-parallel on the FFN width"),
        ]
        inner = pc.n_embed * pc.mlp_ratio
        reqs.append(Divisibility("tp", "projector width (n_embed * mlp_ratio)", inner,
                                 "image_encoder.projector.layers.0.weight",
                                 (inner, pc.input_dim * pc.downsample_ratio ** 2),
                                 "column-parallel on the projector width"))
        return reqs

    def ep_requirements(self, config):
        lc = config.language_config
        shape = (lc.n_routed_experts, 2 * lc.moe_intermediate_size, lc.hidden_size)
        return [Divisibility("ep", "language_config.n_routed_experts", lc.n_routed_experts,
                             f"{_EXPERTS}.linear_fc1.weight (stacked expert weights)", shape,
                             "each EP rank must hold the same number of whole experts")]

    def check(self, pc: ParallelConfig, config) -> None:
        if pc.cp != 1:
            raise ParallelConfigError(f"cp={pc.cp}: context parallel is not implemented for DeepSeek-VL2")
        if pc.pp != 1:
            raise ParallelConfigError(f"pp={pc.pp}: pipeline parallel is not implemented for DeepSeek-VL2 "
                                      f"(use tp, ep and dp)")
        lc = config.language_config
        has_experts = any(lc.is_moe_layer(i) for i in range(lc.num_hidden_layers))
        if pc.ep > 1 and not has_experts:
            raise ParallelConfigError(
                f"ep={pc.ep}: this DeepSeek-VL2 config has no MoE layer (language_config.n_routed_experts="
                f"{lc.n_routed_experts}, first_k_dense_replace={lc.first_k_dense_replace}); expert parallel "
                f"size must be 1")
        pc.check_divisible(self.tp_requirements(config))
        if has_experts:
            pc.check_divisible(self.ep_requirements(config))

    # the global batch rows are split by dp
    check_batch = staticmethod(sharding.check_batch_rows)

    # ----------------------------------------------------------------------------------- apply
    def apply(self, model, pc: ParallelConfig):
        return self.shard(model, pc)

    def shard(self, model, pc: ParallelConfig):
        dp, tp, ep = pc.dp, pc.tp, pc.ep
        text = model.text_decoder
        sharding.vocab_parallel_embedding(text.embedding.word_embeddings, dp, tp)
        for layer in text.decoder.layers:
            sharding.rms_norm(layer.input_layernorm, dp, rank=3)
            sharding.rms_norm(layer.pre_mlp_layernorm, dp, rank=3)
            _shard_attention(layer.self_attention, dp, tp)
            if layer.is_moe:
                moe = layer.mlp
                moe.router.matmul.shard(((dp, 1), (1, 1)))  # replicated router weight
                expert_parallel(moe.experts, dp, tp, ep)
                if moe.has_shared:
                    _shard_gated_mlp(moe.shared_experts, dp, tp)
            else:
                _shard_gated_mlp(layer.mlp, dp, tp)
        sharding.rms_norm(text.decoder.final_layernorm, dp, rank=3)
        if not text.tie:
            sharding.column_parallel(text.output_layer, dp, tp)

        # each dp rank encodes its own tiles: the trainer feeds every dp rank its own samples with the
        # same tile count (``Family.dp_slice``), so the global tile axis is dp slices, split by dp here
        vision = model.image_encoder.encoder
        for block in vision.blocks:
            attn = block.attn
            sharding.column_parallel(attn.qkv, dp, tp)
            sharding.head_parallel_attention(attn.core_attention, dp, tp, mask_batch=1, has_mask=False)
            sharding.row_parallel(attn.proj, dp, tp)
            sharding.column_parallel(block.mlp.fc1, dp, tp)
            sharding.row_parallel(block.mlp.fc2, dp, tp)
        linears = [cell for cell in model.image_encoder.projector.layers if hasattr(cell, "matmul")]
        sharding.column_parallel(linears[0], dp, tp)
        for middle in linears[1:-1]:
            sharding.replicated_linear(middle, dp)
        sharding.row_parallel(linears[-1], dp, tp)
        return model


def expert_parallel(experts, dp: int, tp: int, ep: int) -> None:
    """``ms_mm.ops.moe.RoutedExperts`` on the batched dispatch with the expert axis split by ``ep``.

    Each batch matmul runs on a device matrix experts ``ep`` x tokens ``dp // ep`` x FFN width ``tp``
    (``dp * tp`` devices, the whole stage); the stacked weights are its operands, so a rank holds
    E / ep whole experts with their FFN width split by tp (fc1 column-, fc2 row-parallel within each
    expert, as the dense MLP) and no expert weight is gathered: tokens move to the experts instead.
    """
    tokens = dp // ep
    experts.dispatch = "batched"
    experts.bmm_fc1.shard(((ep, tokens, 1), (ep, tp, 1)))      # [E, T, H] x [E, 2I, H]
    experts.bmm_fc2.shard(((ep, tokens, tp), (ep, 1, tp)))     # [E, T, I] x [E, H, I]
    experts.combine_mul.shard(((ep, tokens, 1), (ep, tokens, 1)))
    experts.combine_sum.shard(((ep, tokens, 1),))


def _shard_gated_mlp(mlp, dp, tp):
    sharding.column_parallel(mlp.linear_fc1, dp, tp)
    sharding.row_parallel(mlp.linear_fc2, dp, tp)


def _shard_attention(attn, dp, tp):
    if hasattr(attn, "linear_kvb"):  # MLA: the latent projections have no head axis
        sharding.replicated_linear(attn.linear_qkv, dp)
        if hasattr(attn, "linear_qb"):
            sharding.rms_norm(attn.q_layernorm, dp, rank=3)
            sharding.column_parallel(attn.linear_qb, dp, tp)
        sharding.rms_norm(attn.k_layernorm, dp, rank=3)
        sharding.column_parallel(attn.linear_kvb, dp, tp)
    else:
        sharding.column_parallel(attn.linear_qkv, dp, tp)
    sharding.head_parallel_attention(attn.core_attention, dp, tp, mask_batch=dp)
    sharding.row_parallel(attn.linear_proj, dp, tp)


PLAN = DeepseekVL2Plan()


def synthetic_batch(config, batch_size: int, seq_len: int):
    """DeepSeek-VL2 inputs: per sample one image cropped to 1x1 tiles (global view + one local
    tile) right after the first token, the rest supervised text."""
    import numpy as np
    from ms_mm.models.deepseek_vl2 import build_model_inputs
    from ms_mm.models.deepseek_vl2.inputs import num_image_tokens
    n_image = num_image_tokens(1, 1, config)
    if n_image + 2 > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for a 1x1-tile image of {n_image} tokens plus text")
    tile, vocab = config.vision_config.image_size, config.language_config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch_size, seq_len)).astype(np.int64)
    seq_mask = np.zeros((batch_size, seq_len), bool)
    seq_mask[:, 1:1 + n_image] = True
    labels = np.where(seq_mask, -100, ids)
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
             "images": rng.standard_normal((batch_size, 2, 3, tile, tile)).astype(np.float32),
             "images_seq_mask": seq_mask, "images_spatial_crop": np.ones((batch_size, 1, 2), np.int64)}
    return build_model_inputs(batch, config)
