"""`mm-parity` runner for BAGEL: a checkpoint in the release layout + one packed batch (the keys of
`fixtures/bagel/forward/inputs.npz`) -> the arrays the reference wrote, under the same keys.

The checkpoint goes through the project's converter (`convert.load_hf_as_mm`), the model runs in
MindSpore graph mode (`ms.jit`) in fp32, and gradients of loss = ce + mse come back under the
checkpoint's tensor names (`convert.mm_grads_to_hf`: fused qkv / gate-up split exactly).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

__all__ = ["run_parity", "INPUT_KEYS"]

FAMILY = "bagel"
# batch keys the runner reads (besides the model's, `padded_images` feeds the VAE outputs)
INPUT_KEYS = ("padded_images",)
_KNOWN_EXTRA = ("nested_attention_mask_", "ce_loss_weights")


def run_parity(hf_dir, inputs: Dict[str, np.ndarray], grad_names: List[str]) -> Dict[str, np.ndarray]:
    import mindspore as ms

    import convert
    from ms_mm.models.bagel.inputs import BATCH_KEYS, MODEL_INPUT_NAMES, build_model_inputs
    from ms_mm.models.bagel.modeling import Bagel, LatentDecoder
    from ms_mm.training.weights import load_state_dict

    known = set(BATCH_KEYS) | set(INPUT_KEYS) | {"noise", "split_lens", "attn_modes"}
    unknown = sorted(k for k in inputs if k not in known and not k.startswith(_KNOWN_EXTRA))
    if unknown:
        raise ValueError(f"inputs: unknown key(s) {unknown}; a BAGEL batch has {sorted(known)}")
    config, state = convert.load_hf_as_mm(hf_dir, FAMILY)
    hf_names = set(convert.mm_state_to_hf(FAMILY, config, {k: v for k, v in state.items()}))
    bad = [n for n in grad_names if n not in hf_names]
    if bad:
        raise ValueError(f"--grad {bad[0]}: not a tensor of this BAGEL checkpoint")
    try:
        model_inputs = build_model_inputs(inputs, config)
    except ValueError as e:
        raise ValueError(f"inputs: {e}") from e

    net = Bagel(config)
    load_state_dict(net, state)
    args = [ms.Tensor(model_inputs[k]) for k in MODEL_INPUT_NAMES]
    names = ("loss", "ce", "mse", "ce_per_token", "ce_logits", "velocity_pred", "velocity_target",
             "mse_elementwise", "packed_latent_clean", "timesteps_effective", "last_hidden_state",
             "vit_connector_out")
    out: Dict[str, np.ndarray] = {}
    if grad_names:
        weights = net.trainable_params()
        step = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))
        results, grads = step(*args)
        mm_grads = {p.name: g.asnumpy() for p, g in zip(weights, grads)}
        hf_grads = convert.mm_grads_to_hf(FAMILY, config, mm_grads)
        out.update({f"grad.{n}": hf_grads[n] for n in grad_names})
    else:
        results = ms.jit(net.construct)(*args)
    for name, value in zip(names, results):
        out[name] = np.asarray(value.asnumpy(), np.float32)
    out["last_hidden_state"] = out["last_hidden_state"][model_inputs["row_of_position"]]  # packed order

    if "padded_images" in inputs:
        images = ms.Tensor(np.asarray(inputs["padded_images"], np.float32))
        moments, latent = ms.jit(net.vae.construct)(images)
        out["vae_encoder_moments"] = moments.asnumpy()
        out["vae_latent"] = latent.asnumpy()
        out["vae_decoded"] = ms.jit(LatentDecoder(net.vae).construct)(latent).asnumpy()
    return out
