"""nvCOMP ANS chunks (codec ANS = 2, format 1.1): a GPU-only codec.

Each stored chunk is exactly one compressed chunk of nvCOMP's batched ANS compressor (nvCOMP
>= 6.0, RAW bitstream, default options, uint8 data), as written by
`nvidia.nvcomp.Codec(algorithm="ANS", bitstream_kind=BitstreamKind.RAW).encode`. The bitstream is
nvCOMP's (undocumented, changed incompatibly in 6.0), so nothing on the CPU can decode or
structurally check a chunk: this module checks what the index allows (sizes), and encodes or
decodes on a CUDA GPU through nvCOMP.

Security: nvCOMP's decoders assume valid input, and the ANS bitstream cannot be validated on the
CPU, so a crafted chunk with a correct checksum could crash the process or corrupt GPU memory.
Decoding is therefore refused (TrustRequired) unless the codec is created with trusted=True
(the reader's trust_gpu_codecs=True, the CLIs' --trust-gpu-codecs). See SECURITY.md.

Nothing here imports torch-CUDA or nvCOMP at import time: the reader imports this module on
every machine.
"""

from __future__ import annotations

import importlib
import threading
from typing import Sequence

import numpy as np

from .. import constants as C
from ..errors import CllmError, CodecUnavailable, DecodeError, TrustRequired
from .base import Buffer, ChunkCodec, register

NVCOMP_MIN_VERSION = (6, 0)
"""The ANS bitstream of nvCOMP 6.0 (incompatible with nvCOMP <= 5.x) is the one codec ANS names."""
NVCOMP_INSTALL_HINT = (
    'pip install "codecllm-format[gpu]" (nvidia-nvcomp-cu13>=6.0 for CUDA 13; '
    "codecllm-format[gpu-cu12] / nvidia-nvcomp-cu12>=6.0 for CUDA 12)"
)
TRUST_HINT = (
    "nvCOMP's ANS decoder assumes valid input and an ANS chunk cannot be checked on the CPU, so a crafted "
    "chunk (checksums recomputed) could crash the process or corrupt GPU memory; decode ANS chunks only of "
    "files whose source you trust: pass trust_gpu_codecs=True (CLI: --trust-gpu-codecs)"
)
CONVERT_HINT = "or transcode the file to zstd on a GPU machine: cllm-convert FILE.cllm --codec zstd -o FILE-zstd.cllm"
PACK_ALIGNMENT = 16
"""Chunks start at 16-byte boundaries in device input buffers (as in the file: CHUNK_ALIGNMENT)."""
OUT_ALIGNMENT = 256
"""Decoded chunks start at 256-byte boundaries in device output buffers."""


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _cuda_device_and_stream():
    """(torch device, torch CUDA stream) for nvCOMP work: a new stream on the current CUDA
    device. (The CPU tests replace this, and nvidia.nvcomp, with stand-ins to check the
    plumbing around nvCOMP; the GPU tests run the real thing.)"""
    import torch  # noqa: PLC0415

    dev = torch.device("cuda", torch.cuda.current_device())
    return dev, torch.cuda.Stream(dev)


def _on(stream):
    """Context that makes `stream` current (no-op without one)."""
    import contextlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _handle(stream) -> int:
    return stream.cuda_stream if stream is not None else 0


def _sync(stream) -> None:
    if stream is not None:
        stream.synchronize()


def nvcomp_version(nv) -> tuple[int, int]:
    """(major, minor) of an imported nvidia.nvcomp module ((0, 0) when it does not say)."""
    parts = str(getattr(nv, "__version__", "0.0")).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def gpu_decoder_unavailable() -> str | None:
    """Why this process cannot encode or decode ANS chunks, or None when it can (a CUDA GPU in
    PyTorch and nvCOMP >= 6.0 importable). Never raises."""
    try:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            return "no CUDA GPU is available to this process (ANS chunks are decoded by nvCOMP on a GPU)"
    except Exception as e:  # noqa: BLE001 - a broken torch install is a reason too
        return f"PyTorch cannot be used ({type(e).__name__}: {e})"
    try:
        nv = importlib.import_module("nvidia.nvcomp")
    except ImportError as e:
        return f"nvCOMP is not installed ({e}); {NVCOMP_INSTALL_HINT}"
    if nvcomp_version(nv) < NVCOMP_MIN_VERSION:
        return (f"nvCOMP {getattr(nv, '__version__', '?')} is installed, but .cllm ANS chunks use the nvCOMP "
                f"{NVCOMP_MIN_VERSION[0]}.{NVCOMP_MIN_VERSION[1]} bitstream; {NVCOMP_INSTALL_HINT}")
    return None


def check_ans_chunk_sizes(stored: int, raw_size: int, where: str = "") -> None:
    """The size rules an ANS chunk must meet (everything the CPU can check of one).

    Raises:
        DecodeError: an empty chunk, a raw size outside [1, MAX_CHUNK_SIZE], or more than
            MAX_ZSTD_EXPANSION x expansion.
    """
    if stored < 1:
        raise DecodeError(f"{where}: empty ANS chunk")
    if not 1 <= raw_size <= C.MAX_CHUNK_SIZE:
        raise DecodeError(f"{where}: ANS chunk of {raw_size} raw bytes (must be 1..{C.MAX_CHUNK_SIZE})")
    if raw_size > stored * C.MAX_ZSTD_EXPANSION:
        raise DecodeError(f"{where}: ANS chunk of {stored} bytes for {raw_size} raw bytes "
                          f"(more than the {C.MAX_ZSTD_EXPANSION}x expansion a chunk may have)")


@register
class AnsCodec(ChunkCodec):
    """nvCOMP ANS on the current CUDA device. `encode` needs a GPU; decoding needs a GPU and
    `trusted=True`.

    Args:
        trusted: allow decoding (the caller trusts the file's source; see the module docstring).
    """

    codec_id = C.Codec.ANS
    name = "ans"
    gpu_only = True

    def __init__(self, trusted: bool = False):
        self.trusted = bool(trusted)
        self._local = threading.local()  # an nvCOMP Codec must not be shared between threads
        self._max_comp: dict[int, int] = {}

    # --- nvCOMP plumbing ------------------------------------------------------------------

    def _gpu(self, where: str):
        """(nvcomp module, torch module, device, stream, nvCOMP Codec) of this thread."""
        state = getattr(self._local, "state", None)
        if state is None:
            reason = gpu_decoder_unavailable()
            if reason is not None:
                raise CodecUnavailable(f"{where}: stored with the GPU-only codec ANS, which this process cannot "
                                       f"encode or decode: {reason}; {CONVERT_HINT}")
            import torch  # noqa: PLC0415

            nv = importlib.import_module("nvidia.nvcomp")
            dev, stream = _cuda_device_and_stream()
            codec = nv.Codec(algorithm="ANS", bitstream_kind=nv.BitstreamKind.RAW, device_id=dev.index,
                             cuda_stream=_handle(stream))
            state = self._local.state = (nv, torch, dev, stream, codec)
        return state

    def max_compressed_size(self, raw_size: int, where: str = "") -> int:
        """nvCOMP's bound on the compressed size of a chunk of `raw_size` bytes (needs a GPU)."""
        hit = self._max_comp.get(raw_size)
        if hit is None:
            nv, torch, dev, stream, codec = self._gpu(where)
            probe = torch.empty(raw_size, dtype=torch.uint8, device=dev)
            hit = int(codec.get_max_comp_buffer_size(nv.as_array(probe, _handle(stream))))
            self._max_comp[raw_size] = hit
        return hit

    @staticmethod
    def _pack(torch, buffers: Sequence[Buffer], alignment: int):
        """One host uint8 tensor holding `buffers` at `alignment`-aligned offsets."""
        sizes = [len(memoryview(b).cast("B")) for b in buffers]
        offsets, pos = [], 0
        for n in sizes:
            offsets.append(pos)
            pos = _align(pos + n, alignment)
        host = torch.zeros(max(pos, 1), dtype=torch.uint8)
        arr = host.numpy()
        for o, b, n in zip(offsets, buffers, sizes):
            arr[o : o + n] = np.frombuffer(b, dtype=np.uint8, count=n)
        return host, offsets, sizes

    # --- ChunkCodec ---------------------------------------------------------------------------

    def encode(self, chunks: Sequence[Buffer], threads: int = 1) -> list[Buffer]:
        """Compress chunks on the GPU in one batched nvCOMP call; returns host bytes.

        Raises:
            CodecUnavailable: no CUDA GPU or nvCOMP >= 6.0.
            CllmError: a chunk compressed beyond the format's expansion limit (cannot happen for
                nvCOMP's ANS in practice; a smaller chunk size avoids it).
        """
        if not chunks:
            return []
        nv, torch, dev, stream, codec = self._gpu("ANS encoding")
        s = _handle(stream)
        host, offsets, sizes = self._pack(torch, chunks, PACK_ALIGNMENT)
        n = len(sizes)
        stride = _align(self.max_compressed_size(max(sizes), "ANS encoding"), PACK_ALIGNMENT)
        with _on(stream):
            src = host.to(dev)
            out = torch.empty(n * stride, dtype=torch.uint8, device=dev)
            srcs = nv.as_arrays(src, offsets, sizes, s)
            outs = nv.as_arrays(out, [i * stride for i in range(n)], [stride] * n, s)
            result = codec.encode(srcs, out=outs)
            _sync(stream)
            comp = [int(x) for x in result.buffer_sizes]
            back = out.cpu().numpy()
        _sync(stream)
        frames = []
        for i, (raw, size) in enumerate(zip(sizes, comp)):
            if not 1 <= size <= stride or raw > size * C.MAX_ZSTD_EXPANSION:
                raise CllmError(f"ANS encoding: chunk {i} of {raw} bytes compressed to {size} bytes, outside what "
                                f"the format allows (1..{stride}, at most {C.MAX_ZSTD_EXPANSION}x); use another chunk size")
            frames.append(back[i * stride : i * stride + size].tobytes())
        return frames

    def _require_decoder(self, where: str) -> None:
        reason = gpu_decoder_unavailable()
        if reason is not None:
            raise CodecUnavailable(f"{where}: stored with the GPU-only codec ANS, which this process cannot decode: "
                                   f"{reason}; {CONVERT_HINT}")
        if not self.trusted:
            raise TrustRequired(f"{where}: stored with the GPU-only codec ANS; {TRUST_HINT}")

    def check_sizes(self, frames: Sequence[Buffer], raw_sizes: Sequence[int], where: str = "") -> None:
        """Size rules on the CPU, then nvCOMP's compressed-size bound (needs a GPU).

        Raises:
            DecodeError: naming the chunk.
        """
        for i, (f, n) in enumerate(zip(frames, raw_sizes)):
            check_ans_chunk_sizes(len(memoryview(f).cast("B")), n, f"{where} chunk {i}")
        for i, (f, n) in enumerate(zip(frames, raw_sizes)):
            bound = self.max_compressed_size(n, where)
            if len(memoryview(f).cast("B")) > bound:
                raise DecodeError(f"{where} chunk {i}: {len(f)} stored bytes for {n} raw bytes, more than nvCOMP's "
                                  f"ANS bound of {bound}: not an ANS chunk")

    def decode_into(
        self, frames: Sequence[Buffer], raw_sizes: Sequence[int], out: memoryview, threads: int = 1, where: str = ""
    ) -> None:
        """Decode ANS chunks on the GPU (one batched call) back to back into host `out`.

        Raises:
            CodecUnavailable: no CUDA GPU or nvCOMP >= 6.0 (the message says what to install).
            TrustRequired: the codec was not created with trusted=True.
            DecodeError: a chunk breaks the size rules or nvCOMP reports a failure.
        """
        if not frames:
            return
        self._require_decoder(where)
        if len(out) != sum(raw_sizes):
            raise DecodeError(f"{where}: output buffer of {len(out)} bytes for {sum(raw_sizes)} decoded bytes")
        self.check_sizes(frames, raw_sizes, where)
        nv, torch, dev, stream, codec = self._gpu(where)
        s = _handle(stream)
        host, offsets, sizes = self._pack(torch, frames, PACK_ALIGNMENT)
        out_offsets, pos = [], 0
        for n in raw_sizes:
            out_offsets.append(pos)
            pos = _align(pos + n, OUT_ALIGNMENT)
        try:
            with _on(stream):
                src = host.to(dev)
                dec = torch.zeros(max(pos, 1), dtype=torch.uint8, device=dev)
                srcs = nv.as_arrays(src, offsets, sizes, s)
                outs = nv.as_arrays(dec, out_offsets, list(raw_sizes), s)
                codec.decode(srcs, out=outs)
                _sync(stream)
                back = dec.cpu().numpy()
            _sync(stream)
        except CllmError:
            raise
        except Exception as e:  # noqa: BLE001 - nvCOMP reports failures as plain exceptions
            raise DecodeError(f"{where}: nvCOMP ANS decode failed ({type(e).__name__}: {e})") from None
        dst = np.frombuffer(out, dtype=np.uint8)
        p = 0
        for o, n in zip(out_offsets, raw_sizes):
            dst[p : p + n] = back[o : o + n]
            p += n

    def check_frame(self, frame: Buffer, raw_size: int, where: str = "") -> None:
        """Decode one chunk on the GPU (trusted files only) and check its size."""
        self.decode_into([frame], [raw_size], memoryview(bytearray(raw_size)), where=where)
