"""Batched GPU decode of one layer group with NVIDIA nvCOMP (zstd, RAW bitstream).

One `decode()` = ONE batched nvCOMP call over every int8 chunk of a group: the group's stored
bytes sit in a device buffer (one host->GPU copy of one contiguous byte range), the chunks are
carved out of it by an offset table (`nvcomp.as_arrays(buffer, offsets, sizes)`), and decode
into a preallocated slot through a second offset table, with a DecompressConfig built once per
group and reused, on a CUDA stream of ours. nvCOMP's scratch memory comes from PyTorch's caching
allocator, so torch.cuda memory statistics count it.
"""

from __future__ import annotations

import importlib
import threading

import torch

from ..errors import CodecUnavailable
from .layout import GroupLayout

INSTALL_HINT = (
    'install nvCOMP\'s Python package: pip install "codecllm-format[gpu]" '
    "(nvidia-nvcomp-cu13 for CUDA 13; codecllm-format[gpu-cu12] for CUDA 12)"
)

_allocator_lock = threading.Lock()
_allocator_installed = False


def import_nvcomp():
    """The nvidia.nvcomp module, or CodecUnavailable saying what to install."""
    try:
        nvcomp = importlib.import_module("nvidia.nvcomp")
    except ImportError as e:
        raise CodecUnavailable(f"GPU decoding needs nvCOMP, which is not importable ({e}); {INSTALL_HINT}") from None
    return nvcomp


class _TorchMemory:
    """A block from PyTorch's caching allocator, freed when nvCOMP drops it."""

    def __init__(self, size: int, device: int, stream: int):
        self.ptr = torch.cuda.caching_allocator_alloc(max(size, 1), device, stream) if size else 0
        self._owned = bool(size)

    def __del__(self):
        if self._owned:
            torch.cuda.caching_allocator_delete(self.ptr)


def install_torch_allocator(nvcomp) -> None:
    """Route nvCOMP's device allocations through torch's caching allocator (once)."""
    global _allocator_installed
    with _allocator_lock:
        if _allocator_installed:
            return
        from nvidia.nvcomp.external_memory import ExternalMemory  # noqa: PLC0415

        def alloc(size, stream):
            return ExternalMemory(_TorchMemory(size, stream.device, stream.ptr), stream)

        nvcomp.set_device_allocator(alloc)
        _allocator_installed = True


class GroupDecoder:
    """Decodes layer groups on `stream` into caller-owned device buffers.

    Args:
        device: the CUDA device.
        stream: the torch CUDA stream nvCOMP runs on.
    """

    def __init__(self, device: torch.device, stream: torch.cuda.Stream):
        self.nvcomp = import_nvcomp()
        install_torch_allocator(self.nvcomp)
        self.device = device
        self.stream = stream
        nv = self.nvcomp
        self.codec = nv.Codec(
            algorithm="Zstd",
            bitstream_kind=nv.BitstreamKind.RAW,
            device_id=device.index if device.index is not None else torch.cuda.current_device(),
            cuda_stream=stream.cuda_stream,
        )
        self._configs: dict[int, object] = {}
        self._batches: dict[tuple, tuple] = {}

    def _batch(self, layout: GroupLayout, src: torch.Tensor, out: torch.Tensor):
        key = (layout.gid, src.data_ptr(), out.data_ptr())
        b = self._batches.get(key)
        if b is None:
            nv = self.nvcomp
            s = self.stream.cuda_stream
            srcs = nv.as_arrays(src, layout.in_offsets.tolist(), layout.in_sizes.tolist(), s)
            outs = nv.as_arrays(out, layout.out_offsets.tolist(), layout.out_sizes.tolist(), s)
            b = (srcs, outs, src, out)  # keep the tensors alive as long as the batch
            self._batches[key] = b
        return b

    def decode(self, layout: GroupLayout, src: torch.Tensor, out: torch.Tensor) -> None:
        """Enqueue the decode of `layout`'s chunks from `src` (uint8, the group's byte range
        at offset 0) into `out` (uint8, >= layout.decoded_bytes) on self.stream. Callers order
        it with events; nothing here synchronizes the host after the first call per group."""
        srcs, outs, _, _ = self._batch(layout, src, out)
        cfg = self._configs.get(layout.gid)
        if cfg is None:
            # Parses the frame headers once (this one synchronizes); reused afterwards.
            cfg = self.codec.decompression_config(srcs)
            self._configs[layout.gid] = cfg
        self.codec.decode(srcs, out=outs, decompression_config=cfg)

    def forget(self, src: torch.Tensor | None = None) -> None:
        """Drop cached batches (all, or those over `src`)."""
        if src is None:
            self._batches.clear()
        else:
            p = src.data_ptr()
            self._batches = {k: v for k, v in self._batches.items() if k[1] != p}
