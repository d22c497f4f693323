"""DeepSeek-VL2 parity: one upstream processor batch through ms-mm, with the fixtures' output keys
(`parity_outputs`), and the `mm-parity deepseek_vl2` runner (`run_parity`)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ms_mm.models.deepseek_vl2.config import DeepseekVL2Config


# ---------------------------------------------------------------------------------------------

def parity_outputs(config: DeepseekVL2Config, state: Dict[str, np.ndarray], inputs: Dict[str, np.ndarray],
                   gradients: Tuple[str, ...] = ("grad",)) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]]]:
    """Run the MM-named ``state`` on one upstream processor batch, in graph mode, fp32.

    Returns ``(outputs, grads)``. ``outputs`` uses the keys of the reference fixtures'
    ``outputs.npz``: ``logits``, ``loss`` (CE), ``images_embeds``, ``inputs_embeds`` and, per MoE
    layer L, ``moe.layer{L}.topk_idx`` / ``topk_weight`` (each row sorted by expert id: upstream's
    top-k order is unspecified) / ``aux_loss``. ``grads`` maps each requested kind to MM-named
    gradients: ``"grad"`` of CE + sum(aux) (upstream's training gradient), ``"grad_ce_only"`` of CE.
    Map them to HF names with ``convert.mm_grads_to_hf("deepseek_vl2", config, ...)``.
    """
    import mindspore as ms

    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES, DeepseekVL2ForCausalLM, build_model_inputs

    unknown = [g for g in gradients if g not in ("grad", "grad_ce_only")]
    if unknown:
        raise ValueError(f"parity_outputs: unknown gradient kind(s) {unknown}; expected 'grad' or 'grad_ce_only'")
    net = load_state_dict(DeepseekVL2ForCausalLM(config), state)
    feed = build_model_inputs(inputs, config)
    args = [ms.Tensor(feed[k]) for k in MODEL_INPUT_NAMES]
    weights = net.trainable_params()

    def ce_only(*a):
        out = net(*a)
        return out[2], out

    grads: Dict[str, Dict[str, np.ndarray]] = {}
    if "grad" in gradients:  # objective = first output = CE + sum(aux)
        result, g = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
        grads["grad"] = {p.name: x.asnumpy() for p, x in zip(weights, g)}
    if "grad_ce_only" in gradients:
        (_, result), g = ms.jit(ms.value_and_grad(ce_only, None, weights, has_aux=True))(*args)
        grads["grad_ce_only"] = {p.name: x.asnumpy() for p, x in zip(weights, g)}
    if not gradients:
        result = net(*args)
    _, logits, ce, aux, routing, routing_weights = (r.asnumpy() for r in result)

    tensors = {k: ms.Tensor(feed[k]) for k in ("input_ids", "pixel_values", "image_token_index", "images_seq_mask")}
    out = {"logits": logits, "loss": np.asarray(ce, np.float32).reshape(()),
           "images_embeds": net.image_encoder(tensors["pixel_values"]).asnumpy(),
           "inputs_embeds": net.embed(tensors["input_ids"], tensors["pixel_values"], tensors["image_token_index"],
                                      tensors["images_seq_mask"]).asnumpy()}
    moe_layers = [i for i in range(config.language_config.num_hidden_layers) if config.language_config.is_moe_layer(i)]
    for j, layer in enumerate(moe_layers):
        order = np.argsort(routing[j], axis=-1, kind="stable")
        out[f"moe.layer{layer}.topk_idx"] = np.take_along_axis(routing[j], order, -1).astype(np.int64)
        out[f"moe.layer{layer}.topk_weight"] = np.take_along_axis(routing_weights[j], order, -1)
        out[f"moe.layer{layer}.aux_loss"] = np.asarray(aux[j], np.float32).reshape(())
    return out, grads


def run_parity(hf_dir, inputs: Dict[str, np.ndarray], grad_names: List[str]) -> Dict[str, np.ndarray]:
    """``mm-parity deepseek_vl2`` runner (``convert.parity`` signature): load ``hf_dir`` through the
    converter, run ``parity_outputs`` and add ``grad.<name>`` (CE + aux objective) for each
    requested HF tensor name."""
    import convert

    config, state = convert.load_hf_as_mm(hf_dir, "deepseek_vl2")
    missing = [k for k in ("input_ids", "images", "images_seq_mask", "images_spatial_crop") if k not in inputs]
    if missing:
        raise ValueError(f"inputs: missing key(s) {missing} (have {sorted(inputs)}); expected the "
                         f"DeepseekVLV2Processor batch")
    out, grads = parity_outputs(config, state, inputs, gradients=("grad",) if grad_names else ())
    if grad_names:
        hf_grads = convert.mm_grads_to_hf("deepseek_vl2", config, grads["grad"])
        for name in grad_names:
            if name not in hf_grads:
                close = [k for k in sorted(hf_grads) if k.split(".")[-2:] == name.split(".")[-2:]][:5]
                raise ValueError(f"--grad {name}: not a trainable deepseek_vl2 checkpoint tensor"
                                 + (f" (e.g. {', '.join(close)})" if close else ""))
            out[f"grad.{name}"] = hf_grads[name]
    return out
