"""The `mm-parity qwen2_5_vl` runner: an HF checkpoint through the converter and the model, with the
fixture's output keys (loss, logits, image_embeds, M-RoPE ids, requested gradients by HF name)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from convert.parity import ParityError, check_grad_names, select_grads


def run_parity(hf_dir, inputs: Dict[str, np.ndarray], grad_names: List[str]) -> Dict[str, np.ndarray]:
    import mindspore as ms

    import convert
    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.qwen2_5_vl import (MODEL_INPUT_NAMES, VISION_INPUT_NAMES,
                                         Qwen2_5_VLForConditionalGeneration, build_model_inputs, get_rope_index)

    config, state = convert.load_hf_as_mm(hf_dir, "qwen2_5_vl")
    check_grad_names("qwen2_5_vl", config, state, grad_names)
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        if key not in inputs:
            raise ParityError(f"inputs: missing key {key!r} (have {sorted(inputs)})")
    try:
        model_inputs = build_model_inputs(inputs, config)
        position_ids, rope_deltas = get_rope_index(inputs["input_ids"], inputs.get("attention_mask"),
                                                   inputs["image_grid_thw"], config)
    except ValueError as e:
        raise ParityError(f"inputs: {e}") from e
    net = Qwen2_5_VLForConditionalGeneration(config)
    load_state_dict(net, state)
    args = [ms.Tensor(model_inputs[k]) for k in MODEL_INPUT_NAMES]
    vision_args = [ms.Tensor(model_inputs[k]) for k in VISION_INPUT_NAMES]
    out = {"position_ids": position_ids.astype(np.int64), "rope_deltas": rope_deltas.astype(np.int64)}
    out["image_embeds"] = net.image_encoder(*vision_args).asnumpy()
    if grad_names:
        weights = net.trainable_params()
        step = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))
        (loss, logits), grads = step(*args)
        mm_grads = {p.name: g.asnumpy() for p, g in zip(weights, grads)}
        out.update(select_grads("qwen2_5_vl", config, mm_grads, grad_names))
    else:
        loss, logits = net(*args)
    out["loss"] = np.asarray(loss.asnumpy(), np.float32).reshape(())
    out["logits"] = logits.asnumpy()
    return out
