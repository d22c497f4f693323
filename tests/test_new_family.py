"""A family added from outside the repository plugs into every engine through the registry alone.

A throwaway family (config, a two-layer model, a conversion spec, a loader, a parity runner, a tiny
builder) is written into a temporary package that no engine file knows. It is registered the two
ways a user can — `MS_MM_FAMILY_MODULES` for the command lines, `ms_mm.registry.register` in
process — and then goes through `python -m convert.tiny`, `mm-convert hf_to_mm` / `mm_to_hf`, the
trainer (a short finetune with a checkpoint) and `mm-parity` against a reference computed here with
numpy from the checkpoint's own tensors.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mmfam_throwaway"

CONFIG_PY = '''
import dataclasses
from dataclasses import dataclass


@dataclass
class ThrowawayConfig:
    vocab_size: int = 24
    hidden_size: int = 16
    num_layers: int = 2

    def validate(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f.name}={v!r} must be a positive int")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in ("vocab_size", "hidden_size", "num_layers") if k in d}).validate()


def config_from_hf(hf):
    if hf.get("model_type") != "throwaway":
        raise ValueError(f"config.json model_type is {hf.get('model_type')!r}, expected 'throwaway'")
    return ThrowawayConfig.from_dict(hf)


def config_from_json(d):
    return config_from_hf(d) if "model_type" in d else ThrowawayConfig.from_dict(d)
'''

MODELING_PY = '''
import mindspore as ms
from mindspore import nn, ops

from ms_mm.ops import Embedding, Linear

INPUT_NAMES = ("input_ids", "labels")


class Layer(nn.Cell):
    def __init__(self, hidden):
        super().__init__()
        self.linear = Linear(hidden, hidden)

    def construct(self, x):
        return x + ops.relu(self.linear(x))


class Decoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.CellList([Layer(config.hidden_size) for _ in range(config.num_layers)])

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TextDecoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Cell()
        self.embedding.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Decoder(config)
        self.output_layer = Linear(config.hidden_size, config.vocab_size, has_bias=False)


class ThrowawayLM(nn.Cell):
    """embedding -> num_layers residual ReLU layers -> output layer; mean CE over all positions."""

    def __init__(self, config, compute_dtype=None):
        super().__init__()
        self.config = config
        self.text_decoder = TextDecoder(config)

    def construct(self, input_ids, labels):
        t = self.text_decoder
        logits = t.output_layer(t.decoder(t.embedding.word_embeddings(input_ids)))
        flat = logits.reshape((-1, logits.shape[-1]))
        loss = ops.cross_entropy(flat, labels.reshape((-1,)).astype(ms.int32))
        return loss, logits
'''

ADAPTER_PY = '''
from convert.spec import FamilySpec, Rule
from {pkg}.config import config_from_hf


def _rules(c):
    h, v = c.hidden_size, c.vocab_size
    L = "text_decoder.decoder.layers.{{i}}.linear."
    return [Rule("text_decoder.embedding.word_embeddings.weight", ("embed.weight",), hf_shapes=((v, h),)),
            Rule(L + "weight", ("layers.{{i}}.fc.weight",), over="llm", hf_shapes=((h, h),)),
            Rule(L + "bias", ("layers.{{i}}.fc.bias",), over="llm", hf_shapes=((h,),)),
            Rule("text_decoder.output_layer.weight", ("head.weight",), hf_shapes=((v, h),))]


SPEC = FamilySpec(family="throwaway", converter="ThrowawayConverter", config_from_hf=config_from_hf,
                  rules=_rules, layer_counts=lambda c: {{"llm": c.num_layers}},
                  pp_modules={{"llm": ("llm", "layers (num_layers)")}})
'''

FAMILY_PY = '''
import json
from pathlib import Path

import numpy as np

from ms_mm.registry import Family
from {pkg}.config import ThrowawayConfig, config_from_json


def _build_model(config, compute_dtype):
    from {pkg}.modeling import ThrowawayLM
    return ThrowawayLM(config, compute_dtype)


class Loader:
    """Learnable synthetic data: every label is the input token plus one."""

    def __init__(self, config, mbs, seed, rank, world):
        self.config, self.mbs, self.seed, self.rank, self.world = config, mbs, seed, rank, world
        self.position, self.skipped = 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng((self.seed, self.position + self.rank))
        self.position += self.world
        ids = rng.integers(0, self.config.vocab_size, (self.mbs, 8))
        return {{"input_ids": ids.astype(np.int32), "labels": ((ids + 1) % self.config.vocab_size).astype(np.int32)}}

    def state_dict(self):
        return {{"position": self.position, "skipped": self.skipped}}

    def load_state_dict(self, state):
        self.position = int(state["position"])


def _loader(data_cfg, config, mbs, seed, rank, world, num_workers, skip_bad_samples, **kwargs):
    return Loader(config, mbs, seed, rank, world)


def _parity(hf_dir, inputs, grad_names):
    import mindspore as ms
    import convert
    from ms_mm.training.weights import load_state_dict
    from {pkg}.modeling import ThrowawayLM

    config, state = convert.load_hf_as_mm(hf_dir, "throwaway")
    net = load_state_dict(ThrowawayLM(config), state)
    loss, logits = net(ms.Tensor(inputs["input_ids"].astype(np.int32)), ms.Tensor(inputs["labels"].astype(np.int32)))
    return {{"loss": np.asarray(loss.asnumpy(), np.float32).reshape(()), "logits": logits.asnumpy()}}


def _tiny(out, seed=0, assets=None, wide=False):
    from convert.tiny import write_random_hf
    hidden = 32 if wide else 16
    return write_random_hf(out, {{"model_type": "throwaway", "vocab_size": 24, "hidden_size": hidden,
                                  "num_layers": 2}}, "throwaway", seed)


FAMILY = Family(
    name="throwaway", title="Throwaway", model_ids=("throwaway_lm",), converter="ThrowawayConverter",
    adapter="{pkg}.adapter", config_class=ThrowawayConfig, config_from_json=config_from_json,
    claims_json=lambda d: d.get("model_type") == "throwaway",
    build_model=_build_model, input_names=("input_ids", "labels"), build_dataloader=_loader,
    freeze_groups={{"text_decoder": ("text_decoder.",)}},
    parity={{"throwaway": _parity}}, build_tiny=_tiny, tiny_flags={{"--wide": ("wide", True, "hidden 32")}},
)
'''


@pytest.fixture(scope="module")
def family_pkg(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    pkg = root / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(textwrap.dedent(CONFIG_PY))
    (pkg / "modeling.py").write_text(textwrap.dedent(MODELING_PY))
    (pkg / "adapter.py").write_text(textwrap.dedent(ADAPTER_PY.format(pkg=PACKAGE)))
    (pkg / "family.py").write_text(textwrap.dedent(FAMILY_PY.format(pkg=PACKAGE)))
    return root


def _env(root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO)])
    env["MS_MM_FAMILY_MODULES"] = f"{PACKAGE}.family"
    return env


def _run(args, root, cwd):
    r = subprocess.run([sys.executable, *args], env=_env(root), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{args}:\n{r.stdout}\n{r.stderr}"
    return r


def _read_hf(hf_dir):
    from safetensors.numpy import load_file
    return load_file(str(Path(hf_dir) / "model.safetensors"))


def test_registry_finds_it_only_when_registered(family_pkg, tmp_path):
    env = _env(family_pkg)
    code = "from ms_mm import registry; f = registry.get('ThrowawayConverter'); print(f.name, f.names)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("throwaway ('throwaway', 'throwaway_lm', 'ThrowawayConverter'"), \
        r.stdout + r.stderr
    env.pop("MS_MM_FAMILY_MODULES")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "'ThrowawayConverter' is not a known model family" in r.stderr


def test_tiny_convert_train_convert_back_and_parity(family_pkg, tmp_path):
    # a tiny checkpoint from the family's own builder, with its own CLI switch
    _run(["-m", "convert.tiny", "throwaway", "--out", "hf", "--seed", "3", "--wide"], family_pkg, tmp_path)
    hf = _read_hf(tmp_path / "hf")
    assert hf["embed.weight"].shape == (24, 32) and set(hf) == {
        "embed.weight", "head.weight", "layers.0.fc.weight", "layers.0.fc.bias", "layers.1.fc.weight",
        "layers.1.fc.bias"}
    bad = subprocess.run([sys.executable, "-m", "convert.tiny", "qwen2_5_vl", "--out", "x", "--wide"],
                         env=_env(family_pkg), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--wide applies to throwaway only" in bad.stderr

    # mm-convert by the converter name, both ways, bit-exact
    _run(["-m", "convert.cli", "ThrowawayConverter", "hf_to_mm", "--cfg.mm_dir", "mm", "--cfg.hf_config.hf_dir", "hf"],
         family_pkg, tmp_path)
    _run(["-m", "convert.cli", "ThrowawayConverter", "mm_to_hf", "--cfg.mm_dir", "mm", "--cfg.hf_config.hf_dir", "hf",
          "--cfg.save_hf_dir", "back"], family_pkg, tmp_path)
    back = _read_hf(tmp_path / "back")
    assert set(back) == set(hf) and all(np.array_equal(back[k], hf[k]) for k in hf)

    # the trainer, in process, after ms_mm.registry.register: loads the converted weights, trains, saves
    sys.path.insert(0, str(family_pkg))
    try:
        from ms_mm import registry
        from ms_mm.training import mm_checkpoint as mmc
        from ms_mm.training.arguments import parse_args
        from ms_mm.training.trainer import train

        registry.register(f"{PACKAGE}.family")
        (tmp_path / "model.json").write_text(json.dumps({"model_id": "throwaway_lm", "vocab_size": 24,
                                                         "hidden_size": 32, "num_layers": 2}))
        (tmp_path / "data.json").write_text("{}")
        argv = ["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
                "--load", str(tmp_path / "mm"), "--save", str(tmp_path / "save"), "--save-interval", "20",
                "--train-iters", "20", "--micro-batch-size", "8", "--lr", "5e-2", "--log-interval", "1"]
        import io
        losses = train(parse_args(argv), stream=io.StringIO())
    finally:
        registry.unregister("throwaway")
        sys.path.remove(str(family_pkg))
    assert len(losses) == 20 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    trained = mmc.load_model(tmp_path / "save")
    save_iter = mmc.iteration_dir(tmp_path / "save", mmc.latest_iteration(tmp_path / "save"))
    assert mmc.read_layout(save_iter).family == "throwaway"
    _run(["-m", "convert.cli", "ThrowawayConverter", "mm_to_hf", "--cfg.mm_dir", "save", "--cfg.hf_config.hf_dir",
          "hf", "--cfg.save_hf_dir", "trained_hf"], family_pkg, tmp_path)
    trained_hf = _read_hf(tmp_path / "trained_hf")
    assert np.array_equal(trained_hf["layers.1.fc.weight"],
                          trained["text_decoder.decoder.layers.1.linear.weight"])
    assert not np.array_equal(trained_hf["layers.1.fc.weight"], hf["layers.1.fc.weight"])

    # mm-parity against a numpy reference computed from the HF tensors themselves
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 24, (2, 5))
    labels = (ids + 1) % 24
    np.savez(tmp_path / "inputs.npz", input_ids=ids, labels=labels)
    x = hf["embed.weight"][ids].astype(np.float64)
    for i in range(2):
        x = x + np.maximum(x @ hf[f"layers.{i}.fc.weight"].T + hf[f"layers.{i}.fc.bias"], 0)
    logits = x @ hf["head.weight"].T
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    loss = -np.take_along_axis(logp, labels[..., None], -1).mean()
    np.savez(tmp_path / "ref.npz", loss=np.float32(loss), logits=logits.astype(np.float32))
    r = _run(["-m", "convert.parity", "throwaway", "--hf-dir", "hf", "--inputs", "inputs.npz", "--out", "out.npz",
              "--reference", "ref.npz"], family_pkg, tmp_path)
    assert "ok   loss" in r.stdout and "ok   logits" in r.stdout, r.stdout
