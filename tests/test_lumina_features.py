"""Lumina-mGPT 2.0 feature extraction (ms_mm.models.lumina_mgpt2.features / processing).

* item processor pieces against upstream's definitions (crop-size list, the fixture's image-token
  layout through the feature path);
* two workers, each killed right after renaming a feature file into place (before its record line),
  plus a torn record line: the rerun encodes only what is left — every image encoded exactly once —
  and the index names every record once, with the tokens of a clean run;
* bad input: a missing image and a prompt too long for the context are one error naming the item
  and file, or a counted skip with --skip-bad-samples; a MoVQGAN whose codebook does not match the
  tokenizer is refused.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE_ROOT
from ms_mm.data.errors import BadSampleError
from ms_mm.models.lumina_mgpt2 import inputs as lin
from ms_mm.models.lumina_mgpt2.processing import generate_crop_size_list, read_feature, read_index

REPO = Path(__file__).resolve().parents[1]
FIXTURE = FIXTURE_ROOT / "lumina_mgpt2" / "forward"


def test_crop_size_list_follows_upstream():
    # upstream generate_crop_size_list(num_patches=4, patch_size=32): w from 4 grids down, h up while w*h <= 4
    assert generate_crop_size_list(4, 32) == [(128, 32), (96, 32), (64, 32), (64, 64), (32, 64), (32, 96), (32, 128)]
    sizes = generate_crop_size_list((512 // 32) ** 2, 32)
    assert (512, 512) in sizes and all(w * h <= 512 * 512 and max(w, h) / min(w, h) <= 4 for w, h in sizes)


def test_fixture_image_layout_round_trips():
    seq = json.loads((FIXTURE / "sequences.json").read_text())
    from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config

    tok = LuminaMGPT2Config.preset("tiny").tokens
    ids, labels = seq["seq1"], seq["labels1"]
    start = ids.index(tok.image_start_id)
    end = ids.index(tok.image_end_id, start)
    codes, hg, wg = lin.parse_image_tokens(ids[start:end + 1], tok)
    prompt = ids[1:start - 1]
    rebuilt, rebuilt_labels = lin.t2i_sequence(prompt, codes, tok, ids[0])
    assert rebuilt == ids and rebuilt_labels == labels


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny MoVQGAN + bundled tokenizer + 6 demo images in the guide's layout."""
    from ms_mm.models.lumina_mgpt2.demo import write_demo_images
    from ms_mm.models.lumina_mgpt2.tiny import build_tiny_movqgan

    root = tmp_path_factory.mktemp("lumina_assets")
    build_tiny_movqgan(root / "movqgan", seed=0)
    data = write_demo_images(root / "dataset", n=6, seed=3)
    return root, data


def _jsons(root: Path, data: Path, save: Path, max_length=None):
    from ms_mm.models.lumina_mgpt2.tokenizer import ASSET_DIR

    d = json.loads((REPO / "examples/mindspore/lumina/mgpt2/feature_extract/data.json").read_text())
    d["dataset_param"]["basic_parameters"]["data_config"]["path"] = str(data)
    d["dataset_param"]["tokenizer_config"]["from_pretrained"] = str(ASSET_DIR)
    d["dataset_param"]["preprocess_parameters"]["target_size"] = 64
    if max_length:
        d["dataset_param"]["preprocess_parameters"]["max_length"] = max_length
    (save.parent / "data.json").write_text(json.dumps(d))
    (save.parent / "model.json").write_text(json.dumps({"ae": {"from_pretrained": str(root / "movqgan")}}))
    (save.parent / "tools.json").write_text(json.dumps({"sorafeature": {"save_path": str(save)}}))
    return [str(save.parent / n) for n in ("data.json", "model.json", "tools.json")]


def _run(jsons, *extra, env=None):
    cmd = [sys.executable, "-m", "ms_mm.models.lumina_mgpt2.features", "--mm-data", jsons[0], "--mm-model", jsons[1],
           "--mm-tool", jsons[2], *extra]
    e = dict(os.environ, MS_MM_DEVICE_TARGET="CPU", GLOG_v="3", **(env or {}))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=e, cwd=REPO)
    return res.returncode, res.stdout + res.stderr


def _encoded(out: str) -> int:
    return sum(int(l.split("encoded ")[1].split()[0]) for l in out.splitlines() if "feature worker" in l)


def test_two_workers_crash_and_resume_encode_each_image_once(assets, tmp_path):
    root, data = assets
    jsons = _jsons(root, data, tmp_path / "features")
    rc, out = _run(jsons, "--workers", "2", env={"MS_MM_LUMINA_CRASH_AFTER": "1"})
    assert rc != 0 and "resume" in out, out[-2000:]
    save = tmp_path / "features"
    files = sorted((save / "files").glob("*.npz"))
    assert len(files) == 2                          # one per worker, renamed into place, no record line yet
    assert not (save / "data.jsonl").exists()
    assert not list((save / "files").glob(".*tmp*"))   # never a half-written feature file
    # a torn line (the crash came mid-append) at the end of worker 1's record file
    with open(save / "records" / "1-of-2-record.jsonl", "a") as f:
        f.write('{"file": "files/000')
    rc, out = _run(jsons, "--workers", "2")
    assert rc == 0, out[-3000:]
    assert _encoded(out) == 4 and out.count("1 recovered") == 2, out[-2000:]
    records = read_index(save / "data.jsonl")
    assert sorted(r["id"] for r in records) == list(range(6))
    # a third run has nothing left to do
    rc, out = _run(jsons, "--workers", "2")
    assert rc == 0 and _encoded(out) == 0 and out.count("3 already complete") == 2, out[-2000:]
    # the tokens equal a clean single-worker run's
    (tmp_path / "clean").mkdir()
    clean = _jsons(root, data, tmp_path / "clean" / "features")
    rc, out = _run(clean)
    assert rc == 0 and _encoded(out) == 6, out[-2000:]
    for r in read_index(tmp_path / "clean" / "features" / "data.jsonl"):
        a = read_feature(r["file"])
        b = read_feature(save / "files" / Path(r["file"]).name)
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()
        assert r["len"] == a["input_ids"].size


def test_bad_samples_fail_by_name_or_are_counted(assets, tmp_path):
    from ms_mm.models.lumina_mgpt2.features import resolve_spec, run_worker

    root, data = assets
    items = json.loads(data.read_text())
    items[2]["file"] = "images/missing.png"
    bad = data.parent / "bad.json"
    bad.write_text(json.dumps(items))
    jsons = _jsons(root, bad, tmp_path / "features")
    rc, out = _run(jsons)
    lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "missing.png not found" in lines[0] and "bad.json[2]" in lines[0], out
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    spec = resolve_spec(*jsons, say=lambda m: None)
    msgs = []
    stats = run_worker(spec, 0, 1, skip_bad_samples=True, say=msgs.append)
    assert stats["skipped"] == 1 and stats["encoded"] == 3 and stats["complete"] == 2, stats  # 0, 1 done before
    assert any("missing.png" in m for m in msgs)
    # a prompt that cannot fit the context
    (tmp_path / "long").mkdir()
    long_jsons = _jsons(root, data, tmp_path / "long" / "features", max_length=40)
    spec = resolve_spec(*long_jsons, say=lambda m: None)
    with pytest.raises(BadSampleError, match=r"more than the context max_length 40") as e:
        run_worker(spec, 0, 1, say=lambda m: None)
    assert str(data) in str(e.value)


def test_movqgan_codebook_must_match_the_tokenizer(assets, tmp_path):
    from ms_mm.models.lumina_mgpt2.features import ExtractionError, ExtractionSpec, _Processor
    from ms_mm.models.lumina_mgpt2.tiny import tiny_movqgan_release_config
    from ms_mm.models.lumina_mgpt2.tokenizer import ASSET_DIR
    from convert.tiny import write_random_hf

    root, data = assets
    cfg = tiny_movqgan_release_config()
    cfg["n_embed"] = 32
    write_random_hf(tmp_path / "movq32", cfg, "movqgan", 0)
    (tmp_path / "movq32" / "config.json").rename(tmp_path / "movq32" / "movqgan_config.json")
    spec = ExtractionSpec(data, ASSET_DIR, tmp_path / "movq32", tmp_path / "f", 32, 64, None, None)
    with pytest.raises(ExtractionError, match="codebook of 32 codes but tokenizer .* has 64"):
        _Processor(spec)
