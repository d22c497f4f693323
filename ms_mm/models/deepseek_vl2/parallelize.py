"""Parallelize plan for DeepSeek-VL2: data + tensor parallel, and expert parallel for the routed experts.

Applied from outside to ``DeepseekVL2ForCausalLM`` (``PLAN.check`` then ``PLAN.apply``, or
``ms_mm.parallel.parallelize``). Under MindSpore semi-auto parallel it sets:

language model (tokens split by dp; heads / FFN / vocab split by tp, as ``TP_RULES`` says)
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
                          (``RoutedExperts.dispatch = "batched"``, or "capacity") run on experts ep x
                          tokens dp/ep x width tp. MindSpore moves the tokens of the EP group to the
                          experts' ranks (all-to-all of the capacity slots, or all-gather when dense).
    output_layer          column-parallel on the vocabulary
vision tower (SigLIP) and projector: tiles split by dp (each dp rank encodes its own samples' tiles),
    weights whole on every tp rank (as the checkpoint's TP split keeps them, MindSpeed-MM's patterns).

Every Linear is split as ``TP_RULES`` (the converter's table) says; attention heads follow their
projection (split by tp when it is column-parallel).

Expert parallel follows MindSpeed / mindformers: ``ep`` divides ``dp`` (EP groups are carved out
of the data-parallel ranks) and the routed expert count. With a capacity factor
(``language_config.moe_expert_capacity_factor``, Megatron's drop and pad) the experts take the
"capacity" dispatch: each dp rank routes its own tokens into [E, C, H] slots, which reach the
experts' ranks and come back by one all-to-all each way within the EP group (``capacity_dispatch``).
Without one (dropless, the default) the batched dispatch is dense (static shapes): each EP rank runs
its experts on every token of its EP group, with zero combine weights where a token did not choose
the expert, so the tokens reach the experts as an all-gather within the EP group and the combine as a
reduce-scatter (a dropless all-to-all needs the grouped matmul with per-expert token counts, Ascend's
``gmm``, under dynamic shapes).

Pipeline (pp > 1), by the converter's stage table (``adapters.deepseek_vl2.PP_STAGES``): the SigLIP
blocks go to stages by ``vit_pp_layers`` (default: all on stage 0; the patch embedding and position table
on the first), the tower's norm, attention pool and projector on the stage of its last block, and with
them the image scatter (``ImageTokenScatter``: image newline and view separator); LLM layers by
``llm_pp_layers`` (default: an even split), the word embeddings on stage 0, the final norm and output
layer on the last stage. EP groups stay inside a stage's dp ranks (ep divides dp = world / (tp x pp)).
"""
from __future__ import annotations

from ms_mm.parallel import sharding
from ms_mm.parallel.config import Divisibility, ParallelConfig, ParallelConfigError

# The one table of where tensors are split over tp (MindSpeed-MM's deepseek_vl_tp_patterns): regex on
# the MM name -> "col" / "col_gated" / "row" (``ms_mm.training.mm_checkpoint`` kinds); anything else is
# whole on every tp rank: the vision tower, projector, router and the MLA down-projection ``linear_qkv``
# (q ; kv latent ; rope key rows). The converter writes its mp_rank files by it (``adapters.deepseek_vl2``)
# and ``DeepseekVL2Plan.shard`` splits every Linear by it, so the two cannot disagree; the stacked experts
# are split on their expert axis by ep besides (``mm_checkpoint.EXPERT_PATTERN``).
TP_RULES = [
    (r"^text_decoder\.embedding\.word_embeddings\.weight$", "col"),
    (r"^text_decoder\.output_layer\.weight$", "col"),
    (r"^text_decoder\..*\.self_attention\.linear_(qb|kvb)\.weight$", "col"),
    (r"^text_decoder\..*\.self_attention\.linear_proj\.weight$", "row"),
    (r"^text_decoder\..*\.linear_fc1\.weight$", "col_gated"),
    (r"^text_decoder\..*\.linear_fc2\.weight$", "row"),
]
# MHA (use_mla false): linear_qkv rows are per KV group [q heads; k; v]; tp splits whole groups
MHA_QKV_RULE = (r"^text_decoder\..*\.self_attention\.linear_qkv\.weight$", "col")


def tp_rules(config):
    """The TP table of ``config`` (MLA or MHA attention)."""
    return list(TP_RULES) if config.language_config.use_mla else [MHA_QKV_RULE] + list(TP_RULES)


_LLM = "text_decoder.decoder.layers.*"
_VIT = "image_encoder.encoder.blocks.*"
_EXPERTS = f"{_LLM}.mlp.experts"


class DeepseekVL2Plan:
    family = "deepseek_vl2"

    # ------------------------------------------------------------------------------------ checks
    def tp_requirements(self, config):
        lc = config.language_config
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
        lc = config.language_config
        pc.stage_layers("llm_pp_layers", lc.num_hidden_layers)
        pc.stage_layers("vit_pp_layers", config.vision_config.layers, default_all_first=True)
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
        self.shard(model, pc)
        if pc.pp > 1:
            self.assign_stages(model, pc)
        return model

    def stage_of_layers(self, pc: ParallelConfig, config):
        """(vision stage per block, LLM stage per layer)."""
        return pc.vlm_layer_stages(config.vision_config.layers, config.language_config.num_hidden_layers)

    def assign_stages(self, model, pc: ParallelConfig):
        vit_stages, llm_stages = self.stage_of_layers(pc, model.config)
        last_vit = max(vit_stages) if vit_stages else 0
        image = model.image_encoder
        image.encoder.pipeline_stage = 0          # its own ops: the patch embedding and position table
        image.encoder.patch_embed.pipeline_stage = 0
        for block, stage in zip(image.encoder.blocks, vit_stages):
            block.pipeline_stage = stage
        for cell in (image.encoder.norm, image.encoder.attn_pool, image.projector, model.image_scatter):
            cell.pipeline_stage = last_vit
        text = model.text_decoder
        sharding.place_text_decoder(text, llm_stages, pc.pp - 1, tied=text.tie)
        text.embedding.word_embeddings.pipeline_stage = 0     # the model calls it directly (``embed``)
        return model

    def shard(self, model, pc: ParallelConfig):
        dp, tp, ep = pc.dp, pc.tp, pc.ep
        table, kinds = sharding.linears_by_table(model, tp_rules(model.config), dp, tp)
        text = model.text_decoder
        sharding.vocab_parallel_embedding(text.embedding.word_embeddings, dp,
                                          tp if table.tp_kind("text_decoder.embedding.word_embeddings.weight") else 1)
        for i, layer in enumerate(text.decoder.layers):
            sharding.rms_norm(layer.input_layernorm, dp, rank=3)
            sharding.rms_norm(layer.pre_mlp_layernorm, dp, rank=3)
            attn, prefix = layer.self_attention, f"text_decoder.decoder.layers.{i}.self_attention."
            heads_by = "linear_kvb" if hasattr(attn, "linear_kvb") else "linear_qkv"
            if hasattr(attn, "q_layernorm"):
                sharding.rms_norm(attn.q_layernorm, dp, rank=3)
            if hasattr(attn, "k_layernorm"):
                sharding.rms_norm(attn.k_layernorm, dp, rank=3)
            sharding.head_parallel_attention(attn.core_attention, dp, tp if kinds[prefix + heads_by] else 1,
                                             mask_batch=dp)
            if layer.is_moe:
                moe = layer.mlp
                moe.router.matmul.shard(((dp, 1), (1, 1)))  # replicated router weight
                expert_parallel(moe.experts, dp, tp, ep)
        sharding.rms_norm(text.decoder.final_layernorm, dp, rank=3)

        # each dp rank encodes its own tiles: the trainer feeds every dp rank its own samples with the
        # same tile count (``Family.dp_slice``), so the global tile axis is dp slices, split by dp here
        for i, block in enumerate(model.image_encoder.encoder.blocks):
            split = kinds[f"image_encoder.encoder.blocks.{i}.attn.qkv"]
            sharding.head_parallel_attention(block.attn.core_attention, dp, tp if split else 1, mask_batch=1,
                                             has_mask=False)
        return model


def expert_parallel(experts, dp: int, tp: int, ep: int) -> None:
    """``ms_mm.ops.moe.RoutedExperts`` on the batched dispatch with the expert axis split by ``ep``.

    Each batch matmul runs on a device matrix experts ``ep`` x tokens ``dp // ep`` x FFN width ``tp``
    (``dp * tp`` devices, the whole stage); the stacked weights are its operands, so a rank holds
    E / ep whole experts with their FFN width split by tp (fc1 column-, fc2 row-parallel within each
    expert, as the dense MLP) and no expert weight is gathered: tokens move to the experts instead.
    """
    tokens = dp // ep
    if experts.dispatch == "capacity":
        capacity_dispatch(experts.capacity, dp, ep)
    else:
        experts.dispatch = "batched"
    experts.bmm_fc1.shard(((ep, tokens, 1), (ep, tp, 1)))      # [E, T, H] x [E, 2I, H]
    # [gate; up] are the two halves of 2I, so they are whole for the split (with tp > 1 a tp rank's
    # column slice of 2I is gate or up rows, re-gathered here); the SwiGLU runs split by tp again
    experts.split_gate_up.shard(((ep, tokens, 1),))
    experts.silu.shard(((ep, tokens, tp),))
    experts.swiglu_mul.shard(((ep, tokens, tp), (ep, tokens, tp)))
    experts.bmm_fc2.shard(((ep, tokens, tp), (ep, 1, tp)))     # [E, T, I] x [E, H, I]
    experts.combine_mul.shard(((ep, tokens, 1), (ep, tokens, 1)))
    experts.combine_sum.shard(((ep, tokens, 1),))


def capacity_dispatch(d, dp: int, ep: int) -> None:
    """``ms_mm.ops.moe.CapacityDispatch`` with one token group per dp rank: the index work and both
    gathers run on the rank's own tokens (group axis split by dp); the expert buffer [ep, dp/ep, E, C, H]
    is laid out by group (``to_experts`` local), and MindSpore moves it to the batch matmuls' layout
    (experts by ep, tokens by dp/ep) and back with an all-to-all within each EP group."""
    d.groups, d.ep = dp, ep
    g3, g4 = ((dp, 1, 1),), ((dp, 1, 1, 1),)
    d.one_hot.shard(((dp, 1, 1, 1), (), ()))
    for prim in (d.sum_choices, d.sum_weights, d.sum_choice_pos):
        prim.shard(g4)
    for prim in (d.mul_weight, d.mul_choice_pos):
        prim.shard(g4 * 2)
    for prim in (d.transpose_chosen, d.transpose_weights, d.transpose_pos, d.top_weights, d.cumsum, d.first_kept):
        prim.shard(g3)
    for prim in (d.mul_keep, d.mul_pos, d.mul_within, d.mul_pos_kept, d.at_least, d.slot_add, d.mul_kept_weight):
        prim.shard(g3 * 2)
    for prim in (d.within, d.slot_mul, d.kept_choice, d.key_mul):
        prim.shard(g3 + ((),))
    d.key_add.shard(((dp, 1, 1), (1, 1, 1)))
    d.zeros_tokens.shard(g3)
    d.pad_tokens.shard(g3 * 2)
    d.dispatch_gather.shard(g3 * 2)
    d.to_experts.shard(((ep, dp // ep, 1, 1, 1),))
    d.from_experts.shard(((ep, dp // ep, 1, 1, 1),))
    d.zeros_slots.shard(g4)
    d.pad_slots.shard(g4 * 2)
    d.combine_gather.shard(g3 * 2)
    d.combine_mul.shard(g4 * 2)
    d.combine_sum.shard(g4)


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
