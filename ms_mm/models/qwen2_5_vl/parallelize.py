"""Parallelize plan for Qwen2.5-VL: data + tensor parallel (Megatron splits) and pipeline stages.

Applied from outside to ``Qwen2_5_VLForConditionalGeneration`` (the model holds no parallel
logic): ``PLAN.check(parallel_config, model_config)`` then ``PLAN.apply(model, parallel_config)``
(or ``ms_mm.parallel.parallelize(model, parallel_config)`` for both). Under MindSpore
semi-auto parallel it sets:

Every Linear is split as ``TP_RULES`` (the converter's table, MindSpeed-MM's Megatron defaults) says;
attention heads follow their ``linear_qkv`` (split by tp when it is column-parallel):

text decoder (tokens split by dp, heads / FFN / vocab split by tp)
    word_embeddings     gather from a vocab-split table (each rank looks up its rows)
    linear_qkv          column-parallel; rows are per KV group, so tp splits whole groups
    core_attention      heads split by tp
    linear_proj         row-parallel
    linear_fc1 / fc2    column / row-parallel
    output_layer        column-parallel on the vocabulary (or the tied logits matmul)
vision tower and merger (patch rows split by dp; heads / FFN split by tp)
    the same column / row split per block; attention over dp groups of patches (each rank's own);
    the patch embedding's weight whole, its rows split.

Pipeline (pp > 1): vision blocks go to stages by ``vit_pp_layers`` (default: all on stage 0),
LLM layers by ``llm_pp_layers`` (default: even split); the patch embedding, merger and word
embeddings sit on stage 0, the final norm and output layer on the last stage. This sets each
Cell's ``pipeline_stage``; the train step wraps the loss in
``ms_mm.parallel.pipeline.StackedPipelineCell`` (inputs stacked per micro batch, since
``position_ids`` and the vision inputs are not batch-major) and the step in
``PipelineTrainOneStepCell``, as ``ms_mm.parallel.dryrun`` does.

Ops the plan does not name (element-wise, reshapes, slices inside the model) get MindSpore's
defaults and the redistributions it derives; the tensor layouts above decide the memory. Known
costs of the current model layout: ``linear_fc1`` holds [gate; up] as two row blocks, so a
column split gives some ranks gate rows and others up rows and MindSpore re-gathers before the
SwiGLU (correct, but extra communication). The vision tower's attention groups assume each dp
slice of the patches holds whole images (the trainer's per-rank data, or equal samples), which the
trainer's ``dp_slice`` inputs guarantee.
"""
from __future__ import annotations

from typing import Optional

from ms_mm.parallel import sharding
from ms_mm.parallel.config import Divisibility, ParallelConfig, ParallelConfigError
from ms_mm.training.mm_checkpoint import MEGATRON_TP_RULES

# The one table of where tensors are split over tp: MindSpeed-MM's Megatron default patterns (regex on
# the MM name -> "col" / "col_gated" / "row", ``ms_mm.training.mm_checkpoint`` kinds; anything else is
# whole on every tp rank, here the patch embedding and the norms). The converter writes its mp_rank
# files by it (``adapters.qwen2_5_vl``) and ``Qwen2_5_VLPlan.shard`` splits every Linear by it, so the
# checkpoint layout and the compiled layout cannot disagree.
TP_RULES = list(MEGATRON_TP_RULES)


def tp_rules(config=None):
    """The TP table (the same for every Qwen2.5-VL config)."""
    return list(TP_RULES)


_LLM = "text_decoder.decoder.layers.*"
_VIT = "image_encoder.encoder.blocks.layers.*"


class Qwen2_5_VLPlan:
    family = "qwen2_5_vl"

    # ------------------------------------------------------------------------------------ checks
    def tp_requirements(self, config):
        tc, vc = config.text, config.vision
        n, nkv, d, h = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim, tc.hidden_size
        qkv_rows = (n + 2 * nkv) * d
        vh = vc.hidden_size
        merged = vh * vc.merge_unit
        return [
            Divisibility("tp", "text.num_attention_heads", n, f"{_LLM}.self_attention.linear_qkv.weight",
                         (qkv_rows, h), "attention heads are split across tp ranks"),
            Divisibility("tp", "text.num_key_value_heads", nkv, f"{_LLM}.self_attention.linear_qkv.weight",
                         (qkv_rows, h), "its rows are grouped per KV head, and tp splits whole groups"),
            Divisibility("tp", "text.intermediate_size", tc.intermediate_size, f"{_LLM}.mlp.linear_fc2.weight",
                         (h, tc.intermediate_size), "row-parallel on the FFN width"),
            Divisibility("tp", "text.vocab_size", tc.vocab_size, "text_decoder.embedding.word_embeddings.weight",
                         (tc.vocab_size, h), "the vocabulary is split across tp ranks"),
            Divisibility("tp", "vision.num_heads", vc.num_heads, f"{_VIT}.self_attention.linear_qkv.weight",
                         (3 * vh, vh), "vision attention heads are split across tp ranks"),
            Divisibility("tp", "vision.intermediate_size", vc.intermediate_size, f"{_VIT}.mlp.linear_fc2.weight",
                         (vh, vc.intermediate_size), "row-parallel on the FFN width"),
            Divisibility("tp", "vision merged width (hidden_size * spatial_merge_size**2)", merged,
                         "image_encoder.projector.encoder.linear_fc1.weight", (merged, merged),
                         "column-parallel on the merger width"),
        ]

    def check(self, pc: ParallelConfig, config) -> None:
        if pc.ep != 1:
            raise ParallelConfigError(f"ep={pc.ep}: Qwen2.5-VL has no experts; expert parallel size must be 1")
        if pc.cp != 1:
            raise ParallelConfigError(f"cp={pc.cp}: context parallel is not implemented for Qwen2.5-VL")
        pc.check_divisible(self.tp_requirements(config))
        pc.stage_layers("llm_pp_layers", config.text.num_hidden_layers)
        pc.stage_layers("vit_pp_layers", config.vision.depth, default_all_first=True)

    check_batch = staticmethod(sharding.check_batch_rows)

    # ----------------------------------------------------------------------------------- apply
    def apply(self, model, pc: ParallelConfig):
        self.shard(model, pc)
        if pc.pp > 1:
            self.assign_stages(model, pc)
        return model

    def shard(self, model, pc: ParallelConfig):
        dp, tp = pc.dp, pc.tp
        # every Linear (vision blocks, merger, LLM layers, output layer) as the table says
        table, kinds = sharding.linears_by_table(model, tp_rules(model.config), dp, tp)
        text = model.text_decoder
        vocab_tp = tp if table.tp_kind("text_decoder.embedding.word_embeddings.weight") else 1
        sharding.vocab_parallel_embedding(text.embedding.word_embeddings, dp, vocab_tp)
        for i, layer in enumerate(text.decoder.layers):
            heads = tp if kinds[f"text_decoder.decoder.layers.{i}.self_attention.linear_qkv"] else 1
            _shard_block(layer, dp, heads, rank=3, mask_batch=dp)
        sharding.rms_norm(text.decoder.final_layernorm, dp, rank=3)
        if text.tie_word_embeddings:
            text.logits_matmul.shard(((dp, 1), (vocab_tp, 1)))

        # The vision tower sees all patches of the global batch as one sequence (attention segments
        # come from masks). Each dp rank is fed its own samples with the same patch count (the trainer's
        # per-rank data), so the sequence is dp equal runs that never attend across: the patch rows are
        # split by dp and attention runs as a batch of dp groups (each rank attends within its own
        # images, no keys gathered from other ranks); heads / FFN by tp as the table says.
        vision = model.image_encoder.encoder
        vision.set_groups(dp)
        vision.patch_embed.proj.matmul.shard(((dp, 1), (1, 1)))   # no table row: the kernel whole
        for i, block in enumerate(vision.blocks.layers):
            heads = tp if kinds[f"image_encoder.encoder.blocks.layers.{i}.self_attention.linear_qkv"] else 1
            _shard_block(block, dp, heads, rank=2, vision=True)
        sharding.rms_norm(model.image_encoder.projector.layernorm, dp, rank=2)
        return model

    def stage_of_layers(self, pc: ParallelConfig, config):
        """(vision stage per block, LLM stage per layer)."""
        return pc.vlm_layer_stages(config.vision.depth, config.text.num_hidden_layers)

    def assign_stages(self, model, pc: ParallelConfig):
        vit_stages, llm_stages = self.stage_of_layers(pc, model.config)
        last = pc.pp - 1
        image = model.image_encoder
        image.encoder.patch_embed.pipeline_stage = 0
        for block, stage in zip(image.encoder.blocks.layers, vit_stages):
            block.pipeline_stage = stage
        image.projector.pipeline_stage = max(vit_stages) if vit_stages else 0
        text = model.text_decoder
        sharding.place_text_decoder(text, llm_stages, last, tied=text.tie_word_embeddings)
        return model


def _shard_block(block, dp, heads_tp, rank, mask_batch=None, vision=False):
    """The non-Linear parts of one transformer block (vision or text; its Linears follow the table):
    norms with rows (tokens, or patches) by dp, attention heads by ``heads_tp`` (tp when the block's
    ``linear_qkv`` is column-parallel). Text attention is batch-split; vision attention is split on its
    batch of dp patch groups."""
    sharding.rms_norm(block.input_layernorm, dp, rank)
    sharding.rms_norm(block.pre_mlp_layernorm, dp, rank)
    # vision: its attention batch is the dp groups of patches (``VisionEncoder.set_groups``), one mask each
    sharding.head_parallel_attention(block.self_attention.core_attention, dp, heads_tp,
                                     mask_batch=dp if vision else mask_batch)


PLAN = Qwen2_5_VLPlan()


def synthetic_batch(config, batch_size: int, seq_len: int, image_tokens: Optional[int] = None):
    """Dry-run model inputs for ``batch_size`` samples of ``seq_len`` tokens, each with one square image.

    The image takes about a quarter of the sequence (at least one merged 2x2 patch group) unless
    ``image_tokens`` says how many merged tokens; all other tokens are supervised text.
    """
    import numpy as np
    from ms_mm.models.qwen2_5_vl import build_model_inputs
    vc = config.vision
    budget = seq_len - 2 if image_tokens is None else image_tokens
    side = max(1, int((seq_len // 4 if image_tokens is None else budget) ** 0.5))
    if side * side + 2 > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for an image of {side * side} tokens plus its "
                         f"start/end markers")
    merge = vc.spatial_merge_size
    grid = [1, side * merge, side * merge]
    n_patches = side * side * vc.merge_unit
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(config.vision_start_token_id, config.text.vocab_size - 1),
                       size=(batch_size, seq_len)).astype(np.int64)
    ids[:, 0] = config.vision_start_token_id
    ids[:, 1:1 + side * side] = config.image_token_id
    ids[:, 1 + side * side] = config.vision_end_token_id
    labels = ids.copy()
    labels[:, : 2 + side * side] = -100
    batch = {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
        "pixel_values": rng.standard_normal((batch_size * n_patches, vc.patch_dim)).astype(np.float32),
        "image_grid_thw": np.array([grid] * batch_size, np.int64),
    }
    return build_model_inputs(batch, config)
