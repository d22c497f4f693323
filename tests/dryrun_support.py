"""Shared pieces of the DryRun tests: the fake CANN tree (built once per session) and small configs.

The tree is built by the project's own ``ms_mm.parallel.fake_cann`` into the user cache
(``MS_MM_CACHE`` or ``~/.cache/ms_mm``), reused across runs, or into a session temp dir when the
cache is not writable. Building needs gcc and nm, which CI machines have: a missing tool is an
error, never a skip.
"""
import os

import pytest

from ms_mm.parallel.fake_cann import default_cache_root, ensure_fake_cann

# tiny Qwen2.5-VL whose vision heads (4) and KV heads (4) allow tp = 4
TINY_TP4 = {"preset": "tiny", "vision": {"num_heads": 4}, "text": {"num_key_value_heads": 4}}


@pytest.fixture(scope="session")
def fake_cann_root(tmp_path_factory):
    cache = default_cache_root()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        cache = tmp_path_factory.mktemp("fake-cann")
    return ensure_fake_cann(cache)
