"""`DRY_RUN=1` runs the trainer itself (pretrain_vlm.py) on simulated Ascend ranks: Qwen2.5-VL tiny with
TP 2 x PP 2 x DP 2 on 8 ranks and the distributed optimizer, the first rank of each pipeline stage, two
iterations each, with a user's `GLOG_v=3` (the memory figures are log lines that level would hide).

The same compiled layouts then drive the per-rank checkpoint test: every one of the 8 ranks gets its
blocks of an MM checkpoint (split TP 2 x PP 2 by the converter, and unsplit: re-sliced on load), which
must equal MindSpore's own cut of the full tensors for that rank (``transform_checkpoint_by_rank`` on
the strategy files the ranks wrote), optimizer moments included; the ranks' blocks saved by the
trainer's sharded save give the full tensors back bit-exactly, and load again to the same blocks."""
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dryrun_support import collectives, fake_cann_root  # noqa: F401  (session fixture: builds the stub CANN tree)
from ms_mm.ops.moe import expert_capacity
from ms_mm.parallel.config import ParallelConfig
from ms_mm.parallel.dryrun import parse_peak_memory
from ms_mm.training import launch

MOMENTS = ("exp_avg.", "exp_avg_sq.")
EMA = "ema."


def _dry_run(root, model_json, world, *flags, parallel=1):
    """The trainer under DRY_RUN=1 (and a user's GLOG_v=3) on the first rank of each stage, 2 iterations;
    (rc, printed lines). No data here: the family's synthetic batch."""
    (root / "model.json").write_text(json.dumps(model_json))
    (root / "data.json").write_text("{}")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(root)
        for key, value in {"DRY_RUN": "1", "DRY_RUN_PARALLEL": str(parallel), "GLOG_v": "3"}.items():
            mp.setenv(key, value)
        mp.delenv("DRY_RUN_RANKS", raising=False)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = launch.main(["--worker_num", str(world), "--local_worker_num", str(world), "--log_dir", "msrun_log",
                              "--", "--mm-model", "model.json", "--mm-data", "data.json", "--micro-batch-size", "1",
                              "--seq-length", "64", "--train-iters", "100", *flags])
    finally:
        mp.undo()
    return rc, out.getvalue()


def _point_at_fake_cann(fake_cann_root, root, monkeypatch):
    if fake_cann_root.parent.name != "fake-cann":
        monkeypatch.setenv("MS_MM_CACHE", str(root / "cache"))
        (root / "cache").mkdir()
        (root / "cache" / "fake-cann").symlink_to(fake_cann_root.parent)


@pytest.fixture(scope="module")
def tp2_pp2_dp2(fake_cann_root, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dryrun_trainer")
    mp = pytest.MonkeyPatch()
    try:
        _point_at_fake_cann(fake_cann_root, tmp_path, mp)
        rc, out = _dry_run(tmp_path, {"model_id": "qwen2_5vl", "preset": "tiny"}, 8,
                           "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--global-batch-size", "4", "--use-distributed-optimizer", "--save", "save_dir",
                           "--save-interval", "1", parallel=2)
    finally:
        mp.undo()
    return tmp_path, rc, out


def test_dry_run_of_the_trainer_tp2_pp2_dp2(tp2_pp2_dp2):
    tmp_path, rc, out = tp2_pp2_dp2
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert [line.split(":")[0] for line in lines] == ["rank 0 (pipeline stage 0)", "rank 4 (pipeline stage 1)"], out
    for line in lines:
        assert "ok, predicted peak device memory" in line and "of 64 GB: fits" in line, line
    assert not (tmp_path / "save_dir").exists()       # a dry run writes no checkpoint
    work = tmp_path / "msrun_log" / "dryrun"
    log0 = (work / "rank0" / "train.log").read_text()
    assert "compiled once and shared by the 2 pipeline micro batches" in log0, log0
    assert "sharding plan of qwen2_5_vl applied: semi-auto parallel, dp 2 x tp 2 x pp 2 (ep 1), 2 micro batch(es) " \
           "of 2 rows per step, 1 read by each dp rank, optimizer states sharded over dp" in log0
    # per-rank data: each rank prepares its own micro batch of 1 sample (the graph's global batch is 2 rows)
    assert "iteration        2/       2" in log0 and "synthetic batches of 1 samples x 64 tokens" in log0
    assert "input_ids [1, 64]" in log0 and "position_ids [3, 1, 64]" in log0
    # MindSpore's own reading of the dataset strategy: the global micro batch is the dp ranks' slices together
    assert "slice of the global micro batch, whose shapes are input_ids [2, 64], attention_mask [2, 64], " \
           "position_ids [3, 2, 64], labels [2, 64], pixel_values [128, 1176]" in log0
    # MindSpore's compiled layouts: stage 0 holds the vision tower and LLM layer 0, stage 1 the rest;
    # tp splits inside each stage; the distributed optimizer gives parameters and AdamW moments an optimizer-shard group
    # (empty without --use-distributed-optimizer)
    stage0 = json.loads((work / "rank0" / "parameter_layouts.json").read_text())
    stage1 = json.loads((work / "rank4" / "parameter_layouts.json").read_text())
    model0 = {k for k in stage0 if k.startswith(("image_encoder.", "text_decoder."))}
    model1 = {k for k in stage1 if k.startswith(("image_encoder.", "text_decoder."))}
    assert "image_encoder.encoder.patch_embed.proj.weight" in model0
    assert not any(k.startswith("image_encoder.") or ".layers.0." in k for k in model1)
    assert stage0["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"]["slice_shape"] == [64, 64]
    assert stage1["text_decoder.output_layer.weight"]["slice_shape"] == [192, 64]          # vocab 384 / tp 2
    for name in ("text_decoder.decoder.layers.0.input_layernorm.weight",
                 "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"):
        assert stage0[name]["opt_shard_group"] and stage0["exp_avg." + name]["opt_shard_group"], name


class _Param:
    """What the trainer's sharded load / save use of a MindSpore Parameter: name, shape, dtype, data."""

    def __init__(self, name, arr):
        import mindspore as ms

        self.name, self.data, self.dtype = name, np.asarray(arr), ms.float32

    @property
    def shape(self):
        return self.data.shape

    def asnumpy(self):
        return self.data

    def set_data(self, tensor, slice_shape=False):
        self.data = tensor.asnumpy()


class _Holder:
    def __init__(self, params, graph_unused_prefixes=()):
        self.params = params
        self.graph_unused_prefixes = graph_unused_prefixes

    def get_parameters(self):
        return iter(self.params)


def check_rank_blocks(work, world, pp, family, config, split, tmp_path, run_pc, dp_peers=(0, 1), ema=False):
    """Every rank's blocks of an MM checkpoint (split by the converter as ``split``, and unsplit) equal
    MindSpore's cut for that rank; the trainer's sharded save of those blocks (in the converter's layout
    of the run's sizes ``run_pc``) gives the full tensors back bit-exactly, through ``mm-convert resplit``
    too, and loads again to the same blocks. ``work``: the dry run's rank dirs (the first rank of each
    stage compiled). ``ema``: the run kept the weights' EMA, whose blocks are checked as the moments are and
    which is saved as the model dir ``ema/`` (frozen weights there as themselves)."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters

    from ms_mm import registry
    from ms_mm.parallel import checkpoint as shards
    from ms_mm.training import checkpointing as ckpt
    from ms_mm.training import mm_checkpoint as mmc

    tmp_path.mkdir(parents=True, exist_ok=True)
    size = world // pp
    stages = {s: shards.layouts_from_json(json.loads((work / f"rank{size * s}" / "parameter_layouts.json")
                                                     .read_text())) for s in range(pp)}
    names = {s: sorted(n for n in lay if not n.startswith(("accu_grads.", "inputs"))) for s, lay in stages.items()}
    full_shape = {n: stages[s][n].full_shape for s in stages for n in names[s]}
    rng = np.random.default_rng(0)
    full = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in sorted(full_shape.items())}
    model_names = sorted(n for n in full if not n.startswith(MOMENTS + (EMA,)))
    moment_names = sorted(n for n in full if n.startswith(MOMENTS))
    ema_names = sorted(n for n in full if n.startswith(EMA))    # the sharded step's EMA of the trainable weights
    assert bool(ema_names) == ema, ema_names[:3]
    with no_init_parameters():
        built = registry.get(family).build_model(config, ms.float32)
    every = {p.name: tuple(p.shape) for p in built.get_parameters()}
    unused_prefixes = getattr(built, "graph_unused_prefixes", ())
    # the stages together hold the whole model but the weights the graph never uses (SigLIP's attention-pool
    # head), which have no compiled layout: whole on every rank, or under pipeline stages on the first stage's
    unused = sorted(set(every) - set(model_names))
    assert set(model_names) <= set(every) and moment_names, model_names
    assert pp == 1 or unused == sorted(ckpt.graph_unused(built)), unused
    for n in unused:
        full[n] = rng.standard_normal(every[n]).astype(np.float32)
        stages[0][n] = shards.ParamLayout(full_shape=every[n], dev_matrix=(), tensor_map=())
        names[0].append(n)
    model_names = sorted(every)

    # MindSpore's own cut of the full tensors for each rank, from the strategy files the stages wrote
    strategies = tmp_path / "strategies"
    strategies.mkdir()
    for s in range(pp):
        (strategies / f"strategy_{s}.ckpt").write_bytes((work / f"rank{size * s}" / "strategy.ckpt").read_bytes())
    if pp > 1:
        ms.merge_pipeline_strategys(str(strategies), str(tmp_path / "strategy.ckpt"))
    else:
        (tmp_path / "strategy.ckpt").write_bytes((strategies / "strategy_0.ckpt").read_bytes())
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in full.items() if n not in unused],
                       str(tmp_path / "full.ckpt"))
    expected = {}
    for rank in range(world):
        ms.transform_checkpoint_by_rank(rank, {0: str(tmp_path / "full.ckpt")}, str(tmp_path / f"rank{rank}.ckpt"),
                                        None, str(tmp_path / "strategy.ckpt"))
        cut = ms.load_checkpoint(str(tmp_path / f"rank{rank}.ckpt"))
        expected[rank] = {n: full[n] if n in unused else cut[n].asnumpy() for n in names[rank // size]}

    # the converter's split and unsplit layouts; moments in optim.safetensors
    model_state = {n: full[n] for n in model_names}
    sources = [mmc.save_model(tmp_path / "tp2pp2", model_state, split), mmc.save_model(tmp_path / "tp1", model_state)]
    mmc.write_safetensors(tmp_path / "optim.safetensors", {n: full[n] for n in moment_names})
    ema_dir = mmc.save_model(tmp_path / "ema", {n: full.get(EMA + n, full[n]) for n in model_names}) if ema else None
    held = {}
    for rank in range(world):
        stage, lay = rank // size, stages[rank // size]
        mine = [n for n in names[stage] if n in model_state]
        for src in sources:
            got = shards.read_rank_slices(src, lay, rank, names=mine)
            for n in mine:
                np.testing.assert_array_equal(got[n], expected[rank][n], err_msg=f"rank {rank} {n} from {src}")
        moments = shards.read_rank_slices(tmp_path / "optim.safetensors", lay, rank,
                                          names=[n for n in names[stage] if n.startswith(MOMENTS)])
        if ema:     # the EMA's blocks out of an ema/ model dir, as a resumed run reads them
            moments.update(shards.read_rank_slices(ema_dir, lay, rank, names=[n for n in names[stage] if n in ema_names],
                                                   rename=lambda n: n[len(EMA):]))
        for n, arr in moments.items():
            np.testing.assert_array_equal(arr, expected[rank][n], err_msg=f"rank {rank} {n}")
        held[rank] = {**got, **moments}
    # optimizer parallel really cut the blocks further than the model split: dp peers hold other blocks
    a, b = dp_peers
    cut_further = [n for n in model_names if n in held[a] and held[a][n].shape == held[b][n].shape
                   and held[a][n].size * 2 <= full[n].size and not np.array_equal(held[a][n], held[b][n])]
    assert cut_further, "no weight is split between the dp peers"

    # the trainer's sharded save: every rank its blocks (rank 0 last: it assembles), then load them back
    # (as in a pipeline run, every rank has the whole model and optimizer; it compiled, holds and writes its stage)
    save = tmp_path / "save"

    def rank_objects(rank, fill):
        local = {n: fill(held[rank][n]) if n in held[rank] else np.full((1,), np.nan, np.float32) for n in full}
        return (_Holder([_Param(n, local[n]) for n in model_names], unused_prefixes),
                _Holder([_Param(n, local[n]) for n in moment_names + ["global_step"]
                         if n != "global_step"] + [_Param("global_step", np.asarray([5], np.float32))]),
                [_Param(n, local[n]) for n in ema_names])

    run_layout = ckpt.run_checkpoint_layout(registry.get(family), config, run_pc)
    for rank in reversed(range(world)):
        model, optim, averages = rank_objects(rank, lambda a: a)
        ckpt.save_sharded_checkpoint(str(save), 5, model, optim, stages[rank // size], rank=rank, family=family,
                                     data_state={"per_rank": [{}]}, train_state={"iteration": 5}, save_rng=False,
                                     pipeline=pp > 1, layout=run_layout, ema=averages, first_stage=rank < size)
    it = mmc.iteration_dir(save, 5)
    assert mmc.latest_iteration(save) == 5 and not list(save.glob(".shards_*"))
    # saved in the converter's mp_rank layout of the run's TP / PP / EP
    written = json.loads((it / "parallel_layout.json").read_text())
    assert (written["tp_size"], written.get("ep_size", 1)) == (run_pc.tp, run_pc.ep), written
    assert len(list(it.glob("mp_rank_*"))) == run_pc.tp * run_pc.pp * run_pc.ep
    saved = mmc.load_model(str(it))
    assert sorted(saved) == model_names
    for n in model_names:
        np.testing.assert_array_equal(saved[n], full[n], err_msg=n)
    # mm-convert resplit takes the run's output like a converted checkpoint
    from convert.framework import resplit

    resplit(str(save), str(tmp_path / "resplit"), tp_size=1)
    again = mmc.load_model(str(tmp_path / "resplit"))
    for n in model_names:
        np.testing.assert_array_equal(again[n], full[n], err_msg=f"resplit {n}")
    saved_moments = mmc.read_safetensors(it / ckpt.OPTIM_FILE)
    assert sorted(saved_moments) == sorted(moment_names + ["global_step"]) and saved_moments["global_step"][0] == 5
    for n in moment_names:
        np.testing.assert_array_equal(saved_moments[n], full[n], err_msg=n)
    if ema:     # the EMA: a whole model dir beside the model, in the same layout; frozen weights as themselves
        assert json.loads((it / ckpt.EMA_DIR / "parallel_layout.json").read_text()) == written
        saved_ema = mmc.load_model(str(it / ckpt.EMA_DIR))
        assert sorted(saved_ema) == model_names
        for n in model_names:
            np.testing.assert_array_equal(saved_ema[n], full.get(EMA + n, full[n]), err_msg=f"ema/ {n}")
    else:
        assert not (it / ckpt.EMA_DIR).exists()
    state = ckpt.LoadedState(weights_dir=it, optim_file=it / ckpt.OPTIM_FILE, iter_dir=it, release=False)
    for rank in range(world):
        model, optim, averages = rank_objects(rank, lambda a: 0 * a)
        n_set = ckpt.load_sharded_weights(state, model, optim, stages[rank // size], rank, pipeline=pp > 1,
                                          ema=averages, first_stage=rank < size)
        assert n_set == len(names[rank // size]) + 1       # + the optimizer's step, replicated
        for p in list(model.params) + list(optim.params) + averages:
            if p.name in held[rank]:
                np.testing.assert_array_equal(p.data, held[rank][p.name], err_msg=f"rank {rank} {p.name}")
            elif p.name != "global_step":               # another stage's: not read, not touched
                assert p.data.shape == (1,) and np.isnan(p.data).all(), p.name
    return held, full


def check_table_agrees(work, ranks, split, tp, ep):
    """The compiled layout of every model parameter cuts exactly the dims the checkpoint's TP / EP table
    cuts (the TP kind's dim by tp, a stacked expert tensor's dim 0 by ep, nothing else), on each rank.
    One exception, MindSpore's own: a tensor the table keeps whole whose first consumer is an op the plan
    gives no strategy (the Reshape of Qwen's 5-D patch-embed kernel, DeepSeek's image_newline) gets the
    default data-parallel cut, dim 0 over the whole stage; the per-rank load reads that block as any other."""
    from ms_mm.parallel import checkpoint as shards
    from ms_mm.training import mm_checkpoint as mmc

    for rank in ranks:
        layouts = shards.layouts_from_json(json.loads((work / f"rank{rank}" / "parameter_layouts.json").read_text()))
        wrong = []
        for name, lay in layouts.items():
            if name.startswith(MOMENTS + (EMA, "adam_m.", "adam_v.", "accu_grads.", "inputs")) or name == "global_step":
                continue   # optimizer state and gradient accumulators follow their parameter; inputs are data
            region = lay.model_parallel_region(rank)
            got = tuple(full // (e - s) for full, (s, e) in zip(lay.full_shape, region))
            want = [1] * len(lay.full_shape)
            axis = mmc.tp_axis(split.tp_kind(name), len(want))
            if axis is not None:
                want[axis] *= tp
            if split.is_expert(name):
                want[0] *= ep
            default_cut = (split.tp_kind(name) is None and not split.is_expert(name)
                           and got == (lay.stage_size,) + (1,) * (len(got) - 1))
            if got != tuple(want) and not default_cut:
                wrong.append((name, list(lay.full_shape), split.tp_kind(name), got))
        assert len(layouts) > 20 and not wrong, wrong


def test_each_rank_holds_mindspores_cut_and_save_load_is_bit_exact(tp2_pp2_dp2, tmp_path):
    from adapters.qwen2_5_vl import SPEC
    from convert.framework import make_layout
    from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    root, rc, out = tp2_pp2_dp2
    assert rc == 0, out
    config = Qwen2_5_VLConfig.preset("tiny")
    # the converter's TP 2 x PP 2 with another layer split than the run's (LLM 1 + rest; the run: even)
    split = make_layout(SPEC, config, tp_size=2, pp_layers={"llm": [1, config.text.num_hidden_layers - 1]})
    check_table_agrees(root / "msrun_log" / "dryrun", (0, 4), split, tp=2, ep=1)
    check_rank_blocks(root / "msrun_log" / "dryrun", 8, 2, "qwen2_5_vl", config, split, tmp_path,
                      ParallelConfig(world_size=8, tp=2, pp=2))


def test_deepseek_tp2_pp2_ep2_blocks_are_mindspores_cut(fake_cann_root, tmp_path, monkeypatch):
    """DeepSeek-VL2 tiny, TP 2 x PP 2 x DP 2 with EP 2 on 8 ranks, the distributed optimizer and the MoE
    capacity dispatch (``--moe-expert-capacity-factor``, tokens to the experts by all-to-all); the
    converter's checkpoint split TP 2 x EP 2 (the stacked experts cut on the expert axis, whole experts per
    EP rank; one pipeline stage) is re-sliced to the run's blocks. Stage 0 holds the SigLIP tower, projector,
    image newline / view separator, word embeddings and the dense layer 0; stage 1 the MoE layer 1, the
    final norm and the output layer, and nothing of stage 0."""
    from adapters.deepseek_vl2 import SPEC
    from convert.framework import make_layout
    from ms_mm.models.deepseek_vl2.config import DeepseekVL2Config

    _point_at_fake_cann(fake_cann_root, tmp_path, monkeypatch)
    monkeypatch.setenv("MS_DEV_SAVE_GRAPHS", "1")
    monkeypatch.setenv("MS_DEV_SAVE_GRAPHS_PATH", str(tmp_path / "ir"))
    rc, out = _dry_run(tmp_path, {"model_id": "deepseekvl2", "preset": "tiny"}, 8, "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                       "--global-batch-size", "4", "--use-distributed-optimizer", "--moe-expert-capacity-factor", "1.5",
                       parallel=2)
    assert rc == 0 and "rank 0 (pipeline stage 0): ok" in out and "rank 4 (pipeline stage 1): ok" in out, out
    config = DeepseekVL2Config.preset("tiny")
    work = tmp_path / "msrun_log" / "dryrun"
    held = {r: {n for n in json.loads((work / f"rank{r}" / "parameter_layouts.json").read_text())
                if not n.startswith(MOMENTS + ("accu_grads.", "inputs"))} for r in (0, 4)}
    assert {"image_newline", "view_seperator", "text_decoder.embedding.word_embeddings.weight"} <= held[0]
    assert all(n.startswith(("text_decoder.decoder.layers.1.", "text_decoder.decoder.final_layernorm.",
                             "text_decoder.output_layer.")) for n in held[4]), held[4]
    # the family flag reached the model: its tokens move to the experts as the capacity buffer, by all-to-all
    # (the MoE layer is on stage 1: rank 4's graph), two each way per micro batch, two micro batches
    lc = config.language_config
    slots = expert_capacity(64, lc.num_experts_per_tok, lc.n_routed_experts, 1.5)
    moves = [c for c in collectives(tmp_path / "ir" / "rank_4") if c[0] == "AllToAll" and "experts-RoutedExperts" in c[3]]
    assert len(moves) == 4 * 2 and all(np.prod(c[1]) == lc.n_routed_experts * slots * lc.hidden_size for c in moves), moves
    split = make_layout(SPEC, config, tp_size=2, ep_size=2)
    check_table_agrees(work, (0, 4), split, tp=2, ep=2)
    check_rank_blocks(work, 8, 2, "deepseek_vl2", config, split, tmp_path / "ck",
                      ParallelConfig(world_size=8, tp=2, pp=2, ep=2))


def test_lumina_fsdp1_compiles_as_the_distributed_optimizer(fake_cann_root, tmp_path, monkeypatch):
    _point_at_fake_cann(fake_cann_root, tmp_path, monkeypatch)
    rc, out = _dry_run(tmp_path, {"model_id": "lumina", "preset": "tiny", "fsdp1": {}}, 2, "--global-batch-size", "2")
    assert rc == 0 and "rank 0 (pipeline stage 0): ok" in out and "distributed optimizer" in out, out
    work = tmp_path / "msrun_log" / "dryrun" / "rank0"
    assert "optimizer states sharded over dp" in (work / "train.log").read_text()
    layouts = json.loads((work / "parameter_layouts.json").read_text())
    name = "text_decoder.decoder.layers.0.mlp.linear_fc1.weight"
    assert layouts[name]["opt_shard_group"] and layouts["exp_avg." + name]["opt_shard_group"]


def test_bagel_fsdp2_trains_one_packed_sequence_per_dp_rank(fake_cann_root, tmp_path, monkeypatch):
    """BAGEL tiny, data parallel over 2 simulated ranks with its recipe's ``--use-torch-fsdp2`` (the
    distributed optimizer as ZeRO-3): each rank is fed its own packed sequence (the per-rank form, a leading axis of
    one sequence), and the compiled graph attends within the rank's own sequence: the decoder's and the
    ViT's attention scores are [1, heads, S, S] of the rank's budget S, not of the dp ranks' rows together,
    and no collective moves the activations of the packed rows."""
    from ms_mm import registry
    from ms_mm.models.bagel.config import BagelConfig
    from ms_mm.models.bagel.modeling import BagelForTraining

    _point_at_fake_cann(fake_cann_root, tmp_path, monkeypatch)
    monkeypatch.setenv("MS_DEV_SAVE_GRAPHS", "1")
    monkeypatch.setenv("MS_DEV_SAVE_GRAPHS_PATH", str(tmp_path / "ir"))
    rc, out = _dry_run(tmp_path, {"model_id": "bagel", "preset": "tiny"}, 2, "--global-batch-size", "2",
                       "--use-torch-fsdp2")      # and the recipe's EMA (the family's default decay, 0.9999)
    assert rc == 0 and "rank 0 (pipeline stage 0): ok" in out, out
    log0 = (tmp_path / "msrun_log" / "dryrun" / "rank0" / "train.log").read_text()
    assert "1 read by each dp rank, weights, gradients and optimizer states sharded over dp" in log0, log0
    assert "EMA of the weights: decay 0.9999, updated in the sharded step" in log0, log0
    # the EMA of each trainable weight is laid out as the weight: sharded over dp by ZeRO, as the moments
    layouts = json.loads((tmp_path / "msrun_log" / "dryrun" / "rank0" / "parameter_layouts.json").read_text())
    averaged = [n for n in layouts if n.startswith(EMA)]
    assert averaged and all(n[len(EMA):] in layouts for n in averaged)
    assert all((layouts[n]["slice_shape"], layouts[n]["opt_shard_group"]) ==
               (layouts[n[len(EMA):]]["slice_shape"], layouts[n[len(EMA):]]["opt_shard_group"]) for n in averaged)
    assert sum(bool(layouts[n]["opt_shard_group"]) for n in averaged) > len(averaged) // 2
    config = BagelConfig.preset("tiny")
    batch = registry.get("bagel").synthetic_batch(config, 1, 64)
    S, n_vit = batch["token_budget"], batch["vit_pixels"].shape[0]
    assert f"attention_mask [2, 1, {S}, {S}]" in log0, log0      # the global micro batch: 2 ranks' sequences
    graph = max((tmp_path / "ir").rglob("graph_build_*.ir"), key=lambda f: f.stat().st_size).read_text()
    llm = (1, config.llm.num_attention_heads, S, S)
    vit = (1, config.vit.num_attention_heads, n_vit, n_vit)
    scores = {tuple(int(d) for d in m.split(",")) for m in
              re.findall(r"= PrimFunc_BatchMatMul\(.*\n.*-> \(<Tensor\[\w+\], \(([\d, ]+)\)>\)", graph)}
    assert llm in scores and vit in scores, scores
    # every batch matmul (the VAE's attention too) runs on this rank's one sequence, none on both ranks' rows
    assert all(sh[0] == 1 and 2 * S not in sh and (sh[1] != config.vit.num_attention_heads or 2 * n_vit not in sh)
               for sh in scores), scores
    # FSDP (--use-torch-fsdp2) is ZeRO-3: each weight gathered over dp for the forward is gathered again
    # for the backward instead of being kept (MindSpore's optimizer level3)
    passes = sorted((tmp_path / "ir").rglob("[0-9][0-9]_optimize_*.ir"))     # the frontend's optimized graph
    assert passes
    gathers = re.findall(r"instance name: (parallel_optimizer_allgather\w*)", passes[0].read_text())
    assert "parallel_optimizer_allgather" in gathers and "parallel_optimizer_allgather_not_recompute" not in gathers
    # the packed rows stay on their rank: collectives carry parameters / gradients and scalars only
    params = {tuple(p.shape) for p in BagelForTraining(config).get_parameters()}
    moved = collectives(tmp_path / "ir")
    assert moved
    for op, src, dst, scope in moved:   # a parameter, its shard over the 2 ranks, or a scalar
        assert any(len(sh) == 0 or sh in params or (sh[0] * 2,) + sh[1:] in params for sh in (src, dst)), \
            (op, src, dst, scope)
    # each rank's ZeRO-3 blocks are MindSpore's cut of the converter's checkpoint, and save -> load is bit-exact
    from adapters.bagel import SPEC
    from convert.framework import make_layout

    check_rank_blocks(tmp_path / "msrun_log" / "dryrun", 2, 1, "bagel", config, make_layout(SPEC, config),
                      tmp_path / "ck", ParallelConfig(world_size=2), ema=True)


def test_bagel_fsdp2_with_full_recompute_compiles(fake_cann_root, tmp_path, monkeypatch):
    """ZeRO-3 (``--use-torch-fsdp2``) with full recompute: the trainer switches off MindSpore 2.9's AddRmsNorm
    fusion (it made a graph cycle of BAGEL-7B at 11520 rows) and the step compiles, the layers recomputed."""
    _point_at_fake_cann(fake_cann_root, tmp_path, monkeypatch)
    rc, out = _dry_run(tmp_path, {"model_id": "bagel", "preset": "tiny"}, 2, "--global-batch-size", "2",
                       "--use-torch-fsdp2", "--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1")
    assert rc == 0 and "rank 0 (pipeline stage 0): ok" in out, out
    log0 = (tmp_path / "msrun_log" / "dryrun" / "rank0" / "train.log").read_text()
    assert "recomputing" in log0 and "graph_kernel_flags '--disable_pass=add_rms_norm_fusion'" in log0, log0


def test_more_micro_batches_do_not_keep_more_activations(fake_cann_root, tmp_path, monkeypatch):
    """pp = 1 with gradient accumulation: the micro batches of a step are tagged for MindSpore's
    gradient-accumulation pass, which runs each one's forward and backward before the next, so a second
    micro batch adds little to the predicted peak (Qwen2.5-VL tiny at 4096 tokens, dp 2, the distributed
    optimizer: 1297 MB at one micro batch, 1434 MB at two; untagged, the differentiated sum kept both micro
    batches' activations: 2042 MB; at 3B with 6 layers, 8.7 -> 14.4 GB from 2 to 4 micro batches untagged,
    10.1 -> 10.1 GB tagged)."""
    _point_at_fake_cann(fake_cann_root, tmp_path, monkeypatch)
    peaks = []
    for gbs in (2, 4):
        root = tmp_path / f"gbs{gbs}"
        root.mkdir()
        rc, out = _dry_run(root, {"model_id": "qwen2_5vl", "preset": "tiny"}, 2, "--global-batch-size", str(gbs),
                           "--seq-length", "4096", "--use-distributed-optimizer")
        assert rc == 0 and "rank 0 (pipeline stage 0): ok" in out, out
        used, _ = parse_peak_memory((root / "msrun_log" / "dryrun" / "rank0" / "train.log").read_text())
        assert used is not None, out
        peaks.append(used)
    one, two = peaks
    assert two < 1.25 * one, peaks
