"""List the broadcasting element-wise kernels (and the other kernels that keep index tables) of a
compiled MindSpore graph, biggest first.

    MS_DEV_SAVE_GRAPHS=1 MS_DEV_SAVE_GRAPHS_PATH=DIR python <anything that compiles a graph>
    python scripts/cpu_broadcasts.py DIR/graph_build_0_*.ir [--top 30]

Why: MindSpore 2.9's CPU arithmetic kernels (Add, Sub, Mul, RealDiv, ...) broadcast two
different-shaped inputs through index tables of one 8-byte offset per output element per input,
built at the first launch and kept for the graph's lifetime: 4x the fp32 output's size, resident,
for every such kernel instance (measured: a [2, 16, 1024, 1024] fp32 `x * r` with r [2, 16, 1024, 1]
keeps 512 MB beside its 128 MB output; one input of a single element is exempt).
`ms_mm.ops.functional.broadcast_pair` (and its `mul` / `add` / `sub` / `div`) spells those ops without
them on CPU; this script finds the ones left, with the model source line each came from. Table bytes
are the estimate 16 x output elements.

The same holds for two data-movement kernels, whatever their inputs: ``Transpose`` keeps one 8-byte
source offset per output element (built with the graph) and ``StridedSliceGrad`` (the gradient of a
slice, and of ``ops.split`` with unequal sizes) about 4 bytes. ``ms_mm.ops.functional.permute`` spells
transposes without it; the split's gradient is kept (the two replacements tried cost more, see
docs/performance.md). Both are listed below the broadcasts (``TABLE_BYTES``).
"""
from __future__ import annotations

import argparse
import collections
import math
import re
import sys

ELEMENTWISE = {"Add", "Sub", "Mul", "RealDiv", "Div", "Maximum", "Minimum", "Pow", "Equal", "NotEqual",
               "Less", "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr", "Select",
               "SquaredDifference", "FloorDiv", "Atan2", "Xdivy", "DivNoNan", "BitwiseAnd", "BitwiseOr"}
TABLE_BYTES = {"Transpose": 8, "StridedSliceGrad": 4}   # kept bytes per output element (measured)
NODE = re.compile(r"^\s+%\d+\([^)]*\) = (?:PrimFunc_)?(\w+)\(")
SHAPES = re.compile(r"<Tensor\[\w+\], \(([0-9, ]*)\)>")
SOURCE = re.compile(r"# In file (\S*ms_mm/\S+?:\d+)")


def _nodes(path: str, ops, skip_training: bool = False):
    """Yield (op, signature line, ms_mm source line) of each node of a saved graph whose op is in ``ops``
    (``skip_training``: the source line is the model's, not the train step's that differentiated it)."""
    lines = open(path).read().splitlines()
    i = 0
    while i < len(lines):
        m = NODE.match(lines[i])
        if not m or m.group(1) not in ops:
            i += 1
            continue
        op, j, src = m.group(1), i + 1, None
        sig = lines[j] if j < len(lines) else ""
        j += 1
        while j < len(lines) and not NODE.match(lines[j]):
            s = SOURCE.search(lines[j])
            if s and not (skip_training and "training/" in s.group(1)):
                src = s.group(1).split("ms_mm/", 1)[1]
            j += 1
        yield op, sig, src
        i = j


def _shapes(text: str):
    return [tuple(int(v) for v in g.split(",") if v.strip()) for g in SHAPES.findall(text)]


def scan(path: str):
    """Yield (op, input shapes, output shape, ms_mm source line) of each broadcasting kernel."""
    for op, sig, src in _nodes(path, ELEMENTWISE):
        if "->" in sig:
            ins, out = sig.split("->", 1)
            shapes, outs = _shapes(ins), _shapes(out)
            sizes = [math.prod(s) for s in shapes]
            if len(shapes) >= 2 and outs and len(set(shapes)) > 1 and min(sizes) > 1:
                yield op, shapes, outs[0], src


def scan_tables(path: str):
    """Yield (op, output shape, ms_mm source line) of each ``TABLE_BYTES`` kernel."""
    for op, sig, src in _nodes(path, TABLE_BYTES, skip_training=True):
        outs = _shapes(sig.split("->", 1)[-1])
        if outs:
            yield op, outs[0], src


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ir", nargs="+")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args(argv)
    rows = collections.Counter()
    for path in a.ir:
        for op, shapes, out, src in scan(path):
            rows[(op, str(shapes), str(out), src or "?")] += 16 * math.prod(out)
    total = sum(rows.values())
    print(f"{len(rows)} broadcasting kernel kinds, index tables ~{total / 2**20:.0f} MB in all")
    for (op, shapes, out, src), b in rows.most_common(a.top):
        print(f"{b / 2**20:9.1f} MB  {op:8s} {shapes} -> {out}  {src}")
    tables = collections.Counter()
    for path in a.ir:
        for op, out, src in scan_tables(path):
            tables[(op, str(out), src or "?")] += TABLE_BYTES[op] * math.prod(out)
    print(f"{len(tables)} Transpose / StridedSliceGrad kinds, index tables ~{sum(tables.values()) / 2**20:.0f} MB in all")
    for (op, out, src), b in tables.most_common(a.top):
        print(f"{b / 2**20:9.1f} MB  {op:16s} -> {out}  {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
