"""``arlab.utils.prefetched``: a background thread's items in order, its exceptions at the consumer, and an early
stop that ends the thread (tokenization reads its image shards through it)."""

from __future__ import annotations

import threading
import time

import pytest

from arlab.utils import prefetched


def test_items_arrive_in_order_and_all_of_them():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetched(iter([]))) == []


def test_the_producer_runs_ahead_of_a_slow_consumer():
    made: list[int] = []

    def produce():
        for i in range(5):
            made.append(i)
            yield i

    it = prefetched(produce(), depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 10
    while len(made) < 3 and time.monotonic() < deadline:  # the item in hand, plus 2 queued while we wait
        time.sleep(0.01)
    assert len(made) >= 3
    assert list(it) == [1, 2, 3, 4]


def test_an_exception_in_the_producer_is_raised_at_its_item():
    def produce():
        yield 1
        yield 2
        raise ValueError("corrupt shard")

    got = []
    with pytest.raises(ValueError, match="corrupt shard"):
        for x in prefetched(produce()):
            got.append(x)
    assert got == [1, 2]


@pytest.mark.timeout(60)
def test_a_consumer_that_stops_early_stops_the_thread_and_closes_the_source():
    closed = []

    def produce():
        try:
            yield from range(10**9)
        finally:
            closed.append(True)

    it = prefetched(produce(), depth=2)
    assert next(it) == 0
    it.close()  # the generator's finally: stop, join
    assert not [t for t in threading.enumerate() if t.name == "arlab-prefetch" and t.is_alive()]
    assert closed == [True]
