"""The shape of the code: imports only go downward, there are no import cycles, and no engine code
line names a model family (docs/internals.md, "Layers").

Layers, bottom up: `ms_mm.ops`; the registry (`ms_mm`, `ms_mm.registry`); the engines
(`ms_mm.training`, `ms_mm.parallel`, `ms_mm.data`, `convert`); family code (`ms_mm.models.<family>`,
`adapters.<family>`). Every import statement counts, also those inside functions; an engine reaches a
family only through the registry, by name (importlib), which is no import statement.
"""
import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("ms_mm", "convert", "adapters")
ENGINES = ("ms_mm.training", "ms_mm.parallel", "ms_mm.data", "convert")
# words that name a model family: every family in ms_mm/models and its upstream names
FAMILY_WORDS = ("qwen", "deepseek", "bagel", "lumina", "chameleon", "movqgan", "siglip", "toy_vlm", "throwaway")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    out = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(line, imported module) for every import statement, resolved to modules of this repository."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the longest prefix that is a module of ours
            parts = t.split(".")
            for n in range(len(parts), 0, -1):
                cand = ".".join(parts[:n])
                if cand in MODULES:
                    found.append((node.lineno, cand))
                    break
    return sorted(set(found))


def _adapter_folders():
    """adapters.<x> -> the family folder whose record names it (an adapter may serve a second record
    of a folder, e.g. an image tokenizer beside its model); else its own name."""
    from ms_mm import registry

    return {f.adapter: f.package.split(".")[-1] for f in registry.families() if f.adapter and f.package}


ADAPTER_FOLDERS = _adapter_folders()


def _layer(module: str):
    """(rank, family folder) of a module: 0 ops, 1 registry, 2 engines, 3 family code."""
    if module == "ms_mm.ops" or module.startswith("ms_mm.ops."):
        return 0, None
    if module in ("ms_mm", "ms_mm.registry"):
        return 1, None
    if any(module == e or module.startswith(e + ".") for e in ENGINES):
        return 2, None
    parts = module.split(".")
    if parts[:2] == ["ms_mm", "models"]:
        return 3, parts[2] if len(parts) > 2 else None
    if parts[0] == "adapters":
        adapter = ".".join(parts[:2])
        return 3, ADAPTER_FOLDERS.get(adapter, parts[1]) if len(parts) > 1 else None
    raise AssertionError(f"{module}: in no layer")


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_only_go_downward():
    bad = []
    for name, path in MODULES.items():
        rank, family = _layer(name)
        for line, target in _imports(name, path):
            t_rank, t_family = _layer(target)
            if t_rank > rank:
                bad.append(f"{path.relative_to(REPO)}:{line}: {name} imports {target} (upward)")
            elif rank == 3 and t_rank == 3 and family and t_family and family != t_family:
                bad.append(f"{path.relative_to(REPO)}:{line}: family {family} imports family {t_family} ({target})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for _, t in _imports(name, path) if t != name} for name, path in MODULES.items()}
    # a package's __init__ importing its own submodules is not a cycle back from them: drop the
    # implicit edge submodule -> package only when the package is just an ancestor
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _docstring_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _code_mentions(path: Path):
    """(line, text) of every identifier or string (docstrings and comments aside) naming a family."""
    text = path.read_text()
    skip = _docstring_lines(ast.parse(text))
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.NAME, tokenize.STRING) or tok.start[0] in skip:
            continue
        low = tok.string.lower()
        if any(w in low for w in FAMILY_WORDS):
            hits.append((tok.start[0], tok.string))
    return hits


@pytest.mark.parametrize("engine", ENGINES + ("ms_mm.registry", "ms_mm.ops"))
def test_engines_name_no_family(engine):
    bad = []
    for name, path in MODULES.items():
        if name == engine or name.startswith(engine + "."):
            bad += [f"{path.relative_to(REPO)}:{line}: {s}" for line, s in _code_mentions(path)]
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The checkers see what they must: a family word in code, an upward import, a cycle."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""Docstrings may name Qwen."""\n# so may comments: deepseek\nx = "qwen2_5_vl"\n')
    assert _code_mentions(probe) == [(3, '"qwen2_5_vl"')]
    assert _layer("ms_mm.models.qwen2_5_vl.family") == (3, "qwen2_5_vl") and _layer("convert.cli") == (2, None)
