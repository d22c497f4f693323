"""`DRY_RUN=1` runs the trainer itself (pretrain_vlm.py) on simulated Ascend ranks: Qwen2.5-VL tiny with
TP 2 x PP 2 x DP 2 on 8 ranks and the distributed optimizer, the first rank of each pipeline stage, two
iterations each, with a user's `GLOG_v=3` (the memory figures are log lines that level would hide)."""
import json
from pathlib import Path

from dryrun_support import fake_cann_root  # noqa: F401  (session fixture: builds the stub CANN tree)
from ms_mm.training import launch


def test_dry_run_of_the_trainer_tp2_pp2_dp2(fake_cann_root, tmp_path, monkeypatch, capsys):
    if fake_cann_root.parent.name != "fake-cann":      # built in a temp dir: point the launcher at it
        monkeypatch.setenv("MS_MM_CACHE", str(tmp_path / "cache"))
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "fake-cann").symlink_to(fake_cann_root.parent)
    (tmp_path / "model.json").write_text(json.dumps({"model_id": "qwen2_5vl", "preset": "tiny"}))
    (tmp_path / "data.json").write_text("{}")        # no data here: the family's synthetic batch
    monkeypatch.chdir(tmp_path)
    for key, value in {"DRY_RUN": "1", "DRY_RUN_PARALLEL": "2", "GLOG_v": "3"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DRY_RUN_RANKS", raising=False)
    rc = launch.main(["--worker_num", "8", "--local_worker_num", "8", "--log_dir", "msrun_log", "--",
                      "--mm-model", "model.json", "--mm-data", "data.json", "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "4",
                      "--seq-length", "64", "--use-distributed-optimizer", "--save", "save_dir",
                      "--save-interval", "1", "--train-iters", "100"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert [line.split(":")[0] for line in lines] == ["rank 0 (pipeline stage 0)", "rank 4 (pipeline stage 1)"], out
    for line in lines:
        assert "ok, predicted peak device memory" in line and "of 64 GB: fits" in line, line
    assert not (tmp_path / "save_dir").exists()       # a dry run writes no checkpoint
    work = tmp_path / "msrun_log" / "dryrun"
    log0 = (work / "rank0" / "train.log").read_text()
    assert "sharding plan of qwen2_5_vl applied: semi-auto parallel, dp 2 x tp 2 x pp 2 (ep 1), 2 micro batch(es) " \
           "of 2 rows per step, optimizer states sharded over dp" in log0
    assert "iteration        2/       2" in log0 and "synthetic batches of 2 samples x 64 tokens" in log0
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
