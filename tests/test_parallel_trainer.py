"""The trainer's parallel path without devices: sizes refused up front in one line, the CPU refusal,
the recompute flags, and the micro-batch arithmetic (the compiled path: tests/test_dryrun_trainer.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from ms_mm import registry
from ms_mm.parallel.config import ParallelConfig
from ms_mm.parallel.training import apply_recompute, micro_batches_per_step, run_parallel_config
from ms_mm.training.arguments import ArgumentError, parse_args
from ms_mm.training.trainer import parallel_run_config, train

QWEN_TINY = {"model_id": "qwen2_5vl", "preset": "tiny"}       # 2 LLM layers, 2 KV heads, 2 vision heads
DSV2_TINY = {"model_id": "deepseekvl2", "preset": "tiny"}     # 4 routed experts
SEVEN_B_BAD_SPLIT = json.loads((Path(__file__).resolve().parents[1] / "examples" / "mindspore" / "qwen2.5vl"
                                / "model_7b.json").read_text())
SEVEN_B_BAD_SPLIT["text_decoder"]["pipeline_num_layers"] = [1, 10, 10, 7]   # 28 layers, 4 stages


def _check(model_json, world, *flags):
    args = parse_args(["--mm-model", "m.json", "--mm-data", "d.json", *flags])
    args.validate(world, "Ascend")
    family = registry.get(model_json["model_id"])
    config = family.config_from_json(model_json)
    return parallel_run_config(family, config, args, model_json, world, "m.json")


def test_sizes_that_fit_give_the_config_and_micro_batches():
    pc, micro = _check(QWEN_TINY, 8, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--global-batch-size", "8")
    assert (pc.dp, pc.tp, pc.pp, micro) == (2, 2, 2, 4)
    assert _check(QWEN_TINY, 8) is None                                   # pure data parallel: today's path
    pc, micro = _check(QWEN_TINY, 8, "--use-distributed-optimizer")       # optimizer parallel alone
    assert (pc.dp, micro) == (8, 1)
    pc, _ = _check(DSV2_TINY, 8, "--expert-model-parallel-size", "2")
    assert (pc.dp, pc.ep) == (8, 2)


@pytest.mark.parametrize("model_json, world, flags, message", [
    (QWEN_TINY, 8, ["--tensor-model-parallel-size", "4"],
     "tp=4 does not divide text.num_key_value_heads=2 (text_decoder.decoder.layers.*.self_attention.linear_qkv"
     ".weight has shape [128, 64]"),
    (SEVEN_B_BAD_SPLIT, 8, ["--pipeline-model-parallel-size", "2"],
     "llm_pp_layers=[1, 10, 10, 7] has 4 stage(s) but pp=2"),
    (DSV2_TINY, 8, ["--expert-model-parallel-size", "8"],
     "ep=8 does not divide language_config.n_routed_experts=4"),
    (QWEN_TINY, 8, ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8", "--micro-batch-size", "2"],
     "--global-batch-size 8 gives 1 micro batch(es) of 2 x dp 4 per step, fewer than pp=2 pipeline stages"),
])
def test_sizes_that_do_not_divide_are_one_line(model_json, world, flags, message):
    with pytest.raises(ArgumentError) as e:
        _check(model_json, world, *flags)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_world_and_global_batch_mismatch_named_before_anything_starts():
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--tensor-model-parallel-size", "4"])
    with pytest.raises(ArgumentError, match=r"WORLD_SIZE=6 is not divisible by tensor-model-parallel-size \(4\)"):
        args.validate(6, "Ascend")
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--tensor-model-parallel-size", "2",
                       "--global-batch-size", "6"])
    with pytest.raises(ArgumentError, match=r"--global-batch-size 6 is not divisible by --micro-batch-size 1 \* "
                                            r"data-parallel size 4"):
        args.validate(8, "Ascend")
    pc = run_parallel_config(parse_args(["--pipeline-model-parallel-size", "2"]), 4, {})
    args = parse_args(["--global-batch-size", "5"])
    assert micro_batches_per_step(pc, parse_args(["--global-batch-size", "8"])) == 4
    with pytest.raises(ValueError, match="--global-batch-size 5 is not divisible by --micro-batch-size 1 \\* dp 2"):
        micro_batches_per_step(pc, args)


def _launched_args(tmp_path, monkeypatch, world, device, *flags):
    """TrainArgs of tiny Qwen as if msrun had launched `world` workers on `device`."""
    (tmp_path / "m.json").write_text(json.dumps(QWEN_TINY))
    (tmp_path / "d.json").write_text("{}")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)
    monkeypatch.setenv("MS_MM_DEVICE_TARGET", device)
    return parse_args(["--mm-model", str(tmp_path / "m.json"), "--mm-data", str(tmp_path / "d.json"), *flags])


def test_cpu_refuses_the_sharded_path_in_one_line_pointing_to_dry_run(tmp_path, monkeypatch):
    args = _launched_args(tmp_path, monkeypatch, 4, "CPU", "--tensor-model-parallel-size", "2")
    with pytest.raises(ArgumentError) as e:
        train(args)
    assert "need MindSpore semi-auto parallel, which the CPU backend refuses" in str(e.value)
    assert "DRY_RUN=1 bash <script>" in str(e.value) and "\n" not in str(e.value)


def test_recompute_flags_map_to_cell_recompute_of_the_layers():
    family = registry.get("qwen2_5vl")
    config = family.config_from_json(QWEN_TINY)
    args = parse_args(["--recompute-granularity", "full", "--recompute-method", "block",
                       "--recompute-num-layers", "1"])
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "block", 1)
    model = family.build_model(config)
    done = apply_recompute(model, "full", "block", 1)
    assert done == ["image_encoder.encoder.blocks.layers.0", "text_decoder.decoder.layers.0"]
    assert model.text_decoder.decoder.layers[0].recompute is not None
    assert len(apply_recompute(family.build_model(config), "full", "uniform", 1)) == 4
    sel = apply_recompute(family.build_model(config), "selective")
    assert sel[-1] == "text_decoder.decoder.layers.1.self_attention.core_attention"
    with pytest.raises(ValueError, match="--recompute-method block needs --recompute-num-layers"):
        apply_recompute(model, "full", "block", None)
    with pytest.raises(ValueError, match="need --recompute-granularity"):
        apply_recompute(model, None, "uniform", 2)


def test_fsdp_switches_map_to_the_distributed_optimizer_on_ascend(monkeypatch):
    # BAGEL's recipe flag: FSDP2's sharding = MindSpore's optimizer parallel, on Ascend with > 1 card
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--use-torch-fsdp2"])
    args.validate(2, "Ascend")
    assert args.use_distributed_optimizer
    with pytest.raises(ArgumentError, match="--use-torch-fsdp2 .* needs Ascend with more than one card"):
        parse_args(["--mm-model", "m", "--mm-data", "d", "--use-torch-fsdp2"]).validate(1, "Ascend")
    # Lumina's model.json switch, as DRY_RUN=1 plans it for Ascend (on CPU: tests/test_lumina_training.py)
    lumina = registry.get("lumina")
    monkeypatch.setenv("DRY_RUN", "1")
    for fsdp1, sharded in (({}, True), (None, False)):
        model_json = {"model_id": "lumina", "preset": "tiny", **({"fsdp1": fsdp1} if fsdp1 is not None else {})}
        args = parse_args(["--mm-model", "m", "--mm-data", "d"])
        lumina.check_parallel_sizes(lumina.config_from_json(model_json), args)
        assert args.use_distributed_optimizer is sharded
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--tensor-model-parallel-size", "2"])
    with pytest.raises(ValueError, match="does not combine with model parallelism"):
        lumina.check_parallel_sizes(lumina.config_from_json({"model_id": "lumina", "preset": "tiny", "fsdp1": {}}), args)


def test_a_family_without_a_plan_shards_only_the_optimizer():
    pc, micro = _check({"model_id": "lumina", "preset": "tiny"}, 4, "--use-distributed-optimizer")
    assert (pc.dp, pc.tp, micro) == (4, 1, 1)
    with pytest.raises(ValueError, match="the lumina_mgpt2 family has no tensor / pipeline / expert parallel plan: "
                                         "tp 2, pp 1"):
        _check({"model_id": "lumina", "preset": "tiny"}, 4, "--tensor-model-parallel-size", "2")


def test_the_sharded_step_computes_what_the_plain_step_does_ema_included():
    """The sharded train step's Cell (three micro batches summed inside the graph: without a parallel
    context MindSpore's gradient-accumulation pass does not run, so this is the plain sum; clipping, the
    update and the weights' EMA kept inside the step), run here on one CPU process, gives the
    losses, weights and EMA of ``TrainStep`` + ``WeightEMA`` on the same micro batches (fp32 noise); its EMA
    covers the trainable weights only."""
    import mindspore as ms
    from mindspore import nn, ops

    from ms_mm.parallel.training import ParallelTrainStep
    from ms_mm.training.ema import WeightEMA
    from ms_mm.training.optimizer import FusedAdamW
    from ms_mm.training.train_step import TrainStep

    class Tiny(nn.Cell):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.w = ms.Parameter(ms.Tensor(rng.standard_normal((4, 3)).astype(np.float32)), name="w")
            self.b = ms.Parameter(ms.Tensor(rng.standard_normal(3).astype(np.float32)), name="b")
            self.frozen = ms.Parameter(ms.Tensor(np.full(3, 2.0, np.float32)), name="frozen", requires_grad=False)

        def construct(self, x, y):
            out = ops.matmul(x, self.w) + self.b * self.frozen
            return (ops.reduce_mean((out - y) ** 2),)

    rng = np.random.default_rng(1)
    steps = [[(rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32))
              for _ in range(3)] for _ in range(3)]
    results = []
    for sharded in (True, False):
        model = Tiny()
        optimizer = FusedAdamW([model.w, model.b], learning_rate=0.1, weight_decay=0.01)
        if sharded:
            step = ParallelTrainStep(model, optimizer, ParallelConfig(world_size=1), 3, clip_grad=0.5,
                                     input_names=("x", "y"), ema_decay=0.9)
            ema = None
        else:
            step = TrainStep(model, optimizer, accum_steps=3, clip_grad=0.5)
            ema = WeightEMA(model, 0.9)
        losses = []
        for mbs in steps:
            losses.append(step([tuple(ms.Tensor(a) for a in mb) for mb in mbs])[0])
            if ema is not None:
                ema.update()
        averages = ({p.name[len("ema."):]: p.asnumpy() for p in step.ema_parameters} if sharded else
                    {n: a for n, a in ema.state().items() if n != "frozen"})
        results.append((losses, {p.name: p.asnumpy() for p in model.get_parameters()}, averages))
    (l1, w1, e1), (l2, w2, e2) = results
    assert sorted(e1) == sorted(e2) == ["b", "w"]
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for n in w2:
        np.testing.assert_allclose(w1[n], w2[n], rtol=1e-6, atol=1e-7, err_msg=n)
    for n in e2:
        np.testing.assert_allclose(e1[n], e2[n], rtol=1e-6, atol=1e-7, err_msg=n)
        assert not np.allclose(e1[n], w1[n])      # a real average, not the weights


def test_every_ranks_whole_data_position_is_gathered():
    """Per-rank positions with more than integers (a packing buffer, a list of cursors) come back whole,
    each rank's own: two ranks in threads, the all-gather a rendezvous of their rows."""
    import threading

    import numpy as np

    from ms_mm.training.trainer import _gather_data_states

    states = [{"rank": 0, "cursor": 3, "buffer": [[1, 2], [3]], "note": "é"},
              {"rank": 1, "cursor": 7, "buffer": [], "groups": {"t2i": [4, 5]}}]
    rows, results = {}, {}
    barrier = threading.Barrier(2)

    def make_all_gather(rank):
        calls = [0]

        def all_gather(local):
            key = calls[0]
            calls[0] += 1
            rows[(key, rank)] = local
            barrier.wait()
            out = np.concatenate([rows[(key, r)] for r in range(2)])
            barrier.wait()
            return out
        return all_gather

    def run(rank):
        results[rank] = _gather_data_states(states[rank], 2, all_gather=make_all_gather(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0] == results[1] == {"per_rank": states}




def test_zero3_with_recompute_switches_off_the_fusion_that_makes_a_graph_cycle():
    """MindSpore 2.9's AddRmsNorm fusion gives a graph cycle under ZeRO-3 with recompute (BAGEL-7B, DryRun);
    the trainer then switches the pass off, after the user's own graph_kernel_flags, and only then."""
    from ms_mm.parallel.context import fusion_flags

    assert fusion_flags(True, True) == "--disable_pass=add_rms_norm_fusion"
    assert fusion_flags(True, True, "--opt_level=1") == "--opt_level=1 --disable_pass=add_rms_norm_fusion"
    assert fusion_flags(True, True, "--disable_pass=add_rms_norm_fusion") is None
    assert fusion_flags(True, False) is None and fusion_flags(False, True) is None
