"""GroupReader (runtime/disk.py): the disk tier's read-ahead thread, on the CPU.

The GPU side (pinned buffers, CUDA events, the disk tier end to end) is covered by the `gpu`
tests in test_gpu_model.py; here the reader's own contract: bytes are right, reads happen
ahead on the worker thread, a buffer is not overwritten before its copy-done event completes,
errors reach the caller, and a full ring still serves any group."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from codecllm_format.errors import ChecksumError
from codecllm_format.runtime.disk import GroupReader


class Event:
    """Stands in for a torch.cuda.Event: completes when `fire()` is called."""

    def __init__(self):
        self._done = threading.Event()
        self.waited = False

    def fire(self):
        self._done.set()

    def synchronize(self):
        self.waited = True
        assert self._done.wait(5), "a buffer was reused before its copy completed"


def make_groups(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {g: rng.integers(0, 256, size=1000 + 37 * g, dtype=np.uint8) for g in range(n)}


def reader_for(groups, buffers=3, fail=None, log=None):
    def read_into(gid, dst):
        if log is not None:
            log.append((gid, threading.current_thread().name))
        if fail is not None and gid == fail:
            raise ChecksumError(f"group {gid}: checksum mismatch")
        dst[:] = groups[gid]

    return GroupReader(read_into, {g: len(v) for g, v in groups.items()}, buffers=buffers, pin=False)


def test_take_returns_each_groups_bytes_read_on_the_worker_thread():
    groups, log = make_groups(), []
    r = reader_for(groups, log=log)
    try:
        for g in groups:
            data, buf = r.take(g)
            assert np.array_equal(data.numpy(), groups[g])
            ev = Event()
            ev.fire()
            r.give_back(buf, ev)
        assert all(name.startswith("cllm-disk-read") for _, name in log)
    finally:
        r.close()


def test_read_ahead_is_ready_when_taken_and_in_order():
    groups = make_groups()
    r = reader_for(groups, buffers=3)
    try:
        assert r.request(1) and r.request(2)
        assert not r.request(1), "a group already being read is not read twice"
        assert not r.request(99), "groups the reader does not serve are ignored"
        time.sleep(0.2)
        for g in (1, 2):
            data, buf = r.take(g)
            assert np.array_equal(data.numpy(), groups[g])
            ev = Event()
            ev.fire()
            r.give_back(buf, ev)
        assert r.stats["ready_on_take"] == 2 and r.stats["reads"] == 2
    finally:
        r.close()


def test_a_buffer_is_not_overwritten_before_its_copy_event_completes():
    groups = make_groups()
    r = reader_for(groups, buffers=2)
    try:
        data0, buf0 = r.take(0)
        snapshot = data0.numpy().copy()
        ev0 = Event()
        r.give_back(buf0, ev0)  # "copy to the GPU" still in flight
        data1, buf1 = r.take(1)  # uses the other buffer
        r.give_back(buf1, Event())
        assert r.request(2)  # lands in buf0: must wait for ev0
        time.sleep(0.2)
        assert np.array_equal(data0.numpy(), snapshot), "buffer 0 overwritten while its copy was in flight"
        ev0.fire()
        data2, buf2 = r.take(2)
        assert buf2 is buf0 and ev0.waited
        assert np.array_equal(data2.numpy(), groups[2])
    finally:
        r.close()


def test_errors_reach_the_caller_and_the_buffer_returns_to_the_ring():
    groups = make_groups()
    r = reader_for(groups, buffers=2, fail=3)
    try:
        with pytest.raises(ChecksumError, match="group 3"):
            r.take(3)
        for g in (0, 1, 2):  # both buffers still usable
            data, buf = r.take(g)
            assert np.array_equal(data.numpy(), groups[g])
            ev = Event()
            ev.fire()
            r.give_back(buf, ev)
    finally:
        r.close()


def test_taking_an_unrequested_group_while_the_ring_is_full_still_works():
    groups = make_groups()
    r = reader_for(groups, buffers=2)
    try:
        assert r.request(4) and r.request(5)
        assert not r.request(0)  # ring full
        data, buf = r.take(0)  # recycles a read-ahead buffer
        assert np.array_equal(data.numpy(), groups[0])
        ev = Event()
        ev.fire()
        r.give_back(buf, ev)
        other = 5 if 4 not in r._pending else 4
        data, _ = r.take(other)
        assert np.array_equal(data.numpy(), groups[other])
    finally:
        r.close()
