"""Parity runners (the `convert.parity` / ``mm-parity`` runner signature) for Lumina-mGPT 2.0 and
its MoVQGAN tokenizer: load an upstream-layout checkpoint through the project's converter, run it
in MindSpore graph mode in fp32, and return arrays under the keys of the reference fixtures'
``outputs.npz`` (../shared/fixtures/lumina_mgpt2/{forward,movqgan}/README.md).

* `run_parity(hf_dir, inputs, grad_names)`: inputs ``input_ids``, ``labels`` [B, S] (padded, as the
  fixture) and optionally ``seq_lens`` [B] (then the rows are unpadded and re-padded exactly as
  upstream's forward does) and ``image_codes`` (recorded only). Outputs ``logits``, ``c_loss``,
  ``z_loss``, ``z_loss_weight``, ``loss`` and, per HF tensor name n in ``grad_names``,
  ``grad.n`` (d loss, loss = c_loss + z_loss_weight * z_loss) and ``grad_zloss_only.n`` (d z_loss).
* `run_movqgan_parity(hf_dir, inputs, grad_names)`: input ``image`` [B, 3, H, W] in [-1, 1] and
  optionally ``codes_hw`` (codes to decode; default the encoded ones). Outputs ``codes`` (flattened
  row-major), ``codes_hw`` ([h, w] for one image, else [B, h, w]), ``z_pre_quant``, ``z_q``,
  ``emb_loss``, ``decoded`` (decode_code) and ``decoded_from_quant`` (decode(z_q)); ``grad.n`` is
  d emb_loss / d n (the VQ loss is the only loss the tokenizer defines without its discriminator).
Bad inputs raise ``ValueError("inputs: ...")``; an unknown gradient name raises ``ValueError("grad: ...")``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

__all__ = ["run_parity", "run_movqgan_parity", "LUMINA_INPUT_KEYS", "MOVQGAN_INPUT_KEYS"]

LUMINA_INPUT_KEYS = {"input_ids": True, "labels": True, "seq_lens": False, "image_codes": False}
MOVQGAN_INPUT_KEYS = {"image": True, "codes_hw": False}


def _check_keys(inputs: Dict[str, np.ndarray], keys: Dict[str, bool], what: str):
    missing = [k for k, required in keys.items() if required and k not in inputs]
    unknown = sorted(set(inputs) - set(keys))
    if missing or unknown:
        raise ValueError(f"inputs: {what} needs {[k for k, r in keys.items() if r]} (optional "
                         f"{[k for k, r in keys.items() if not r]}); missing {missing}, unknown {unknown}")


def _check_grad_names(family, config, names: Sequence[str]):
    """Refuse unknown gradient names before anything is compiled."""
    from convert import get_spec
    from convert.spec import expand_rules

    spec = get_spec(family)
    known = {h for r in expand_rules(spec.rules(config), spec.layer_counts(config)) for h in r.hf}
    for name in names:
        if name not in known:
            close = [k for k in sorted(known) if k.split(".")[-2:] == name.split(".")[-2:]][:5]
            raise ValueError(f"grad: {name!r} is not a trainable {family} checkpoint tensor"
                             + (f" (e.g. {', '.join(close)})" if close else ""))


def _hf_grads(family, config, weights, grads, names: Sequence[str], prefix: str, out: Dict[str, np.ndarray]):
    import convert

    hf = convert.mm_grads_to_hf(family, config, {p.name: g.asnumpy() for p, g in zip(weights, grads)})
    for name in names:
        out[f"{prefix}.{name}"] = hf[name]


def run_parity(hf_dir, inputs: Dict[str, np.ndarray], grad_names: List[str]) -> Dict[str, np.ndarray]:
    import mindspore as ms

    import convert
    from ms_mm.models.lumina_mgpt2.inputs import MODEL_INPUT_NAMES, build_model_inputs
    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.training.weights import load_state_dict

    _check_keys(inputs, LUMINA_INPUT_KEYS, "lumina_mgpt2")
    ids, labels = np.asarray(inputs["input_ids"]), np.asarray(inputs["labels"])
    if ids.ndim != 2 or labels.shape != ids.shape:
        raise ValueError(f"inputs: input_ids {list(ids.shape)} and labels {list(labels.shape)} must be equal [B, S]")
    config, state = convert.load_hf_as_mm(hf_dir, "lumina_mgpt2")
    _check_grad_names("lumina_mgpt2", config, grad_names)
    batch = {"input_ids": ids, "labels": labels}
    if "seq_lens" in inputs:
        lens = np.asarray(inputs["seq_lens"]).reshape(-1)
        if lens.shape[0] != ids.shape[0] or (lens < 1).any() or (lens > ids.shape[1]).any():
            raise ValueError(f"inputs: seq_lens {lens.tolist()} do not fit input_ids {list(ids.shape)}")
        batch = {"input_ids": [ids[i, :n].tolist() for i, n in enumerate(lens)],
                 "labels": [labels[i, :n].tolist() for i, n in enumerate(lens)]}
    try:
        feed = build_model_inputs(batch, config)
    except ValueError as e:
        raise ValueError(f"inputs: {e}") from e
    args = [ms.Tensor(feed[k]) for k in MODEL_INPUT_NAMES]

    net = load_state_dict(LuminaMGPT2ForCausalLM(config), state)
    net.set_train(False)  # parity runs without dropout
    weights = net.trainable_params()

    def z_only(*a):
        res = net(*a)
        return res[3], res

    out: Dict[str, np.ndarray] = {}
    if grad_names:
        result, grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
        _hf_grads("lumina_mgpt2", config, weights, grads, grad_names, "grad", out)
        (_, _), z_grads = ms.jit(ms.value_and_grad(z_only, None, weights, has_aux=True))(*args)
        _hf_grads("lumina_mgpt2", config, weights, z_grads, grad_names, "grad_zloss_only", out)
    else:
        def forward(*a):
            return net(*a)

        result = ms.jit(forward)(*args)
    loss, logits, ce, z = (r.asnumpy() for r in result)
    logits = logits[..., :config.vocab_size]     # the padded vocabulary's rows are ours, not upstream's
    out.update({"logits": logits, "c_loss": np.float32(ce).reshape(()), "z_loss": np.float32(z).reshape(()),
                "z_loss_weight": np.float32(config.z_loss_weight).reshape(()), "loss": np.float32(loss).reshape(())})
    return out


def run_movqgan_parity(hf_dir, inputs: Dict[str, np.ndarray], grad_names: List[str]) -> Dict[str, np.ndarray]:
    import mindspore as ms
    from mindspore import nn

    import convert
    from ms_mm.models.lumina_mgpt2.movqgan import MoVQGAN
    from ms_mm.training.weights import load_state_dict

    _check_keys(inputs, MOVQGAN_INPUT_KEYS, "movqgan")
    image = np.asarray(inputs["image"], np.float32)
    if image.ndim != 4:
        raise ValueError(f"inputs: image must be [B, C, H, W], got {list(image.shape)}")
    config, state = convert.load_hf_as_mm(hf_dir, "movqgan")
    _check_grad_names("movqgan", config, grad_names)
    f = config.downsample_factor
    if image.shape[1] != config.in_channels or image.shape[2] % f or image.shape[3] % f:
        raise ValueError(f"inputs: image {list(image.shape)} needs {config.in_channels} channels and H, W "
                         f"divisible by {f}")
    b, h, w = image.shape[0], image.shape[2] // f, image.shape[3] // f
    net = load_state_dict(MoVQGAN(config), state)
    net.set_train(False)

    class _DecodeCode(nn.Cell):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def construct(self, codes):
            return self.model.decode_code(codes, h, w)

    def vq_loss(x):
        res = net(x)
        return res[1], res

    x = ms.Tensor(image)
    out: Dict[str, np.ndarray] = {}
    if grad_names:
        weights = net.trainable_params()
        result, grads = ms.jit(ms.value_and_grad(vq_loss, None, weights, has_aux=True))(x)
        result = result[1]
        _hf_grads("movqgan", config, weights, grads, grad_names, "grad", out)
    else:
        def forward(t):
            return net(t)

        result = ms.jit(forward)(x)
    decoded_q, loss, codes, z_q, z = (r.asnumpy() for r in result)
    codes = codes.astype(np.int64)
    if "codes_hw" in inputs:
        to_decode = np.asarray(inputs["codes_hw"]).reshape(b, -1)
        if to_decode.shape[1] != h * w:
            raise ValueError(f"inputs: codes_hw has {to_decode.shape[1]} codes per image, the image gives {h}x{w}")
    else:
        to_decode = codes
    decode_code = _DecodeCode(net)

    def decode(c):
        return decode_code(c)

    decoded = ms.jit(decode)(ms.Tensor(to_decode.astype(np.int32))).asnumpy()
    out.update({"codes": codes.reshape(-1), "codes_hw": codes.reshape(h, w) if b == 1 else codes.reshape(b, h, w),
                "z_pre_quant": z, "z_q": z_q, "emb_loss": np.float32(loss).reshape(()), "decoded": decoded,
                "decoded_from_quant": decoded_q})
    return out
