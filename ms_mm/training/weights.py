"""Putting an MM-named state dict into a Cell, with name and shape checks (used by the trainer,
mm-parity, the benches and every family's parity runner)."""
from typing import Mapping

import numpy as np

__all__ = ["load_state_dict"]


def load_state_dict(net, state: Mapping[str, np.ndarray], strict: bool = True):
    """Copy ``{MM name: array}`` into ``net``'s parameters (cast to each parameter's dtype).

    With ``strict`` every parameter must be given and every given name must exist; a mismatch
    raises one ``ValueError`` naming the offending tensors, before any parameter is modified.
    """
    import mindspore as ms  # here, not at import: the converter reads configs without MindSpore

    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad_shapes = [f"{k}: given {list(np.shape(state[k]))}, model has {list(params[k].shape)}"
                  for k in sorted(set(state) & set(params)) if tuple(np.shape(state[k])) != tuple(params[k].shape)]
    problems = []
    if strict and missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:6])}"
                        + (" ..." if len(unexpected) > 6 else ""))
    if bad_shapes:
        problems.append("shape mismatch: " + "; ".join(bad_shapes[:6]))
    if problems:
        raise ValueError(f"cannot load state into {type(net).__name__}: " + " | ".join(problems))
    for name, value in state.items():
        if name in params:
            p = params[name]
            p.set_data(ms.Tensor(np.asarray(value), dtype=p.dtype))
    return net
