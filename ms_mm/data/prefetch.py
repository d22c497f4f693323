"""Background prefetch for the data loaders: one producer thread runs an iterator ahead of the consumer.

A loader hands `Prefetcher` a function that makes its item iterator (usually a generator that
starts from the loader's saved position and yields ``(batch, position_after_it)``); the thread
keeps up to `depth` items ready in a bounded queue, so loading overlaps the train step. What the
consumer sees is exactly the iterator's sequence:

* `get()` returns the next item in order; when the iterator ends it raises `StopIteration`, and when
  the iterator raised, it raises that exception at that point of the sequence (after the items made
  before it). Both are sticky: later calls raise the same again.
* `close()` stops the thread: a producer blocked on a full queue is released, the iterator is
  closed in the producer thread (a generator's ``finally`` runs there, e.g. to cancel worker
  futures), and the thread is joined. Items still queued are dropped, which is what resume needs:
  the loader restarts a new `Prefetcher` from the position of the last item it handed out.
* `ready` is the number of items waiting (0 means the consumer is about to wait on the producer).

`Closeable` is the small base of everything here that holds threads: a context manager whose exit,
like its garbage collection, calls `close()`.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Optional

__all__ = ["Closeable", "Prefetcher"]

_ITEM, _END, _ERROR = "item", "end", "error"


class Closeable:
    """`with obj:` and garbage collection both call `obj.close()` (which must be safe to repeat)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to during interpreter shutdown
            pass


class Prefetcher(Closeable):
    """Run ``make_items()`` in a daemon thread, `depth` items ahead; see the module docstring."""

    def __init__(self, make_items: Callable[[], Iterable[Any]], depth: int, name: str = "ms_mm-prefetch",
                 join_timeout: float = 30.0):
        if int(depth) < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self._make_items = make_items
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._done: Optional[BaseException] = None     # StopIteration or the producer's error, once seen
        self._join_timeout = float(join_timeout)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ consumer side
    @property
    def ready(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def get(self) -> Any:
        if self._done is not None:
            raise self._done
        if self._thread is None:
            raise RuntimeError("Prefetcher.get() after close()")
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._done = StopIteration() if kind == _END else value
        self.close()
        raise self._done

    def __iter__(self):
        return self

    def __next__(self):
        return self.get()

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        try:                        # release a producer waiting on a full queue
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if thread is not threading.current_thread():
            thread.join(timeout=self._join_timeout)

    # ------------------------------------------------------------------ producer side
    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        items = None
        try:
            items = iter(self._make_items())
            for item in items:
                if self._stop.is_set() or not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as e:  # noqa: BLE001 - every failure reaches the consumer, not a dead thread
            self._put((_ERROR, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as e:  # noqa: BLE001
                    self._put((_ERROR, e))
