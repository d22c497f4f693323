"""ms_mm.data.prefetch.Prefetcher: order, read-ahead bound, errors at their place, end, stop and cleanup."""
import threading
import time

import pytest

from ms_mm.data.prefetch import Prefetcher


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_items_in_order_then_sticky_end():
    p = Prefetcher(lambda: iter(range(7)), depth=3)
    assert [p.get() for _ in range(7)] == list(range(7))
    for _ in range(2):
        with pytest.raises(StopIteration):
            p.get()
    assert not p.alive


def test_reads_ahead_up_to_depth_while_the_consumer_is_busy():
    made = []

    def items():
        for i in range(100):
            made.append(i)
            yield i

    p = Prefetcher(items, depth=4)
    try:
        assert _wait(lambda: p.ready == 4), "the queue should fill while nobody consumes"
        time.sleep(0.3)
        assert p.ready == 4 and len(made) <= 5          # bounded: depth queued + one waiting to be put
        assert p.get() == 0
        assert _wait(lambda: p.ready == 4)               # refilled behind the consumer
    finally:
        p.close()


def test_error_arrives_after_the_items_before_it_and_stays():
    def items():
        yield "a"
        yield "b"
        raise ValueError("bad record 3")

    p = Prefetcher(items, depth=8)
    assert p.get() == "a" and p.get() == "b"
    for _ in range(2):
        with pytest.raises(ValueError, match="bad record 3"):
            p.get()
    assert not p.alive


def test_close_releases_a_blocked_producer_and_runs_the_generator_cleanup():
    cleaned = threading.Event()

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    p = Prefetcher(items, depth=2, name="test-prefetch")
    assert _wait(lambda: p.ready == 2)
    assert any(t.name == "test-prefetch" for t in threading.enumerate())
    p.close()
    assert cleaned.is_set() and not p.alive
    p.close()                                            # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        p.get()
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(lambda: iter(()), depth=0)
