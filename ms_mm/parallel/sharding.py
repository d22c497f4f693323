"""Reusable sharding strategies for the ``ms_mm.ops`` Cells, for MindSpore semi-auto parallel.

A plan (``ms_mm.models.qwen2_5_vl.parallelize``, ...) walks a model and calls these helpers on its Cells;
each helper attaches ``.shard()`` strategies to the primitives the Cell holds as attributes
(``Linear.matmul`` / ``Linear.bias_add``, ``CoreAttention.bmm_qk`` ...), never changing the
Cell's maths. Strategies are tuples of per-input split counts, as ``Primitive.shard`` takes them.

Layout conventions (Megatron): ``x`` rows (tokens, flattened batch*seq) split by ``dp``;
column-parallel splits a Linear's output features by ``tp`` (weight dim 0), row-parallel its
input features (weight dim 1; MindSpore inserts the all-reduce of the partial sums).
"""
from __future__ import annotations

from mindspore import nn


def _set(primitive, strategy):
    if primitive is not None:
        primitive.shard(strategy)


def column_parallel(linear: nn.Cell, dp: int, tp: int) -> None:
    """Linear with weight [out, in] split on ``out``: y [T, out/tp] stays split for the next op."""
    _set(linear.matmul, ((dp, 1), (tp, 1)))
    if getattr(linear, "has_bias", False):
        _set(linear.bias_add, ((dp, tp), (tp,)))


def row_parallel(linear: nn.Cell, dp: int, tp: int) -> None:
    """Linear with weight [out, in] split on ``in``: partial sums all-reduced over tp, bias after."""
    _set(linear.matmul, ((dp, tp), (1, tp)))
    if getattr(linear, "has_bias", False):
        _set(linear.bias_add, ((dp, 1), (1,)))


def replicated_linear(linear: nn.Cell, dp: int) -> None:
    """Linear whose weight is whole on every rank; only the token rows are split."""
    _set(linear.matmul, ((dp, 1), (1, 1)))
    if getattr(linear, "has_bias", False):
        _set(linear.bias_add, ((dp, 1), (1,)))


def linear_of_kind(linear: nn.Cell, kind, dp: int, tp: int) -> None:
    """Split a Linear as a checkpoint TP rule kind says: "col" / "col_gated" column-parallel, "row"
    row-parallel, None replicated (the kinds of ``ms_mm.training.mm_checkpoint``)."""
    if kind in ("col", "col_gated"):
        column_parallel(linear, dp, tp)
    elif kind == "row":
        row_parallel(linear, dp, tp)
    elif kind is None:
        replicated_linear(linear, dp)
    else:
        raise ValueError(f"unknown TP split kind {kind!r}")


def linears_by_table(model: nn.Cell, tp_rules, dp: int, tp: int):
    """Split every ``ms_mm.ops.Linear`` of ``model`` as its weight's rule in the TP table ``tp_rules`` says
    (``linear_of_kind``); returns ``(table, kinds)``: the table as a ``ms_mm.training.mm_checkpoint.ParallelLayout``
    and {Linear's cell name: kind}, for the plan's other choices (heads follow their projection)."""
    from ms_mm.ops import Linear
    from ms_mm.training.mm_checkpoint import ParallelLayout

    table = ParallelLayout(tp_rules=tp_rules)
    kinds = {}
    for name, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            kinds[name] = table.tp_kind(f"{name}.weight")
            linear_of_kind(cell, kinds[name], dp, tp)
    return table, kinds


def head_parallel_attention(attn: nn.Cell, dp: int, tp: int, mask_batch: int = None, has_mask: bool = True) -> None:
    """``ms_mm.ops.CoreAttention`` on q [B, N, S, D], k/v [B, Nkv, S, D] with heads split by tp.

    ``mask_batch`` is the split of the mask's batch axis: ``dp`` for a per-sample [B, 1, S, S]
    mask, 1 for one mask broadcast over the batch; ``has_mask=False`` for attention called without one.
    """
    mask_batch = dp if mask_batch is None else mask_batch
    heads = (dp, tp, 1, 1)
    _set(attn.bmm_qk, (heads, heads))
    _set(attn.mul, (heads, ()))
    _set(attn.add, (heads, (mask_batch, 1, 1, 1)))
    _set(attn.softmax, (heads,))
    _set(attn.bmm_pv, (heads, heads))
    if getattr(attn, "tile", None) is not None and getattr(attn, "n_rep", 1) > 1:
        _set(attn.tile, ((dp, tp, 1, 1, 1),))
    if getattr(attn, "flash_attention", None) is not None:
        # q, k, v, then the boolean mask (the None inputs take no strategy); the mask is made (additive
        # mask < 0, as uint8) in the layout the kernel takes, so no uint8 tensor is redistributed (its
        # AllGather's backward, a ReduceScatter, takes no uint8 on Ascend)
        _set(attn.flash_attention, (heads, heads, heads) + (((mask_batch, 1, 1, 1),) if has_mask else ()))
        if has_mask and getattr(attn, "less", None) is not None:
            _set(attn.less, ((mask_batch, 1, 1, 1), ()))


def vocab_parallel_embedding(embedding: nn.Cell, dp: int, tp: int) -> None:
    """Gather from weight [vocab, dim] split on vocab by tp (each rank looks up its own rows)."""
    _set(embedding.gather, ((tp, 1), (dp, 1)))


def replicated_embedding(embedding: nn.Cell, dp: int) -> None:
    _set(embedding.gather, ((1, 1), (dp, 1)))


def rms_norm(norm: nn.Cell, dp: int, rank: int = 3) -> None:
    """Norm over the last axis of a rank-``rank`` input whose first axis is split by dp."""
    data = (dp,) + (1,) * (rank - 1)
    if getattr(norm, "fused", False):
        _set(norm.rms_norm, (data, (1,)))


def check_batch_rows(pc, batch_size: int, seq_len: int) -> None:
    """The global batch rows are split by dp (and into micro batches by the pipeline)."""
    from ms_mm.parallel.errors import ParallelConfigError

    if batch_size % pc.dp:
        raise ParallelConfigError(f"dp={pc.dp} does not divide the global batch size {batch_size} "
                                  f"(input_ids has shape [{batch_size}, {seq_len}])")


def place_text_decoder(text, llm_stages, last: int, tied: bool) -> None:
    """Pipeline stages of an MM text decoder (``embedding``, ``decoder.layers``, ``decoder.final_layernorm``,
    ``output_layer``): the embedding on stage 0, each layer on its stage, the final norm and (untied) output
    layer on the last one, ``last`` (``llm_stages``: the stage of each layer)."""
    text.embedding.pipeline_stage = 0
    for layer, stage in zip(text.decoder.layers, llm_stages):
        layer.pipeline_stage = stage
    text.decoder.final_layernorm.pipeline_stage = last
    if not tied:
        text.output_layer.pipeline_stage = last
