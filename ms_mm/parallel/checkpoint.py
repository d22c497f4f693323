"""Checkpoints of a sharded run, rank by rank: each rank reads and writes only its own slices.

MindSpore semi-auto parallel gives every parameter (and optimizer moment) of a compiled step a
layout (``Cell.parameter_layout_dict``): a device matrix, a tensor map (which device axes cut which
tensor dim) and, under optimizer parallel, an optimizer-shard group that cuts dim 0 of the slice
further. ``ParamLayout`` reads that tuple and gives, for any rank, the block of the full tensor the
rank holds (``region``: one ``(start, stop)`` per dim; uniform splits are always blocks).

    layouts = layouts_from_mindspore(step.parameter_layout_dict)          # after the first compile
    slices = read_rank_slices(mm_checkpoint_dir, layouts, rank, stage_size)  # {name: local block}
    write_rank_shard(shard_dir, rank, local_values, layouts, stage_size)  # owned blocks only
    assemble(shard_dir) -> {name: LazyTensor of the full tensor}          # for mm_checkpoint writers

Loading reads the block straight out of the MM checkpoint (``mm_checkpoint``'s ``mp_rank_*``
layout, any TP / PP / EP split: ``MMCheckpointReader.get_region`` maps the block onto the TP pieces
of the checkpoint and reads each piece through a memory map), so host memory stays at the rank's share whatever split the
checkpoint was written with (re-slicing on load). Saving writes each distinct block once (the lowest
rank holding it) into ``rank_XXXXX.safetensors`` with its region in the metadata; ``assemble``
streams full tensors back out of those blocks one tensor at a time, checking that the blocks tile
every tensor exactly. The trainer (``ms_mm.training.trainer``) writes them into the usual iteration
directory, so ``mm-convert ... mm_to_hf``, ``resplit`` and a later run of any size read it.

Rank numbering follows MindSpore: stage ``s`` holds global ranks ``s * stage_size ...``; a layout's
device matrix covers one stage (``rank % stage_size``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ms_mm.training import mm_checkpoint as mmc

Region = Tuple[Tuple[int, int], ...]
SHARD_META_KEY = "ms_mm_regions"


class ShardedCheckpointError(ValueError):
    """A layout, block or checkpoint that cannot be read as the rank's slices; names the tensor / file."""


@dataclass(frozen=True)
class ParamLayout:
    """One parameter's MindSpore layout: ``dev_matrix``, ``tensor_map`` (per tensor dim: a device
    axis counted from the right, -1 for none, or a tuple of axes), ``full_shape`` and
    ``opt_shard_size`` (> 1: dim 0 of the slice is cut again over the optimizer-shard group, the
    ranks holding the same slice; -1: over all of them, the world group)."""

    full_shape: Tuple[int, ...]
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple
    opt_shard_size: int = 1

    @classmethod
    def from_mindspore(cls, name: str, layout) -> "ParamLayout":
        """From a ``parameter_layout_dict`` tuple: (dev_matrix, tensor_map, slice_shape, field,
        uniform_split, opt_shard_group, full_shape, ...)."""
        layout = tuple(layout)
        if len(layout) < 7:
            raise ShardedCheckpointError(f"{name}: MindSpore layout {layout!r} has fewer than 7 fields")
        dev, tmap, _slice, _field, uniform, group, full = layout[:7]
        if not uniform:
            raise ShardedCheckpointError(f"{name}: non-uniform split in its layout {layout!r}")
        size = 1
        if group:      # "<size>-<hash>", or the world group itself ("hccl_world_group"): every holder
            prefix = str(group).split("-", 1)[0]
            size = int(prefix) if prefix.isdigit() else -1
        return cls(tuple(int(d) for d in full), tuple(int(d) for d in dev),
                   tuple(tuple(int(x) for x in m) if isinstance(m, (tuple, list)) else int(m) for m in tmap), size)

    @property
    def stage_size(self) -> int:
        return int(np.prod(self.dev_matrix, dtype=np.int64)) if self.dev_matrix else 1

    def _axes(self, m) -> Tuple[int, ...]:
        n = len(self.dev_matrix)
        ms = m if isinstance(m, tuple) else (m,)
        return tuple(n - 1 - a for a in ms if a != -1)       # positions in dev_matrix, major first

    def model_parallel_region(self, local_rank: int) -> Region:
        """The block cut by the tensor map alone (before the optimizer shard)."""
        coord = np.unravel_index(local_rank % self.stage_size, self.dev_matrix) if self.dev_matrix else ()
        region = []
        for d, full in enumerate(self.full_shape):
            m = self.tensor_map[d] if d < len(self.tensor_map) else -1
            idx, count = 0, 1
            for pos in self._axes(m):
                idx, count = idx * self.dev_matrix[pos] + int(coord[pos]), count * self.dev_matrix[pos]
            if full % count:
                raise ShardedCheckpointError(f"dim {d} of shape {list(self.full_shape)} is not divisible by {count}")
            step = full // count
            region.append((idx * step, (idx + 1) * step))
        return tuple(region)

    @cached_property
    def _mp_regions(self) -> List[Region]:
        return [self.model_parallel_region(r) for r in range(self.stage_size)]

    def region(self, local_rank: int) -> Region:
        """The block of the full tensor that rank ``local_rank`` of the stage holds."""
        region = self.model_parallel_region(local_rank)
        if self.opt_shard_size in (0, 1):
            return region
        holders = [r for r, other in enumerate(self._mp_regions) if other == region]
        if self.opt_shard_size != -1 and len(holders) != self.opt_shard_size:
            raise ShardedCheckpointError(
                f"optimizer shard over {self.opt_shard_size} ranks, but {len(holders)} rank(s) of the stage hold "
                f"the block {list(region)} (only the default optimizer_weight_shard_size -1 is supported)")
        (s, e), rest = region[0], region[1:]
        if (e - s) % len(holders):
            raise ShardedCheckpointError(f"dim 0 block {e - s} not divisible by the optimizer shard {len(holders)}")
        step = (e - s) // len(holders)
        k = holders.index(local_rank % self.stage_size)
        return ((s + k * step, s + (k + 1) * step),) + rest

    def owner(self, local_rank: int) -> bool:
        """Is ``local_rank`` the lowest rank of the stage holding its block (so it writes it)?"""
        local = local_rank % self.stage_size
        if self.opt_shard_size not in (0, 1):
            return True               # every holder of a block keeps its own piece of it
        mine = self._mp_regions[local]
        return all(other != mine for other in self._mp_regions[:local])


def layouts_from_mindspore(parameter_layout_dict: Mapping[str, Sequence]) -> Dict[str, ParamLayout]:
    return {name: ParamLayout.from_mindspore(name, lay) for name, lay in parameter_layout_dict.items()}


def layouts_from_json(d: Mapping[str, Mapping]) -> Dict[str, ParamLayout]:
    """From the ``parameter_layouts.json`` a DryRun rank writes (its "layout" field is the tuple's repr)."""
    import ast

    return {name: ParamLayout.from_mindspore(name, ast.literal_eval(v["layout"])) for name, v in d.items()}


def _slices(region: Region):
    return tuple(slice(s, e) for s, e in region)


def region_shape(region: Region) -> Tuple[int, ...]:
    return tuple(e - s for s, e in region)


# ------------------------------------------------------------------------------------ reading
class RegionSource:
    """Blocks of full tensors from an MM checkpoint dir (``mp_rank_*``) or a flat safetensors file
    (the optimizer moments, ``optim.safetensors``)."""

    def __init__(self, path):
        path = Path(path)
        if path.is_file():
            self.file, self.reader, self.where = mmc.SafetensorsFile(path), None, str(path)
        else:
            self.file, self.reader, self.where = None, mmc.open_model(path), str(path)

    def __contains__(self, name) -> bool:
        return name in (self.file if self.file is not None else self.reader)

    def shape(self, name) -> Tuple[int, ...]:
        return tuple((self.file if self.file is not None else self.reader).shape(name))

    def read(self, name: str, region: Region) -> np.ndarray:
        if self.file is not None:
            return self.file.read_region(name, region)
        try:
            return self.reader.get_region(name, region)
        except mmc.CheckpointError as e:
            raise ShardedCheckpointError(str(e)) from e


def read_rank_slices(source, layouts: Mapping[str, ParamLayout], rank: int,
                     names: Optional[Sequence[str]] = None, rename=None) -> Dict[str, np.ndarray]:
    """{name: the rank's block} of every layout (or of ``names``) found in ``source`` (a
    ``RegionSource`` or a path). ``rename(name) -> checkpoint name`` maps e.g. an optimizer moment's
    name onto the checkpoint's. A tensor missing from the checkpoint or of another full shape is an
    error naming it."""
    src = source if isinstance(source, RegionSource) else RegionSource(source)
    out = {}
    for name in (names if names is not None else list(layouts)):
        lay = layouts[name]
        key = rename(name) if rename else name
        if key not in src:
            raise ShardedCheckpointError(f"{src.where}: no tensor {key!r} (needed by this rank)")
        shape = src.shape(key)
        if tuple(shape) != tuple(lay.full_shape):
            raise ShardedCheckpointError(f"{src.where}: tensor {key!r} has shape {list(shape)}, the run's layout "
                                         f"expects {list(lay.full_shape)}")
        out[name] = src.read(key, lay.region(rank % lay.stage_size))
    return out


# ------------------------------------------------------------------------------------ writing
def shard_file(shard_dir, rank: int) -> Path:
    return Path(shard_dir) / f"rank_{rank:05d}.safetensors"


def write_rank_shard(shard_dir, rank: int, values: Mapping[str, np.ndarray], layouts: Mapping[str, ParamLayout]) -> Path:
    """Write the blocks this rank owns (``ParamLayout.owner``) of ``values`` ({name: local block})."""
    regions, owned = {}, {}
    for name, arr in values.items():
        lay = layouts.get(name)
        if lay is None:
            raise ShardedCheckpointError(f"rank {rank}: no compiled layout for {name!r}")
        local = rank % lay.stage_size
        region = lay.region(local)
        if tuple(np.shape(arr)) != region_shape(region):
            raise ShardedCheckpointError(f"rank {rank}: {name!r} holds shape {list(np.shape(arr))}, its layout gives "
                                         f"the block {list(region)} of {list(lay.full_shape)}")
        if lay.owner(local):
            owned[name] = np.asarray(arr)
            regions[name] = {"full_shape": list(lay.full_shape), "region": [list(r) for r in region]}
    path = shard_file(shard_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    mmc.write_safetensors(path, owned, metadata={SHARD_META_KEY: json.dumps(regions)})
    return path


def assemble(shard_dir, names: Optional[Sequence[str]] = None) -> Dict[str, "mmc.LazyTensor"]:
    """{name: LazyTensor of the full tensor} from every ``rank_*.safetensors`` block in ``shard_dir``.
    Each tensor's distinct blocks must tile it exactly (no gap, no overlap); a full tensor is built only when
    its LazyTensor is loaded, so writers stream one tensor at a time."""
    files = sorted(Path(shard_dir).glob("rank_*.safetensors"))
    if not files:
        raise ShardedCheckpointError(f"{shard_dir}: no rank_*.safetensors blocks")
    blocks: Dict[str, List] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for path in files:
        f = mmc.SafetensorsFile(path)
        try:
            meta = json.loads(f.metadata.get(SHARD_META_KEY, ""))
        except json.JSONDecodeError as e:
            raise ShardedCheckpointError(f"{path}: no block metadata ({SHARD_META_KEY}: {e})") from e
        for name, info in meta.items():
            full = tuple(info["full_shape"])
            if shapes.setdefault(name, full) != full:
                raise ShardedCheckpointError(f"{path}: {name!r} full shape {list(full)} differs from "
                                             f"{list(shapes[name])} in another rank's file")
            blocks.setdefault(name, []).append((f, tuple(tuple(r) for r in info["region"])))
    out = {}
    for name in (names if names is not None else sorted(blocks)):
        if name not in blocks:
            raise ShardedCheckpointError(f"{shard_dir}: no rank wrote a block of {name!r}")
        full = shapes[name]
        # the same block from several ranks (a tensor without a compiled layout, a pipeline-shared copy):
        # copies of one value; the lowest rank's is kept
        parts = list({region: (f, region) for f, region in reversed(blocks[name])}.values())
        covered = sum(int(np.prod(region_shape(r), dtype=np.int64)) for _, r in parts)
        if covered != int(np.prod(full, dtype=np.int64)) or len({r for _, r in parts}) != len(parts):
            raise ShardedCheckpointError(f"{shard_dir}: the blocks of {name!r} do not tile its shape {list(full)} "
                                         f"({[list(r) for _, r in parts]})")
        out[name] = mmc.LazyTensor(full, parts[0][0].dtype(name), _assembler(name, full, parts))
    return out


def _assembler(name, full, parts):
    def load():
        arr = np.empty(full, dtype=parts[0][0].dtype(name))
        for f, region in parts:
            arr[_slices(region)] = f.read_region(name, tuple((0, e - s) for s, e in region))
        return arr
    return load
