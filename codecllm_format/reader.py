"""CllmFile: a lazy, memory-mapped, validating reader (like safetensors.safe_open).

Opening a file reads and checks the 64-byte header and the whole index (schema, enums,
shapes, chunk tables, exact layout) before anything else; tensor data is read from the
mmap on demand, each chunk's checksum checked before it is decoded.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import constants as C
from .checksums import xxh3_64
from .codecs import get_codec
from .errors import (
    ChecksumError,
    CllmError,
    CodecUnavailable,
    DecodeError,
    FormatError,
    LayoutError,
    NotACllmFile,
    TruncatedFile,
    TrustRequired,
    UnsupportedVersion,
)
from .index import Index, Stream, TensorEntry, check_minor_version, decode_index
from .planes import join_planes
from .quant import dequantize_int8_groups, dequantize_int8_rows, group_count
from .writer import DTYPE_TO_TORCH


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    flags: int
    index_offset: int
    index_length: int
    index_checksum: int
    file_length: int


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: int8 values and per-row float32 scales (int8_row), int8 values and
    bfloat16 scales [rows, ceil(cols / group_size)] (int8_group; `entry.group_size`), or the
    logical tensor itself (raw; `scales` is None)."""

    data: torch.Tensor
    scales: torch.Tensor | None
    entry: TensorEntry


def parse_header(buf: bytes | memoryview, actual_size: int) -> Header:
    """Check the fixed header against the real file size.

    Raises:
        NotACllmFile, TruncatedFile, UnsupportedVersion, ChecksumError, LayoutError, FormatError.
    """
    if actual_size < len(C.MAGIC) or bytes(buf[: len(C.MAGIC)]) != C.MAGIC:
        if actual_size < len(C.MAGIC) and bytes(buf[:actual_size]) == C.MAGIC[:actual_size] and actual_size:
            raise TruncatedFile(f"file is {actual_size} bytes, shorter than the {C.HEADER_SIZE}-byte header")
        raise NotACllmFile(
            f"not a .cllm file: the first bytes are {bytes(buf[:8])!r}, expected {C.MAGIC!r}"
        )
    if actual_size < C.HEADER_SIZE:
        raise TruncatedFile(f"file is {actual_size} bytes, shorter than the {C.HEADER_SIZE}-byte header")
    (magic, major, minor, flags, index_offset, index_length, index_checksum, file_length, reserved,
     header_checksum) = C.HEADER_STRUCT.unpack(bytes(buf[: C.HEADER_SIZE]))
    if major != C.VERSION_MAJOR:
        raise UnsupportedVersion(
            f"file format version {major}.{minor}; this reader supports {C.VERSION_MAJOR}.x"
        )
    actual = xxh3_64(bytes(buf[: C.HEADER_CHECKSUM_OFFSET]))
    if actual != header_checksum:
        raise ChecksumError(
            f"header checksum mismatch: stored {header_checksum:#018x}, computed {actual:#018x}"
        )
    if flags & ~C.KNOWN_FLAGS:
        raise UnsupportedVersion(f"header flags {flags:#x} include bits this reader does not know")
    if reserved:
        raise FormatError(f"header reserved field is {reserved:#x}, must be 0")
    if file_length != actual_size:
        if actual_size < file_length:
            raise TruncatedFile(f"file is {actual_size} bytes, the header says {file_length}: truncated")
        raise FormatError(f"file is {actual_size} bytes, the header says {file_length}: trailing data")
    if index_length > C.MAX_INDEX_LENGTH:
        raise LayoutError(f"index length {index_length} is over the {C.MAX_INDEX_LENGTH}-byte limit")
    if index_offset < C.DATA_START or index_offset % C.INDEX_ALIGNMENT:
        raise LayoutError(f"index offset {index_offset} is not a {C.INDEX_ALIGNMENT}-aligned offset >= {C.DATA_START}")
    if index_offset + index_length != file_length:
        raise LayoutError(
            f"index [{index_offset}, +{index_length}) does not end at the end of the file ({file_length})"
        )
    return Header(major, minor, flags, index_offset, index_length, index_checksum, file_length)


class CllmFile:
    """An open .cllm file. Prefer `codecllm_format.open(path)` as a context manager.

    Args:
        path: the file.
        threads: CPU threads for zstd decoding.
        trust_gpu_codecs: allow decoding chunks of GPU-only codecs (ANS) with nvCOMP, whose
            decoder assumes valid input (see SECURITY.md). Opening, checksums and every zstd
            stream work without it.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, trust_gpu_codecs: bool = False):
        self.path = Path(path)
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.trust_gpu_codecs = bool(trust_gpu_codecs)
        self._mm: mmap.mmap | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
        except FileNotFoundError:
            raise CllmError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CllmError(f"{self.path}: is a directory, not a .cllm file") from None
        except OSError as e:
            raise CllmError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise CllmError(f"{self.path}: is {kind}, not a .cllm file")
            size = st.st_size
            if size == 0:
                raise NotACllmFile(f"{self.path}: empty file, not a .cllm file")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CllmError(f"{self.path}: cannot map ({e})") from None
        finally:
            os.close(fd)
        try:
            self.header = parse_header(self._mm, size)
            blob = self._mm[self.header.index_offset : self.header.file_length]
            actual = xxh3_64(blob)
            if actual != self.header.index_checksum:
                raise ChecksumError(
                    f"index checksum mismatch: stored {self.header.index_checksum:#018x}, computed {actual:#018x}"
                )
            self.index: Index = decode_index(blob, self.header.index_offset)
            check_minor_version(self.index, self.header.minor)
        except BaseException:
            self.close()
            raise
        self._tensors = self.index.tensor_map()
        self._files = {f.name: f for f in self.index.files}
        self._codecs: dict[C.Codec, object] = {}

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views handed out (group_bytes) still alive: the map closes when they go
            self._mm = None

    def __enter__(self) -> "CllmFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _buf(self) -> mmap.mmap:
        if self._mm is None:
            raise CllmError(f"{self.path}: file is closed")
        return self._mm

    # --- catalogue ---------------------------------------------------------------------

    @property
    def version(self) -> tuple[int, int]:
        return self.header.major, self.header.minor

    @property
    def file_size(self) -> int:
        return self.header.file_length

    def keys(self) -> list[str]:
        """Tensor names, stored and aliased, in file order (aliases last)."""
        return [t.name for t in self.index.tensors] + list(self.index.aliases)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self.index.aliases

    def metadata(self) -> dict[str, str]:
        return dict(self.index.metadata)

    def entry(self, name: str) -> TensorEntry:
        """The index entry of a tensor (aliases resolved)."""
        target = self.index.aliases.get(name, name)
        try:
            return self._tensors[target]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path.name}") from None

    def file_names(self) -> list[str]:
        return list(self._files)

    def read_file(self, name: str) -> bytes:
        """Bytes of an embedded file (config.json, tokenizer.json, ...)."""
        try:
            f = self._files[name]
        except KeyError:
            raise KeyError(f"no embedded file named {name!r} in {self.path.name}") from None
        return bytes(self.read_stream(f.stream, where=f"file {name!r}"))

    # --- data ----------------------------------------------------------------------------

    def _codec(self, codec_id: C.Codec):
        if codec_id not in self._codecs:
            gpu_only = codec_id in C.GPU_ONLY_CODECS  # only nvCOMP decodes them: trust is the caller's call
            self._codecs[codec_id] = get_codec(codec_id, **({"trusted": self.trust_gpu_codecs} if gpu_only else {}))
        return self._codecs[codec_id]

    @property
    def gpu_only_codecs(self) -> set[C.Codec]:
        """GPU-only codecs (ANS) this file's streams use (empty for a portable zstd file)."""
        return {s.codec for _n, _g, s in self.index.iter_streams() if s.codec in C.GPU_ONLY_CODECS}

    def stored_chunks(self, stream: Stream, where: str = "", verify: bool = True) -> list[memoryview]:
        """Zero-copy views of a stream's stored chunks, checksums checked unless verify=False."""
        mm = self._buf()
        views = []
        for i, (off, stored, _raw, checksum) in enumerate(stream.chunks.tolist()):
            view = memoryview(mm)[off : off + stored]
            if verify:
                actual = xxh3_64(view)
                if actual != checksum:
                    view.release()
                    for v in views:
                        v.release()
                    raise ChecksumError(
                        f"{where} chunk {i} at offset {off}: checksum mismatch "
                        f"(stored {checksum:#018x}, computed {actual:#018x})"
                    )
            views.append(view)
        return views

    def read_stream(self, stream: Stream, where: str = "", out: memoryview | None = None, verify: bool = True) -> bytearray | memoryview:
        """Decode a whole stream (checksums first) into `out` or a new bytearray."""
        if out is None:
            out_buf = bytearray(stream.length)
            out = memoryview(out_buf)
        else:
            out_buf = out
            if len(out) != stream.length:
                raise ValueError(f"{where}: output buffer is {len(out)} bytes, stream is {stream.length}")
        views = self.stored_chunks(stream, where, verify=verify)
        try:
            self._codec(stream.codec).decode_into(
                views, stream.chunks["raw"].tolist(), out, threads=self.threads, where=where
            )
        finally:
            for v in views:
                v.release()
        return out_buf

    def _stream_tensor(self, stream: Stream, dtype: torch.dtype, shape: tuple[int, ...], where: str) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            self.read_stream(stream, where=where, out=memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        return out

    def get_planes(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The two decoded planes of a float_planes tensor, as stored (spec section 10.3).

        Returns:
            (exponent uint8 [numel], sign_mantissa uint8 [k * numel]: k byte planes, k = 1
            (bf16), 2 (f16), 3 (f32)): what runtime.planes.interleave_planes turns into the
            tensor on a GPU.

        Raises:
            ValueError: the tensor is not float_planes. ChecksumError, DecodeError.
        """
        e = self.entry(name)
        if e.encoding != C.Encoding.FLOAT_PLANES:
            raise ValueError(f"tensor {e.name!r} is {e.encoding.name}, not FLOAT_PLANES")
        where = f"tensor {e.name!r}"
        exponent = self._stream_tensor(e.streams[0], torch.uint8, (e.streams[0].length,), where + " exponent plane")
        sign_mantissa = self._stream_tensor(e.streams[1], torch.uint8, (e.streams[1].length,),
                                            where + " sign_mantissa plane")
        return exponent, sign_mantissa

    def get_raw(self, name: str) -> RawTensor:
        """The tensor as stored: (int8 values, float32 scales [rows]) for int8_row, (int8 values,
        bfloat16 scales [rows, groups]) for int8_group; the tensor for raw and float_planes
        (decoded bit-exact; `get_planes` gives the planes themselves)."""
        e = self.entry(name)
        where = f"tensor {e.name!r}"
        if e.encoding == C.Encoding.INT8_ROW:
            q = self._stream_tensor(e.streams[0], torch.int8, e.shape, where + " values")
            s = self._stream_tensor(e.streams[1], torch.float32, (e.shape[0],), where + " scales")
            if s.numel() and not bool((torch.isfinite(s) & (s >= 0)).all()):
                raise DecodeError(f"{where}: a scale is negative, NaN or infinite")
            return RawTensor(q, s, e)
        if e.encoding == C.Encoding.FLOAT_PLANES:
            exponent, sign_mantissa = self.get_planes(name)
            return RawTensor(join_planes(exponent.numpy(), sign_mantissa.numpy(), e.dtype, e.shape, where), None, e)
        if e.encoding == C.Encoding.INT8_GROUP:
            q = self._stream_tensor(e.streams[0], torch.int8, e.shape, where + " values")
            s = self._stream_tensor(e.streams[1], torch.bfloat16, (e.shape[0], group_count(e.shape[1], e.group_size)),
                                    where + " scales")
            f = s.to(torch.float32)  # exact
            if f.numel() and not bool((torch.isfinite(f) & (f >= 0)).all()):
                raise DecodeError(f"{where}: a scale is negative, NaN or infinite")
            return RawTensor(q, s, e)
        t = self._stream_tensor(e.streams[0], DTYPE_TO_TORCH[e.dtype], e.shape, where)
        if e.dtype == C.DType.BOOL and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise DecodeError(f"{where}: a bool byte is neither 0 nor 1")
        return RawTensor(t, None, e)

    def get_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in its logical dtype (int8 dequantized), or in `dtype` if given."""
        raw = self.get_raw(name)
        target = dtype or DTYPE_TO_TORCH[raw.entry.dtype]
        if raw.entry.encoding == C.Encoding.INT8_GROUP:
            return dequantize_int8_groups(raw.data, raw.scales, raw.entry.group_size, target)
        if raw.scales is not None:
            return dequantize_int8_rows(raw.data, raw.scales, target)
        return raw.data if dtype is None else raw.data.to(dtype)

    def group_bytes(self, group: int) -> memoryview:
        """The stored bytes of one layer group: one contiguous range (for one host->GPU copy)."""
        g = self.index.groups[group]
        return memoryview(self._buf())[g.offset : g.offset + g.length]

    # --- verification ------------------------------------------------------------------

    def verify(self, *, undecoded: list[str] | None = None) -> list[str]:
        """Check every chunk's checksum, strictly decode every chunk, and check that all
        padding is zero. Returns a list of problems (empty when the file is sound).

        Chunks of a GPU-only codec (ANS) are decoded on the GPU (nvCOMP, trust_gpu_codecs=True).
        Where that is not possible (no GPU/nvCOMP, or not trusted), their checksums and sizes are
        still checked; each such stream is then reported in `undecoded` when a list is given,
        else as a problem (so an empty result always means every chunk was decoded)."""
        problems: list[str] = []
        mm = self._buf()
        prev_end = C.HEADER_SIZE
        for name, _gid, stream in self.index.iter_streams():
            codec = self._codec(stream.codec)
            if stream.codec in C.GPU_ONLY_CODECS:
                prev_end = self._verify_gpu_stream(name, stream, codec, prev_end, problems, undecoded)
                continue
            for i, record in enumerate(stream.chunks.tolist()):
                where, view, prev_end = self._checksummed_chunk(mm, name, i, record, prev_end, problems)
                if view is None:
                    continue
                try:
                    codec.check_frame(view, record[2], where)
                except CllmError as e:
                    problems.append(str(e))
                finally:
                    view.release()
        if any(mm[prev_end : self.header.index_offset]):
            problems.append(f"non-zero padding in [{prev_end}, {self.header.index_offset}) before the index")
        return problems

    @staticmethod
    def _checksummed_chunk(mm, name: str, i: int, record, prev_end: int, problems: list[str]):
        """verify()'s first checks of one chunk: the padding before it, then its checksum.
        Returns (where, a view of its stored bytes or None if the checksum failed, its end)."""
        off, stored, _raw, checksum = record
        where = f"{name!r} chunk {i} at offset {off}"
        if any(mm[prev_end:off]):
            problems.append(f"non-zero padding in [{prev_end}, {off}) before {where}")
        view = memoryview(mm)[off : off + stored]
        actual = xxh3_64(view)
        if actual != checksum:
            problems.append(f"{where}: checksum mismatch (stored {checksum:#018x}, computed {actual:#018x})")
            view.release()
            return where, None, off + stored
        return where, view, off + stored

    def _verify_gpu_stream(self, name: str, stream: Stream, codec, prev_end: int, problems: list[str],
                           undecoded: list[str] | None) -> int:
        """verify() of one stream of a GPU-only codec: padding, checksums and size rules per
        chunk, then one batched GPU decode of the chunks that passed. Returns the stream's end."""
        from .codecs.ans import check_ans_chunk_sizes  # noqa: PLC0415

        mm = self._buf()
        views, raws = [], []
        try:
            for i, record in enumerate(stream.chunks.tolist()):
                where, view, prev_end = self._checksummed_chunk(mm, name, i, record, prev_end, problems)
                if view is None:
                    continue
                _off, stored, raw, _checksum = record
                try:
                    check_ans_chunk_sizes(stored, raw, where)
                except CllmError as e:
                    problems.append(str(e))
                    view.release()
                    continue
                views.append(view)
                raws.append(raw)
            if views:
                try:
                    codec.decode_into(views, raws, memoryview(bytearray(sum(raws))), where=f"{name!r}")
                except (CodecUnavailable, TrustRequired) as e:
                    note = f"{name!r}: {len(views)} {stream.codec.name} chunk(s) checksummed but not decoded ({e})"
                    (undecoded if undecoded is not None else problems).append(note)
                except CllmError as e:
                    problems.append(str(e))
        finally:
            for v in views:
                v.release()
        return prev_end

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get_tensor(name)


def open_cllm(path: str | os.PathLike, *, threads: int | None = None, trust_gpu_codecs: bool = False) -> CllmFile:
    """Open and validate a .cllm file. Use as a context manager. `trust_gpu_codecs`: see CllmFile.

    Raises:
        CllmError (and subclasses): missing file, not a .cllm file, unsupported version,
        truncation, checksum or layout problems.
    """
    return CllmFile(path, threads=threads, trust_gpu_codecs=trust_gpu_codecs)
