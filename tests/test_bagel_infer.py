"""BAGEL inference: the sampler's velocity is the training forward's prediction (on the official fixture and
at the sampler's first step), the flow schedule, and the three tasks from Python and the command line."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert
from conftest import FIXTURE_ROOT
from ms_mm.models.bagel import processing as P
from ms_mm.models.bagel.infer import BagelInferencer, flow_timesteps
from ms_mm.models.bagel.inputs import build_model_inputs, effective_timesteps

REPO = Path(__file__).resolve().parents[1]
FIXTURE = FIXTURE_ROOT / "bagel" / "forward"   # missing: an error (conftest), never a skip


def test_flow_schedule_is_upstreams():
    t, dt = flow_timesteps(5, 3.0)
    base = np.linspace(1, 0, 5)
    shifted = 3.0 * base / (1 + 2.0 * base)          # generate_image: shift * t / (1 + (shift - 1) t)
    np.testing.assert_allclose(t, shifted[:-1], rtol=1e-6)
    np.testing.assert_allclose(dt, shifted[:-1] - shifted[1:], rtol=1e-6)
    assert t[0] == 1.0 and abs(dt.sum() - 1.0) < 1e-6


def test_velocity_entry_matches_the_official_fixture():
    """`Bagel.velocity` (the sampler's call: x_t and t given, no noising inside) on the fixture's packed batch
    reproduces the official velocity prediction at the parity tolerance."""
    import mindspore as ms

    from ms_mm.models.bagel.modeling import Bagel
    from ms_mm.training.weights import load_state_dict

    ms.set_context(mode=ms.GRAPH_MODE)
    with np.load(FIXTURE / "inputs.npz") as i, np.load(FIXTURE / "outputs.npz") as o:
        inputs, ref = {k: i[k] for k in i.files}, {k: o[k] for k in o.files}
    config, state = convert.load_hf_as_mm(FIXTURE, "bagel")
    net = Bagel(config)
    load_state_dict(net, state)
    mi = build_model_inputs(inputs, config)
    x0 = inputs["padded_latent"].reshape(-1)[mi["latent_gather_index"]]
    t = effective_timesteps(inputs["packed_timesteps"], config.timestep_shift)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * inputs["noise"]
    T = ms.Tensor
    v = ms.jit(net.velocity)(*[T(mi[k]) for k in ("text_ids", "vit_pixels", "vit_position_ids", "vit_attention_mask")],
                             T(x_t.astype(np.float32)), T(t), T(mi["latent_position_ids"]), T(mi["position_ids"]),
                             T(mi["attention_mask"]), T(mi["mse_rows"])).asnumpy()
    np.testing.assert_allclose(v, ref["velocity_pred"], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ms_mm.models.bagel.tiny import build_tiny

    hf = build_tiny(tmp_path_factory.mktemp("bagel_tiny") / "hf", seed=3)
    # a non-zero velocity head, so the comparison below is not 0 == 0
    from ms_mm.training.mm_checkpoint import SafetensorsFile, write_safetensors

    ema = SafetensorsFile(hf / "ema.safetensors")
    tensors = {k: ema.get(k) for k in ema.keys()}
    rng = np.random.default_rng(0)
    tensors["llm2vae.weight"] = rng.standard_normal(tensors["llm2vae.weight"].shape).astype(np.float32) * 0.1
    write_safetensors(hf / "ema.safetensors", tensors)
    return hf


def test_first_sampler_velocity_equals_training_forward(tiny):
    """The sampler's first step (t = 1, x = its initial noise) predicts exactly what the training forward
    (`BagelForTraining`, VAE inside, raw timestep +inf -> t = 1, x_t = noise) predicts for the same sequence."""
    import mindspore as ms

    from ms_mm.models.bagel.modeling import BagelForTraining
    from ms_mm.training.weights import load_state_dict

    inf = BagelInferencer.from_checkpoint(str(tiny), max_num_tokens=192, image_size=64)
    prompt = "a red circle on a blue background"
    inf.text_to_image(prompt, 64, 64, num_timesteps=3, cfg_text_scale=1.0, seed=11)
    v_sampler = inf.first_velocity
    n = v_sampler.shape[0]
    noise = np.random.default_rng(11).standard_normal((n, inf.config.patch_latent_dim)).astype(np.float32)

    # the training path: the same packed t2i sequence, its raw timestep +inf, the sampler's noise
    packer = P.Packer(inf.s, inf.special, np.random.default_rng(0))
    sample = {"sequence_plan": [P._plan("text"), P._plan("vae_image", loss=1)], "text_ids_list": [inf._ids(prompt)],
              "images": [np.zeros((3, 64, 64), np.float32)]}
    packer.add(sample, P.sample_cost(sample, inf.s))
    batch = packer.batch()
    batch["packed_timesteps"] = np.full_like(batch["packed_timesteps"], np.inf)
    train_in = P.padded_model_inputs(batch, inf.config, inf.s.budgets, np.random.default_rng(0), 16, noise=noise)
    net = BagelForTraining(inf.config)
    load_state_dict(net, {p.name: p.asnumpy() for p in inf.net.get_parameters()})
    _, latent = net.vae(ms.Tensor(train_in["padded_images"]))
    out = net.train_forward(*[ms.Tensor(train_in[k]) if k != "padded_images" else latent for k in P.TRAIN_INPUT_NAMES
                              if k != "posterior_noise"])
    v_train = out[5].asnumpy()[:n]                           # velocity_pred at the mse rows (the noised image)
    assert np.abs(v_train).max() > 1e-3
    np.testing.assert_allclose(v_sampler, v_train, atol=1e-5, rtol=1e-5)


def test_tasks_from_python_and_cli(tiny, tmp_path):
    from PIL import Image

    inf = BagelInferencer.from_checkpoint(str(tiny), max_num_tokens=192, image_size=64)
    img = inf.text_to_image("a red circle on a blue background", 64, 64, num_timesteps=3, cfg_text_scale=2.0)
    assert img.size == (64, 64)
    src = tmp_path / "in.png"
    img.save(src)
    edited = inf.edit(src, "make the circle green", num_timesteps=2)
    assert edited.size == (64, 64) and np.asarray(edited).std() > 0
    answer = inf.understand(src, "What colour is the shape?", max_new_tokens=4)
    assert isinstance(answer, str)
    r = subprocess.run([sys.executable, "-m", "ms_mm.models.bagel.infer", "und", "--load", str(tiny), "--image",
                        str(tmp_path / "missing.png"), "--question", "?"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "error: --image" in r.stderr and "missing.png: no such file" in r.stderr
