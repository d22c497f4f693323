"""Batching and the training data loader: order, sharding, prefetch, resume, bad samples.

- `collate(samples, pad_token_id, pad_to)`: right-pads `input_ids` (pad id), `attention_mask`
  (0) and `labels` (-100) to the longest sample, to a fixed length, or up to a multiple (bucket),
  and concatenates `pixel_values` / `image_grid_thw` in sample order. A fixed length keeps the
  graph-mode step from recompiling on every new sequence length.
- `MllmDataLoader` / `build_dataloader(...)`: an endless stream of micro-batches (epoch after
  epoch; `num_epochs` bounds it). The order is a function of `(seed, epoch)` only: epoch e is
  a seeded permutation of all records, cut to a multiple of `world_size` and dealt out
  round-robin, rank r taking every world_size-th record from offset r. A producer thread
  (`ms_mm.data.prefetch.Prefetcher`) keeps up to `prefetch_batches` batches ready, with
  `num_workers` workers processing samples (decode, resize, tokenize) in parallel and results
  re-ordered, so the order never depends on timing. Workers are threads by default (PIL, numpy
  and the tokenizer spend most of their time outside the GIL, and nothing is forked after
  MindSpore has started); `worker_type="process"` uses spawned processes instead (the entry
  script then needs an `if __name__ == "__main__":` guard). `state_dict()` is the position
  *after the last batch handed out* (epoch, cursor in this rank's shard, bad samples skipped so
  far): a loader given it with `load_state_dict` yields exactly the batches an uninterrupted run
  would have yielded next.
- Bad samples: by default the first one raises its `BadSampleError` (file + line/index + what
  is wrong) at the position it occurs, after every good batch before it was delivered. With
  `skip_bad_samples=True` it is logged, counted (`.skipped`) and the batch is filled from the
  following samples.
"""
from __future__ import annotations

import json
import logging
import os
from collections import deque
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from ms_mm.data.errors import BadSampleError
from ms_mm.data.prefetch import Closeable, Prefetcher

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100   # label of positions the loss skips (padding, prompts)
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


class Buckets:
    """Shape buckets for one padded dimension: `size(n)` is the smallest bucket >= n.

    `edges` (sorted ints) are the buckets when given; else the ladder `multiple` x {1, 2, 3, 4, 6, 8,
    12, 16, ...} (each step x1.5 or x1.33), capped at `maximum` (a size above the cap is padded to
    the cap itself; above `maximum` is an error)."""

    def __init__(self, edges: Sequence[int] | None = None, multiple: int = 64, maximum: int | None = None):
        self.edges = tuple(sorted(int(e) for e in edges)) if edges else ()
        if any(e < 1 for e in self.edges):
            raise ValueError(f"bucket edges must be positive, got {list(edges)}")
        self.multiple = max(1, int(multiple))
        self.maximum = int(maximum) if maximum else None
        if self.maximum and self.edges and self.edges[-1] < self.maximum:
            self.edges += (self.maximum,)

    def size(self, n: int) -> int:
        n = int(n)
        if self.maximum is not None and n > self.maximum:
            raise ValueError(f"{n} is more than the largest bucket {self.maximum}")
        if self.edges:
            for e in self.edges:
                if n <= e:
                    return e
            raise ValueError(f"{n} is more than the largest bucket edge {self.edges[-1]}")
        v = 1
        while self.multiple * v < n:   # 1, 2, 3, 4, 6, 8, 12, 16, ... times `multiple`
            v = 2 if v == 1 else (v * 3 // 2 if v & (v - 1) == 0 else v * 4 // 3)
        size = self.multiple * v
        if self.maximum is not None:
            size = min(size, self.maximum)
        return size

    def __repr__(self):
        return f"Buckets(edges={list(self.edges)}, multiple={self.multiple}, maximum={self.maximum})"


def buckets_from_config(value, maximum: int | None, multiple: int = 64) -> Buckets:
    """A data json's bucket setting: a list of edges, or "auto"/None (the ladder up to `maximum`)."""
    if value in (None, "auto", True):
        return Buckets(None, multiple, maximum)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, np.integer)) for v in value):
        return Buckets(value, multiple, maximum)
    raise ValueError(f"bucket edges must be a list of ints or \"auto\", got {value!r}")


def padding_record(**dims) -> dict:
    """A `"_padding"` entry for a model-inputs batch: {name: (real, padded)}."""
    return {k: (int(real), int(padded)) for k, (real, padded) in dims.items()}


def format_padding(totals: dict) -> str:
    """'tokens 12.5 % padding, patches 3.1 % padding' from {name: [real, padded]}."""
    return ", ".join(f"{k} {100.0 * (1 - r / p) if p else 0.0:.1f} % padding" for k, (r, p) in sorted(totals.items()))


def padded_length(lengths: Sequence[int], pad_to=None, pad_multiple: int | None = None) -> int:
    """Target length of a batch: `pad_to` an int (fixed), a `Buckets` (the bucket of the longest)
    or None/"longest"; then rounded up to a multiple of `pad_multiple`."""
    longest = max(lengths)
    if isinstance(pad_to, Buckets):
        target = pad_to.size(longest)
    elif pad_to in (None, "longest"):
        target = longest
    elif isinstance(pad_to, (int, np.integer)):
        if longest > pad_to:
            raise ValueError(f"a sample has {longest} tokens, more than the fixed length pad_to={pad_to} "
                             "(set cutoff_len <= pad_to)")
        target = int(pad_to)
    else:
        raise ValueError(f"pad_to must be an int, None or 'longest', got {pad_to!r}")
    if pad_multiple:
        target = -(-target // pad_multiple) * pad_multiple
    return target


def collate(samples: Sequence[dict], pad_token_id: int, pad_to=None,
            pad_multiple: int | None = None) -> dict[str, np.ndarray]:
    """Processor dicts → one batch: `input_ids/attention_mask/labels [B, S]` (right padding),
    `pixel_values [sum N, D]`, `image_grid_thw [sum I, 3]`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = padded_length([len(s["input_ids"]) for s in samples], pad_to, pad_multiple)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key in SEQUENCE_KEYS:
        out = np.full((len(samples), length), fill[key], dtype=np.int64)
        for i, s in enumerate(samples):
            out[i, :len(s[key])] = s[key]
        batch[key] = out
    batch["pixel_values"] = np.concatenate([s["pixel_values"] for s in samples], axis=0)
    batch["image_grid_thw"] = np.concatenate([s["image_grid_thw"] for s in samples], axis=0)
    return batch


def epoch_shard(num_records: int, epoch: int, seed: int, rank: int, world_size: int,
                shuffle: bool = True) -> np.ndarray:
    """Record indices rank `rank` reads in epoch `epoch`, in order (same length on every rank)."""
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_records)
    else:
        order = np.arange(num_records)
    usable = (num_records // world_size) * world_size
    return order[:usable][rank::world_size]


class MllmDataLoader(Closeable):
    """Iterator of micro-batches over an indexable dataset; see the module docstring.

    `dataset[i]` returns a processor dict or raises `BadSampleError`; `collate_fn(list)` makes
    the batch; `model_inputs_fn(batch)` (optional) turns it into model inputs."""

    def __init__(self, dataset, micro_batch_size: int, collate_fn: Callable, *, seed: int = 1234,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True,
                 num_workers: int = 2, prefetch_batches: int = 4, skip_bad_samples: bool = False,
                 num_epochs: int | None = None, model_inputs_fn: Callable | None = None,
                 worker_type: str = "thread", group_by_length: bool = False, group_window: int = 8,
                 length_key: str = "input_ids"):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if len(dataset) < world_size:
            raise ValueError(f"dataset has {len(dataset)} records, fewer than world_size={world_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.collate_fn = collate_fn
        self.model_inputs_fn = model_inputs_fn
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        if worker_type not in ("thread", "process"):
            raise ValueError(f"worker_type must be 'thread' or 'process', got {worker_type!r}")
        self.num_workers = max(0, int(num_workers))
        self.worker_type = worker_type
        self._pool = None
        self.prefetch_batches = max(1, int(prefetch_batches))
        self.skip_bad_samples = skip_bad_samples
        self.num_epochs = num_epochs
        self.group_by_length = bool(group_by_length)
        self.group_window = max(1, int(group_window))
        self.length_key = length_key
        # window_done: batches of the length-sorted window starting at `cursor` already delivered
        self._position = {"epoch": 0, "cursor": 0, "skipped": 0, "batches": 0, "window_done": 0}
        if drop_last and len(self) == 0:
            # an endless loader with nothing to emit would block the train step forever
            raise ValueError(f"dataset has {len(dataset)} records: {self.samples_per_epoch} per rank "
                             f"(world_size {world_size}) cannot fill one micro batch of {micro_batch_size} "
                             f"(drop_last); use a smaller micro batch or more data")
        self._prefetcher: Prefetcher | None = None
        self.padding: dict = {}   # {name: [real, padded]} summed over the batches handed out

    # --------------------------------------------------------------- public
    @property
    def samples_per_epoch(self) -> int:
        """Records this rank reads per epoch (before skipping bad ones)."""
        return len(self.dataset) // self.world_size

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (assuming no bad samples)."""
        n = self.samples_per_epoch
        return n // self.micro_batch_size if self.drop_last else -(-n // self.micro_batch_size)

    @property
    def skipped(self) -> int:
        """Bad samples skipped before the last batch handed out."""
        return self._position["skipped"]

    @property
    def epoch(self) -> int:
        return self._position["epoch"]

    @property
    def prefetched(self) -> int:
        """Batches ready and waiting (0 before iteration starts)."""
        return self._prefetcher.ready if self._prefetcher is not None else 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in epoch `epoch`, in reading order: the one hook for a
        different per-epoch order (a subclass overrides only this). Default: `epoch_shard` (a
        permutation seeded by (seed, epoch) when `shuffle`, dealt round-robin over the ranks, the
        same `samples_per_epoch` on every rank). The order must depend only on `epoch` and the
        loader's settings, since a saved position (`state_dict`'s `cursor`) is an offset into it.
        With `group_by_length`, the loader then sorts each window of `group_window` micro-batches
        read in this order by sample length (`length_key`) before batching."""
        return epoch_shard(len(self.dataset), epoch, self.seed, self.rank, self.world_size, self.shuffle)

    def state_dict(self) -> dict:
        """Position after the last delivered batch, plus what it is only valid for."""
        return {**self._position, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "num_records": len(self.dataset),
                "shuffle": self.shuffle, "group_by_length": self.group_by_length, "group_window": self.group_window}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of a loader with the same data, seed,
        world size and shuffle setting; the micro batch size may differ). Ranks share one
        position unless bad samples were skipped, so a single saved state fits every rank in
        the common case; with `skip_bad_samples`, save and load one state per rank."""
        for key, mine in (("seed", self.seed), ("world_size", self.world_size),
                          ("num_records", len(self.dataset)), ("shuffle", self.shuffle),
                          ("group_by_length", self.group_by_length)):
            if key in state and state[key] != mine:
                raise ValueError(f"data loader state was saved with {key}={state[key]!r}, this loader "
                                 f"has {key}={mine!r}: the data position cannot be restored exactly")
        if state.get("rank", self.rank) != self.rank and state.get("skipped", 0):
            # Without skipped samples every rank stands at the same cursor; with them it does not.
            logger.warning("data loader state of rank %s loaded on rank %s after %s skipped samples: "
                           "the position is approximate; save one state per rank", state.get("rank"),
                           self.rank, state.get("skipped"))
        self._stop_producer()
        self._position = {k: int(state[k]) for k in ("epoch", "cursor", "skipped", "batches")}
        self._position["window_done"] = int(state.get("window_done", 0))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._prefetcher is None:
            self._start()
        # the end of the data, or the producer's error (a bad sample, ...) at its place in the
        # stream, is raised here and again on every later call (the prefetcher keeps it)
        batch, position, padding = self._prefetcher.get()
        self._position = position
        for key, (real, padded) in padding.items():
            total = self.padding.setdefault(key, [0, 0])
            total[0] += real
            total[1] += padded
        return batch

    def close(self) -> None:
        """Stop the background threads and worker pool (iterating again restarts them from the
        current position). A loader that ended or failed stays so until `load_state_dict`."""
        if self._prefetcher is not None and self._prefetcher.alive:
            self._stop_producer()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _stop_producer(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = None

    # ------------------------------------------------------------- producer
    def _submit(self, index: int) -> Future:
        """Process sample `index` in a worker (or right here with num_workers=0)."""
        if self.num_workers == 0:
            fut = Future()
            try:
                fut.set_result(self.dataset[index])
            except BaseException as e:
                fut.set_exception(e)
            return fut
        if self._pool is None:
            if self.worker_type == "process":
                # spawn, not fork: the parent may already run MindSpore and other threads
                self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self.dataset,))
            else:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="ms_mm-data")
        if self.worker_type == "process":
            return self._pool.submit(_worker_getitem, index)
        return self._pool.submit(self.dataset.__getitem__, index)

    def _start(self) -> None:
        position = dict(self._position)
        self._prefetcher = Prefetcher(lambda: self._batches(position), self.prefetch_batches,
                                      name="ms_mm-data-producer")

    def _sample_stream(self, position: dict):
        """Yield `(epoch, cursor_after, index)` from `position` on, forever or num_epochs."""
        epoch, cursor = position["epoch"], position["cursor"]
        while self.num_epochs is None or epoch < self.num_epochs:
            shard = self.epoch_order(epoch)
            for c in range(cursor, len(shard)):
                yield epoch, c + 1, int(shard[c])
            yield epoch, len(shard), None  # epoch boundary marker
            epoch, cursor = epoch + 1, 0

    def _batches(self, position: dict):
        """Yield `(batch, position_after_it, padding)` from `position` on (runs in the prefetch thread).
        A bad sample (unless skipped) or any other failure is raised at its place in the sequence."""
        pending = deque()
        try:
            stream = self._sample_stream(position)
            # Enough samples in flight to keep every worker busy while batches are assembled.
            window = max(2 * self.num_workers, self.micro_batch_size)
            skipped, batches = position["skipped"], position["batches"]
            # length grouping: samples of one window (group_window micro-batches) are sorted together
            group = self.micro_batch_size * self.group_window if self.group_by_length else self.micro_batch_size
            skip_in_window = position.get("window_done", 0) if self.group_by_length else 0
            window_start = (position["epoch"], position["cursor"], skipped)
            samples = []
            exhausted = False
            # a whole epoch (read from its start) that gives no batch would repeat forever: an error
            whole_epoch, emitted_in_epoch, skipped_at_epoch_start = position["cursor"] == 0, 0, skipped

            def flush(samples, end_epoch, end_cursor, final_partial):
                """Yield the micro-batches of `samples`; returns how many."""
                nonlocal batches, skip_in_window
                if self.group_by_length:
                    order = sorted(range(len(samples)), key=lambda i: (len(samples[i][self.length_key]), i))
                    samples = [samples[i] for i in order]
                mb = self.micro_batch_size
                chunks = [samples[i:i + mb] for i in range(0, len(samples), mb)]
                if chunks and len(chunks[-1]) < mb and (self.drop_last or not final_partial):
                    chunks.pop()
                emitted = 0
                for j, chunk in enumerate(chunks):
                    if j < skip_in_window:
                        continue
                    batches += 1
                    emitted += 1
                    if j == len(chunks) - 1:
                        pos = (end_epoch, end_cursor, skipped, 0)
                    else:
                        pos = (window_start[0], window_start[1], window_start[2], j + 1)
                    yield self._batch_item(chunk, *pos[:3], batches, window_done=pos[3])
                skip_in_window = 0
                return emitted

            while True:
                while not exhausted and len(pending) < window:
                    nxt = next(stream, None)
                    if nxt is None:
                        exhausted = True
                        break
                    epoch, cursor, index = nxt
                    fut = self._submit(index) if index is not None else None
                    pending.append((epoch, cursor, index, fut))
                if not pending:
                    return
                epoch, cursor, index, fut = pending.popleft()
                if index is None:  # end of an epoch: a partial batch is dropped or emitted
                    if samples:
                        emitted_in_epoch += yield from flush(samples, epoch + 1, 0, True)
                    if whole_epoch and emitted_in_epoch == 0:
                        raise ValueError(
                            f"epoch {epoch} of this rank's {self.samples_per_epoch} records gave no micro batch of "
                            f"{self.micro_batch_size}: {skipped - skipped_at_epoch_start} bad samples were skipped")
                    samples = []
                    whole_epoch, emitted_in_epoch, skipped_at_epoch_start = True, 0, skipped
                    window_start = (epoch + 1, 0, skipped)
                    continue
                try:
                    samples.append(fut.result())
                except BadSampleError as e:
                    if not self.skip_bad_samples:
                        raise
                    skipped += 1
                    logger.warning("skipping bad sample (%d so far): %s", skipped, e)
                if len(samples) == group:
                    emitted_in_epoch += yield from flush(samples, epoch, cursor, False)
                    samples = []
                    window_start = (epoch, cursor, skipped)
        finally:  # also on close(): work prefetched for a stopped stream is not needed
            for *_, fut in pending:
                if fut is not None:
                    fut.cancel()

    def _batch_item(self, samples, epoch, cursor, skipped, batches, window_done: int = 0):
        """`(batch, position, padding)` for the micro batch `samples` and the position after it."""
        batch = self.collate_fn(samples)
        padding = {}
        if isinstance(batch, dict) and "attention_mask" in batch:
            mask = np.asarray(batch["attention_mask"])
            padding["tokens"] = (int((mask != 0).sum()), int(mask.size))
        if self.model_inputs_fn is not None:
            batch = self.model_inputs_fn(batch)
        if isinstance(batch, dict):
            padding.update(batch.pop("_padding", {}))
        position = {"epoch": epoch, "cursor": cursor, "skipped": skipped, "batches": batches,
                    "window_done": window_done}
        return batch, position, padding


_WORKER_DATASET = None


def _init_worker(dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _worker_getitem(index: int):
    return _WORKER_DATASET[index]


# ------------------------------------------------------------------ config
def loader_from_config(dl: dict, dataset, micro_batch_size: int, collate_fn: Callable, *, seed: int, rank: int,
                       world_size: int, num_workers: int | None, skip_bad_samples: bool, num_epochs: int | None,
                       model_inputs_fn: Callable | None, worker_type: str | None,
                       group_by_length: bool = False) -> MllmDataLoader:
    """The `MllmDataLoader` a data json's `dataloader_param` section (`dl`) describes: `shuffle` (true),
    `drop_last` (true), `num_workers` (2; the argument wins when not None), `prefetch_batches` (4),
    `worker_type` ("thread"; the argument wins), `group_by_length` (false; also read from the
    MindSpeed-MM key `dataset_param.group_by_length` by the families), `group_window` (8)."""
    return MllmDataLoader(
        dataset, micro_batch_size, collate_fn, seed=seed, rank=rank, world_size=world_size,
        shuffle=bool(dl.get("shuffle", True)), drop_last=bool(dl.get("drop_last", True)),
        num_workers=num_workers if num_workers is not None else int(dl.get("num_workers", 2)),
        prefetch_batches=int(dl.get("prefetch_batches", 4)), skip_bad_samples=skip_bad_samples,
        num_epochs=num_epochs, model_inputs_fn=model_inputs_fn, worker_type=worker_type or dl.get("worker_type", "thread"),
        group_by_length=bool(dl.get("group_by_length", group_by_length)), group_window=int(dl.get("group_window", 8)))


def build_dataloader(data_cfg, model_config=None, micro_batch_size: int = 1, seed: int = 1234,
                     rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                     skip_bad_samples: bool = False, **kwargs) -> MllmDataLoader:
    """The training loader for a MindSpeed-MM data json (a dict or its path), built by the model
    family whose data format its `dataset_param.dataset_type` names (`Family.dataset_types`, looked
    up in `ms_mm.registry`). Keyword arguments (`model_inputs_fn`, `num_epochs`, `worker_type`) go
    to the family's builder; with `model_config` given, batches come out as that family's model
    inputs."""
    from ms_mm import registry

    if isinstance(data_cfg, (str, os.PathLike)):
        data_cfg = load_data_config(data_cfg)
    dataset_type = (data_cfg.get("dataset_param") or {}).get("dataset_type") or ""
    family = registry.family_for_dataset_type(dataset_type)
    return family.build_dataloader(data_cfg, model_config, micro_batch_size, seed, rank, world_size, num_workers,
                                   skip_bad_samples, **kwargs)


def load_data_config(path: str | os.PathLike) -> dict:
    """Read a `data_*.json` file (errors name the file)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed json at line {e.lineno} column {e.colno}: {e.msg}") from None


def section(cfg: dict, key: str, prefix: str = "") -> dict:
    """`cfg[key]`, which must be an object (errors name the dotted key)."""
    sec = cfg.get(key)
    if not isinstance(sec, dict):
        raise KeyError(f"data config: {prefix}{key} (an object) is required")
    return sec
