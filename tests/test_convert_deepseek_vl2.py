"""DeepSeek-VL2 through `mm-convert DeepSeekVLConverter`: the guide's command, expert parallelism
(expert i on EP rank i // (E/ep), renumbered), TP x PP x EP bit-exact round trips of both fixture
checkpoints (MLA and MHA), resplit, `trust_remote_code`, and the tiny-model builder.

Expected shard contents are computed here from the HF files with the `safetensors` package and
plain numpy slicing, not with the converter's own code.
"""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURE_ROOT
from convert import hf_to_mm as _hf_to_mm, mm_to_hf as _mm_to_hf, resplit

# The checkpoints here are in the official custom-code layout (model_type deepseek_vl_v2): the Python
# API, like the CLI, converts them only when told to trust them (nothing is executed either way).
def hf_to_mm(*args, **kwargs):
    return _hf_to_mm(*args, trust_remote_code=True, **kwargs)


def mm_to_hf(*args, **kwargs):
    return _mm_to_hf(*args, trust_remote_code=True, **kwargs)

from convert.cli import main

REPO = Path(__file__).resolve().parents[1]
MLA = FIXTURE_ROOT / "deepseek_vl2" / "forward" / "hf"
MHA = FIXTURE_ROOT / "deepseek_vl2" / "forward_mha" / "hf"
E = 4  # routed experts in both fixtures (layer 1 is the only MoE layer)
FC1 = "text_decoder.decoder.layers.1.mlp.experts.linear_fc1.weight"   # stacked [E, 2I, H]
FC2 = "text_decoder.decoder.layers.1.mlp.experts.linear_fc2.weight"   # stacked [E, H, I]
HF_EXPERT = "language.model.layers.1.mlp.experts.{e}.{p}_proj.weight"


def cli(*args):
    return main([str(a) for a in args])


def shard(d, name):
    return load_file(str(Path(d) / "release" / name / "model.safetensors"))


def same_files(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x)


CASES = [(hf, ep, tp, pp) for hf, (ep, tp, pp) in itertools.product(
    (MLA, MHA), itertools.product((1, 2, 4), (1, 2), (1, 2)))]


@pytest.mark.parametrize("hf,ep,tp,pp", CASES,
                         ids=[f"{h.parent.name}-ep{e}-tp{t}-pp{p}" for h, e, t, p in CASES])
def test_round_trip_is_bit_exact(tmp_path, hf, ep, tp, pp):
    pp_layers = {"llm": [1, 1], "vit": [1, 1]} if pp == 2 else None
    mm = hf_to_mm(hf, tmp_path / "mm", "deepseek_vl2", tp, pp_layers, ep_size=ep).parent
    dirs = sorted(p.name for p in (mm / "release").iterdir() if p.is_dir())
    want = sorted("mp_rank_%02d" % t + ("_%03d" % s if pp > 1 else "") + ("_%03d" % e if ep > 1 else "")
                  for t in range(tp) for s in range(pp) for e in range(ep))
    assert dirs == want
    out = mm_to_hf(mm, hf, tmp_path / "back", "deepseek_vl2", tp, pp_layers, ep_size=ep)
    assert same_files(out / "model.safetensors", hf / "model.safetensors")
    assert json.loads((out / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


SHAPES = REPO / "tests" / "fixtures" / "deepseek_vl2_shapes"
# (case, routed experts, tp size the heads allow): q_lora (linear_qb / q_layernorm), noaux_tc (router.expert_bias), GQA MHA,
# MoE every second layer with 5 experts
SHAPE_CASES = [("lm_qlora_group_limited", 6, 1), ("lm_sigmoid_noaux_tc", 8, 1), ("lm_mha_gqa_sigmoid", 6, 2),
               ("lm_top1_layer_freq2", 5, 1)]


@pytest.mark.parametrize("case,experts,tp", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_decoder_variants_round_trip(tmp_path, case, experts, tp):
    hf = SHAPES / case / "hf"
    layers = json.loads((hf / "config.json").read_text())["language_config"]["num_hidden_layers"]
    for ep in sorted({experts, min(d for d in range(2, experts + 1) if experts % d == 0)}):
        mm = hf_to_mm(hf, tmp_path / f"mm{ep}", "deepseek_vl2", tp, {"llm": [1, layers - 1], "vit": [1, 0]},
                      ep_size=ep).parent
        last = shard(mm, f"mp_rank_00_001_{ep - 1:03d}")
        stacked = [k for k in last if k.endswith("mlp.experts.linear_fc1.weight")]
        assert len(stacked) == sum(1 for k in last if k.endswith("mlp.router.weight")) > 0
        assert {last[k].shape[0] for k in stacked} == {experts // ep}   # whole experts per EP rank
        out = mm_to_hf(mm, hf, tmp_path / f"back{ep}", "deepseek_vl2")
        assert same_files(out / "model.safetensors", hf / "model.safetensors")
    bad = next(d for d in range(2, 9) if experts % d)
    with pytest.raises(ValueError, match=f"ep_size {bad} does not divide the number of routed experts {experts}"):
        hf_to_mm(hf, tmp_path / "bad", "deepseek_vl2", ep_size=bad)


def test_expert_and_tensor_parallel_shard_contents(tmp_path):
    ref = load_file(str(MLA / "model.safetensors"))
    hf_to_mm(MLA, tmp_path / "mm", "deepseek_vl2", 2, {"llm": [1, 1], "vit": [2, 0]}, ep_size=2)
    per = E // 2
    for ep_rank, tp_rank in itertools.product(range(2), range(2)):
        last = shard(tmp_path / "mm", f"mp_rank_{tp_rank:02d}_001_{ep_rank:03d}")  # stage 1: MoE layer 1 → local 0
        fc1, fc2 = (last[n.replace("layers.1.", "layers.0.")] for n in (FC1, FC2))
        assert fc1.shape[0] == fc2.shape[0] == per
        for local in range(per):
            e = ep_rank * per + local  # MindSpeed-MM: contiguous blocks of E/ep experts per EP rank
            g, u = ref[HF_EXPERT.format(e=e, p="gate")], ref[HF_EXPERT.format(e=e, p="up")]
            rows = g.shape[0] // 2
            mine = slice(tp_rank * rows, (tp_rank + 1) * rows)
            np.testing.assert_array_equal(fc1[local], np.concatenate([g[mine], u[mine]]))  # gate/up split per TP rank
            down = ref[HF_EXPERT.format(e=e, p="down")]
            cols = down.shape[1] // 2
            np.testing.assert_array_equal(fc2[local], down[:, tp_rank * cols:(tp_rank + 1) * cols])
        # non-expert tensors are on every EP rank: router replicated, lm_head split on vocab rows
        np.testing.assert_array_equal(last["text_decoder.decoder.layers.0.mlp.router.weight"],
                                      ref["language.model.layers.1.mlp.gate.weight"])
        vocab = ref["language.lm_head.weight"]
        np.testing.assert_array_equal(last["text_decoder.output_layer.weight"],
                                      np.split(vocab, 2)[tp_rank])
        first = shard(tmp_path / "mm", f"mp_rank_{tp_rank:02d}_000_{ep_rank:03d}")
        assert not any(".experts." in k for k in first)  # layer 0 is dense
        # MLA: q_proj and kv_a_proj_with_mqa stacked row-wise, replicated over TP
        np.testing.assert_array_equal(
            first["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"],
            np.concatenate([ref["language.model.layers.0.self_attn.q_proj.weight"],
                            ref["language.model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]]))
        np.testing.assert_array_equal(first["image_encoder.encoder.blocks.1.attn.qkv.weight"],
                                      ref["vision.blocks.1.attn.qkv.weight"])
        assert "image_newline" in first and "image_newline" not in last  # vit_pp_layers [2, 0]
    layout = json.loads((tmp_path / "mm/release/parallel_layout.json").read_text())
    assert (layout["ep_size"], layout["num_experts"], layout["tp_size"]) == (2, E, 2)


def test_guide_command_and_trust_remote_code(tmp_path, capsys):
    guide = ["DeepSeekVLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "pretrained/DeepSeekVl2",
             "--cfg.hf_config.hf_dir", MLA, "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
             "--cfg.parallel_config.vit_pp_layers", "[[2,0]]", "--cfg.parallel_config.ep_size", "4",
             "--cfg.parallel_config.tp_size", "1"]
    # without --cfg.trust_remote_code True the custom model type is refused (MindSpeed-MM's default)
    assert cli(*guide) == 2
    err = capsys.readouterr().err
    assert "'deepseek_vl_v2'" in err and "--cfg.trust_remote_code True" in err and "config.json" in err
    assert not (tmp_path / "pretrained").exists()
    assert cli(*guide, "--cfg.trust_remote_code", "False") == 2
    capsys.readouterr()
    # the guide's spelling, through the real entry point
    r = subprocess.run([sys.executable, "-m", "convert.cli"] + [str(a) for a in guide]
                       + ["--cfg.trust_remote_code", "True"],
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mm = tmp_path / "pretrained/DeepSeekVl2"
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (mm / "release/mp_rank_00_001_003/model.safetensors").is_file()
    assert cli("DeepSeekVLConverter", "mm_to_hf", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", MLA,
               "--cfg.save_hf_dir", tmp_path / "back") == 2  # mm_to_hf reads the same config.json
    assert "--cfg.trust_remote_code True" in capsys.readouterr().err
    assert cli("DeepSeekVLConverter", "mm_to_hf", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", MLA,
               "--cfg.save_hf_dir", tmp_path / "back", "--cfg.parallel_config.ep_size", "4",
               "--cfg.trust_remote_code", "True") == 0
    assert same_files(tmp_path / "back/model.safetensors", MLA / "model.safetensors")
    assert cli("DeepSeekVLConverter", "mm_to_hf", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", MLA,
               "--cfg.save_hf_dir", tmp_path / "b2", "--cfg.parallel_config.ep_size", "2",
               "--cfg.trust_remote_code", "True") == 1
    assert "ep_size 2 does not match ep_size 4" in capsys.readouterr().err
    assert cli("--help") == 0
    out = capsys.readouterr().out
    assert "trust_remote_code" in out and "DeepSeekVLConverter" in out and "ep_size" in out


@pytest.mark.parametrize("ep", [3, 8])
def test_ep_size_must_divide_the_experts(tmp_path, capsys, ep):
    assert cli("DeepSeekVLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", MLA,
               "--cfg.parallel_config.ep_size", ep, "--cfg.trust_remote_code", "True") == 1
    assert f"ep_size {ep} does not divide the number of routed experts 4" in capsys.readouterr().err
    assert not (tmp_path / "mm").exists()
    assert cli("DeepSeekVLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", MLA,
               "--cfg.parallel_config.ep_size", 0, "--cfg.trust_remote_code", "True") == 2
    assert "ep_size must be >= 1" in capsys.readouterr().err


def test_tp_and_pp_errors_name_the_numbers(tmp_path, capsys):
    base = ["DeepSeekVLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", MLA,
            "--cfg.trust_remote_code", "True"]
    assert cli(*base, "--cfg.parallel_config.tp_size", 3) == 1
    assert "tp_size 3 does not divide the LLM attention heads (num_attention_heads) = 4" in capsys.readouterr().err
    assert cli(*base, "--cfg.parallel_config.llm_pp_layers", "[[13,17]]",
               "--cfg.parallel_config.vit_pp_layers", "[[27,0]]") == 1
    err = capsys.readouterr().err
    assert "sums to 30" in err or "sums to 27" in err
    assert not (tmp_path / "mm").exists()


def test_resplit_across_ep_tp_pp(tmp_path):
    src = hf_to_mm(MLA, tmp_path / "a", "deepseek_vl2", 2, {"llm": [1, 1], "vit": [1, 1]}, ep_size=2).parent
    mid = resplit(src, tmp_path / "b", tp_size=1, ep_size=4).parent
    assert sorted(p.name for p in (mid / "release").iterdir() if p.is_dir()) == \
        [f"mp_rank_00_{e:03d}" for e in range(4)]
    ref = load_file(str(MLA / "model.safetensors"))
    np.testing.assert_array_equal(shard(mid, "mp_rank_00_003")[FC1],
                                  np.concatenate([ref[HF_EXPERT.format(e=3, p="gate")],
                                                  ref[HF_EXPERT.format(e=3, p="up")]])[None])
    back = resplit(mid, tmp_path / "c", tp_size=2, pp_layers={"llm": [2, 0], "vit": [1, 1]}, ep_size=1).parent
    assert cli("DeepSeekVLConverter", "resplit", "--cfg.source_dir", mid, "--cfg.target_dir", tmp_path / "d",
               "--cfg.source_parallel_config.ep_size", 4, "--cfg.target_parallel_config.ep_size", 3) == 1
    out = mm_to_hf(back, MLA, tmp_path / "hf", "deepseek_vl2")
    assert same_files(out / "model.safetensors", MLA / "model.safetensors")


@pytest.mark.parametrize("mha", [False, True])
def test_tiny_builder(tmp_path, mha):
    """MLA with the bundled tokenizer (ms_mm/models/deepseek_vl2/assets); MHA with the fixture's
    tokenizer passed as --assets."""
    d = tmp_path / "tiny"
    assets = MLA if mha else REPO / "ms_mm/models/deepseek_vl2/assets"
    args = ["deepseek_vl2", "--out", str(d), "--seed", "5"] + (["--mha", "--assets", str(MLA)] if mha else [])
    if mha:  # in process
        from convert.tiny import main as tiny_main
        assert tiny_main(args) == 0
    else:  # as a user types it
        r = subprocess.run([sys.executable, "-m", "convert.tiny"] + args, cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_vl_v2" and cfg["architectures"] == ["DeepseekVLV2ForCausalLM"]
    assert {"vision_config", "projector_config", "language_config"} <= set(cfg)
    lang, vis, proj = cfg["language_config"], cfg["vision_config"], cfg["projector_config"]
    assert lang["use_mla"] is (not mha) and lang["n_routed_experts"] >= 8 and lang["num_hidden_layers"] >= 3
    assert proj["input_dim"] == vis["width"] and proj["n_embed"] == lang["hidden_size"]
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
    assert len(tok) <= lang["vocab_size"] and lang["vocab_size"] % 64 == 0
    assert tok.convert_tokens_to_ids(tok.bos_token) == lang["bos_token_id"]
    assert tok.convert_tokens_to_ids(tok.eos_token) == lang["eos_token_id"]
    assert tok.convert_tokens_to_ids(tok.pad_token) == lang["pad_token_id"]
    assert tok.convert_tokens_to_ids("<image>") < lang["vocab_size"]
    if (assets / "special_ids.json").is_file():
        ids = json.loads((d / "special_ids.json").read_text())
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == \
            (lang["bos_token_id"], lang["eos_token_id"], lang["pad_token_id"])
    proc = json.loads((d / "processor_config.json").read_text())
    assert proc == json.loads((assets / "processor_config.json").read_text())  # the model tiles as the processor
    assert proc["candidate_resolutions"] == cfg["candidate_resolutions"]
    assert (proc["patch_size"], proc["downsample_ratio"]) == (vis["patch_size"], proj["downsample_ratio"])
    assert all(w % vis["image_size"] == 0 for res in proc["candidate_resolutions"] for w in res)
    w = load_file(str(d / "model.safetensors"))
    assert all(k.startswith(("vision.", "projector.layers.", "language.")) or k in ("image_newline", "view_seperator")
               for k in w)
    h = lang["hidden_size"]
    names = (["language.model.layers.0.self_attn.q_proj.weight", "language.model.layers.0.self_attn.k_proj.weight"]
             if mha else ["language.model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                          "language.model.layers.0.self_attn.kv_b_proj.weight"])
    assert all(n in w for n in names)
    assert w["language.model.layers.2.mlp.experts.7.up_proj.weight"].shape == (lang["moe_intermediate_size"], h)
    q = w["language.model.layers.1.mlp.experts.3.gate_proj.weight"]
    assert abs(q.std() * np.sqrt(q.shape[1]) - 1) < 0.15  # N(0, 1/fan_in)
    assert np.all(w["language.model.norm.weight"] == 1) and np.all(w["vision.blocks.0.attn.qkv.bias"] == 0)
    assert w["vision.pos_embed"].shape == (1, (vis["image_size"] // vis["patch_size"]) ** 2, vis["width"])
    assert np.isfinite(w["image_newline"]).all() and w["image_newline"].std() > 0
    from convert.tiny import build_tiny
    build_tiny("deepseek_vl2", tmp_path / "again", seed=5, assets=assets, mla=not mha)  # deterministic in the seed
    assert (tmp_path / "again/model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    # convertible as the guide does it, with every expert split of its 8 experts
    assert cli("DeepSeekVLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", d,
               "--cfg.parallel_config.llm_pp_layers", "[[1,2]]", "--cfg.parallel_config.vit_pp_layers", "[[2,0]]",
               "--cfg.parallel_config.ep_size", 8, "--cfg.parallel_config.tp_size", 2,
               "--cfg.trust_remote_code", "True") == 0
    assert cli("DeepSeekVLConverter", "mm_to_hf", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", d,
               "--cfg.save_hf_dir", tmp_path / "back", "--cfg.trust_remote_code", "True") == 0
    assert same_files(tmp_path / "back/model.safetensors", d / "model.safetensors")


def test_tiny_builder_needs_tokenizer_assets(tmp_path, capsys):
    from convert.tiny import main as tiny_main
    assert tiny_main(["deepseek_vl2", "--out", str(tmp_path / "t"), "--assets", str(tmp_path / "none")]) == 1
    assert "tokenizer.json not found" in capsys.readouterr().err


def test_bf16_sharded_checkpoint_round_trip(tmp_path):
    """A bf16 checkpoint in several HF files (index.json) → ep 2 x tp 2 x pp 2 → sharded HF again."""
    from convert.tiny import write_random_hf
    from ms_mm.models.deepseek_vl2.tiny import deepseek_vl2_tiny_config
    cfg = deepseek_vl2_tiny_config(448, 400, 401, 402)
    hf = write_random_hf(tmp_path / "hf", cfg, "deepseek_vl2", seed=1, dtype="bfloat16", max_shard_bytes=400_000)
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(files) > 2 and (hf / "model.safetensors.index.json").is_file()
    mm = hf_to_mm(hf, tmp_path / "mm", "deepseek_vl2", 2, {"llm": [2, 1], "vit": [1, 1]}, ep_size=2).parent
    out = mm_to_hf(mm, hf, tmp_path / "back", "deepseek_vl2", max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    want = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(want)
    # numpy cannot hold bf16, so compare raw bytes: header entries from the files themselves
    from ms_mm.training.mm_checkpoint import SafetensorsFile
    src = {n: SafetensorsFile(hf / f) for n, f in want.items()}
    dst = {n: SafetensorsFile(out / f) for n, f in index.items()}
    for name in want:
        assert src[name].get(name).tobytes() == dst[name].get(name).tobytes(), name


def test_tiny_model_loads_into_the_mindspore_model(tmp_path):
    """Names and shapes of the tiny checkpoint, through the converter, fit DeepseekVL2ForCausalLM."""
    from convert import load_hf_as_mm
    from convert.tiny import build_tiny
    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.deepseek_vl2 import DeepseekVL2ForCausalLM
    for mla in (True, False):
        d = build_tiny("deepseek_vl2", tmp_path / f"tiny{mla}", seed=0, mla=mla)
        config, state = load_hf_as_mm(d, "deepseek_vl2")
        load_state_dict(DeepseekVL2ForCausalLM(config), state)  # strict: every parameter, no leftovers


def test_expert_parallel_conversion_streams(tmp_path):
    """~300 MB of experts → MM with ep=4, tp=2, pp=2: peak RSS growth stays near two of the largest
    tensor (its parts, then it stacked), far below the checkpoint."""
    import textwrap
    from convert.tiny import write_random_hf
    from ms_mm.models.deepseek_vl2.tiny import deepseek_vl2_tiny_config
    cfg = deepseek_vl2_tiny_config(8192, 1, 2, 3)
    cfg["language_config"].update(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                  n_routed_experts=32, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                  v_head_dim=64)
    cfg["projector_config"]["n_embed"] = 512
    write_random_hf(tmp_path / "hf", cfg, "deepseek_vl2", fill="fast", max_shard_bytes=100 * 2 ** 20)
    size = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    assert size > 250 * 2 ** 20
    conv = textwrap.dedent(f"""
        import json, pathlib
        import convert.framework
        convert.framework.get_spec("deepseek_vl2")  # imports first

        def status(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: ru_maxrss is inherited over exec
        base = status("VmRSS")
        convert.framework.hf_to_mm("{tmp_path}/hf", "{tmp_path}/mm", "deepseek_vl2", 2,
                                   {{"llm": [2, 2], "vit": [2, 0]}}, ep_size=4, trust_remote_code=True)
        peak = status("VmHWM")
        print(json.dumps({{"base_kb": base, "peak_kb": peak}}))
        assert sum(1 for _ in pathlib.Path("{tmp_path}/mm/release").rglob("*.safetensors")) == 16
    """)
    r = subprocess.run([sys.executable, "-c", conv], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (m["peak_kb"] - m["base_kb"]) * 1024
    largest = 32 * 2 * 512 * 512 * 4  # one layer's stacked expert fc1 [32, 1024, 512], 64 MiB
    # its HF parts + the stacked tensor (+ one rank piece), against ~5.5 such tensors in the checkpoint
    assert growth < 2.5 * largest and largest < size / 5, (growth / 2 ** 20, size / 2 ** 20)


def test_python_api_also_defaults_to_not_trusting_custom_code(tmp_path):
    """Without trust_remote_code the Python API refuses the custom model type before writing anything."""
    from convert.framework import RemoteCodeNotTrusted

    with pytest.raises(RemoteCodeNotTrusted, match="deepseek_vl_v2"):
        _hf_to_mm(MLA, tmp_path / "mm", "deepseek_vl2")
    assert not (tmp_path / "mm").exists()
    with pytest.raises(RemoteCodeNotTrusted, match="deepseek_vl_v2"):
        _mm_to_hf(tmp_path / "mm", MLA, tmp_path / "back", "deepseek_vl2")
    assert not (tmp_path / "back").exists()
