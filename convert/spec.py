"""The conversion spec format: what a model family declares so `convert/` can move its weights.

A family adapter (`adapters/<family>.py`) exposes one `FamilySpec` named `SPEC`. The converter
framework (`convert/framework.py`) owns every loop, file and error; a spec is data:

* `Rule(mm, hf, layout, over, hf_shapes)` — one MM tensor made of one or more HF tensors.
  `mm` / `hf` are name templates; `{i}` is expanded over `range(layer_counts[over])`.
  `hf_shapes` (optional) are the expected HF part shapes, checked before any data is read.
* a layout says how the HF parts become the MM tensor and back; all are exact reshapes /
  concatenations, so hf → mm → hf is bit-exact for every dtype:
    - `IDENTITY`: same tensor.
    - `Concat(n)`: n equal parts stacked on dim 0 (e.g. [gate; up] → linear_fc1).
    - `GroupedRows(groups, rows)`: Megatron's fused qkv. The HF parts (q, k, v — or one fused
      tensor split into len(rows) equal parts when `fused_hf`) are cut into `groups` row blocks
      and interleaved per group: [q_g; k_g; v_g] for g in groups, `rows[j]` rows of part j each.
    - `StackExperts(experts, parts)`: routed experts stacked on a new dim 0 ([E, ...], the MM
      layout that expert parallel cuts on dim 0); the HF parts are listed expert by expert, each
      expert's `parts` concatenated on dim 0 first (e.g. [gate_e; up_e] → [E, 2I, H]).
* `FamilySpec` ties it together: converter name (CLI), `config_from_hf`, `rules(config)`,
  `layer_counts(config)`, HF name aliases accepted on input, the TP divisibility checks and the
  pipeline modules (`pp_modules`: layout key → counted layers and a human name).

Only numpy is needed; a spec never opens a file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Rule", "Layout", "IDENTITY", "Concat", "GroupedRows", "PadRows", "StackExperts", "FamilySpec",
           "SpecError", "expand_rules"]


class SpecError(ValueError):
    """A tensor does not fit the family's spec (the message names the tensor and the expectation)."""


class Layout:
    """HF parts ⇄ one MM tensor. Subclasses implement the four methods below."""

    n_parts = 1

    def to_mm(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def to_hf(self, full: np.ndarray) -> List[np.ndarray]:
        raise NotImplementedError

    def mm_shape(self, part_shapes: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
        raise NotImplementedError

    def hf_shapes(self, mm_shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
        raise NotImplementedError


class _Identity(Layout):
    def to_mm(self, parts):
        return parts[0]

    def to_hf(self, full):
        return [full]

    def mm_shape(self, part_shapes):
        return tuple(part_shapes[0])

    def hf_shapes(self, mm_shape):
        return [tuple(mm_shape)]

    def __repr__(self):
        return "IDENTITY"


IDENTITY = _Identity()


@dataclass(frozen=True)
class PadRows(Layout):
    """One HF tensor of ``rows`` rows ⇄ the MM tensor of ``padded`` rows: zero rows appended (a padded
    vocabulary: Megatron's --make-vocab-size-divisible-by), dropped again on the way back."""
    rows: int
    padded: int

    def to_mm(self, parts):
        (x,) = parts
        if x.shape[0] != self.rows:
            raise SpecError(f"PadRows: expected {self.rows} rows, got {x.shape[0]}")
        if self.padded == self.rows:
            return x
        return np.concatenate([x, np.zeros((self.padded - self.rows,) + x.shape[1:], x.dtype)], 0)

    def to_hf(self, full):
        if full.shape[0] != self.padded:
            raise SpecError(f"PadRows: expected {self.padded} rows, got {full.shape[0]}")
        return [full[:self.rows]]

    def mm_shape(self, part_shapes):
        return (self.padded,) + tuple(part_shapes[0][1:])

    def hf_shapes(self, mm_shape):
        return [(self.rows,) + tuple(mm_shape[1:])]


@dataclass(frozen=True)
class Concat(Layout):
    """`n` equal HF parts concatenated on dim 0."""
    n: int = 2

    @property
    def n_parts(self):
        return self.n

    def to_mm(self, parts):
        return np.concatenate(parts, axis=0)

    def to_hf(self, full):
        if full.shape[0] % self.n:
            raise SpecError(f"dim 0 ({full.shape[0]}) is not divisible into {self.n} equal parts")
        return np.split(full, self.n, axis=0)

    def mm_shape(self, part_shapes):
        if len({tuple(s) for s in part_shapes}) != 1:
            raise SpecError(f"parts to concatenate must have equal shapes, got {[list(s) for s in part_shapes]}")
        s = tuple(part_shapes[0])
        return (s[0] * self.n,) + s[1:]

    def hf_shapes(self, mm_shape):
        return [(mm_shape[0] // self.n,) + tuple(mm_shape[1:])] * self.n


@dataclass(frozen=True)
class StackExperts(Layout):
    """`experts` x `parts` HF tensors (expert-major: e0's parts, then e1's, ...) ⇄ one MM tensor
    [experts, parts * rows, ...]: each expert's parts concatenated on dim 0, the experts stacked on a
    new dim 0."""
    experts: int
    parts: int = 1

    @property
    def n_parts(self):
        return self.experts * self.parts

    def to_mm(self, parts):
        # filled in place: peak = the parts + the stacked tensor
        shape = self.mm_shape([np.shape(x) for x in parts])
        out = np.empty(shape, dtype=parts[0].dtype)
        rows = shape[1] // self.parts
        for i, x in enumerate(parts):
            e, j = divmod(i, self.parts)
            out[e, j * rows:(j + 1) * rows] = x
        return out

    def to_hf(self, full):
        if full.shape[0] != self.experts or full.shape[1] % self.parts:
            raise SpecError(f"shape {list(full.shape)}: expected {self.experts} experts on dim 0 and dim 1 "
                            f"divisible into {self.parts} parts")
        return [piece for e in range(self.experts) for piece in np.split(full[e], self.parts, axis=0)]

    def mm_shape(self, part_shapes):
        if len({tuple(s) for s in part_shapes}) != 1:
            raise SpecError(f"expert parts must have equal shapes, got {sorted({tuple(s) for s in part_shapes})}")
        s = tuple(part_shapes[0])
        return (self.experts, s[0] * self.parts) + s[1:]

    def hf_shapes(self, mm_shape):
        return [(mm_shape[1] // self.parts,) + tuple(mm_shape[2:])] * self.n_parts


@dataclass(frozen=True)
class GroupedRows(Layout):
    """Per-group interleave of row blocks (Megatron fused qkv).

    MM rows = for g in range(groups): [part_0 rows of group g; part_1 rows of g; ...], where part j
    holds `rows[j]` rows per group. `fused_hf=True`: HF stores the parts as one tensor, stacked.
    """
    groups: int
    rows: Tuple[int, ...]
    fused_hf: bool = False

    @property
    def n_parts(self):
        return 1 if self.fused_hf else len(self.rows)

    def _hf_part_rows(self):
        return [self.groups * r for r in self.rows]

    def to_mm(self, parts):
        if self.fused_hf:
            parts = np.split(parts[0], np.cumsum(self._hf_part_rows())[:-1], axis=0)
        trail = parts[0].shape[1:]
        blocks = [p.reshape((self.groups, r) + trail) for p, r in zip(parts, self.rows)]
        return np.concatenate(blocks, axis=1).reshape((-1,) + trail)

    def to_hf(self, full):
        trail = full.shape[1:]
        per_group = sum(self.rows)
        if full.shape[0] != self.groups * per_group:
            raise SpecError(f"dim 0 is {full.shape[0]}, expected {self.groups} groups x {per_group} rows")
        g = full.reshape((self.groups, per_group) + trail)
        parts = [p.reshape((-1,) + trail) for p in np.split(g, np.cumsum(self.rows)[:-1], axis=1)]
        return [np.concatenate(parts, axis=0)] if self.fused_hf else parts

    def mm_shape(self, part_shapes):
        want = [sum(self._hf_part_rows())] if self.fused_hf else self._hf_part_rows()
        got = [s[0] for s in part_shapes]
        trails = {tuple(s[1:]) for s in part_shapes}
        if got != want or len(trails) != 1:
            raise SpecError(f"parts have shapes {[list(s) for s in part_shapes]}; expected dim 0 = {want} "
                            f"({self.groups} groups x rows {list(self.rows)}) and equal trailing dims")
        return (self.groups * sum(self.rows),) + trails.pop()

    def hf_shapes(self, mm_shape):
        trail = tuple(mm_shape[1:])
        if self.fused_hf:
            return [(sum(self._hf_part_rows()),) + trail]
        return [(r,) + trail for r in self._hf_part_rows()]


@dataclass(frozen=True)
class Rule:
    """One MM tensor ← HF tensors. `{i}` in names is expanded over `layer_counts[over]`."""
    mm: str
    hf: Tuple[str, ...]
    layout: Layout = IDENTITY
    over: Optional[str] = None
    hf_shapes: Optional[Tuple[Tuple[int, ...], ...]] = None

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        if len(self.hf) != self.layout.n_parts:
            raise SpecError(f"rule for {self.mm!r}: layout {self.layout!r} takes {self.layout.n_parts} HF "
                            f"tensors, {len(self.hf)} given")


def expand_rules(rules: Sequence[Rule], counts: Dict[str, int]) -> List[Rule]:
    """Concrete rules (no `{i}` left). A run of consecutive rules repeating over the same count is
    expanded layer-major (all tensors of layer 0, then layer 1, ...), as checkpoints order them."""
    out: List[Rule] = []
    run: List[Rule] = []

    def flush():
        if not run:
            return
        over = run[0].over
        if over not in counts:
            raise SpecError(f"rule for {run[0].mm!r} repeats over unknown layer count {over!r}")
        for i in range(counts[over]):
            for r in run:
                out.append(Rule(r.mm.format(i=i), tuple(h.format(i=i) for h in r.hf), r.layout, None, r.hf_shapes))
        run.clear()

    for r in rules:
        if run and r.over != run[0].over:
            flush()
        if r.over is None:
            out.append(r)
        else:
            run.append(r)
    flush()
    return out


@dataclass
class FamilySpec:
    """Everything `convert/` needs to know about one model family.

    family          short name ("qwen2_5_vl"), also the adapters module name
    converter       the CLI converter name ("Qwen2_5_VLConverter")
    config_from_hf  HF config.json dict → the ms_mm model config
    rules           model config → list[Rule] (may depend on the config, e.g. tied embeddings)
    layer_counts    model config → {"vit": depth, "llm": layers} used for `{i}` and pp checks
    pp_modules      layout key → (layer-count key, human name), e.g. {"llm": ("llm", "language model")}
    tp_checks       (model config, tp) → list of (what, number) that tp must divide
    hf_aliases      (regex, replacement) applied to HF names on input (other spellings → canonical)
    tied_copies     model config → [(src MM name, dst MM name)] materialised when pp > 1 (a tied
                    output layer on the last stage), dropped again on the way back
    tp_rules / pp_stages  override ms_mm.training.mm_checkpoint defaults (None = defaults); tp_rules may be a
                    function of the model config (DeepSeek-VL2: its parallel plan's table, MLA or MHA)
    hf_extra_files  patterns of non-weight files copied from hf_dir on mm_to_hf
    custom_model_types  config.json ``model_type`` values that transformers only loads with
                    ``trust_remote_code=True`` (the model's code ships outside transformers, e.g.
                    DeepSeek-VL2's ``deepseek_vl_v2``); `mm-convert` then wants
                    ``--cfg.trust_remote_code True`` as MindSpeed-MM does (nothing is executed here)
    init_tensor     (HF name, shape, numpy Generator) → array or None: the random init of the family's own
                    tensors in tiny checkpoints (`convert.tiny.write_random_hf`; None: the default rule)
    read_hf_config  hf_dir (Path) → the config dict given to `config_from_hf`, for releases whose config
                    is not one `config.json` (None: read `config.json`); raise ConversionError naming the file
    hf_weight_file  HF tensor name → the weight file `mm_to_hf` writes it to, for releases whose weights live
                    in named files (None: `model.safetensors`, sharded above max_shard_size, + index)
    """
    family: str
    converter: str
    config_from_hf: Callable[[Dict[str, Any]], Any]
    rules: Callable[[Any], List[Rule]]
    layer_counts: Callable[[Any], Dict[str, int]]
    pp_modules: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    tp_checks: Callable[[Any], List[Tuple[str, int]]] = lambda config: []
    hf_aliases: Sequence[Tuple[str, str]] = ()
    tied_copies: Callable[[Any], List[Tuple[str, str]]] = lambda config: []
    tp_rules: Optional[Union[List[Tuple[str, str]], Callable[[Any], List[Tuple[str, str]]]]] = None
    pp_stages: Optional[List[Dict[str, Any]]] = None
    hf_extra_files: Sequence[str] = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.md")
    custom_model_types: Optional[Sequence[str]] = None
    read_hf_config: Optional[Callable[[Any], Dict[str, Any]]] = None
    hf_weight_file: Optional[Callable[[str], str]] = None
    init_tensor: Optional[Callable[[str, Tuple[int, ...], Any], Any]] = None

    def canonical_hf_name(self, name: str) -> str:
        for pat, repl in self.hf_aliases:
            new = re.sub(pat, repl, name)
            if new != name:
                return new
        return name
