"""HF ⇄ MM checkpoint conversion: one framework (`convert.framework`), per-family specs in `adapters/`.

Public API: `load_hf_as_mm`, `mm_grads_to_hf`, `mm_state_to_hf`, `hf_to_mm`, `mm_to_hf`, `resplit`,
`get_spec`; the `mm-convert` CLI is `convert.cli:main`.
"""
from convert.framework import (  # noqa: F401
    ConversionError, hf_to_mm, load_hf_as_mm, make_layout, mm_grads_to_hf, mm_state_to_hf, mm_to_hf, resplit,
)
from convert.registry import get_spec  # noqa: F401
