"""Batched GPU decode of one layer group with NVIDIA nvCOMP (zstd, RAW bitstream).

One `decode()` = ONE batched nvCOMP call over every int8 chunk of a group: the group's stored
bytes sit in a device buffer (one host->GPU copy of one contiguous byte range), the chunks are
carved out of it by an offset table (`nvcomp.as_arrays(buffer, offsets, sizes)`), and decode
into a preallocated slot through a second offset table, with a DecompressConfig built once per
group and reused, on a CUDA stream of ours. ANS and Zstd decodes go through nvCOMP's C API
instead where it loads (runtime/nvcomp_direct.py: the same offset tables, kept on the device,
one C call per decode); encoding and the other codecs use the Python API. With CODECLLM_NVCOMP_TORCH_ALLOCATOR=1, nvCOMP's
scratch memory comes from PyTorch's caching allocator, so torch.cuda memory statistics count it
(the benchmark sets it); it is off by default because nvCOMP 6 then crashes at interpreter exit.
"""

from __future__ import annotations

import functools

import atexit
import os
import gc
import importlib
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CodecUnavailable
from .layout import GroupLayout

INSTALL_HINT = (
    'install nvCOMP\'s Python package: pip install "codecllm-format[gpu]" '
    "(nvidia-nvcomp-cu13 for CUDA 13; codecllm-format[gpu-cu12] for CUDA 12)"
)

PACK_ALIGNMENT = 16
"""Transcoded chunks start at 16-byte boundaries in their packed buffer (nvCOMP's safe alignment)."""

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
        if self._owned and not _shutting_down:
            try:
                torch.cuda.caching_allocator_delete(self.ptr)
            except Exception:  # interpreter teardown: the allocator may already be gone
                pass


_shutting_down = False
_live_decoders: "weakref.WeakSet[GroupDecoder]" = weakref.WeakSet()


@atexit.register
def _release_before_exit() -> None:
    """Drop every nvCOMP object while Python can still run the allocator callbacks."""
    global _shutting_down
    for d in list(_live_decoders):
        d.close()
    gc.collect()
    _shutting_down = True


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


ALGORITHMS = {"zstd": "Zstd", "ans": "ANS", "bitcomp": "Bitcomp", "gdeflate": "GDeflate"}


@dataclass(frozen=True)
class EncodedGroup:
    """A group's int8 chunks as one contiguous compressed buffer: the file's zstd byte range,
    or an in-memory transcoding (e.g. ANS) of the same chunks."""

    gid: int
    codec: str
    length: int
    in_offsets: np.ndarray
    in_sizes: np.ndarray
    out_offsets: np.ndarray | None = None
    """Where each chunk decodes to in the slot, when the chunks are not the file's (an in-memory
    copy with merged chunks, see merge_chunks); None: the layout's out_offsets."""
    out_sizes: np.ndarray | None = None
    chunk_bytes: int = 0
    """The merge limit the chunks were built with (0: the file's chunking)."""

    def outputs(self, layout: GroupLayout) -> tuple[np.ndarray, np.ndarray]:
        """(out_offsets, out_sizes) of this encoding's chunks."""
        if self.out_offsets is None:
            return layout.out_offsets, layout.out_sizes
        return self.out_offsets, self.out_sizes


def merge_chunks(offsets: np.ndarray, sizes: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded chunk places merged into fewer, larger ones: consecutive chunks whose outputs
    touch (the next starts where one ends) join while the merged size stays <= `limit`. The
    merged chunks cover exactly the same bytes, so decoding them fills a slot identically.

    Args:
        offsets, sizes: decoded chunk offsets and sizes (a GroupLayout's out_offsets/out_sizes).
        limit: the largest merged chunk, in bytes (a chunk already larger stays as it is).
    """
    out_o: list[int] = []
    out_s: list[int] = []
    for o, n in zip(offsets.tolist(), sizes.tolist()):
        if out_o and out_o[-1] + out_s[-1] == o and out_s[-1] + n <= limit:
            out_s[-1] += n
        else:
            out_o.append(o)
            out_s.append(n)
    return np.asarray(out_o, dtype=np.int64), np.asarray(out_s, dtype=np.int64)


def file_encoding(layout: GroupLayout) -> EncodedGroup:
    """The group as stored in the file: its chunks (zstd frames, or nvCOMP ANS chunks in a file
    written with --codec ans) at their offsets in the group's byte range."""
    return EncodedGroup(layout.gid, layout.codec, layout.file_length, layout.in_offsets, layout.in_sizes)


class GroupDecoder:
    """Decodes layer groups on `stream` into caller-owned device buffers, one batched nvCOMP
    call per group.

    Args:
        device: the CUDA device.
        stream: the torch CUDA stream nvCOMP runs on.
        direct: decode ANS and Zstd groups through nvCOMP's C API with device chunk tables built
            once per group and buffers (runtime/nvcomp_direct.py; one C call per decode) where
            it loads; False: always the Python API.
    """

    def __init__(self, device: torch.device, stream: torch.cuda.Stream, direct: bool = True):
        self.nvcomp = import_nvcomp()
        self.use_direct = direct
        if os.environ.get("CODECLLM_NVCOMP_TORCH_ALLOCATOR") == "1":
            install_torch_allocator(self.nvcomp)
        self.device = device
        self.stream = stream
        self._codecs: dict[str, object] = {}
        self._configs: dict[tuple, object] = {}
        self._batches: dict[tuple, tuple] = {}
        self._direct: dict[str, object] = {}  # codec -> DirectDecoder (None: the Python API)
        self._direct_batches: dict[tuple, object] = {}
        _live_decoders.add(self)

    def close(self) -> None:
        """Release nvCOMP codecs, configs and cached batches (after the stream is idle)."""
        try:
            self.stream.synchronize()
        except Exception:
            pass
        self._batches.clear()
        self._configs.clear()
        self._codecs.clear()
        self._direct_batches.clear()
        self._direct.clear()

    def _direct_decoder(self, codec: str):
        """The C-API decoder of `codec` (runtime/nvcomp_direct.py), or None for the Python API."""
        if codec not in self._direct:
            from . import nvcomp_direct  # noqa: PLC0415

            d = None
            if self.use_direct and nvcomp_direct.direct_unavailable(codec) is None:
                try:
                    d = nvcomp_direct.DirectDecoder(codec, self.device, self.stream)
                except Exception:  # noqa: BLE001 - the Python API stays in charge
                    d = None
            self._direct[codec] = d
        return self._direct[codec]

    def codec(self, name: str):
        """The nvCOMP Codec for `name` ("zstd", "ans", ...), bound to our stream."""
        c = self._codecs.get(name)
        if c is None:
            nv = self.nvcomp
            c = nv.Codec(
                algorithm=ALGORITHMS[name],
                bitstream_kind=nv.BitstreamKind.RAW,
                device_id=self.device.index if self.device.index is not None else torch.cuda.current_device(),
                cuda_stream=self.stream.cuda_stream,
            )
            self._codecs[name] = c
        return c

    def _batch(self, enc: EncodedGroup, layout: GroupLayout, src: torch.Tensor, out: torch.Tensor):
        key = (enc.gid, enc.codec, src.data_ptr(), out.data_ptr())
        b = self._batches.get(key)
        if b is None:
            nv = self.nvcomp
            s = self.stream.cuda_stream
            out_offsets, out_sizes = enc.outputs(layout)
            srcs = nv.as_arrays(src, enc.in_offsets.tolist(), enc.in_sizes.tolist(), s)
            outs = nv.as_arrays(out, out_offsets.tolist(), out_sizes.tolist(), s)
            b = (srcs, outs, src, out)  # keep the tensors alive as long as the batch
            self._batches[key] = b
        return b

    def bind(self, enc: EncodedGroup, layout: GroupLayout, src: torch.Tensor, out: torch.Tensor):
        """A callable with no arguments that does `decode(enc, layout, src, out)`: with nvCOMP's C
        API, the prepared C call and nothing else (the streaming tiers keep one per group and
        slot: the per-call lookups here cost host time at every layer of every token)."""
        direct = self._direct_decoder(enc.codec)
        if direct is None:
            return functools.partial(self.decode, enc, layout, src, out)
        return functools.partial(direct.decode, self._direct_batch(direct, enc, layout, src, out), f"group {layout.name!r}")

    def _direct_batch(self, direct, enc: EncodedGroup, layout: GroupLayout, src: torch.Tensor, out: torch.Tensor):
        key = (enc.gid, enc.codec, enc.chunk_bytes, enc.length, len(enc.in_sizes), src.data_ptr(), out.data_ptr())
        b = self._direct_batches.get(key)
        if b is None:
            out_offsets, out_sizes = enc.outputs(layout)
            b = self._direct_batches[key] = direct.prepare(src, enc.in_offsets, enc.in_sizes, out, out_offsets, out_sizes)
        return b

    def decode(self, enc: EncodedGroup, layout: GroupLayout, src: torch.Tensor, out: torch.Tensor) -> None:
        """Enqueue the decode of a group's chunks from `src` (uint8, `enc` laid out from offset 0)
        into `out` (uint8, >= layout.decoded_bytes) on self.stream. Callers order it with
        events; nothing here synchronizes the host after the first call per group."""
        direct = self._direct_decoder(enc.codec)
        if direct is not None:
            direct.decode(self._direct_batch(direct, enc, layout, src, out), where=f"group {layout.name!r}")
            return
        srcs, outs, _, _ = self._batch(enc, layout, src, out)
        codec = self.codec(enc.codec)
        key = (enc.codec, layout.shape_key, enc.chunk_bytes)
        cfg = self._configs.get(key)
        if cfg is None:
            # Parses the chunk headers once (this one synchronizes). A config holds device
            # scratch, and serves every group of the same decoded shape (all transformer
            # blocks share one), so there are a handful, not one per layer.
            cfg = codec.decompression_config(srcs)
            self._configs[key] = cfg
        codec.decode(srcs, out=outs, decompression_config=cfg)

    def encode_packed(self, codec_name: str, layout: GroupLayout, decoded: torch.Tensor,
                      chunk_bytes: int = 0) -> tuple[torch.Tensor, EncodedGroup]:
        """Compress a decoded group (`decoded`, as laid out by `layout`) chunk by chunk with
        `codec_name` on the GPU and pack the chunks into one contiguous device buffer
        (16-byte aligned entries). `chunk_bytes` > 0: merge the file's chunks up to that size
        first (merge_chunks; fewer chunks cost less host time per decode call). Synchronizes
        (sizes are read back): a load-time step."""
        nv = self.nvcomp
        codec = self.codec(codec_name)
        s = self.stream.cuda_stream
        out_offsets, out_sizes = layout.out_offsets, layout.out_sizes
        if chunk_bytes:
            out_offsets, out_sizes = merge_chunks(out_offsets, out_sizes, chunk_bytes)
        n = len(out_sizes)
        probe = torch.empty(int(out_sizes.max()), dtype=torch.uint8, device=self.device)
        stride = -(-codec.get_max_comp_buffer_size(nv.as_array(probe, s)) // PACK_ALIGNMENT) * PACK_ALIGNMENT
        del probe
        strided = torch.empty(n * stride, dtype=torch.uint8, device=self.device)
        srcs = nv.as_arrays(decoded, out_offsets.tolist(), out_sizes.tolist(), s)
        outs = nv.as_arrays(strided, [i * stride for i in range(n)], [stride] * n, s)
        result = codec.encode(srcs, out=outs)
        sizes = np.asarray(result.buffer_sizes, dtype=np.int64)
        padded = -(-sizes // PACK_ALIGNMENT) * PACK_ALIGNMENT
        offsets = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        total = int(padded.sum())
        with torch.cuda.stream(self.stream):
            cols = torch.arange(stride, device=self.device)
            mask = cols[None, :] < torch.from_numpy(padded).to(self.device)[:, None]
            packed = strided.view(n, stride)[mask]
        self.stream.synchronize()
        del result, srcs, outs, strided
        if not chunk_bytes:
            return packed, EncodedGroup(layout.gid, codec_name, total, offsets, sizes)
        return packed, EncodedGroup(layout.gid, codec_name, total, offsets, sizes, out_offsets, out_sizes, chunk_bytes)

    def max_compressed_size(self, codec_name: str, raw_size: int) -> int:
        """nvCOMP's bound on the compressed size of one chunk of `raw_size` bytes (a stored chunk
        larger than that is not a chunk of this codec)."""
        probe = torch.empty(max(int(raw_size), 1), dtype=torch.uint8, device=self.device)
        size = int(self.codec(codec_name).get_max_comp_buffer_size(self.nvcomp.as_array(probe, self.stream.cuda_stream)))
        del probe
        return size

    def scratch_estimate(self, codec: str, shapes) -> int:
        """nvCOMP temporary memory the C-API decoder of `codec` needs for the largest of `shapes`
        ((num_chunks, max_chunk, total) of groups); 0 where decodes go through the Python API
        (which allocates its own scratch, unseen here)."""
        d = self._direct_decoder(codec)
        if d is None:
            return 0
        return max((d.temp_bytes(n, m, t) for n, m, t in shapes), default=0)

    def reserve_scratch(self, codec: str, nbytes: int) -> None:
        """Allocate the C-API decoder's scratch for `codec` now (load time)."""
        d = self._direct_decoder(codec)
        if d is not None and nbytes:
            d.reserve(nbytes)

    @property
    def scratch_bytes(self) -> int:
        """Device scratch the C-API decoders hold now (nvCOMP's temporary memory: small for ANS,
        a few times the largest group for Zstd, which only the disk tier decodes per forward)."""
        return sum(d._temp.numel() for d in self._direct.values() if d is not None)

    def codecs_in_use(self) -> list[str]:
        """Codecs holding nvCOMP state here (a Python-API Codec, a C-API decoder or both)."""
        return sorted(set(self._codecs) | set(self._direct))

    def release_codec(self, name: str) -> None:
        """Drop the nvCOMP Codec `name` with its decompression configs and cached batches
        (their device scratch goes with them); it is re-created on next use."""
        self.stream.synchronize()
        self._batches = {k: v for k, v in self._batches.items() if k[1] != name}
        self._configs = {k: v for k, v in self._configs.items() if k[0] != name}
        self._codecs.pop(name, None)
        self._direct_batches = {k: v for k, v in self._direct_batches.items() if k[1] != name}
        self._direct.pop(name, None)

    def forget(self, src: torch.Tensor | None = None) -> None:
        """Drop cached batches (all, or those over `src`)."""
        if src is None:
            self._batches.clear()
            self._direct_batches.clear()
        else:
            p = src.data_ptr()
            self._batches = {k: v for k, v in self._batches.items() if k[2] != p}
            self._direct_batches = {k: v for k, v in self._direct_batches.items() if k[5] != p}
