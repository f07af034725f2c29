"""Read-ahead of `disk`-tier layer groups into pinned host staging buffers, on a thread.

The disk tier keeps nothing in memory but the file's page-cache mapping: every forward, each
group's stored bytes are copied from the mapping into pinned memory (so that the host->GPU copy
is a DMA at full PCIe speed), then copied to the GPU and decoded. Done on the thread that runs
the model, that memcpy (and, the first time a group is read, its checksum pass) stalls the whole
pipeline. `GroupReader` moves it to one worker thread that reads the next groups ahead into a
small ring of pinned buffers while the GPU works; numpy's copy and xxHash release the GIL, so
the reading overlaps the Python that drives the model.

A buffer goes back to the ring only when the CUDA event recorded after its host->GPU copy has
completed: the worker waits on that event before it overwrites the buffer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch


class _Buffer:
    __slots__ = ("index", "tensor", "copied")

    def __init__(self, index: int, nbytes: int, pin: bool):
        self.index = index
        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        self.copied: torch.cuda.Event | None = None
        """Recorded after the last host->GPU copy out of this buffer was enqueued."""


class GroupReader:
    """Reads layer groups from a memory-mapped file into pinned buffers ahead of use.

    Args:
        read_into: `read_into(gid, dst_uint8_numpy)` copies group `gid`'s stored bytes into dst
            (and verifies them the first time; it may raise a CllmError, which `take` re-raises).
        lengths: stored byte length of every group this reader serves, by group id.
        buffers: pinned buffers in the ring (one being copied to the GPU, the rest read ahead).
        pin: page-lock the buffers (default: when CUDA is available).
    """

    def __init__(self, read_into: Callable[[int, np.ndarray], None], lengths: dict[int, int], buffers: int = 3,
                 pin: bool | None = None):
        if buffers < 2:
            raise ValueError("GroupReader needs at least 2 buffers")
        self._read_into = read_into
        self._lengths = dict(lengths)
        size = max(self._lengths.values(), default=0)
        pin = torch.cuda.is_available() if pin is None else pin
        self._free = [_Buffer(i, size, pin) for i in range(buffers)]
        self._pending: dict[int, tuple[_Buffer, Future]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cllm-disk-read")
        self.stats = {"reads": 0, "ready_on_take": 0, "waited_on_take": 0}

    def _job(self, gid: int, buf: _Buffer) -> None:
        if buf.copied is not None:
            buf.copied.synchronize()  # the previous group's host->GPU copy has left this buffer
            buf.copied = None
        self._read_into(gid, buf.tensor.numpy()[: self._lengths[gid]])

    def request(self, gid: int) -> bool:
        """Start reading `gid` ahead if a buffer is free; False when it is not a disk group,
        already requested, or every buffer is busy."""
        with self._lock:
            if gid not in self._lengths or gid in self._pending or not self._free:
                return False
            buf = self._free.pop(0)
            self._pending[gid] = (buf, self._pool.submit(self._job, gid, buf))
            self.stats["reads"] += 1
            return True

    def take(self, gid: int) -> tuple[torch.Tensor, _Buffer]:
        """The pinned bytes of `gid` (reading them now if they were not requested ahead).
        Hand the buffer back with `give_back(buffer, event)` once its copy is enqueued."""
        if gid not in self._lengths:
            raise KeyError(f"group {gid} is not a disk-tier group of this reader")
        with self._lock:
            pending = self._pending.get(gid)
        if pending is None:
            if not self.request(gid):
                # every buffer is reading other groups ahead: wait for the oldest and recycle it
                with self._lock:
                    oldest = next(iter(self._pending))
                    buf, fut = self._pending.pop(oldest)
                try:
                    fut.result()
                except BaseException:
                    pass  # that group's error resurfaces when it is taken (it is read again)
                with self._lock:
                    self._free.append(buf)
                self.request(gid)
            with self._lock:
                pending = self._pending[gid]
        buf, fut = pending
        self.stats["ready_on_take" if fut.done() else "waited_on_take"] += 1
        try:
            fut.result()
        except BaseException:
            with self._lock:
                self._pending.pop(gid, None)
                self._free.append(buf)
            raise
        with self._lock:
            self._pending.pop(gid, None)
        return buf.tensor[: self._lengths[gid]], buf

    def give_back(self, buf: _Buffer, copied: torch.cuda.Event) -> None:
        """Return a buffer to the ring; it is reused only after `copied` completes."""
        buf.copied = copied
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        """Finish outstanding reads and stop the worker."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._pending.clear()
            self._free.clear()
