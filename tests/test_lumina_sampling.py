"""Lumina-mGPT 2.0 text-to-image sampling (ms_mm.models.lumina_mgpt2.sample).

* the cached generation path runs the training Cells: the prefill's logits equal the training
  forward's (`LuminaDecoder.construct`) on the prompt, and a decode step's equal the full forward's
  last position; the cache has a fixed size, so every step is the same graph;
* generation lays the image out as upstream: forced grid tokens, a newline after each row, codes
  only from the codebook, `<eoss>` last; with and without the cache the same seed gives the same codes;
* `mm-convert LuminaConverter hf_to_mm / mm_to_hf --cfg.source_path --cfg.target_path` round-trips
  bit-exactly, and the sampler reads the converted checkpoint and the tiny MoVQGAN and writes a PNG.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ms_mm.models.lumina_mgpt2.tiny import build_tiny, build_tiny_movqgan

    root = tmp_path_factory.mktemp("lumina_sample")
    build_tiny(root / "hf", seed=1)
    build_tiny_movqgan(root / "movqgan", seed=0)
    return root


@pytest.fixture(scope="module")
def sampler(tiny):
    import mindspore as ms

    import convert
    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.models.lumina_mgpt2.processing import TextTokenizer
    from ms_mm.models.lumina_mgpt2.sample import LuminaSampler
    from ms_mm.training.weights import load_state_dict

    ms.set_context(mode=ms.GRAPH_MODE)
    config, state = convert.framework.load_hf_as_mm(tiny / "hf", "lumina_mgpt2")
    model = LuminaMGPT2ForCausalLM(config)
    load_state_dict(model, state)
    return LuminaSampler(model, TextTokenizer(tiny / "hf"))


def test_cached_steps_equal_the_training_forward(sampler):
    import mindspore as ms

    from ms_mm.models.lumina_mgpt2.modeling import cache_step_inputs

    ids = sampler.prompt_ids("A blue square in the bottom right on a gray background.", 32, 32)
    n = len(ids)
    max_len = n + 8
    sampler.decoder.set_train(False)
    full = sampler.decoder(ms.Tensor(np.asarray([ids], np.int32)),
                           ms.Tensor(np.arange(n, dtype=np.int32)[None])).asnumpy()[0]
    first, cache = sampler._cached(ids, sampler.decoder.new_cache(1, max_len), 0, max_len)
    np.testing.assert_allclose(first, full[-1], atol=1e-5, rtol=1e-5)
    # every prefill position, not just the last
    pos, mask, write = cache_step_inputs(0, n, 1, max_len)
    caches = sampler.decoder.new_cache(1, max_len)
    logits, k, _ = sampler.decoder.construct_cached(ms.Tensor(np.asarray([ids], np.int32)), ms.Tensor(pos),
                                                    ms.Tensor(mask), ms.Tensor(write), *caches)
    np.testing.assert_allclose(logits.asnumpy()[0], full, atol=1e-5, rtol=1e-5)
    assert k[0].shape == (1, 2, max_len, 16) and not k[0].asnumpy()[:, :, n:].any()    # fixed size, tail unwritten
    # two decode steps against the full forward of the longer sequence
    seq = list(ids)
    for tok in (sampler.tokens.code_offset + 5, sampler.tokens.code_offset + 9):
        seq.append(tok)
        step, cache = sampler._cached([tok], cache, len(seq) - 1, max_len)
        ref = sampler.decoder(ms.Tensor(np.asarray([seq], np.int32)),
                              ms.Tensor(np.arange(len(seq), dtype=np.int32)[None])).asnumpy()[0, -1]
        np.testing.assert_allclose(step, ref, atol=1e-5, rtol=1e-5)


def test_generation_follows_the_image_layout(sampler):
    from ms_mm.models.lumina_mgpt2.inputs import parse_image_tokens

    t = sampler.tokens
    res = sampler.generate("A red circle in the top left on a white background.", 64, 32, cfg=3.0, top_k=16,
                           temperature=1.0, seed=3)
    toks = res["tokens"]
    assert toks[0] == t.image_start_id and toks[-1] == t.image_end_id
    assert toks[1] == t.grid_base_id + 1 and toks[2] == t.grid_base_id + 2      # height 1 grid, width 2 grids
    codes, hg, wg = parse_image_tokens(toks, t)                                  # newline after every row
    assert (hg, wg) == (1, 2) and codes.shape == (4, 8)
    np.testing.assert_array_equal(codes, res["codes"])
    assert codes.min() >= 0 and codes.max() < t.codebook_size
    no_cache = sampler.generate("A red circle in the top left on a white background.", 64, 32, cfg=3.0, top_k=16,
                                temperature=1.0, seed=3, use_cache=False)
    np.testing.assert_array_equal(no_cache["codes"], res["codes"])


def test_convert_cli_round_trip_and_sample_cli_writes_png(tiny, tmp_path):
    env = dict(os.environ, MS_MM_DEVICE_TARGET="CPU", GLOG_v="3", PYTHONPATH=str(REPO))
    mm_convert = [sys.executable, "-m", "convert.cli"]
    r = subprocess.run(mm_convert + ["LuminaConverter", "hf_to_mm", "--cfg.source_path", str(tiny / "hf"),
                                     "--cfg.target_path", str(tmp_path / "mm")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(mm_convert + ["LuminaConverter", "mm_to_hf", "--cfg.source_path", str(tmp_path / "mm"),
                                     "--cfg.target_path", str(tmp_path / "back"), "--cfg.hf_config.hf_dir",
                                     str(tiny / "hf")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tiny / "hf" / "model.safetensors").read_bytes()
    model_json = {"model_id": "lumina", "vocabulary_map_path": str(tiny / "hf"), "movqgan_path": str(tiny / "movqgan")}
    (tmp_path / "model.json").write_text(json.dumps(model_json))
    r = subprocess.run([sys.executable, "-m", "ms_mm.models.lumina_mgpt2.sample", "--load", str(tmp_path / "mm"),
                        "--mm-model", str(tmp_path / "model.json"), "--prompt", "A green triangle.", "--out",
                        str(tmp_path / "img.png"), "--width", "32", "--height", "32", "--cfg", "1"],
                       capture_output=True, text=True, env=env, timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    from PIL import Image

    with Image.open(tmp_path / "img.png") as im:
        assert im.format == "PNG" and im.size == (32, 32) and np.asarray(im).std() > 0
    # a size that cannot fit the context is one line
    r = subprocess.run([sys.executable, "-m", "ms_mm.models.lumina_mgpt2.sample", "--load", str(tmp_path / "mm"),
                        "--mm-model", str(tmp_path / "model.json"), "--prompt", "x", "--out",
                        str(tmp_path / "big.png"), "--width", "256", "--height", "256"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "max_position_embeddings=256" in r.stderr and "Traceback" not in r.stderr
