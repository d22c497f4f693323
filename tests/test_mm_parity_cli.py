"""``mm-parity`` end to end on Qwen2.5-VL checkpoints of other shapes than the shared fixture
(tests/fixtures/qwen2_5_vl_shapes, made by scripts/make_parity_fixtures.py with transformers),
plus its error handling."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

from convert.parity import main

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "tests" / "fixtures" / "qwen2_5_vl_shapes"
CASES = ("gqa3_tied_batch2", "mha_patch8_windows", "mqa_rightpad_textonly", "uniform_windows_frames")


@pytest.fixture
def restore_mode():
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


def _grad_args(reference):
    args = []
    for key in reference:
        if key.startswith("grad."):
            args += ["--grad", key[len("grad."):]]
    return args


@pytest.mark.parametrize("case", CASES)
def test_shapes_case_matches_reference(case, tmp_path, restore_mode, capsys):
    root = SHAPES / case
    reference = dict(np.load(root / "outputs.npz"))
    out = tmp_path / "out.npz"
    rc = main(["qwen2_5_vl", "--hf-dir", str(root / "hf"), "--inputs", str(root / "inputs.npz"),
               "--out", str(out), "--reference", str(root / "outputs.npz")] + _grad_args(reference))
    assert rc == 0, capsys.readouterr()
    got = dict(np.load(out))
    assert set(got) == set(reference)
    for key, want in reference.items():
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got[key], want, err_msg=key)
        elif key.startswith("grad."):
            np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=1e-3, err_msg=key)
        elif key == "loss":
            np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=0, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want, atol=1e-4, rtol=1e-4, err_msg=key)


def test_uniform_case_takes_the_per_window_path():
    """uniform_windows_frames is the case whose windows and frames are all of one size: its inputs carry the
    [segments, size] form (attention per window / frame as a batch); partial windows keep the masked [N] form."""
    import json

    from adapters.qwen2_5_vl import config_from_hf
    from ms_mm.models.qwen2_5_vl import build_model_inputs

    def segs(case):
        root = SHAPES / case
        config = config_from_hf(json.loads((root / "hf" / "config.json").read_text()))
        built = build_model_inputs(dict(np.load(root / "inputs.npz")), config)
        return built["vision_window_seg"].shape, built["vision_frame_seg"].shape

    assert segs("uniform_windows_frames") == ((6, 16), (3, 32))
    assert segs("mha_patch8_windows") == ((120,), (120,))


def _bad_run(tmp_path, capsys, inputs=None, extra=(), family="qwen2_5_vl", hf_dir=None):
    root = SHAPES / "mha_patch8_windows"
    if inputs is not None:
        path = tmp_path / "inputs.npz"
        np.savez(path, **inputs)
    else:
        path = root / "inputs.npz"
    out = tmp_path / "out.npz"
    out.write_bytes(b"earlier result")
    rc = main([family, "--hf-dir", str(hf_dir or root / "hf"), "--inputs", str(path), "--out", str(out), *extra])
    assert out.read_bytes() == b"earlier result", "a failed run must not touch an existing output"
    return rc, capsys.readouterr().err


def test_errors_are_clear_and_write_nothing(tmp_path, capsys, restore_mode):
    good = dict(np.load(SHAPES / "mha_patch8_windows" / "inputs.npz"))

    rc, err = _bad_run(tmp_path, capsys, family="llava")
    assert rc == 2 and "unknown model family 'llava'" in err and "qwen2_5_vl" in err

    rc, err = _bad_run(tmp_path, capsys, inputs={k: v for k, v in good.items() if k != "image_grid_thw"})
    assert rc == 2 and f"--inputs {tmp_path / 'inputs.npz'}: missing key 'image_grid_thw'" in err

    rc, err = _bad_run(tmp_path, capsys, inputs={**good, "pixel_values": good["pixel_values"][:-4]})
    assert rc == 2 and "inputs.npz: build_model_inputs: pixel_values has shape (116, 384)" in err

    rc, err = _bad_run(tmp_path, capsys, extra=["--grad", "visual.blocks.9.attn.qkv.weight"])
    assert rc == 2 and "--grad visual.blocks.9.attn.qkv.weight" in err

    rc, err = _bad_run(tmp_path, capsys, hf_dir=tmp_path / "nowhere")
    assert rc == 2 and "nowhere" in err


def test_console_entry_reports_unknown_family(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "convert.parity", "bagel2", "--hf-dir", str(tmp_path),
                           "--inputs", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o.npz")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model family 'bagel2'" in proc.stderr
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("family, case, hf", [("bagel", "bagel/forward", ""), ("movqgan", "lumina_mgpt2/movqgan", ""),
                                              ("lumina_mgpt2", "lumina_mgpt2/forward", "hf")])
def test_other_families_from_the_command_line_match_their_fixture(family, case, hf, tmp_path, restore_mode, capsys):
    """The issue's command lines: `mm-parity <family> --hf-dir CASE[/hf] --inputs inputs.npz --out out.npz`,
    compared with the fixture's outputs.npz (its inputs carry no `input_ids` for BAGEL and MoVQGAN)."""
    from conftest import FIXTURE_ROOT

    root = Path(FIXTURE_ROOT) / case
    reference = dict(np.load(root / "outputs.npz"))
    out = tmp_path / "out.npz"
    rc = main([family, "--hf-dir", str(root / hf if hf else root), "--inputs", str(root / "inputs.npz"),
               "--out", str(out), "--reference", str(root / "outputs.npz")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    written = dict(np.load(out))
    shared = sorted(set(written) & set(reference))
    assert len(shared) >= 3 and "FAIL" not in printed, printed
