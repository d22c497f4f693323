"""Converter framework + Qwen2.5-VL spec: names and fused layouts against the contract, checked on
the shared HF fixture; bit-exact HF → MM → HF round trips with TP/PP; clear errors."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import ConversionError, hf_to_mm, load_hf_as_mm, mm_grads_to_hf, mm_to_hf, resplit
from convert.tiny import write_random_hf
from ms_mm.models.qwen2_5_vl.tiny import qwen2_5_vl_tiny_config
from ms_mm.training.mm_checkpoint import BF16, SafetensorsFile, load_model, read_safetensors

from conftest import FIXTURE_ROOT

QWEN = FIXTURE_ROOT / "qwen2_5_vl" / "forward"
HF = QWEN / "hf"

V = "image_encoder.encoder.blocks.layers."
L = "text_decoder.decoder.layers."


# --- independent reference of the Megatron layouts (docs/internals.md), written head by head ---
def ref_vision_qkv(w, heads):
    q, k, v = np.split(w, 3, axis=0)
    d = q.shape[0] // heads
    return np.concatenate([x[h * d:(h + 1) * d] for h in range(heads) for x in (q, k, v)], axis=0)


def ref_llm_qkv(q, k, v, heads, kv_heads):
    d = k.shape[0] // kv_heads
    r = heads // kv_heads
    blocks = []
    for g in range(kv_heads):
        blocks += [q[g * r * d:(g + 1) * r * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return np.concatenate(blocks, axis=0)


def ref_hf_to_mm(hf, nh=4, nkv=2, vheads=2, vdepth=2, layers=2):
    """The contract's name table, spelled out by hand for the fixture config."""
    mm = {"image_encoder.encoder.patch_embed.proj.weight": hf["visual.patch_embed.proj.weight"],
          "image_encoder.projector.layernorm.weight": hf["visual.merger.ln_q.weight"],
          "text_decoder.embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
          "text_decoder.decoder.final_layernorm.weight": hf["model.norm.weight"],
          "text_decoder.output_layer.weight": hf["lm_head.weight"]}
    for wb in ("weight", "bias"):
        mm[f"image_encoder.projector.encoder.linear_fc1.{wb}"] = hf[f"visual.merger.mlp.0.{wb}"]
        mm[f"image_encoder.projector.encoder.linear_fc2.{wb}"] = hf[f"visual.merger.mlp.2.{wb}"]
    for i in range(vdepth):
        b = f"visual.blocks.{i}."
        mm[f"{V}{i}.input_layernorm.weight"] = hf[b + "norm1.weight"]
        mm[f"{V}{i}.pre_mlp_layernorm.weight"] = hf[b + "norm2.weight"]
        for wb in ("weight", "bias"):
            mm[f"{V}{i}.self_attention.linear_qkv.{wb}"] = ref_vision_qkv(hf[b + f"attn.qkv.{wb}"], vheads)
            mm[f"{V}{i}.self_attention.linear_proj.{wb}"] = hf[b + f"attn.proj.{wb}"]
            mm[f"{V}{i}.mlp.linear_fc1.{wb}"] = np.concatenate([hf[b + f"mlp.gate_proj.{wb}"],
                                                                hf[b + f"mlp.up_proj.{wb}"]])
            mm[f"{V}{i}.mlp.linear_fc2.{wb}"] = hf[b + f"mlp.down_proj.{wb}"]
    for i in range(layers):
        b = f"model.layers.{i}."
        mm[f"{L}{i}.input_layernorm.weight"] = hf[b + "input_layernorm.weight"]
        mm[f"{L}{i}.pre_mlp_layernorm.weight"] = hf[b + "post_attention_layernorm.weight"]
        for wb in ("weight", "bias"):
            mm[f"{L}{i}.self_attention.linear_qkv.{wb}"] = ref_llm_qkv(
                *(hf[b + f"self_attn.{p}_proj.{wb}"] for p in "qkv"), nh, nkv)
        mm[f"{L}{i}.self_attention.linear_proj.weight"] = hf[b + "self_attn.o_proj.weight"]
        mm[f"{L}{i}.mlp.linear_fc1.weight"] = np.concatenate([hf[b + "mlp.gate_proj.weight"],
                                                             hf[b + "mlp.up_proj.weight"]])
        mm[f"{L}{i}.mlp.linear_fc2.weight"] = hf[b + "mlp.down_proj.weight"]
    return mm


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def hf_tensors(d):
    d = Path(d)
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(read_safetensors(p))
    return out


# ----------------------------------------------------------------------------------------------

def test_load_hf_as_mm_matches_contract_layout():
    config, mm = load_hf_as_mm(HF, "qwen2_5_vl")
    assert config.text.num_key_value_heads == 2 and config.vision.depth == 2
    assert config.image_token_id == 359 and config.text.mrope_section == [2, 3, 3]
    ref = ref_hf_to_mm(load_file(str(HF / "model.safetensors")))
    assert_same_tensors(mm, ref)


def test_mm_grads_to_hf_gives_back_fixture_grads():
    config, _ = load_hf_as_mm(HF)
    out = np.load(QWEN / "outputs.npz")
    g = {k[len("grad."):]: out[k] for k in out.files if k.startswith("grad.")}
    mm_grads = {
        f"{V}0.self_attention.linear_qkv.weight": ref_vision_qkv(g["visual.blocks.0.attn.qkv.weight"], 2),
        "image_encoder.projector.encoder.linear_fc1.weight": g["visual.merger.mlp.0.weight"],
        "text_decoder.output_layer.weight": g["lm_head.weight"],
    }
    back = mm_grads_to_hf("qwen2_5_vl", config, mm_grads)
    for k in ("visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight", "lm_head.weight"):
        np.testing.assert_array_equal(back[k], g[k])
    # a fused LLM qkv grad splits back into the q/k/v grads the HF model would have
    q = g["model.layers.0.self_attn.q_proj.weight"]
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 32, 64)).astype(np.float32)
    back = mm_grads_to_hf("qwen2_5_vl", config, {f"{L}0.self_attention.linear_qkv.weight": ref_llm_qkv(q, k, v, 4, 2)})
    np.testing.assert_array_equal(back["model.layers.0.self_attn.q_proj.weight"], q)
    np.testing.assert_array_equal(back["model.layers.0.self_attn.v_proj.weight"], v)
    with pytest.raises(ConversionError, match="no_such.weight"):
        mm_grads_to_hf("qwen2_5_vl", config, {"no_such.weight": q})


def test_accepts_4571_key_spelling_and_flat_release_config(tmp_path):
    hf = load_file(str(HF / "model.safetensors"))
    renamed = {}
    for k, v in hf.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    d = tmp_path / "hf"
    d.mkdir()
    save_file(renamed, str(d / "model.safetensors"), {"format": "pt"})
    nested = json.loads((HF / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update(nested["text_config"])
    flat["model_type"] = "qwen2_5_vl"
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    flat["vision_config"] = dict(flat["vision_config"], in_chans=3)
    flat["vision_config"].pop("in_channels")
    (d / "config.json").write_text(json.dumps(flat))
    config, mm = load_hf_as_mm(d)
    config0, mm0 = load_hf_as_mm(HF)
    assert config.to_dict() == config0.to_dict()
    assert_same_tensors(mm, mm0)


@pytest.mark.parametrize("tp,llm,vit", [(1, None, None), (2, [[1, 1]], [[2, 0]]), (2, [0, 2], [1, 1])])
def test_round_trip_is_bit_exact(tmp_path, tp, llm, vit):
    pp = {"llm": llm, "vit": vit}
    hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", tp, pp)
    assert (tmp_path / "mm" / "latest_checkpointed_iteration.txt").read_text() == "release"
    mm_to_hf(tmp_path / "mm", HF, tmp_path / "back", "Qwen2_5_VLConverter", tp, pp)
    assert_same_tensors(hf_tensors(tmp_path / "back"), hf_tensors(HF))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((HF / "config.json").read_text())
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (HF / "tokenizer.json").read_bytes()
    # the merged MM view equals the unsplit conversion
    _, ref = load_hf_as_mm(HF)
    assert_same_tensors(load_model(tmp_path / "mm"), ref)


def test_tp_pp_shard_contents(tmp_path):
    hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 2, {"llm": [[1, 1]], "vit": [[2, 0]]})
    _, full = load_hf_as_mm(HF)
    rel = tmp_path / "mm" / "release"
    assert sorted(p.name for p in rel.iterdir() if p.is_dir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    s = {(t, p): read_safetensors(rel / f"mp_rank_{t:02d}_{p:03d}" / "model.safetensors")
         for t in range(2) for p in range(2)}
    # stage 0: vision + projector + embedding + LLM layer 0; stage 1: LLM layer 1 renumbered to 0 + head
    assert "image_encoder.projector.layernorm.weight" in s[0, 0]
    assert "text_decoder.embedding.word_embeddings.weight" in s[0, 0]
    assert not any(k.startswith("image_encoder") for k in s[0, 1])
    assert {"text_decoder.decoder.final_layernorm.weight", "text_decoder.output_layer.weight"} <= set(s[0, 1])
    assert not any(k.startswith(L + "1.") for k in s[0, 1])
    for t in range(2):
        # rank t holds KV group t: [q heads 2t, 2t+1; k_t; v_t] of global layer 1 (stage-local 0)
        np.testing.assert_array_equal(s[t, 1][f"{L}0.self_attention.linear_qkv.weight"],
                                      np.split(full[f"{L}1.self_attention.linear_qkv.weight"], 2)[t])
        gate, up = np.split(full[f"{L}1.mlp.linear_fc1.weight"], 2)
        np.testing.assert_array_equal(s[t, 1][f"{L}0.mlp.linear_fc1.weight"],
                                      np.concatenate([np.split(gate, 2)[t], np.split(up, 2)[t]]))
        np.testing.assert_array_equal(s[t, 1][f"{L}0.self_attention.linear_proj.weight"],
                                      np.split(full[f"{L}1.self_attention.linear_proj.weight"], 2, axis=1)[t])
        np.testing.assert_array_equal(s[t, 0][f"{V}1.self_attention.linear_proj.bias"],
                                      full[f"{V}1.self_attention.linear_proj.bias"])  # row-parallel bias: replicated
        np.testing.assert_array_equal(s[t, 0]["text_decoder.embedding.word_embeddings.weight"],
                                      np.split(full["text_decoder.embedding.word_embeddings.weight"], 2)[t])


def test_bf16_sharded_tied_checkpoint_round_trip(tmp_path):
    cfg = qwen2_5_vl_tiny_config({"vocab_size": 512, "bos_token_id": 490, "eos_token_id": 492, "pad_token_id": 490,
                                  "image_token_id": 502, "video_token_id": 503, "vision_start_token_id": 499,
                                  "vision_end_token_id": 500, "vision_token_id": 501})
    cfg["tie_word_embeddings"] = True
    hf = write_random_hf(tmp_path / "hf", cfg, seed=3, dtype="bfloat16", max_shard_bytes=300_000)
    assert (hf / "model.safetensors.index.json").is_file() and "lm_head.weight" not in hf_tensors(hf)
    hf_to_mm(hf, tmp_path / "mm", "qwen2_5_vl", 2, {"llm": [1, 1], "vit": [3, 1]})
    last = read_safetensors(tmp_path / "mm/release/mp_rank_01_001/model.safetensors")
    first = read_safetensors(tmp_path / "mm/release/mp_rank_01_000/model.safetensors")
    # tied + pp > 1: the last stage carries its own copy of the (TP-split) embedding
    assert last["text_decoder.output_layer.weight"].dtype == BF16
    assert last["text_decoder.output_layer.weight"].tobytes() == \
        first["text_decoder.embedding.word_embeddings.weight"].tobytes()
    assert "image_encoder.projector.layernorm.weight" in last  # projector follows the last ViT stage
    mm_to_hf(tmp_path / "mm", hf, tmp_path / "back", "qwen2_5_vl", max_shard_bytes=400_000)
    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_tensors(hf))
    assert_same_tensors(hf_tensors(back), hf_tensors(hf))
    # and the resplit to pp=1 drops the copy again, values unchanged
    resplit(tmp_path / "mm", tmp_path / "mm1", 1, {"llm": [2], "vit": [4]})
    mm1 = load_model(tmp_path / "mm1")
    assert "text_decoder.output_layer.weight" not in mm1
    mm_to_hf(tmp_path / "mm1", hf, tmp_path / "back1", "qwen2_5_vl")
    assert_same_tensors(hf_tensors(tmp_path / "back1"), hf_tensors(hf))


def test_resplit_keeps_iteration_and_values(tmp_path):
    hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 2, {"llm": [1, 1], "vit": [2, 0]})
    out = resplit(tmp_path / "mm", tmp_path / "re", 1, {"llm": [[2, 0]], "vit": [[1, 1]]})
    assert out.name == "release"
    layout = json.loads((out / "parallel_layout.json").read_text())
    assert layout["tp_size"] == 1 and layout["llm_pp_layers"] == [2, 0] and layout["vit_pp_layers"] == [1, 1]
    _, ref = load_hf_as_mm(HF)
    assert_same_tensors(load_model(tmp_path / "re"), ref)
    with pytest.raises(ConversionError, match=r"sums to 3, but the language model .* has 2 layers"):
        resplit(tmp_path / "mm", tmp_path / "bad", 1, {"llm": [2, 1], "vit": [2, 0]})


# --- errors ---------------------------------------------------------------------------------

def _copy_fixture(tmp_path, mutate=None, config=None):
    d = tmp_path / "hfbad"
    shutil.copytree(HF, d)
    os.chmod(d, 0o755)
    for p in d.iterdir():
        os.chmod(p, 0o644)
    if mutate:
        t = load_file(str(HF / "model.safetensors"))
        mutate(t)
        save_file(t, str(d / "model.safetensors"), {"format": "pt"})
    if config:
        c = json.loads((HF / "config.json").read_text())
        config(c)
        (d / "config.json").write_text(json.dumps(c))
    return d


def test_errors_name_the_bad_tensor(tmp_path):
    d = _copy_fixture(tmp_path, mutate=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ConversionError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf_to_mm(d, tmp_path / "mm", "qwen2_5_vl")
    d = _copy_fixture(tmp_path / "b", mutate=lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(ConversionError, match=r"'model\.norm\.weight'.* shape \[63\].* implies \[64\]"):
        hf_to_mm(d, tmp_path / "mm", "qwen2_5_vl")
    d = _copy_fixture(tmp_path / "c", mutate=lambda t: t.update({"visual.extra.weight": np.ones(2, np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected .*visual\.extra\.weight"):
        hf_to_mm(d, tmp_path / "mm", "qwen2_5_vl")
    d = _copy_fixture(tmp_path / "d", config=lambda c: c["text_config"].update(num_hidden_layers=3))
    with pytest.raises(ConversionError, match=r"missing .*model\.layers\.2\."):
        hf_to_mm(d, tmp_path / "mm", "qwen2_5_vl")
    assert not (tmp_path / "mm").exists()  # nothing written on a failed plan


def test_errors_name_the_bad_parallel_argument(tmp_path):
    with pytest.raises(ConversionError, match=r"llm_pp_layers \[1, 10, 10, 7\] sums to 28, but the language "
                                              r"model \(num_hidden_layers\) has 2 layers"):
        hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 1, {"llm": [[1, 10, 10, 7]], "vit": [[2, 0, 0, 0]]})
    with pytest.raises(ConversionError, match=r"vit_pp_layers \[1, 0\] sums to 1, but the vision encoder"):
        hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 1, {"llm": [1, 1], "vit": [1, 0]})
    with pytest.raises(ConversionError, match=r"tp_size 4 does not divide the vision attention heads .* = 2"):
        hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 4)
    with pytest.raises(ConversionError, match="different numbers of stages"):
        hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 1, {"llm": [1, 1], "vit": [2, 0, 0]})
    with pytest.raises(ConversionError, match="virtual-pipeline"):
        hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 1, {"llm": [[1, 0], [0, 1]]})
    hf_to_mm(HF, tmp_path / "mm", "qwen2_5_vl", 2)
    with pytest.raises(ConversionError, match=r"tp_size 1 does not match tp_size 2 recorded"):
        mm_to_hf(tmp_path / "mm", HF, tmp_path / "out", "qwen2_5_vl", 1)
    assert not (tmp_path / "out").exists()
    d = _copy_fixture(tmp_path / "e")
    (d / "config.json").write_text('{"model_type": "qwen2_5_vl",\n  "text_config": }')
    with pytest.raises(ConversionError, match=r"config\.json: invalid JSON at line 2"):
        hf_to_mm(d, tmp_path / "mm2", "qwen2_5_vl")


def test_mm_to_hf_reports_missing_and_leftover_mm_tensors(tmp_path):
    from ms_mm.training.mm_checkpoint import save_model
    _, mm = load_hf_as_mm(HF, dtype=None)
    extra = dict(mm, **{"text_decoder.rogue.weight": np.zeros(3, np.float32)})
    save_model(tmp_path / "a", extra)
    with pytest.raises(ConversionError, match=r"unexpected .*text_decoder\.rogue\.weight"):
        mm_to_hf(tmp_path / "a", HF, tmp_path / "out", "qwen2_5_vl")
    mm.pop(f"{L}1.mlp.linear_fc2.weight")
    save_model(tmp_path / "b", mm)
    with pytest.raises(ConversionError, match=r"missing .*decoder\.layers\.1\.mlp\.linear_fc2\.weight"):
        mm_to_hf(tmp_path / "b", HF, tmp_path / "out", "qwen2_5_vl")


def test_hf_reader_is_lazy_per_tensor(tmp_path):
    f = SafetensorsFile(HF / "model.safetensors")
    assert f.shape("visual.patch_embed.proj.weight") == (32, 3, 2, 14, 14)
    assert f.nbytes("lm_head.weight") == 384 * 64 * 4
