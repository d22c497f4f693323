"""Shared pieces of the DryRun tests: the fake CANN tree (built once per session) and small configs.

The tree is built by the project's own ``ms_mm.parallel.fake_cann`` into the user cache
(``MS_MM_CACHE`` or ``~/.cache/ms_mm``), reused across runs, or into a session temp dir when the
cache is not writable. Building needs gcc and nm, which CI machines have: a missing tool is an
error, never a skip.
"""
import os
import re
from pathlib import Path

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


def collectives(ir_dir):
    """(op, input shape, output shape, scope) of every collective in the largest compiled graph under
    ``ir_dir`` (``MS_DEV_SAVE_GRAPHS=1`` with ``MS_DEV_SAVE_GRAPHS_PATH``: the train step's, beside the
    trainer's small helper graphs); scope is the op's full name."""
    graph = max(Path(ir_dir).rglob("graph_build_*.ir"), key=lambda f: f.stat().st_size)
    lines = graph.read_text().splitlines()
    shape = r"<Tensor\[\w+\], \(([\d, ]*)\)>"
    out = []
    for i, line in enumerate(lines[:-1]):
        m = re.match(r"\s+%\S+ = (AllGather|ReduceScatter|AllReduce|AlltoAll\w*|AllToAll\w*)\(", line)
        shapes = re.findall(shape, lines[i + 1])
        if m and len(shapes) >= 2:
            scope = next((ln.split("Fullname with scope: ", 1)[1] for ln in lines[i:i + 8]
                          if "Fullname with scope: " in ln), "")
            out.append((m.group(1),) + tuple(tuple(int(d) for d in s.split(",") if d.strip()) for s in shapes[:2])
                       + (scope,))
    return out
