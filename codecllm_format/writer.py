"""CllmWriter: streams tensors into a .cllm file, one tensor in memory at a time.

An explicit state machine (NEW -> OPEN -> DONE, or ABORTED), like gguf-py's WriterState.
Bytes go to a temporary file beside the target ('.NAME.<random>.cllm-partial'); `finish()`
writes the index, patches the header, fsyncs and atomically renames, so the target path
never holds a partial file. Same input, same calls -> same bytes.
"""

from __future__ import annotations

import enum
import os
import secrets
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import zstandard

from . import constants as C
from .checksums import xxh3_64
from .codecs import get_codec
from .codecs.zstd import check_frame_structure
from .errors import CllmError, CodecUnavailable
from .index import (
    CHUNK_DTYPE,
    EmbeddedFile,
    Group,
    Index,
    Stream,
    TensorEntry,
    align_up,
    encode_index,
    expected_stream_lengths,
    index_minor_version,
)
from .planes import plane_dtype, split_planes
from .quant import group_count, quantize_int8_groups, quantize_int8_rows

PARTIAL_SUFFIX = ".cllm-partial"
FILES_GROUP = C.FILES_GROUP
BATCH_BYTES = 32 * 1024 * 1024
"""Raw bytes compressed per batch: bounds the compressed output held in memory."""
DEFAULT_LEVEL = 3
"""zstd level of raw tensor data (level 1 makes lossless bf16 0.5% larger)."""
INT8_LEVEL = 1
"""zstd level of int8 values: they are Huffman-coded literals with almost no matches, so
level 1 gives the same size as level 3 (+0.003%), 1.3x faster (benchmarks/RESULTS.md)."""
SMALL_STREAM_BYTES = 1024 * 1024
SMALL_STREAM_LEVEL = 6
"""Raw tensors and scales of at most SMALL_STREAM_BYTES are compressed at this level:
2-20% smaller than level 3 (float32 scales), and they are ~0.1% of the input. Higher levels
gain a few % more at 3-10x the time (benchmarks/RESULTS.md)."""
FILE_LEVEL = 19
"""Embedded files (config, tokenizer) are compressed at this level, one frame per file up to
MAX_CHUNK_SIZE: 22% smaller than level 3 in 64 KiB chunks; they are compressed once and
never decoded by chunk."""

EXPONENT_PARAMS = dict(window_log=16, chain_log=12, hash_log=12, search_log=1, min_match=7,
                       target_length=16, strategy=zstandard.STRATEGY_BTOPT)
"""zstd parameters of FLOAT_PLANES exponent planes: the optimal parser (which only takes a
match where it beats coding literals) with a small search. On all-MiniLM-L6-v2 in bf16 it
reaches 2.649 bits per exponent (order-0 entropy 2.664) at ~12 MB/s of exponents per core;
level 19 gives 2.654 at 1.6 MB/s, levels 1-9 3.0-3.2 bits (their greedy matches cost more
than they save). Window 64 KiB = the default chunk: single-segment frames.
(benchmarks/RESULTS.md, "Lossless (FLOAT_PLANES)")."""
SIGN_MANTISSA_LEVEL = 1
"""zstd level of FLOAT_PLANES sign_mantissa streams. Mantissa byte planes are near 8 bits of
entropy per byte: zstd stores raw blocks at any level, level 1 fastest (1.2 GB/s). The F16
top plane (sign + 2 mantissa bits, 2.97 bits of entropy) gets 3.08 bits at level 1, 3.44 at
level 3, 3.01 with EXPONENT_PARAMS at 10x the time."""

TORCH_TO_DTYPE = {
    torch.float32: C.DType.F32,
    torch.float16: C.DType.F16,
    torch.bfloat16: C.DType.BF16,
    torch.float64: C.DType.F64,
    torch.int8: C.DType.I8,
    torch.uint8: C.DType.U8,
    torch.int16: C.DType.I16,
    torch.int32: C.DType.I32,
    torch.int64: C.DType.I64,
    torch.bool: C.DType.BOOL,
}
DTYPE_TO_TORCH = {v: k for k, v in TORCH_TO_DTYPE.items()}


@dataclass(frozen=True)
class PrecompressedStream:
    """A stream whose chunks were compressed elsewhere (e.g. on a GPU, or copied from another
    .cllm file), for CllmWriter.add_precompressed_tensor.

    Attributes:
        codec: the codec of every chunk.
        length: decoded length of the stream in bytes.
        chunk_size: decoded bytes per chunk (the last chunk holds the rest).
        chunks: the stored bytes of each chunk, in order.
        raw_lengths: decoded bytes of each chunk; None: derived from length and chunk_size
            (when given, they must equal that chunking).
    """

    codec: C.Codec
    length: int
    chunk_size: int
    chunks: Sequence
    raw_lengths: Sequence[int] | None = None


class WriterState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    DONE = "done"
    ABORTED = "aborted"


def partial_path_for(target: Path) -> Path:
    """A fresh temporary path beside `target`, recognisable by its suffix."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian row-major bytes of a CPU tensor (no copy when already contiguous)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class CllmWriter:
    """Writes a .cllm file. Use as a context manager; leaving with an exception aborts.

    Args:
        path: target path; written only at `finish()`, by atomic rename.
        chunk_size: raw bytes per chunk (default 64 KiB).
        level: zstd level of every stream; None (default): DEFAULT_LEVEL for raw tensors,
            INT8_LEVEL for int8 values, SMALL_STREAM_LEVEL for scales and small tensors,
            FILE_LEVEL for embedded files, EXPONENT_PARAMS / SIGN_MANTISSA_LEVEL for the
            planes of float_planes tensors.
        threads: compression threads (zstandard releases the GIL).
        metadata: free string key/values stored in the index.
        int8_codec: codec of both streams (values and scales) of int8_row tensors: "zstd"
            (default, portable) or "ans" (nvCOMP ANS, compressed on the GPU; the file is then
            GPU-only for those tensors and says format 1.1). RAW tensors and embedded files
            always use zstd.

    Raises:
        CodecUnavailable: int8_codec="ans" without a CUDA GPU and nvCOMP >= 6.0 (before
            anything is written).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        chunk_size: int = C.DEFAULT_CHUNK_SIZE,
        level: int | None = None,
        threads: int = 1,
        metadata: dict[str, str] | None = None,
        int8_codec: str = "zstd",
    ):
        if int8_codec not in ("zstd", "ans"):
            raise ValueError(f"int8_codec must be 'zstd' or 'ans', got {int8_codec!r}")
        if not C.MIN_CHUNK_SIZE <= chunk_size <= C.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in [{C.MIN_CHUNK_SIZE}, {C.MAX_CHUNK_SIZE}], got {chunk_size}")
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.threads = max(1, int(threads))
        self.codec = get_codec(C.Codec.ZSTD, level=DEFAULT_LEVEL if level is None else level)
        self.int8_codec = get_codec(C.Codec.ZSTD, level=INT8_LEVEL if level is None else level)
        self.small_codec = get_codec(C.Codec.ZSTD, level=SMALL_STREAM_LEVEL if level is None else level)
        self.file_codec = get_codec(C.Codec.ZSTD, level=FILE_LEVEL if level is None else level)
        self.int8_scale_codec = None  # None: scales by size, as raw tensors
        if int8_codec == "ans":
            from .codecs.ans import gpu_decoder_unavailable  # noqa: PLC0415

            reason = gpu_decoder_unavailable()
            if reason is not None:
                raise CodecUnavailable(f"int8_codec='ans' compresses on the GPU with nvCOMP: {reason}")
            self.int8_codec = self.int8_scale_codec = get_codec(C.Codec.ANS)
        self.exponent_codec = (get_codec(C.Codec.ZSTD, params=EXPONENT_PARAMS) if level is None
                               else get_codec(C.Codec.ZSTD, level=level))
        self.sign_mantissa_codec = get_codec(C.Codec.ZSTD, level=SIGN_MANTISSA_LEVEL if level is None else level)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        if len(self.metadata) > C.MAX_METADATA_ENTRIES or any(
            not k or len(k) > C.MAX_NAME_LENGTH or len(v.encode()) > C.MAX_METADATA_VALUE_LENGTH
            for k, v in self.metadata.items()
        ):
            raise ValueError("metadata: too many entries, an empty or too long key, or a too long value")
        self.state = WriterState.NEW
        self._tensors: list[TensorEntry] = []
        self._groups: list[Group] = []
        self._group_names: set[str] = set()
        self._aliases: dict[str, str] = {}
        self._pending_files: list[tuple[str, bytes]] = []
        self._files: list[EmbeddedFile] = []
        self._names: set[str] = set()
        self._fh = None
        self._tmp: Path | None = None
        self._pos = 0
        self._group_start: int | None = None
        self._group_int8_codec: tuple[C.Codec, str] | None = None
        """(codec, first tensor) of the current group's int8_row streams: one codec per group."""

    # --- state ----------------------------------------------------------------------

    def _require(self, *states: WriterState) -> None:
        if self.state not in states:
            raise RuntimeError(f"CllmWriter is {self.state.value}; this needs {[s.value for s in states]}")

    def open(self) -> "CllmWriter":
        self._require(WriterState.NEW)
        self._tmp = partial_path_for(self.path)
        self._fh = open(self._tmp, "wb")
        self._fh.write(b"\0" * C.DATA_START)
        self._pos = C.DATA_START
        self.state = WriterState.OPEN
        return self

    def __enter__(self) -> "CllmWriter":
        return self.open() if self.state == WriterState.NEW else self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.state == WriterState.OPEN:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far; the target path is untouched."""
        if self.state in (WriterState.DONE, WriterState.ABORTED):
            return
        self.state = WriterState.ABORTED
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass

    # --- low-level writing -------------------------------------------------------------

    def _pad_to(self, alignment: int) -> None:
        target = align_up(self._pos, alignment)
        if target > self._pos:
            self._fh.write(b"\0" * (target - self._pos))
            self._pos = target

    def _close_group(self) -> None:
        if self._group_start is not None:
            g = self._groups[-1]
            self._groups[-1] = Group(name=g.name, offset=g.offset, length=self._pos - g.offset)
            self._group_start = None

    def begin_group(self, name: str, *, _files: bool = False) -> None:
        """Start a layer group: every chunk written until the next group is contiguous."""
        self._require(WriterState.OPEN)
        if not name or name in self._group_names or len(name) > C.MAX_NAME_LENGTH:
            raise ValueError(f"group name {name!r} is empty, too long or already used")
        if (name == FILES_GROUP) != _files:
            raise ValueError(f"group name {FILES_GROUP!r} is reserved for embedded files")
        self._close_group()
        self._pad_to(C.GROUP_ALIGNMENT)
        self._groups.append(Group(name=name, offset=self._pos, length=0))
        self._group_names.add(name)
        self._group_start = self._pos
        self._group_int8_codec = None

    def _write_stream(self, data: memoryview, progress: Callable[[int], None] | None, scale: float | Fraction,
                      chunk_size: int | None = None, codec=None) -> Stream:
        """Chunk, compress (in batches, multi-threaded) and write one stream (with `codec`,
        default the raw-data one); `progress` gets int(raw bytes done * scale) increments,
        summing exactly to int(length * scale)."""
        if self._group_start is None:
            raise RuntimeError("begin_group() must be called before writing data")
        length = len(data)
        cs = chunk_size or self.chunk_size
        codec = codec or self.codec
        records = np.zeros(-(-length // cs), dtype=CHUNK_DTYPE)
        batch = max(cs, BATCH_BYTES // cs * cs)
        i = 0
        for b0 in range(0, length, batch):
            raw_chunks = [data[o : min(o + cs, length)] for o in range(b0, min(b0 + batch, length), cs)]
            frames = codec.encode(raw_chunks, threads=self.threads)
            for raw, frame in zip(raw_chunks, frames):
                self._pad_to(C.CHUNK_ALIGNMENT)
                records[i] = (self._pos, len(frame), len(raw), xxh3_64(frame))
                self._fh.write(frame)
                self._pos += len(frame)
                i += 1
            if progress is not None:
                done = min(b0 + batch, length)
                progress(int(done * scale) - int(b0 * scale))
        records.flags.writeable = False
        return Stream(codec=codec.codec_id, length=length, chunk_size=cs, chunks=records)

    def _write_precompressed(self, ps: PrecompressedStream, where: str) -> Stream:
        """Write chunks compressed elsewhere: same alignment, records and checksums as
        _write_stream. Checks the chunking, sizes and (zstd) frame structure first."""
        if self._group_start is None:
            raise RuntimeError("begin_group() must be called before writing data")
        cs, length = int(ps.chunk_size), int(ps.length)
        if not C.MIN_CHUNK_SIZE <= cs <= C.MAX_CHUNK_SIZE or length < 0:
            raise ValueError(f"{where}: chunk_size {cs} or length {length} out of range")
        n = -(-length // cs)
        raws = [cs] * n
        if n:
            raws[-1] = length - (n - 1) * cs
        if ps.raw_lengths is not None and [int(r) for r in ps.raw_lengths] != raws:
            raise ValueError(f"{where}: raw lengths {list(ps.raw_lengths)[:4]}... are not {length} bytes in chunks of {cs}")
        frames = [memoryview(f).cast("B") for f in ps.chunks]
        if len(frames) != n:
            raise ValueError(f"{where}: {len(frames)} chunks, {length} bytes in chunks of {cs} need {n}")
        codec_id = C.Codec(ps.codec)
        for i, (frame, raw) in enumerate(zip(frames, raws)):
            if not len(frame) or raw > len(frame) * C.MAX_ZSTD_EXPANSION or len(frame) >= 1 << 32:
                raise ValueError(f"{where}: chunk {i} stores {len(frame)} bytes for {raw} raw bytes")
            if codec_id == C.Codec.ZSTD:
                check_frame_structure(frame, raw, f"{where} chunk {i}")
        records = np.zeros(n, dtype=CHUNK_DTYPE)
        for i, (frame, raw) in enumerate(zip(frames, raws)):
            self._pad_to(C.CHUNK_ALIGNMENT)
            records[i] = (self._pos, len(frame), raw, xxh3_64(frame))
            self._fh.write(frame)
            self._pos += len(frame)
        records.flags.writeable = False
        return Stream(codec=codec_id, length=length, chunk_size=cs, chunks=records)

    def _note_int8_codec(self, name: str, codecs) -> None:
        """All int8_row streams of a group share one codec (spec 11: one batched decode)."""
        for codec in codecs:
            first = self._group_int8_codec
            if first is None:
                self._group_int8_codec = (C.Codec(codec), name)
            elif first[0] != codec:
                raise ValueError(f"tensor {name!r}: codec {C.Codec(codec).name}, but int8_row tensor {first[1]!r} of this "
                                 f"group uses {first[0].name} (one codec for all int8_row streams of a group)")

    def _claim_name(self, name: str) -> None:
        if not name or len(name) > C.MAX_NAME_LENGTH:
            raise ValueError(f"bad tensor name {name!r}")
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)

    # --- public API ----------------------------------------------------------------------

    def add_tensor(
        self,
        name: str,
        tensor: torch.Tensor,
        encoding: C.Encoding = C.Encoding.RAW,
        progress: Callable[[int], None] | None = None,
        *,
        group_size: int | None = None,
    ) -> TensorEntry:
        """Encode and write one tensor into the current group.

        Args:
            name: unique tensor name.
            tensor: CPU tensor; its dtype becomes the logical dtype.
            encoding: RAW; INT8_ROW / INT8_GROUP for 2-D float tensors; FLOAT_PLANES (lossless)
                for bfloat16, float16, float32 tensors of any shape.
            progress: called with increments of input bytes consumed.
            group_size: INT8_GROUP only: columns per scale (default C.DEFAULT_GROUP_SIZE).

        Raises:
            ValueError: bad name, unsupported dtype, or an encoding the tensor can't take.
            quant.NonFiniteError: INT8_ROW / INT8_GROUP of a tensor with NaN/inf.
        """
        self._require(WriterState.OPEN)
        if tensor.dtype not in TORCH_TO_DTYPE:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} is not supported by .cllm v1")
        dtype = TORCH_TO_DTYPE[tensor.dtype]
        if encoding == C.Encoding.INT8_GROUP:
            group_size = C.DEFAULT_GROUP_SIZE if group_size is None else group_size
            _check_group_size(name, group_size)
        elif group_size is not None:
            raise ValueError(f"tensor {name!r}: group_size is only for int8_group")
        self._claim_name(name)
        in_bytes = tensor.numel() * tensor.element_size()
        if encoding == C.Encoding.RAW:
            data = tensor_bytes(tensor)
            codec = self.small_codec if len(data) <= SMALL_STREAM_BYTES else self.codec
            streams = (self._write_stream(data, progress, 1.0, codec=codec),)
        elif encoding == C.Encoding.INT8_ROW:
            if tensor.dim() != 2 or dtype not in C.FLOAT_DTYPES:
                raise ValueError(f"tensor {name!r}: int8_row needs a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}")
            q, scales = quantize_int8_rows(tensor)
            self._note_int8_codec(name, (self.int8_codec.codec_id,))
            streams = self._write_int8_streams(q, scales, progress, in_bytes)
            del q, scales
        elif encoding == C.Encoding.FLOAT_PLANES:
            try:
                plane_dtype(tensor.dtype)
            except ValueError:
                raise ValueError(f"tensor {name!r}: float_planes takes bfloat16, float16 or float32, "
                                 f"got {tensor.dtype}") from None
            exponent, sign_mantissa = split_planes(tensor)
            # progress in source bytes: the exponent plane stands for 1 / (1 + k) of them
            e_share = in_bytes * len(exponent) // max(1, len(exponent) + len(sign_mantissa))
            streams = (
                self._write_stream(memoryview(exponent), progress, Fraction(e_share, max(1, len(exponent))),
                                   codec=self.exponent_codec),
                self._write_stream(memoryview(sign_mantissa), progress,
                                   Fraction(in_bytes - e_share, max(1, len(sign_mantissa))),
                                   codec=self.sign_mantissa_codec),
            )
            del exponent, sign_mantissa
        elif encoding == C.Encoding.INT8_GROUP:
            if tensor.dim() != 2 or dtype not in C.FLOAT_DTYPES:
                raise ValueError(f"tensor {name!r}: int8_group needs a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}")
            q, scales = quantize_int8_groups(tensor, group_size, torch.bfloat16)
            streams = self._write_int8_streams(q, scales, progress, in_bytes)
            del q, scales
        else:
            raise ValueError(f"unknown encoding {encoding!r}")
        entry = TensorEntry(
            name=name,
            shape=tuple(int(d) for d in tensor.shape),
            dtype=dtype,
            encoding=C.Encoding(encoding),
            group=len(self._groups) - 1,
            streams=streams,
            group_size=group_size,
        )
        self._tensors.append(entry)
        return entry

    def _write_int8_streams(self, q: torch.Tensor, scales: torch.Tensor,
                            progress: Callable[[int], None] | None, in_bytes: int) -> tuple[Stream, Stream]:
        """The two streams of an int8_row or int8_group tensor; progress totals `in_bytes` (the source's size)."""
        q_bytes, s_bytes = q.numel(), scales.numel() * scales.element_size()
        total = max(1, q_bytes + s_bytes)
        # progress in source bytes: q's share is int(q_bytes * in_bytes / total), the rest is the scales'
        q_share = q_bytes * in_bytes // total
        return (
            self._write_stream(tensor_bytes(q), progress, Fraction(q_share, max(1, q_bytes)), codec=self.int8_codec),
            self._write_stream(tensor_bytes(scales), progress, Fraction(in_bytes - q_share, max(1, s_bytes)),
                               codec=self.int8_scale_codec or (self.small_codec if s_bytes <= SMALL_STREAM_BYTES else self.codec)),
        )

    def add_int8_tensor(
        self, name: str, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
        progress: Callable[[int], None] | None = None, *, group_size: int | None = None,
    ) -> TensorEntry:
        """Write an already-quantized int8_row tensor (e.g. quantized on a GPU, or on another
        thread), or an int8_group one when `group_size` is given; the bytes are those
        add_tensor writes for the same q and scales.

        Args:
            q: int8 [rows, cols]; scales: float32 [rows] (int8_row) or bfloat16
                [rows, ceil(cols / group_size)] (int8_group); dtype: the logical float dtype.
            progress: called with increments that total the size of the source in `dtype`.
            group_size: int8_group's columns per scale (a power of two in
                [C.MIN_GROUP_SIZE, C.MAX_GROUP_SIZE]); None writes int8_row.
        """
        self._require(WriterState.OPEN)
        if group_size is not None:
            _check_group_size(name, group_size)
            if (q.dtype != torch.int8 or q.dim() != 2 or scales.dtype != torch.bfloat16
                    or scales.shape != (q.shape[0], group_count(q.shape[1], group_size))):
                raise ValueError(f"tensor {name!r}: need int8 [rows, cols] and bfloat16 [rows, ceil(cols / "
                                 f"{group_size})] scales, got {q.dtype} {tuple(q.shape)} and {scales.dtype} "
                                 f"{tuple(scales.shape)}")
        elif q.dtype != torch.int8 or q.dim() != 2 or scales.dtype != torch.float32 or scales.shape != (q.shape[0],):
            raise ValueError(f"tensor {name!r}: need int8 [rows, cols] and float32 [rows] scales")
        if dtype not in TORCH_TO_DTYPE or TORCH_TO_DTYPE[dtype] not in C.FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r}: logical dtype must be a float dtype, got {dtype}")
        self._claim_name(name)
        if group_size is not None and self.int8_codec.codec_id == C.Codec.ANS:
            raise ValueError(f"tensor {name!r}: int8_group streams are zstd only (codec ANS holds int8_row streams, "
                             f"spec/FORMAT.md section 11)")
        self._note_int8_codec(name, (self.int8_codec.codec_id,))
        streams = self._write_int8_streams(q, scales, progress, q.numel() * dtype.itemsize)
        entry = TensorEntry(
            name=name, shape=(int(q.shape[0]), int(q.shape[1])), dtype=TORCH_TO_DTYPE[dtype],
            encoding=C.Encoding.INT8_ROW if group_size is None else C.Encoding.INT8_GROUP,
            group=len(self._groups) - 1, streams=streams, group_size=group_size,
        )
        self._tensors.append(entry)
        return entry

    def add_precompressed_tensor(
        self, name: str, shape: Sequence[int], dtype: C.DType | torch.dtype, encoding: C.Encoding,
        streams: Sequence[PrecompressedStream],
    ) -> TensorEntry:
        """Write a tensor whose streams were compressed elsewhere (nvCOMP ANS chunks compressed on a
        GPU in one batch per layer group, or chunks copied from another .cllm file), into the
        current group. Checksums, alignment and layout are the writer's as for add_tensor.

        Args:
            name: unique tensor name.
            shape, dtype, encoding: the tensor's; the streams' lengths must be what they need.
            streams: one PrecompressedStream per stream of the encoding, in order.

        Raises:
            ValueError: a bad name, shape, dtype, stream count or length, chunking, chunk size,
                a GPU-only codec outside int8_row, two codecs among a group's int8_row streams.
            DecodeError: a zstd chunk that is not exactly one frame of its raw size.
        """
        self._require(WriterState.OPEN)
        dt = TORCH_TO_DTYPE.get(dtype) if isinstance(dtype, torch.dtype) else C.DType(dtype)
        if dt is None:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not supported by .cllm v1")
        enc = C.Encoding(encoding)
        shape = tuple(int(d) for d in shape)
        if len(shape) > C.MAX_NDIM or any(not 0 <= d < 1 << 48 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape}")
        if enc == C.Encoding.INT8_ROW and (len(shape) != 2 or dt not in C.FLOAT_DTYPES):
            raise ValueError(f"tensor {name!r}: int8_row needs a 2-D float tensor, got {shape} {dt.name}")
        lengths = expected_stream_lengths(shape, dt, enc)
        if len(streams) != len(lengths):
            raise ValueError(f"tensor {name!r}: {len(streams)} streams, encoding {enc.name} needs {len(lengths)}")
        for j, (ps, want) in enumerate(zip(streams, lengths)):
            if int(ps.length) != want:
                raise ValueError(f"tensor {name!r}: stream {j} has {ps.length} bytes, shape x dtype needs {want}")
            if C.Codec(ps.codec) in C.GPU_ONLY_CODECS and enc != C.Encoding.INT8_ROW:
                raise ValueError(f"tensor {name!r}: codec {C.Codec(ps.codec).name} is allowed only for int8_row tensors")
        self._claim_name(name)
        if enc == C.Encoding.INT8_ROW:
            try:
                self._note_int8_codec(name, [C.Codec(ps.codec) for ps in streams])
            except ValueError:
                self._names.discard(name)
                raise
        written = tuple(self._write_precompressed(ps, f"tensor {name!r} stream {j}") for j, ps in enumerate(streams))
        entry = TensorEntry(name=name, shape=shape, dtype=dt, encoding=enc, group=len(self._groups) - 1, streams=written)
        self._tensors.append(entry)
        return entry

    def add_alias(self, alias: str, target: str) -> None:
        """Record that tensor `alias` is the same tensor as stored `target` (tied weights)."""
        self._require(WriterState.OPEN)
        if target not in self._names or target in self._aliases:
            raise ValueError(f"alias target {target!r} is not a stored tensor")
        self._claim_name(alias)
        self._aliases[alias] = target

    def add_file(self, name: str, data: bytes) -> None:
        """Embed a file (config.json, tokenizer files...). Written in a final group."""
        self._require(WriterState.OPEN)
        if not name or name.startswith("/") or ".." in name.split("/") or len(name) > C.MAX_NAME_LENGTH:
            raise ValueError(f"bad embedded file name {name!r}")
        if any(n == name for n, _ in self._pending_files):
            raise ValueError(f"embedded file {name!r} added twice")
        if len(data) > C.MAX_EMBEDDED_FILE_LENGTH or len(self._pending_files) >= C.MAX_FILES:
            raise ValueError(f"embedded file {name!r} is too large or too many files")
        self._pending_files.append((name, bytes(data)))

    @property
    def bytes_written(self) -> int:
        return self._pos

    def finish(self) -> Path:
        """Write embedded files, the index and the header; fsync; rename into place."""
        self._require(WriterState.OPEN)
        try:
            if self._pending_files:
                self.begin_group(FILES_GROUP, _files=True)
                for name, data in self._pending_files:
                    # one frame per file (up to MAX_CHUNK_SIZE): files are never decoded by chunk
                    one_frame = self.chunk_size if len(data) <= self.chunk_size else min(C.MAX_CHUNK_SIZE, len(data))
                    codec = self.file_codec if len(data) <= C.MAX_CHUNK_SIZE else self.codec
                    stream = self._write_stream(memoryview(data), None, 1.0, chunk_size=one_frame, codec=codec)
                    self._files.append(EmbeddedFile(name=name, group=len(self._groups) - 1, stream=stream))
            self._close_group()
            index = Index(
                tensors=tuple(self._tensors),
                groups=tuple(self._groups),
                aliases=dict(self._aliases),
                files=tuple(self._files),
                metadata=dict(self.metadata),
            )
            blob = encode_index(index)
            if len(blob) > C.MAX_INDEX_LENGTH:
                raise CllmError(f"index is {len(blob)} bytes, over the {C.MAX_INDEX_LENGTH} limit")
            self._pad_to(C.INDEX_ALIGNMENT)
            index_offset = self._pos
            self._fh.write(blob)
            self._pos += len(blob)
            header = build_header(index_offset, len(blob), xxh3_64(blob), self._pos,
                                  minor=index_minor_version(index))
            self._fh.seek(0)
            self._fh.write(header)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self.state = WriterState.DONE
        return self.path


def _check_group_size(name: str, group_size: int) -> None:
    if (type(group_size) is not int or not C.MIN_GROUP_SIZE <= group_size <= C.MAX_GROUP_SIZE
            or group_size & (group_size - 1)):
        raise ValueError(f"tensor {name!r}: group_size must be a power of two in "
                         f"[{C.MIN_GROUP_SIZE}, {C.MAX_GROUP_SIZE}], got {group_size!r}")


def build_header(index_offset: int, index_length: int, index_checksum: int, file_length: int, *,
                 major: int = C.VERSION_MAJOR, minor: int = C.VERSION_MINOR, flags: int = 0) -> bytes:
    """The 64-byte header, its own checksum included."""
    head = C.HEADER_STRUCT.pack(
        C.MAGIC, major, minor, flags, index_offset, index_length, index_checksum, file_length, 0, 0
    )[: C.HEADER_CHECKSUM_OFFSET]
    return head + xxh3_64(head).to_bytes(8, "little")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
