"""The one kernel switch of ms-mm: Ascend fused kernels or portable math.

The choice is made once per process (first call) from ``MS_MM_KERNELS`` (``ascend`` or
``portable``) or, when unset, from MindSpore's ``device_target``. Cells read it in
``__init__`` and keep it as a plain Python attribute, so graph mode sees a constant and
compiles only one branch.
"""
import os

import mindspore as ms
from mindspore import context
from mindspore.ops import constexpr

_VALID = ("ascend", "portable")
_choice = None


def kernels() -> str:
    """Return ``"ascend"`` or ``"portable"`` (decided on the first call, then fixed)."""
    global _choice
    if _choice is None:
        env = os.environ.get("MS_MM_KERNELS", "").strip().lower()
        if env:
            if env not in _VALID:
                raise ValueError(f"MS_MM_KERNELS={env!r}: expected one of {_VALID}")
            _choice = env
        else:
            target = str(ms.get_context("device_target")).lower()
            _choice = "ascend" if target == "ascend" else "portable"
    return _choice


def use_fused() -> bool:
    """True when the Ascend fused kernels are in use."""
    return kernels() == "ascend"


@constexpr
def sharded() -> bool:
    """True while compiling under semi-auto / auto parallel, where the parallel plans' per-primitive
    strategies apply; a compile-time constant, so graph mode keeps one branch. Ops with a faster
    unsharded spelling (``CoreAttention``, ``cross_entropy_sum``) use it only when this is False."""
    return context.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel")


def _reset_for_tests(choice=None):
    """Forget (or force) the decision; only tests should need this."""
    global _choice
    if choice is not None and choice not in _VALID:
        raise ValueError(f"kernel choice {choice!r}: expected one of {_VALID}")
    _choice = choice
