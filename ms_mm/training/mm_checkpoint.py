"""The MM checkpoint directory: file format, parallel layout and atomic commits.

This module owns everything on disk under a MindSpeed-MM style checkpoint root
(`docs/internals.md`, "MM checkpoint directory layout")::

    <root>/latest_checkpointed_iteration.txt      "release" or an integer
    <root>/release/ | <root>/iter_0000005/
        parallel_layout.json                      tp / pp layout + the rules to undo it
        mp_rank_{tp:02d}[_{pp:03d}]/model.safetensors
        ...                                       extra files written by training

It needs only numpy (no MindSpore, no torch), and it has three parts:

* **safetensors streaming I/O** (`SafetensorsFile`, `SafetensorsWriter`): tensors are read one at a
  time from their byte range and written one at a time behind a header computed up front, so
  converting or saving never holds more than one (full) tensor. We parse the format ourselves
  because the `safetensors` numpy backend cannot materialise bf16 / fp8; here such tensors are
  numpy arrays of a one-field structured dtype (`BF16`, ...) that reshape, slice and concatenate
  like any array and round-trip bit-exactly. `to_float32` widens them.
* **parallel layout** (`ParallelLayout`): which tensors are split on which dim across TP ranks and
  which pipeline stage holds which layers. The rules travel inside `parallel_layout.json`, so a
  checkpoint can be merged back without knowing its model family (ms_mm never imports the
  converter). `MEGATRON_TP_RULES` / `VLM_PP_STAGES` are the defaults for MindSpeed-MM names.
* **commit protocol** (`staged_iteration`, `save_model`, `load_model`, `open_model`): an iteration
  is written into a hidden temp dir, renamed into place, and only then is
  `latest_checkpointed_iteration.txt` replaced (temp file + rename), so a process killed mid-save
  leaves the previous good checkpoint as the latest one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "BF16", "F8_E4M3", "F8_E5M2", "SafetensorsFile", "SafetensorsWriter", "LazyTensor", "to_float32",
    "dtype_to_st", "st_to_dtype", "write_safetensors", "read_safetensors",
    "ParallelLayout", "MEGATRON_TP_RULES", "VLM_PP_STAGES", "CheckpointError",
    "LATEST_FILE", "LAYOUT_FILE", "MODEL_FILE", "iteration_dir", "latest_iteration",
    "staged_iteration", "save_model", "load_model", "open_model", "MMCheckpointReader", "read_layout",
    "tp_split", "tp_merge",
]

LATEST_FILE = "latest_checkpointed_iteration.txt"
LAYOUT_FILE = "parallel_layout.json"
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed or inconsistent (message names it)."""


# ---------------------------------------------------------------------------------------------
# safetensors streaming I/O
# ---------------------------------------------------------------------------------------------

# numpy has no bf16/fp8: a one-field structured dtype keeps the bytes and the identity of the type
BF16 = np.dtype([("bf16", "<u2")])
F8_E4M3 = np.dtype([("f8_e4m3", "u1")])
F8_E5M2 = np.dtype([("f8_e5m2", "u1")])

_ST_TO_NP = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
    "F8_E4M3": F8_E4M3, "F8_E5M2": F8_E5M2,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


def st_to_dtype(name: str) -> np.dtype:
    try:
        return _ST_TO_NP[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}") from None


def dtype_to_st(dtype) -> str:
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        raise CheckpointError(f"big-endian dtype {dt} cannot be stored in safetensors")
    key = dt.newbyteorder("<") if dt.byteorder == "=" else dt
    for cand in (dt, key):
        if cand in _NP_TO_ST:
            return _NP_TO_ST[cand]
    raise CheckpointError(f"numpy dtype {dt} has no safetensors equivalent")


def to_float32(arr: np.ndarray) -> np.ndarray:
    """Widen any floating array (bf16 structured dtype included) to float32; bf16 → f32 is exact."""
    if arr.dtype == BF16:
        return (arr.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if arr.dtype in (F8_E4M3, F8_E5M2):
        raise CheckpointError("fp8 tensors need their scales to be widened; not supported here")
    return arr.astype(np.float32, copy=False)


class SafetensorsFile:
    """Lazily opened safetensors file: the header is parsed once, each tensor read on demand."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                size = self.path.stat().st_size
                if n > size - 8:
                    raise CheckpointError(f"{self.path}: header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors header ({e})") from e
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
        data_len = size - self._data_start
        for name, info in header.items():
            try:
                dtype = st_to_dtype(info["dtype"])
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: bad header entry for tensor {name!r} ({e})") from e
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > data_len:
                raise CheckpointError(f"{self.path}: tensor {name!r} byte range [{begin},{end}) does not "
                                      f"match shape {list(shape)} {info['dtype']} / file size")
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self._entry(name)
        return e - b

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entry(name)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: truncated data for tensor {name!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def lazy(self, name: str) -> "LazyTensor":
        return LazyTensor(self.shape(name), self.dtype(name), lambda: self.get(name))

    def memmap(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only memory map: slicing it reads only the pages of the slice."""
        dtype, shape, begin, _ = self._entry(name)
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

    def read_region(self, name: str, region) -> np.ndarray:
        """The block `region` ((start, stop) per dim) of tensor `name`, read through its memory map."""
        return np.array(self.memmap(name)[tuple(slice(s, e) for s, e in region)])

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None


@dataclass
class LazyTensor:
    """A tensor known by shape and dtype whose data is produced on demand (once per call)."""
    shape: Tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]


def _as_lazy(value) -> LazyTensor:
    if isinstance(value, LazyTensor):
        return value
    arr = np.asarray(value)
    return LazyTensor(tuple(arr.shape), arr.dtype, lambda: arr)


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order its header was declared.

    The header (names, dtypes, shapes) must be known up front; `write` then appends raw bytes,
    so only the tensor being written is in memory. The file appears under its final name only
    after `close()` succeeded.
    """

    def __init__(self, path, entries: Sequence[Tuple[str, Tuple[int, ...], np.dtype]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        header: Dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = []
        for name, shape, dtype in entries:
            if name in header:
                raise CheckpointError(f"{self.path}: tensor {name!r} declared twice")
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": dtype_to_st(dtype), "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(int(s) for s in shape), dtype))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data start, as the reference writer does
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise CheckpointError(f"{self.path}: unexpected extra tensor {name!r}")
        want_name, shape, dtype = self._order[self._next]
        if name != want_name:
            raise CheckpointError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        arr = np.asarray(arr)
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {list(arr.shape)} {arr.dtype}, "
                                  f"header says {list(shape)} {dtype}")
        self._f.write(np.ascontiguousarray(arr).data)
        self._next += 1

    def close(self) -> None:
        if self._f is None:
            return
        if self._next != len(self._order):
            self.abort()
            raise CheckpointError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path, tensors: Mapping[str, Union[np.ndarray, LazyTensor]],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a dict of arrays / LazyTensors, loading each lazy tensor only while it is written."""
    lazies = {k: _as_lazy(v) for k, v in tensors.items()}
    with SafetensorsWriter(path, [(k, t.shape, t.dtype) for k, t in lazies.items()], metadata) as w:
        for k, t in lazies.items():
            w.write(k, t.load())


def read_safetensors(path) -> Dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


# ---------------------------------------------------------------------------------------------
# parallel layout: TP split rules and pipeline stages
# ---------------------------------------------------------------------------------------------

# (regex on the full MM name, kind); first match wins, no match = replicated on every TP rank.
# kinds, on a weight's last two dims (dim 0 / dim 1 of a 2-D weight, dim 1 / dim 2 of stacked experts
# [E, out, in]; a 1-D bias splits dim 0 for "col" and stays whole for "row"):
#        "col" the output dim; "col_gated" the output dim with its [gate; up] halves split
#        separately; "row" the input dim (row-parallel weights).
MEGATRON_TP_RULES: List[Tuple[str, str]] = [
    (r".*\.projector\.encoder\.linear_fc1\.(weight|bias)$", "col"),
    (r".*\.self_attention\.linear_qkv\.(weight|bias)$", "col"),
    (r".*\.linear_fc1\.(weight|bias)$", "col_gated"),  # MLPs, shared and routed experts
    (r".*\.word_embeddings\.weight$", "col"),
    (r".*\.output_layer\.weight$", "col"),
    (r".*\.linear_proj\.weight$", "row"),
    (r".*\.linear_fc2\.weight$", "row"),
]

# stacked routed-expert weights ([E, 2I, H] fc1, [E, H, I] fc2): dim 0 is the expert axis, split in
# contiguous blocks over EP ranks (EP rank r holds experts [r*E/ep, (r+1)*E/ep), whole)
EXPERT_PATTERN = r"^.*\.experts\.linear_fc[12]\.weight$"

# One entry per pipelined module: its layer prefix, which `<key>_pp_layers` splits it, and the
# non-layer tensors that live on its first / last non-empty stage (MindSpeed-MM's convention).
VLM_PP_STAGES: List[Dict[str, Any]] = [
    {"key": "vit", "layers": "image_encoder.encoder.blocks.layers.",
     "firsts": ["image_encoder.encoder.patch_embed."], "lasts": ["image_encoder.projector."]},
    {"key": "llm", "layers": "text_decoder.decoder.layers.",
     "firsts": ["text_decoder.embedding."],
     "lasts": ["text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."]},
]


def tp_axis(kind: Optional[str], ndim: int) -> Optional[int]:
    """The dim a TP rule kind splits in a tensor of `ndim` dims (None: the tensor stays whole)."""
    if kind is None:
        return None
    if kind == "row":
        return ndim - 1 if ndim >= 2 else None
    if kind in ("col", "col_gated"):
        return max(ndim - 2, 0)
    raise CheckpointError(f"unknown TP split kind {kind!r}")


def tp_split(arr: np.ndarray, kind: Optional[str], tp: int, name: str = "?") -> List[np.ndarray]:
    """Split one full tensor into `tp` rank pieces according to its rule kind."""
    return [tp_piece(arr, kind, tp, r, name) for r in range(tp)]


def tp_piece(arr: np.ndarray, kind: Optional[str], tp: int, rank: int, name: str = "?") -> np.ndarray:
    """TP rank `rank`'s piece of `arr` (`tp_split(...)[rank]`, built without the other pieces)."""
    axis = tp_axis(kind, arr.ndim)
    if tp == 1 or axis is None:
        return arr
    n = arr.shape[axis]
    if kind == "col_gated":
        if n % (2 * tp):
            raise CheckpointError(f"tensor {name!r} gate/up halves ({n} rows) are not divisible by tp_size {tp}")
        per, half = n // 2 // tp, n // 2
        return np.concatenate([_axis_slice(arr, axis, rank * per, (rank + 1) * per),
                               _axis_slice(arr, axis, half + rank * per, half + (rank + 1) * per)], axis=axis)
    if n % tp:
        raise CheckpointError(f"tensor {name!r} dim {axis} ({n}) is not divisible by tp_size {tp}")
    return _axis_slice(arr, axis, rank * (n // tp), (rank + 1) * (n // tp))


def tp_merge(pieces: Sequence[np.ndarray], kind: Optional[str]) -> np.ndarray:
    """Inverse of `tp_split`."""
    axis = tp_axis(kind, pieces[0].ndim)
    if len(pieces) == 1 or axis is None:
        return pieces[0]
    if kind == "col_gated":
        halves = [np.split(p, 2, axis=axis) for p in pieces]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=axis)
    return np.concatenate(pieces, axis=axis)


def _split_shape(shape, kind, tp, ep=1):
    """The shape of one rank's piece: the TP dim divided by tp and, for an expert tensor (ep > 1), dim 0
    by ep."""
    out = list(shape)
    axis = tp_axis(kind, len(shape))
    if tp > 1 and axis is not None:
        out[axis] //= tp
    if ep > 1:
        out[0] //= ep
    return tuple(out)


@dataclass
class ParallelLayout:
    """How a full MM state dict is spread over TP ranks and PP stages.

    `pp_layers` maps a module key of `pp_stages` ("vit", "llm") to its layers per stage, e.g.
    {"llm": [1, 10, 10, 7], "vit": [32, 0, 0, 0]}; all lists have pp_size entries. Stored as
    `parallel_layout.json` ({"tp_size", "llm_pp_layers", "vit_pp_layers", "family", "tp_rules",
    "pp_stages"}).
    """
    tp_size: int = 1
    pp_layers: Dict[str, List[int]] = field(default_factory=dict)
    family: str = ""
    tp_rules: List[Tuple[str, str]] = field(default_factory=lambda: list(MEGATRON_TP_RULES))
    pp_stages: List[Dict[str, Any]] = field(default_factory=lambda: [dict(s) for s in VLM_PP_STAGES])
    # [src, dst]: dst is a copy of src stored only when pp > 1 (a tied output layer on the last stage)
    tied: List[List[str]] = field(default_factory=list)
    # expert parallelism: tensors whose name matches expert_pattern are stacked experts (dim 0 =
    # num_experts), split on dim 0 into ep_size contiguous blocks, one per EP rank; every other tensor
    # is repeated on every EP rank
    ep_size: int = 1
    num_experts: int = 0
    expert_pattern: str = EXPERT_PATTERN

    def __post_init__(self):
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise CheckpointError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise CheckpointError(f"ep_size must be a positive integer, got {self.ep_size!r}")
        if self.num_experts and self.num_experts % self.ep_size:
            raise CheckpointError(f"ep_size {self.ep_size} does not divide the number of experts {self.num_experts}")
        self._expert_re = re.compile(self.expert_pattern)
        sizes = {k: len(v) for k, v in self.pp_layers.items()}
        if len(set(sizes.values())) > 1:
            raise CheckpointError(f"pipeline layer lists have different numbers of stages: {sizes}")
        for k, v in self.pp_layers.items():
            if any((not isinstance(n, int)) or n < 0 for n in v):
                raise CheckpointError(f"{k}_pp_layers must be non-negative integers, got {v}")
        known = {s["key"] for s in self.pp_stages}
        for k in self.pp_layers:
            if k not in known:
                raise CheckpointError(f"{k}_pp_layers given but no pipeline stage schema has key {k!r} "
                                      f"(known: {sorted(known)})")
        self._compiled = [(re.compile(p), kind) for p, kind in self.tp_rules]

    @property
    def pp_size(self) -> int:
        return max((len(v) for v in self.pp_layers.values()), default=1) or 1

    def tp_kind(self, name: str) -> Optional[str]:
        for pat, kind in self._compiled:
            if pat.match(name):
                return kind
        return None

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        """MindSpeed-MM's naming: mp_rank_{tp:02d}[_{pp:03d} if pp > 1][_{ep:03d} if ep > 1]."""
        name = f"mp_rank_{tp_rank:02d}"
        if self.pp_size > 1:
            name += f"_{pp_rank:03d}"
        if self.ep_size > 1:
            name += f"_{ep_rank:03d}"
        return name

    # --- expert placement -------------------------------------------------------------------
    def is_expert(self, name: str) -> bool:
        """Is `name` a stacked-expert tensor (dim 0 split over EP ranks)?"""
        return bool(self._expert_re.match(name))

    def ep_of(self, name: str) -> int:
        """How many EP blocks `name` is stored in (ep_size for a stacked-expert tensor, else 1)."""
        return self.ep_size if self.ep_size > 1 and self.is_expert(name) else 1

    # --- pipeline placement -----------------------------------------------------------------
    def _ranges(self, key):
        counts = self.pp_layers.get(key)
        if counts is None:
            return None
        ends = list(accumulate(counts))
        nonzero = [i for i, c in enumerate(counts) if c]
        first, last = (nonzero[0], nonzero[-1]) if nonzero else (0, 0)
        return [0] + ends[:-1], ends, first, last

    def place(self, name: str) -> Tuple[int, str]:
        """Full MM name → (pp_rank, stage-local name)."""
        if self.pp_size == 1:
            return 0, name
        for st in self.pp_stages:
            rng = self._ranges(st["key"])
            if rng is None:
                continue
            starts, ends, first, last = rng
            if name.startswith(st["layers"]):
                idx_s, _, rest = name[len(st["layers"]):].partition(".")
                idx = int(idx_s)
                for pp, (s, e) in enumerate(zip(starts, ends)):
                    if s <= idx < e:
                        return pp, f"{st['layers']}{idx - s}.{rest}"
                raise CheckpointError(f"tensor {name!r}: layer {idx} is beyond the {sum(ends[-1:])} layers "
                                      f"of {st['key']}_pp_layers {self.pp_layers[st['key']]}")
            if any(name.startswith(p) for p in st["firsts"]):
                return first, name
            if any(name.startswith(p) for p in st["lasts"]):
                return last, name
        raise CheckpointError(f"tensor {name!r} belongs to no pipeline stage (pp_size={self.pp_size}); "
                              f"its module is not in the layout's pp_stages")

    def unplace(self, pp_rank: int, local: str) -> str:
        """Stage-local name → full MM name."""
        if self.pp_size == 1:
            return local
        for st in self.pp_stages:
            if local.startswith(st["layers"]) and st["key"] in self.pp_layers:
                starts = self._ranges(st["key"])[0]
                idx_s, _, rest = local[len(st["layers"]):].partition(".")
                return f"{st['layers']}{int(idx_s) + starts[pp_rank]}.{rest}"
        return local

    def check_layers(self, key: str, total: int, what: str) -> None:
        """Raise unless `<key>_pp_layers` sums to the model's `total` layers of `what`."""
        counts = self.pp_layers.get(key)
        if counts is not None and sum(counts) != total:
            raise CheckpointError(f"{key}_pp_layers {counts} sums to {sum(counts)} but the {what} has "
                                  f"{total} layers")

    # --- json ---------------------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"family": self.family, "tp_size": self.tp_size}
        for k, v in self.pp_layers.items():
            d[f"{k}_pp_layers"] = list(v)
        d["tp_rules"] = [list(r) for r in self.tp_rules]
        d["pp_stages"] = self.pp_stages
        d["tied"] = [list(t) for t in self.tied]
        d["ep_size"] = self.ep_size
        d["num_experts"] = self.num_experts
        d["expert_pattern"] = self.expert_pattern
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ParallelLayout":
        pp = {k[:-len("_pp_layers")]: list(v) for k, v in d.items() if k.endswith("_pp_layers")}
        kw: Dict[str, Any] = {}
        if "tp_rules" in d:
            kw["tp_rules"] = [tuple(r) for r in d["tp_rules"]]
        if "pp_stages" in d:
            kw["pp_stages"] = d["pp_stages"]
        if "tied" in d:
            kw["tied"] = [list(t) for t in d["tied"]]
        for k in ("ep_size", "num_experts", "expert_pattern"):
            if k in d:
                kw[k] = d[k]
        if r"(\d+)" in str(kw.get("expert_pattern", "")):
            # written before experts were stacked: one tensor per expert, dealt out to EP ranks by name
            if int(kw.get("ep_size", 1)) > 1:
                raise CheckpointError(f"expert_pattern {kw['expert_pattern']!r}: this checkpoint stores one tensor per "
                                      f"expert (an older ms-mm layout); convert the HF weights again")
            kw["expert_pattern"] = EXPERT_PATTERN
        return cls(tp_size=int(d.get("tp_size", 1)), pp_layers=pp, family=d.get("family", ""), **kw)


# ---------------------------------------------------------------------------------------------
# directory protocol
# ---------------------------------------------------------------------------------------------

def _iter_name(iteration: Union[str, int]) -> str:
    if iteration == "release":
        return "release"
    if isinstance(iteration, (int, np.integer)) and not isinstance(iteration, bool) and iteration >= 0:
        return f"iter_{int(iteration):07d}"
    raise CheckpointError(f"iteration must be 'release' or a non-negative int, got {iteration!r}")


def iteration_dir(root, iteration: Union[str, int]) -> Path:
    """`root/release` or `root/iter_0000005`."""
    return Path(root) / _iter_name(iteration)


def latest_iteration(root) -> Optional[Union[str, int]]:
    """What `latest_checkpointed_iteration.txt` says ('release' or an int); None if absent."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected 'release' or an integer, found {text[:40]!r}") from None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_iteration(root, iteration: Union[str, int], update_latest: bool = True) -> Iterator[Path]:
    """Yield an empty temp dir for one iteration; on clean exit it becomes `iteration_dir(root, it)`.

    Everything an iteration holds (model shards, optimizer, rng, data state ...) is written into
    the yielded dir. On exit the dir is renamed into place and then, last,
    `latest_checkpointed_iteration.txt` is replaced. On an exception the temp dir is removed and
    the previous checkpoint is untouched. Re-saving an existing iteration replaces it (there is a
    short window, between two renames, where that one iteration dir is missing).
    """
    root = Path(root)
    final = iteration_dir(root, iteration)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if update_latest:
        _write_text_atomic(root / LATEST_FILE, str(iteration) if iteration == "release" else str(int(iteration)))


def write_model_files(iter_dir, state: Mapping[str, Union[np.ndarray, LazyTensor]], layout: ParallelLayout,
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the TP/PP shards + parallel_layout.json of `state` (full MM names) into `iter_dir`.

    Each full tensor is loaded once and sliced into its TP pieces, so memory stays at one full
    tensor (LazyTensors are produced one at a time).
    """
    iter_dir = Path(iter_dir)
    tp = layout.tp_size
    lazies = {k: _as_lazy(v) for k, v in state.items()}
    for src, dst in layout.tied:
        if layout.pp_size > 1 and dst not in lazies and src in lazies:
            lazies[dst] = lazies[src]
        elif layout.pp_size == 1 and src in lazies:
            lazies.pop(dst, None)
    ep = layout.ep_size
    if ep > 1:
        experts = [n for n in lazies if layout.is_expert(n)]
        if not experts:
            raise CheckpointError(f"ep_size {ep} given but the model has no expert tensors "
                                  f"(names matching {layout.expert_pattern})")
        for n in experts:
            if len(lazies[n].shape) < 3:
                raise CheckpointError(f"tensor {n!r} {list(lazies[n].shape)} matches the expert pattern but is not "
                                      f"stacked experts [E, out, in]")
        counts = sorted({lazies[n].shape[0] for n in experts})
        if len(counts) > 1:
            raise CheckpointError(f"the stacked expert tensors hold different numbers of experts {counts}")
        if counts[0] % ep:
            raise CheckpointError(f"ep_size {ep} does not divide the number of experts {counts[0]}")
        layout.num_experts = counts[0]
    stages: List[List[Tuple[str, str]]] = [[] for _ in range(layout.pp_size)]
    for name in lazies:
        pp, local = layout.place(name)
        stages[pp].append((name, local))
    for pp, members in enumerate(stages):
        # every (TP, EP) rank of the stage holds every tensor of it: expert tensors one block of
        # their experts each, the rest whole on every EP rank
        writers: Dict[Tuple[int, int], SafetensorsWriter] = {}
        try:
            specs = []
            for name, local in members:
                t = lazies[name]
                kind = layout.tp_kind(name)
                axis = tp_axis(kind, len(t.shape))
                if tp > 1 and axis is not None:
                    div = 2 * tp if kind == "col_gated" else tp
                    if t.shape[axis] % div:
                        raise CheckpointError(
                            f"tensor {name!r} {list(t.shape)}: dim {axis} is not divisible by tp_size {tp}"
                            + (" (gate and up halves)" if kind == "col_gated" else ""))
                specs.append((local, _split_shape(t.shape, kind, tp, layout.ep_of(name)), t.dtype))
            for e in range(ep):
                for r in range(tp):
                    writers[r, e] = SafetensorsWriter(iter_dir / layout.rank_dir(r, pp, e) / MODEL_FILE, specs,
                                                      metadata)
            for name, local in members:
                # one piece at a time: peak = the full tensor + one piece
                arr, kind = lazies[name].load(), layout.tp_kind(name)
                blocks = np.split(arr, ep, axis=0) if layout.ep_of(name) > 1 else None
                for r in range(tp):
                    shared = None if blocks else tp_piece(arr, kind, tp, r, name)
                    for e in range(ep):
                        writers[r, e].write(local, shared if shared is not None else tp_piece(blocks[e], kind, tp, r, name))
                    del shared
                del arr, blocks
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    (iter_dir / LAYOUT_FILE).write_text(json.dumps(layout.to_json(), indent=1))


def save_model(root, state: Mapping[str, Union[np.ndarray, LazyTensor]], layout: Optional[ParallelLayout] = None,
               iteration: Union[str, int] = "release", metadata: Optional[Dict[str, str]] = None) -> Path:
    """Atomically save one iteration's model weights (full MM names) under `root`; returns its dir.

    Use `staged_iteration` + `write_model_files` directly to add other files to the same commit.
    """
    layout = layout or ParallelLayout()
    with staged_iteration(root, iteration) as d:
        write_model_files(d, state, layout, metadata)
    return iteration_dir(root, iteration)


def read_layout(iter_dir) -> ParallelLayout:
    path = Path(iter_dir) / LAYOUT_FILE
    if not path.is_file():
        # a checkpoint written without a layout file: only unsplit single-rank dirs can be read
        if (Path(iter_dir) / "mp_rank_00" / MODEL_FILE).is_file():
            return ParallelLayout()
        raise CheckpointError(f"{iter_dir}: neither {LAYOUT_FILE} nor mp_rank_00/{MODEL_FILE} found")
    try:
        return ParallelLayout.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed layout ({e})") from e


def _resolve_iter_dir(path, iteration=None) -> Path:
    path = Path(path)
    if iteration is not None:
        return iteration_dir(path, iteration)
    if (path / LAYOUT_FILE).is_file() or (path / "mp_rank_00").is_dir():
        return path  # already an iteration dir
    it = latest_iteration(path)
    if it is None:
        raise CheckpointError(f"{path}: no {LATEST_FILE} and not an iteration dir (no {LAYOUT_FILE})")
    d = iteration_dir(path, it)
    if not d.is_dir():
        raise CheckpointError(f"{path / LATEST_FILE} names iteration {it!r} but {d} does not exist")
    return d


class MMCheckpointReader:
    """Full-MM-name view of one iteration dir; TP pieces, EP blocks and PP stages are merged per tensor
    on `get`."""

    def __init__(self, iter_dir):
        self.iter_dir = Path(iter_dir)
        self.layout = read_layout(self.iter_dir)
        tp, pp, ep = self.layout.tp_size, self.layout.pp_size, self.layout.ep_size
        # full name -> ([the TP rank files of each EP block], stage-local name)
        self._where: Dict[str, Tuple[List[List[SafetensorsFile]], str]] = {}
        for p in range(pp):
            per_ep = []
            for e in range(ep):
                files = []
                for r in range(tp):
                    path = self.iter_dir / self.layout.rank_dir(r, p, e) / MODEL_FILE
                    if not path.is_file():
                        raise CheckpointError(f"{path} is missing (layout tp_size={tp}, pp_size={pp}, ep_size={ep})")
                    files.append(SafetensorsFile(path))
                per_ep.append(files)
            names0 = set(per_ep[0][0].keys())
            for f in (f for files in per_ep for f in files):
                if set(f.keys()) != names0:
                    diff = sorted(names0.symmetric_difference(f.keys()))[:5]
                    raise CheckpointError(f"{f.path}: tensor names differ from {per_ep[0][0].path} ({diff} ...)")
            for local in per_ep[0][0].keys():
                full = self.layout.unplace(p, local)
                if full in self._where:
                    raise CheckpointError(f"{per_ep[0][0].path}: tensor {full!r} is also stored in "
                                          f"{self._where[full][0][0][0].path} (overlapping ranks or stages)")
                # a non-expert tensor is repeated on every EP rank: EP rank 0's copy is read
                self._where[full] = (per_ep if self.layout.ep_of(full) > 1 else per_ep[:1], local)

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def _files(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.iter_dir}: no tensor {name!r} in the checkpoint") from None

    def _block_shape(self, name) -> Tuple[int, ...]:
        """The shape of one EP block of `name` (the whole tensor when it is not split by EP)."""
        blocks, local = self._files(name)
        shape = list(blocks[0][0].shape(local))
        axis = tp_axis(self.layout.tp_kind(name), len(shape))
        if axis is not None:
            shape[axis] *= self.layout.tp_size
        return tuple(shape)

    def shape(self, name) -> Tuple[int, ...]:
        blocks, _ = self._files(name)
        shape = list(self._block_shape(name))
        shape[0] *= len(blocks)
        return tuple(shape)

    def dtype(self, name) -> np.dtype:
        blocks, local = self._files(name)
        return blocks[0][0].dtype(local)

    def get(self, name) -> np.ndarray:
        blocks, local = self._files(name)
        kind, tp = self.layout.tp_kind(name), self.layout.tp_size
        axis = tp_axis(kind, len(blocks[0][0].shape(local)))
        if len(blocks) == 1 and (axis is None or tp == 1):
            return blocks[0][0].get(local)
        # fill a preallocated full tensor piece by piece: peak = full + one piece, not 2 x full
        out = np.empty(self.shape(name), dtype=self.dtype(name))
        per_block = self._block_shape(name)[0]
        for b, files in enumerate(blocks):
            view = out[b * per_block:(b + 1) * per_block]
            if axis is None or tp == 1:
                view[...] = files[0].get(local)
                continue
            for r, f in enumerate(files):
                piece = f.get(local)
                n = piece.shape[axis]
                if kind == "col_gated":
                    h, half = n // 2, view.shape[axis] // 2
                    _axis_slice(view, axis, r * h, (r + 1) * h)[...] = _axis_slice(piece, axis, 0, h)
                    _axis_slice(view, axis, half + r * h, half + (r + 1) * h)[...] = _axis_slice(piece, axis, h, n)
                else:
                    _axis_slice(view, axis, r * n, (r + 1) * n)[...] = piece
                del piece
        return out

    def lazy(self, name) -> LazyTensor:
        return LazyTensor(self.shape(name), self.dtype(name), lambda: self.get(name))

    def get_region(self, name, region) -> np.ndarray:
        """The block `region` ((start, stop) per dim) of the full tensor `name`: only the EP blocks and TP
        pieces overlapping it are touched, each through a memory map (a sharded run's per-rank read)."""
        blocks, local = self._files(name)
        full = self.shape(name)
        if len(region) != len(full) or any(not 0 <= s <= e <= n for (s, e), n in zip(region, full)):
            raise CheckpointError(f"{self.iter_dir}: block {list(region)} outside tensor {name!r} {list(full)}")
        region = [tuple(r) for r in region]
        per_block = full[0] // len(blocks)
        parts = []
        for b, off, length in _tp_runs(region[0][0], region[0][1], "col", full[0], len(blocks)):
            sub = [(off, off + length)] + region[1:]
            parts.append(self._tp_region(blocks[b], local, name, sub, (per_block,) + tuple(full[1:])))
        if not parts:   # an empty block on dim 0
            return np.empty(tuple(e - s for s, e in region), dtype=self.dtype(name))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _tp_region(self, files, local, name, region, block_shape) -> np.ndarray:
        kind, tp = self.layout.tp_kind(name), self.layout.tp_size
        axis = tp_axis(kind, len(block_shape))
        if axis is None or tp == 1:
            return files[0].read_region(local, region)
        parts = []
        for piece, off, length in _tp_runs(region[axis][0], region[axis][1], kind, block_shape[axis], tp):
            sub = list(region)
            sub[axis] = (off, off + length)
            parts.append(files[piece].read_region(local, sub))
        if not parts:
            return np.empty(tuple(e - s for s, e in region), dtype=self.dtype(name))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _axis_slice(arr: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return arr[(slice(None),) * axis + (slice(start, stop),)]


def _tp_runs(start: int, stop: int, kind: str, full: int, tp: int):
    """(piece, local_start, length) runs covering [start, stop) of a dim split over tp by `kind`
    (`col_gated`: the [gate; up] halves split separately, each piece [gate_k; up_k])."""
    runs = []
    i = start
    while i < stop:
        if kind == "col_gated":
            half, per = full // 2, full // 2 // tp
            part, j = (0, i) if i < half else (1, i - half)
            piece, off = j // per, j % per
            length = min(stop - i, per - off, (half if part == 0 else full) - i)
            runs.append((piece, part * per + off, length))
        else:
            per = full // tp
            piece, off = i // per, i % per
            length = min(stop - i, per - off)
            runs.append((piece, off, length))
        i += length
    return runs


def open_model(path, iteration: Union[str, int, None] = None) -> MMCheckpointReader:
    """Open a checkpoint root (follows latest_checkpointed_iteration.txt) or an iteration dir."""
    return MMCheckpointReader(_resolve_iter_dir(path, iteration))


def load_model(path, iteration: Union[str, int, None] = None, float32: bool = False) -> Dict[str, np.ndarray]:
    """Load all model weights with full MM names (stages and TP ranks merged).

    `float32=True` widens every floating tensor (bf16 included) to float32.
    """
    reader = open_model(path, iteration)
    out = {}
    for name in reader.keys():
        arr = reader.get(name)
        if float32 and (arr.dtype == BF16 or np.issubdtype(arr.dtype, np.floating)):
            arr = to_float32(arr)
        out[name] = arr
    return out
