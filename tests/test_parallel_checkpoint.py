"""Per-rank checkpoint slices (ms_mm.parallel.checkpoint), checked without a cluster.

The blocks a rank is given are compared with MindSpore's own cutting of the full tensor
(``mindspore.parallel._tensor._load_tensor``, the function MindSpore's checkpoint loading uses, for
device matrices and tensor maps of the shapes the plans produce); reading a block out of an MM
checkpoint split with TP 2 (column, row and gated-column pieces, pipeline stages) is compared with
the same block of the full tensor; blocks written per rank assemble back bit-exactly, and blocks
that do not tile a tensor are refused by name. The compiled layouts of a real sharded train step
(TP 2 x PP 2 x DP 2, optimizer parallel) are covered by tests/test_dryrun_trainer.py, against
MindSpore's ``transform_checkpoint_by_rank``.
"""
import numpy as np
import pytest

from ms_mm.parallel import checkpoint as pc
from ms_mm.training import mm_checkpoint as mmc


def _mindspore_cut(full, dev, tmap, rank):
    import mindspore as ms
    from mindspore.parallel._tensor import _load_tensor

    return _load_tensor(ms.Tensor(full), list(dev), list(tmap), list(full.shape), rank)


@pytest.mark.parametrize("dev,tmap,shape", [
    ((2, 2), (1, -1), (8, 6)),           # dim 0 over the left axis (column parallel, dp repeats)
    ((2, 2), (-1, 0), (6, 8)),           # dim 1 over the right axis (row parallel)
    ((4,), (0, -1, -1), (8, 3, 2)),       # dim 0 over all 4
    ((2, 2, 2), (2, -1, 0), (4, 6, 8)),   # two dims cut by two axes, one axis repeats
    ((2, 2), (-1, -1), (5, 3)),          # replicated
])
def test_blocks_are_mindspores_cut(dev, tmap, shape):
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    lay = pc.ParamLayout(full_shape=shape, dev_matrix=dev, tensor_map=tmap)
    for rank in range(int(np.prod(dev))):
        block = full[tuple(slice(s, e) for s, e in lay.region(rank))]
        np.testing.assert_array_equal(block, _mindspore_cut(full, dev, tmap, rank), err_msg=f"rank {rank}")


def test_optimizer_shard_cuts_dim0_over_the_ranks_holding_the_same_block():
    # dev (2 tp-like, 2 repeats), dim 0 over the left axis: ranks 0,1 hold rows 0..3, ranks 2,3 rows 4..7;
    # the optimizer shard (group of the 2 holders, in rank order) cuts those again
    lay = pc.ParamLayout(full_shape=(8, 3), dev_matrix=(2, 2), tensor_map=(1, -1), opt_shard_size=2)
    assert [lay.region(r)[0] for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [lay.owner(r) for r in range(4)] == [True, True, True, True]
    repl = pc.ParamLayout(full_shape=(8, 3), dev_matrix=(2, 2), tensor_map=(1, -1))
    assert [repl.owner(r) for r in range(4)] == [True, False, True, False]
    bad = pc.ParamLayout(full_shape=(8, 3), dev_matrix=(2, 2), tensor_map=(1, -1), opt_shard_size=4)
    with pytest.raises(pc.ShardedCheckpointError, match="optimizer shard over 4 ranks"):
        bad.region(0)


def test_from_mindspore_layout_tuple():
    lay = pc.ParamLayout.from_mindspore(
        "w", ([2, 2], [1, -1], [64, 32], 0, True, "2-5004544844489628105", [128, 32], [64, 32], False, False, 0, 0))
    assert (lay.full_shape, lay.dev_matrix, lay.tensor_map, lay.opt_shard_size) == ((128, 32), (2, 2), (1, -1), 2)
    with pytest.raises(pc.ShardedCheckpointError, match="non-uniform"):
        pc.ParamLayout.from_mindspore("w", ([2], [0], [4], 0, False, "", [8]))


def _split_checkpoint(tmp_path, state, tp, pp_layers=None):
    rules = [(r"^w_col$", "col"), (r"^w_row$", "row"), (r"^w_gated$", "col_gated"),
             (r"^layers\.\d+\.w$", "col")]
    stages = [{"key": "llm", "layers": "layers.", "firsts": ["w_"], "lasts": ["bias"]}]
    layout = mmc.ParallelLayout(tp_size=tp, pp_layers=pp_layers or {}, tp_rules=rules, pp_stages=stages)
    return mmc.save_model(tmp_path / f"tp{tp}", state, layout)


def test_blocks_read_out_of_any_tp_pp_split(tmp_path):
    rng = np.random.default_rng(0)
    state = {"w_col": rng.standard_normal((8, 6)).astype(np.float32),
             "w_row": rng.standard_normal((6, 8)).astype(np.float32),
             "w_gated": rng.standard_normal((8, 4)).astype(np.float32),     # [gate 4; up 4]
             "layers.0.w": rng.standard_normal((4, 2)).astype(np.float32),
             "layers.1.w": rng.standard_normal((4, 2)).astype(np.float32),
             "bias": rng.standard_normal((5,)).astype(np.float32)}
    tp2 = pc.RegionSource(_split_checkpoint(tmp_path, state, 2, {"llm": [1, 1]}))
    tp1 = pc.RegionSource(_split_checkpoint(tmp_path, state, 1))
    regions = {"w_col": [((0, 8), (0, 6)), ((2, 6), (1, 4)), ((3, 4), (0, 6))],
               "w_row": [((0, 6), (2, 7)), ((1, 2), (0, 8))],
               # rows 2..6 cross from the gate half into the up half and over both TP pieces
               "w_gated": [((2, 6), (0, 4)), ((0, 8), (1, 3)), ((5, 8), (0, 4))],
               "layers.1.w": [((1, 3), (0, 2))], "bias": [((1, 4),)]}
    for name, rs in regions.items():
        for region in rs:
            want = state[name][tuple(slice(s, e) for s, e in region)]
            for src in (tp1, tp2):
                np.testing.assert_array_equal(src.read(name, region), want, err_msg=f"{name} {region}")


def test_shards_assemble_back_and_bad_tilings_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    full = {"a": rng.standard_normal((8, 6)).astype(np.float32), "b": rng.standard_normal((4,)).astype(np.float32)}
    lays = {"a": pc.ParamLayout((8, 6), (2, 2), (1, 0)), "b": pc.ParamLayout((4,), (2, 2), (-1,), opt_shard_size=4)}
    for rank in range(4):
        values = {n: full[n][tuple(slice(s, e) for s, e in lays[n].region(rank))] for n in full}
        pc.write_rank_shard(tmp_path / "shards", rank, values, lays)
    out = pc.assemble(tmp_path / "shards")
    for n in full:
        np.testing.assert_array_equal(out[n].load(), full[n])
    with pytest.raises(pc.ShardedCheckpointError, match="holds shape"):
        pc.write_rank_shard(tmp_path / "bad", 0, {"a": full["a"]}, lays)
    (tmp_path / "shards" / "rank_00001.safetensors").unlink()      # rank 1's blocks gone: a gap
    with pytest.raises(pc.ShardedCheckpointError, match="do not tile"):
        pc.assemble(tmp_path / "shards")["a"]
