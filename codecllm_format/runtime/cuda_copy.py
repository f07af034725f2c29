"""Host->device copies of streamed groups with one CUDA runtime call.

The host tier copies every layer group from pinned host memory once per token. Through torch
(`with torch.cuda.stream(s): dst.copy_(src, non_blocking=True)`) each copy costs a stream
switch there and back, the copy's dispatch, and a pinned-memory bookkeeping event that torch's
host allocator records so it can free the block later: about ten CUDA API calls and, measured
on an H200 host (2026-11-27), ~200 us of host time per group under cProfile. Our pinned buffers
live as long as the provider (which synchronizes before freeing them), so none of that
bookkeeping is needed: `cudaMemcpyAsync` on the copy stream is the whole job.

The CUDA runtime is the one torch already loaded (found in this process's mappings); anything
missing leaves torch's copy in charge (`unavailable()` says why). CODECLLM_CUDA_COPY=0 switches
it off.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

H2D = 1  # cudaMemcpyHostToDevice

_lock = threading.Lock()
_state: dict = {}


def _find_cudart() -> str | None:
    """Path of the libcudart this process has loaded (torch's), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcudart.so" in path:
                    return path
    except OSError:
        return None
    return None


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        fn, why = None, None
        if os.environ.get("CODECLLM_CUDA_COPY", "1").lower() in ("0", "false", "off", "no"):
            why = "switched off (CODECLLM_CUDA_COPY=0)"
        elif not torch.cuda.is_available():
            why = "no CUDA"
        else:
            torch.cuda.init()
            path = _find_cudart()
            if path is None:
                why = "libcudart is not loaded in this process (torch may link it statically)"
            else:
                try:
                    fn = ctypes.CDLL(path).cudaMemcpyAsync
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
                except (OSError, AttributeError) as e:
                    fn, why = None, f"{type(e).__name__}: {e}"
        _state.update(fn=fn, why=why)
        return _state


def unavailable() -> str | None:
    """Why copies go through torch, or None."""
    return _load()["why"]


class HostToDevice:
    """Enqueues copies from pinned host tensors into device tensors on one stream.

    Args:
        stream: the torch CUDA stream the copies run on.
    """

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream
        self.device_index = stream.device.index
        self._fn = _load()["fn"]
        self._handle = stream.cuda_stream

    @property
    def direct(self) -> bool:
        return self._fn is not None

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst[:] = src (same byte size; src pinned host memory, dst on the stream's device),
        asynchronously on the stream. The caller keeps both alive until the copy completed
        (an event recorded on the stream after it)."""
        n = src.numel() * src.element_size()
        if n != dst.numel() * dst.element_size():
            raise ValueError(f"copy of {n} bytes into {dst.numel() * dst.element_size()}")
        fn = self._fn
        if fn is None or torch.cuda.current_device() != self.device_index:
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
            return
        err = fn(dst.data_ptr(), src.data_ptr(), n, H2D, self._handle)
        if err:
            raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {err}")
