"""MM checkpoint layout: safetensors streaming I/O (checked against the `safetensors` package),
TP/PP split + merge, the atomic commit protocol (exceptions and SIGKILL mid-save)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ms_mm.training.mm_checkpoint import (
    BF16, CheckpointError, LazyTensor, ParallelLayout, SafetensorsFile, iteration_dir, latest_iteration,
    load_model, open_model, read_safetensors, save_model, staged_iteration, to_float32, write_model_files,
    write_safetensors,
)

REPO = Path(__file__).resolve().parents[1]
V = "image_encoder.encoder.blocks.layers."
L = "text_decoder.decoder.layers."


def small_state(seed=0):
    rng = np.random.default_rng(seed)
    s = {"image_encoder.encoder.patch_embed.proj.weight": rng.standard_normal((8, 3, 2, 2, 2)),
         "image_encoder.projector.encoder.linear_fc1.weight": rng.standard_normal((8, 8)),
         "image_encoder.projector.encoder.linear_fc2.bias": rng.standard_normal(4),
         "text_decoder.embedding.word_embeddings.weight": rng.standard_normal((12, 4)),
         "text_decoder.decoder.final_layernorm.weight": rng.standard_normal(4),
         "text_decoder.output_layer.weight": rng.standard_normal((12, 4))}
    for i in range(3):
        s[f"{V}{i}.self_attention.linear_qkv.weight"] = rng.standard_normal((12, 4))
        s[f"{V}{i}.mlp.linear_fc1.bias"] = rng.standard_normal(8)
    for i in range(4):
        s[f"{L}{i}.self_attention.linear_proj.weight"] = rng.standard_normal((4, 4))
        s[f"{L}{i}.mlp.linear_fc1.weight"] = rng.standard_normal((8, 4))
        s[f"{L}{i}.input_layernorm.weight"] = rng.standard_normal(4)
    return {k: v.astype(np.float32) for k, v in s.items()}


def test_files_interoperate_with_the_safetensors_package(tmp_path):
    state = small_state()
    write_safetensors(tmp_path / "ours.safetensors", state, {"format": "pt"})
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert sorted(theirs) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(theirs[k], state[k])
    save_file(state, str(tmp_path / "theirs.safetensors"))
    ours = read_safetensors(tmp_path / "theirs.safetensors")
    for k in state:
        np.testing.assert_array_equal(ours[k], state[k])


def test_bf16_is_kept_bit_exact_and_widens_exactly(tmp_path):
    # bf16 bit patterns: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00, 1/3 ≈ 0x3EAB
    raw = np.array([0x3F80, 0xC000, 0x3F00, 0x3EAB], np.uint16).view(BF16)
    write_safetensors(tmp_path / "b.safetensors", {"x": raw})
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert f.dtype("x") == BF16
    back = f.get("x")
    assert back.tobytes() == raw.tobytes()
    np.testing.assert_array_equal(to_float32(back)[:3], [1.0, -2.0, 0.5])
    assert abs(to_float32(back)[3] - 1 / 3) < 2 ** -9
    header = json.loads((tmp_path / "b.safetensors").read_bytes()[8:8 + 200].split(b"}}")[0] + b"}}")
    assert header["x"]["dtype"] == "BF16"


@pytest.mark.parametrize("tp,pp", [(1, None), (2, {"vit": [2, 1, 0], "llm": [0, 1, 3]}), (1, {"vit": [3, 0], "llm": [2, 2]})])
def test_save_load_merges_ranks_and_stages(tmp_path, tp, pp):
    state = small_state()
    layout = ParallelLayout(tp_size=tp, pp_layers=pp or {})
    d = save_model(tmp_path / "ck", state, layout, iteration=5)
    assert d == tmp_path / "ck" / "iter_0000005" == iteration_dir(tmp_path / "ck", 5)
    assert latest_iteration(tmp_path / "ck") == 5
    back = load_model(tmp_path / "ck")
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    if pp == {"vit": [2, 1, 0], "llm": [0, 1, 3]}:
        s1 = read_safetensors(d / "mp_rank_01_001" / "model.safetensors")
        # stage 1 holds ViT block 2 and LLM layer 0, both renumbered to 0; the projector sits on the
        # last ViT stage, the embedding on the first LLM stage (1), split by rows across TP ranks
        assert f"{V}0.self_attention.linear_qkv.weight" in s1 and f"{L}0.input_layernorm.weight" in s1
        assert "image_encoder.projector.encoder.linear_fc1.weight" in s1
        np.testing.assert_array_equal(s1["text_decoder.embedding.word_embeddings.weight"],
                                      state["text_decoder.embedding.word_embeddings.weight"][6:])
        np.testing.assert_array_equal(s1[f"{L}0.self_attention.linear_proj.weight"],
                                      state[f"{L}0.self_attention.linear_proj.weight"][:, 2:])
        gate_up = state[f"{V}2.mlp.linear_fc1.bias"]
        np.testing.assert_array_equal(s1[f"{V}0.mlp.linear_fc1.bias"], np.r_[gate_up[2:4], gate_up[6:8]])
        s2 = read_safetensors(d / "mp_rank_00_002" / "model.safetensors")
        assert f"{L}2.input_layernorm.weight" in s2 and f"{L}3.input_layernorm.weight" not in s2
        assert "text_decoder.output_layer.weight" in s2


def test_staged_iteration_carries_extra_files_and_latest_is_written_last(tmp_path):
    root = tmp_path / "save"
    with staged_iteration(root, 10) as d:
        write_model_files(d, small_state(), ParallelLayout())
        (d / "rng.json").write_text("{}")
        assert latest_iteration(root) is None and not iteration_dir(root, 10).exists()
    assert (iteration_dir(root, 10) / "rng.json").is_file()
    assert latest_iteration(root) == 10
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "save"
    save_model(root, small_state(0), iteration=1)

    def boom():
        raise RuntimeError("disk full")
    bad = dict(small_state(1))
    bad["text_decoder.output_layer.weight"] = LazyTensor((12, 4), np.dtype(np.float32), boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(root, bad, iteration=2)
    assert latest_iteration(root) == 1 and not iteration_dir(root, 2).exists()
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    np.testing.assert_array_equal(load_model(root)[f"{L}0.mlp.linear_fc1.weight"],
                                  small_state(0)[f"{L}0.mlp.linear_fc1.weight"])


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "save"
    save_model(root, small_state(0), iteration="release")
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from ms_mm.training.mm_checkpoint import save_model, LazyTensor, ParallelLayout
        from tests.test_mm_checkpoint import small_state
        s = small_state(1)
        s["text_decoder.output_layer.weight"] = LazyTensor((12, 4), np.dtype(np.float32),
            lambda: os.kill(os.getpid(), signal.SIGKILL))
        save_model({str(root)!r}, s, ParallelLayout(tp_size=2, pp_layers={{"llm": [2, 2], "vit": [3, 0]}}),
                   iteration="release")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == -signal.SIGKILL
    assert latest_iteration(root) == "release"
    back = load_model(root)
    for k, v in small_state(0).items():
        np.testing.assert_array_equal(back[k], v)


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"x\.safetensors: cannot read safetensors header"):
        SafetensorsFile(tmp_path / "x.safetensors")
    root = tmp_path / "ck"
    save_model(root, small_state(), ParallelLayout(tp_size=2), iteration=3)
    os.remove(root / "iter_0000003" / "mp_rank_01" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model\.safetensors is missing"):
        open_model(root)
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match=r"names iteration 7 but .*iter_0000007 does not exist"):
        open_model(root)
    (root / "latest_checkpointed_iteration.txt").write_text("seven")
    with pytest.raises(CheckpointError, match="expected 'release' or an integer"):
        latest_iteration(root)
    with pytest.raises(CheckpointError, match=r"'text_decoder\.decoder\.layers\.3.[a-z_.]*': layer 3 is beyond the 3 layers of llm_pp_layers \[1, 2\]"):
        save_model(tmp_path / "p", small_state(), ParallelLayout(pp_layers={"llm": [1, 2], "vit": [3, 0]}))
    with pytest.raises(CheckpointError, match=r"projector\.encoder\.linear_fc1\.weight' \[8, 8\]: dim 0 is not divisible by tp_size 5"):
        save_model(tmp_path / "q", small_state(), ParallelLayout(tp_size=5))
    with pytest.raises(CheckpointError, match=r"rogue\.weight' belongs to no pipeline stage"):
        save_model(tmp_path / "r", {"rogue.weight": np.zeros(2)}, ParallelLayout(pp_layers={"llm": [1, 0]}))


def test_expert_parallel_split_and_merge(tmp_path):
    """Stacked experts [E, 2I, H] / [E, H, I]: EP cuts dim 0 into whole experts, TP the last two dims
    (fc1 gate/up-wise on dim 1, fc2 on dim 2); merge and any block read give the full tensor back."""
    state = small_state()
    rng = np.random.default_rng(5)
    for i in (2, 3):
        state[f"{L}{i}.mlp.experts.linear_fc1.weight"] = rng.standard_normal((4, 8, 6)).astype(np.float32)
        state[f"{L}{i}.mlp.experts.linear_fc2.weight"] = rng.standard_normal((4, 6, 4)).astype(np.float32)
    layout = ParallelLayout(tp_size=2, ep_size=2, pp_layers={"vit": [3, 0], "llm": [2, 2]})
    d = save_model(tmp_path / "ck", state, layout)
    s = read_safetensors(d / "mp_rank_01_001_001" / "model.safetensors")
    # EP rank 1 holds experts 2, 3 whole (stage-local layer 1 = global 3); TP rank 1 their gate/up rows 2:4, 6:8
    w1, w2 = state[f"{L}3.mlp.experts.linear_fc1.weight"], state[f"{L}3.mlp.experts.linear_fc2.weight"]
    np.testing.assert_array_equal(s[f"{L}1.mlp.experts.linear_fc1.weight"], np.concatenate([w1[2:, 2:4], w1[2:, 6:8]], 1))
    np.testing.assert_array_equal(s[f"{L}1.mlp.experts.linear_fc2.weight"], w2[2:, :, 2:])
    assert f"{L}1.input_layernorm.weight" in s  # non-expert tensors are on every EP rank
    assert json.loads((d / "parallel_layout.json").read_text())["num_experts"] == 4
    back = load_model(tmp_path / "ck")
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    reader = open_model(tmp_path / "ck")
    for region in (((1, 3), (3, 7), (0, 6)), ((0, 4), (0, 8), (5, 6)), ((3, 4), (4, 5), (0, 6)), ((2, 2), (0, 8), (0, 6))):
        want = w1[tuple(slice(a, b) for a, b in region)]
        np.testing.assert_array_equal(reader.get_region(f"{L}3.mlp.experts.linear_fc1.weight", region), want)
    with pytest.raises(CheckpointError, match="ep_size 3 does not divide the number of experts 4"):
        save_model(tmp_path / "bad", state, ParallelLayout(ep_size=3))
    with pytest.raises(CheckpointError, match="ep_size 2 given but the model has no expert tensors"):
        save_model(tmp_path / "bad2", small_state(), ParallelLayout(ep_size=2))
    flat = dict(small_state(), **{f"{L}2.mlp.experts.linear_fc1.weight": np.zeros((8, 6), np.float32)})
    with pytest.raises(CheckpointError, match=r"experts\.linear_fc1\.weight' \[8, 6\] matches the expert pattern but "
                                              r"is not stacked experts"):
        save_model(tmp_path / "bad3", flat, ParallelLayout(ep_size=2))


def test_per_expert_layout_of_older_checkpoints_is_refused(tmp_path):
    """A layout from before the experts were stacked (one tensor per expert, EP by name) would be misread
    as stacked: it is refused, naming the pattern."""
    d = save_model(tmp_path / "ck", small_state(), ParallelLayout())
    layout = json.loads((d / "parallel_layout.json").read_text())
    layout.update(ep_size=2, num_experts=4, expert_pattern=r"^(.*\.local_experts\.)(\d+)(\..*)$")
    (d / "parallel_layout.json").write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match="stores one tensor per expert .*convert the HF weights again"):
        open_model(tmp_path / "ck")
