"""CPU zstd codec (python-zstandard). Each chunk is one standard zstd frame that records its
content size; no dictionary, no frame checksum (the chunk table checksums stored bytes)."""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import zstandard

from ..constants import Codec
from ..errors import DecodeError
from .base import Buffer, ChunkCodec, register


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def frame_compressed_size(frame: Buffer, where: str = "") -> int:
    """Length of the zstd frame at the start of `frame` (header, blocks, optional checksum),
    found by walking the block headers (RFC 8878 section 3.1.1); libzstd's one-shot and batch
    decoders ignore bytes after the first frame, so this is how trailing data is caught.

    Raises:
        DecodeError: not a zstd frame, a reserved block type, or a truncated frame.
    """
    mv = memoryview(frame).cast("B")
    if bytes(mv[:4]) != ZSTD_MAGIC:
        raise DecodeError(f"{where}: not a zstd frame (magic {bytes(mv[:4])!r})")
    try:
        pos = zstandard.frame_header_size(mv)
    except zstandard.ZstdError as e:
        raise DecodeError(f"{where}: bad zstd frame header ({e})") from None
    while True:
        if pos + 3 > len(mv):
            raise DecodeError(f"{where}: zstd frame truncated at byte {pos}")
        head = mv[pos] | mv[pos + 1] << 8 | mv[pos + 2] << 16
        pos += 3
        block_type, block_size = (head >> 1) & 3, head >> 3
        if block_type == 3:
            raise DecodeError(f"{where}: reserved zstd block type at byte {pos - 3}")
        pos += 1 if block_type == 1 else block_size
        if head & 1:
            break
    return pos + (4 if mv[4] & 0x04 else 0)


def check_frame_structure(frame: Buffer, raw_size: int, where: str = "") -> None:
    """Cheap structural check of one stored chunk, without decoding: exactly one zstd frame
    whose header declares `raw_size` decoded bytes. Run before any decoder (CPU or nvCOMP,
    which assumes valid input) sees the chunk.

    Raises:
        DecodeError: not a frame, a declared size other than `raw_size`, or trailing bytes.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise DecodeError(f"{where}: not a zstd frame ({e})") from None
    if declared != raw_size:
        raise DecodeError(f"{where}: zstd frame declares {declared} decoded bytes, the index says {raw_size}")
    size = frame_compressed_size(frame, where)
    if size != len(frame):
        raise DecodeError(f"{where}: {len(frame) - size} bytes after the zstd frame (a chunk is exactly one frame)")


@register
class ZstdCodec(ChunkCodec):
    codec_id = Codec.ZSTD
    name = "zstd"

    def __init__(self, level: int = 3, params: dict | None = None):
        """Args:
            level: zstd compression level, -7..22.
            params: instead of `level`, explicit zstd compression parameters (keyword
                arguments of zstandard.ZstdCompressionParameters: window_log, strategy, ...).
        """
        if not -7 <= level <= 22:
            raise ValueError(f"zstd level must be in [-7, 22], got {level}")
        self.level = level
        self.params = dict(params) if params else None
        if self.params:
            cp = zstandard.ZstdCompressionParameters(
                **self.params, write_content_size=True, write_checksum=False, write_dict_id=False
            )
            self._cctx = zstandard.ZstdCompressor(compression_params=cp)
        else:
            self._cctx = zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False, write_dict_id=False
            )
        self._local = threading.local()  # a ZstdDecompressor must not be used by two threads at once

    @property
    def _dctx(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor (a shared one corrupts data or crashes, e.g. two threads
        in verify() of one open file)."""
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def encode(self, chunks: Sequence[Buffer], threads: int = 1) -> list[Buffer]:
        if not chunks:
            return []
        if threads <= 1 or len(chunks) == 1:
            return [self._cctx.compress(c) for c in chunks]
        result = self._cctx.multi_compress_to_buffer(list(chunks), threads=threads)
        return [memoryview(seg) for seg in result]

    def _check_content_size(self, frame: Buffer, raw_size: int, where: str) -> None:
        check_frame_structure(frame, raw_size, where)

    def decode_into(
        self, frames: Sequence[Buffer], raw_sizes: Sequence[int], out: memoryview, threads: int = 1, where: str = ""
    ) -> None:
        if not frames:
            return
        for i, (f, n) in enumerate(zip(frames, raw_sizes)):
            self._check_content_size(f, n, f"{where} chunk {i}")
        sizes = np.asarray(raw_sizes, dtype="<u8")
        try:
            result = self._dctx.multi_decompress_to_buffer(
                list(frames), decompressed_sizes=sizes.tobytes(), threads=max(1, threads)
            )
        except zstandard.ZstdError as e:
            raise DecodeError(f"{where}: zstd decode failed ({e})") from None
        pos = 0
        dst = np.frombuffer(out, dtype=np.uint8)
        for seg in result:
            n = len(seg)
            dst[pos : pos + n] = np.frombuffer(seg, dtype=np.uint8)
            pos += n
        if pos != len(out):
            raise DecodeError(f"{where}: decoded {pos} bytes, expected {len(out)}")

    def check_frame(self, frame: Buffer, raw_size: int, where: str = "") -> None:
        self._check_content_size(frame, raw_size, where)
        dobj = self._dctx.decompressobj()
        try:
            data = dobj.decompress(frame)
        except zstandard.ZstdError as e:
            raise DecodeError(f"{where}: zstd decode failed ({e})") from None
        if not dobj.eof:
            raise DecodeError(f"{where}: zstd frame is incomplete")
        if dobj.unused_data:
            raise DecodeError(f"{where}: {len(dobj.unused_data)} bytes after the zstd frame")
        if len(data) != raw_size:
            raise DecodeError(f"{where}: decoded {len(data)} bytes, expected {raw_size}")
