"""The .cllm index: frozen dataclasses, msgpack encoding and full validation.

`decode_index` is the only way bytes become an `Index`, and it validates everything a reader
relies on before returning: the schema, enum values, names, shapes, stream lengths against
shape x dtype, chunk tables against stream lengths, and the exact byte layout (alignment,
no holes, no overlaps, all inside the data region). Sizes are Python ints throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack
import numpy as np

from . import constants as C
from .errors import IndexSchemaError, LayoutError, UnsupportedVersion

CHUNK_DTYPE = np.dtype(
    [("offset", "<u8"), ("stored", "<u4"), ("raw", "<u4"), ("checksum", "<u8")]
)
assert CHUNK_DTYPE.itemsize == C.CHUNK_RECORD_SIZE

MAX_DIM = 1 << 48


def align_up(value: int, alignment: int) -> int:
    """Smallest multiple of `alignment` that is >= `value`."""
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Stream:
    """One run of bytes of a tensor or file, cut into independently compressed chunks."""

    codec: C.Codec
    length: int
    """Decoded length in bytes."""
    chunk_size: int
    chunks: np.ndarray = field(repr=False)
    """CHUNK_DTYPE records: offset, stored, raw, checksum."""

    @property
    def stored_length(self) -> int:
        """Sum of the stored (compressed) chunk lengths."""
        return int(self.chunks["stored"].sum(dtype=np.uint64))

    @property
    def num_chunks(self) -> int:
        return int(self.chunks.shape[0])


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: C.DType
    encoding: C.Encoding
    group: int
    streams: tuple[Stream, ...]
    group_size: int | None = None
    """Columns per scale group (INT8_GROUP only; None for every other encoding)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor in its logical dtype."""
        return self.numel * C.DTYPE_SIZE[self.dtype]

    @property
    def stored_length(self) -> int:
        return sum(s.stored_length for s in self.streams)


@dataclass(frozen=True)
class Group:
    """A contiguous byte range holding every chunk of one transformer block (or one tensor)."""

    name: str
    offset: int
    length: int


@dataclass(frozen=True)
class EmbeddedFile:
    name: str
    group: int
    stream: Stream


@dataclass(frozen=True)
class Index:
    """The decoded index of a file (section 6 of spec/FORMAT.md)."""

    tensors: tuple[TensorEntry, ...]
    groups: tuple[Group, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    files: tuple[EmbeddedFile, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def tensor_map(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    def iter_streams(self) -> Iterator[tuple[str, int, Stream]]:
        """(item name, group, stream) in layout order: tensors, then embedded files."""
        for t in self.tensors:
            for s in t.streams:
                yield t.name, t.group, s
        for f in self.files:
            yield f.name, f.group, f.stream


# --- encoding -----------------------------------------------------------------------------


def _stream_to_obj(s: Stream) -> dict[str, Any]:
    return {
        "codec": int(s.codec),
        "length": s.length,
        "chunk_size": s.chunk_size,
        "chunks": np.ascontiguousarray(s.chunks, dtype=CHUNK_DTYPE).tobytes(),
    }


def encode_index(index: Index) -> bytes:
    """Serialize an Index to msgpack bytes (deterministic: fixed key order)."""
    obj = {
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": int(t.dtype),
                "encoding": int(t.encoding),
                # INT8_GROUP only: other tensor maps stay byte-identical to v1.0
                **({"group_size": t.group_size} if t.group_size is not None else {}),
                "group": t.group,
                "streams": [_stream_to_obj(s) for s in t.streams],
            }
            for t in index.tensors
        ],
        "groups": [{"name": g.name, "offset": g.offset, "length": g.length} for g in index.groups],
        "aliases": dict(index.aliases),
        "files": [
            {"name": f.name, "group": f.group, "stream": _stream_to_obj(f.stream)}
            for f in index.files
        ],
        "metadata": dict(index.metadata),
    }
    return msgpack.packb(obj, use_bin_type=True)


# --- decoding and validation ---------------------------------------------------------------


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise IndexSchemaError(f"index: map key {key!r} is not a string")
        if key in out:
            raise IndexSchemaError(f"index: duplicate map key {key!r}")
        out[key] = value
    return out


class _Fields:
    """Reads a msgpack map with required keys; unknown keys are errors unless they start
    with 'x-' (extensions a reader may ignore)."""

    def __init__(self, obj: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
        if not isinstance(obj, dict):
            raise IndexSchemaError(f"{where}: expected a map, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in required and k not in optional and not k.startswith("x-")]
        if unknown:
            raise UnsupportedVersion(
                f"{where}: unknown field(s) {sorted(unknown)} (written by a newer writer?)"
            )
        missing = [k for k in required if k not in obj]
        if missing:
            raise IndexSchemaError(f"{where}: missing field(s) {missing}")
        self.obj = obj
        self.where = where

    def int(self, key: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
        v = self.obj[key]
        if type(v) is not int:
            raise IndexSchemaError(f"{self.where}.{key}: expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise IndexSchemaError(f"{self.where}.{key}: {v} is outside [{lo}, {hi}]")
        return v

    def str(self, key: str, max_len: int = C.MAX_NAME_LENGTH, allow_empty: bool = False) -> str:
        v = self.obj[key]
        if not isinstance(v, str):
            raise IndexSchemaError(f"{self.where}.{key}: expected a string, got {type(v).__name__}")
        if len(v) > max_len or (not v and not allow_empty):
            raise IndexSchemaError(f"{self.where}.{key}: string length {len(v)} not in [1, {max_len}]")
        return v

    def enum(self, key: str, enum_type: type) -> Any:
        v = self.int(key, 0, 1 << 16)
        try:
            return enum_type(v)
        except ValueError:
            raise UnsupportedVersion(
                f"{self.where}.{key}: unknown {enum_type.__name__} value {v}"
            ) from None

    def list(self, key: str, max_len: int) -> list:
        v = self.obj[key]
        if not isinstance(v, list):
            raise IndexSchemaError(f"{self.where}.{key}: expected an array, got {type(v).__name__}")
        if len(v) > max_len:
            raise IndexSchemaError(f"{self.where}.{key}: {len(v)} entries, limit {max_len}")
        return v

    def map(self, key: str, max_len: int) -> dict:
        v = self.obj.get(key, {})
        if not isinstance(v, dict):
            raise IndexSchemaError(f"{self.where}.{key}: expected a map, got {type(v).__name__}")
        if len(v) > max_len:
            raise IndexSchemaError(f"{self.where}.{key}: {len(v)} entries, limit {max_len}")
        return v


def _decode_stream(obj: Any, where: str, expected_length: int) -> Stream:
    f = _Fields(obj, where, ("codec", "length", "chunk_size", "chunks"))
    codec = f.enum("codec", C.Codec)
    length = f.int("length", 0, 1 << 62)
    if length != expected_length:
        raise IndexSchemaError(
            f"{where}.length: {length} bytes, but shape x dtype needs {expected_length}"
        )
    chunk_size = f.int("chunk_size", C.MIN_CHUNK_SIZE, C.MAX_CHUNK_SIZE)
    raw = obj["chunks"]
    if not isinstance(raw, bytes):
        raise IndexSchemaError(f"{where}.chunks: expected binary, got {type(raw).__name__}")
    if len(raw) % C.CHUNK_RECORD_SIZE:
        raise IndexSchemaError(
            f"{where}.chunks: {len(raw)} bytes is not a multiple of {C.CHUNK_RECORD_SIZE}"
        )
    n = len(raw) // C.CHUNK_RECORD_SIZE
    expected_n = -(-length // chunk_size)
    if n != expected_n:
        raise IndexSchemaError(
            f"{where}.chunks: {n} chunks, but {length} bytes in chunks of {chunk_size} need {expected_n}"
        )
    chunks = np.frombuffer(raw, dtype=CHUNK_DTYPE)
    if n:
        expected_raw = np.full(n, chunk_size, dtype=np.uint64)
        expected_raw[-1] = length - (n - 1) * chunk_size
        bad = np.nonzero(chunks["raw"].astype(np.uint64) != expected_raw)[0]
        if bad.size:
            i = int(bad[0])
            raise IndexSchemaError(
                f"{where}: chunk {i} declares {int(chunks['raw'][i])} raw bytes, expected {int(expected_raw[i])}"
            )
        stored = chunks["stored"].astype(np.uint64)
        bad = np.nonzero((stored == 0) | (chunks["raw"].astype(np.uint64) > stored * C.MAX_ZSTD_EXPANSION))[0]
        if bad.size:
            i = int(bad[0])
            raise IndexSchemaError(
                f"{where}: chunk {i} stores {int(stored[i])} bytes for {int(chunks['raw'][i])} raw "
                f"(a zstd frame expands at most {C.MAX_ZSTD_EXPANSION}x)"
            )
    return Stream(codec=codec, length=length, chunk_size=chunk_size, chunks=chunks)


def _decode_shape(obj: Any, where: str) -> tuple[int, ...]:
    if not isinstance(obj, list) or len(obj) > C.MAX_NDIM:
        raise IndexSchemaError(f"{where}.shape: expected an array of at most {C.MAX_NDIM} dims")
    for d in obj:
        if type(d) is not int or not 0 <= d < MAX_DIM:
            raise IndexSchemaError(f"{where}.shape: bad dimension {d!r} in {obj!r}")
    return tuple(obj)


def expected_stream_lengths(shape: tuple[int, ...], dtype: C.DType, encoding: C.Encoding,
                            group_size: int | None = None) -> tuple[int, ...]:
    """Decoded byte length of each stream of a tensor with this shape, dtype and encoding
    (and, for INT8_GROUP, group size)."""
    numel = math.prod(shape)
    if encoding == C.Encoding.RAW:
        return (numel * C.DTYPE_SIZE[dtype],)
    if encoding == C.Encoding.INT8_ROW:
        return (numel, shape[0] * 4)
    if encoding == C.Encoding.FLOAT_PLANES:
        return (numel, numel * C.FLOAT_PLANES_LAYOUT[dtype][2])
    if encoding == C.Encoding.INT8_GROUP:
        return (numel, shape[0] * -(-shape[1] // group_size) * 2)
    raise UnsupportedVersion(f"unknown encoding {encoding}")


def _decode_tensor(obj: Any, i: int, num_groups: int) -> TensorEntry:
    where = f"tensors[{i}]"
    f = _Fields(obj, where, ("name", "shape", "dtype", "encoding", "group", "streams"), ("group_size",))
    name = f.str("name")
    where = f"tensor {name!r}"
    f.where = where
    shape = _decode_shape(obj["shape"], where)
    dtype = f.enum("dtype", C.DType)
    # an empty tensor's other dimensions still make its strides: (0, 2**47, 2**47) has no
    # bytes, yet no array library can create it (stride overflow)
    # (a non-empty tensor's size is bounded by its stream length, checked below)
    if 0 in shape and math.prod(max(d, 1) for d in shape) * C.DTYPE_SIZE[dtype] > 1 << 62:
        raise IndexSchemaError(
            f"{where}.shape: {list(shape)} of {dtype.name}: with zero dimensions counted as 1 it "
            f"spans over 2^62 bytes (its strides would overflow)"
        )
    encoding = f.enum("encoding", C.Encoding)
    if encoding == C.Encoding.INT8_ROW:
        if len(shape) != 2:
            raise IndexSchemaError(f"{where}: int8_row needs a 2-D tensor, shape is {list(shape)}")
        if dtype not in C.FLOAT_DTYPES:
            raise IndexSchemaError(f"{where}: int8_row needs a float dtype, got {dtype.name}")
    if encoding == C.Encoding.FLOAT_PLANES and dtype not in C.FLOAT_PLANES_LAYOUT:
        raise IndexSchemaError(
            f"{where}: float_planes needs dtype BF16, F16 or F32, got {dtype.name}"
        )
    group_size = _decode_group_size(f, encoding, shape, dtype, where)
    group = f.int("group", 0, max(num_groups - 1, 0))
    if num_groups == 0:
        raise IndexSchemaError(f"{where}.group: the index has no groups")
    lengths = expected_stream_lengths(shape, dtype, encoding, group_size)
    streams = f.list("streams", 16)
    if len(streams) != len(lengths):
        raise IndexSchemaError(
            f"{where}: {len(streams)} streams, encoding {encoding.name} needs {len(lengths)}"
        )
    decoded = tuple(
        _decode_stream(s, f"{where}.streams[{j}]", n) for j, (s, n) in enumerate(zip(streams, lengths))
    )
    return TensorEntry(name=name, shape=shape, dtype=dtype, encoding=encoding, group=group, streams=decoded,
                       group_size=group_size)


def _decode_group_size(f: _Fields, encoding: C.Encoding, shape: tuple[int, ...], dtype: C.DType,
                       where: str) -> int | None:
    """The `group_size` field: required for INT8_GROUP (a power of two in [MIN_GROUP_SIZE,
    MAX_GROUP_SIZE], on a 2-D float tensor), absent for every other encoding."""
    if encoding != C.Encoding.INT8_GROUP:
        if "group_size" in f.obj:
            raise IndexSchemaError(f"{where}.group_size: only int8_group tensors have a group size "
                                   f"(encoding is {encoding.name})")
        return None
    if len(shape) != 2:
        raise IndexSchemaError(f"{where}: int8_group needs a 2-D tensor, shape is {list(shape)}")
    if dtype not in C.FLOAT_DTYPES:
        raise IndexSchemaError(f"{where}: int8_group needs a float dtype, got {dtype.name}")
    if "group_size" not in f.obj:
        raise IndexSchemaError(f"{where}: missing field(s) ['group_size'] (required by int8_group)")
    g = f.int("group_size", C.MIN_GROUP_SIZE, C.MAX_GROUP_SIZE)
    if g & (g - 1):
        raise IndexSchemaError(f"{where}.group_size: {g} is not a power of two")
    return g


def _check_layout(index: Index, index_offset: int) -> None:
    """Chunks tile the data region exactly: layout order, 16-byte chunk alignment, 4096-byte
    group alignment, zero-length gaps beyond alignment, everything before the index."""
    groups = index.groups
    pos = C.DATA_START
    group_cursor = -1
    cur = None  # end of the last chunk in the current group

    def close_group(gid: int) -> int:
        g = groups[gid]
        length = cur - g.offset
        if g.length != length:
            raise LayoutError(f"group {g.name!r}: length {g.length}, but its chunks span {length} bytes")
        return cur

    def open_next_group() -> None:
        nonlocal group_cursor, pos, cur
        if group_cursor >= 0:
            pos = close_group(group_cursor)
        group_cursor += 1
        g = groups[group_cursor]
        want = C.DATA_START if group_cursor == 0 else align_up(pos, C.GROUP_ALIGNMENT)
        if g.offset != want:
            raise LayoutError(f"group {g.name!r}: offset {g.offset}, expected {want}")
        cur = g.offset

    for name, gid, stream in index.iter_streams():
        if gid < group_cursor:
            raise LayoutError(
                f"{name!r} is in group {gid} after items of group {group_cursor}: groups must be in layout order"
            )
        while gid > group_cursor:
            open_next_group()
        n = stream.num_chunks
        if not n:
            continue
        offsets = stream.chunks["offset"]
        stored = stream.chunks["stored"].astype(np.uint64)
        if int(offsets.max()) >= index_offset:
            raise LayoutError(f"{name!r}: a chunk starts at or past the index (offset {index_offset})")
        first = int(offsets[0])
        if first != align_up(cur, C.CHUNK_ALIGNMENT):
            raise LayoutError(
                f"{name!r}: chunk 0 at offset {first}, expected {align_up(cur, C.CHUNK_ALIGNMENT)}"
            )
        ends = offsets + stored
        expected_next = (ends[:-1] + (C.CHUNK_ALIGNMENT - 1)) // C.CHUNK_ALIGNMENT * C.CHUNK_ALIGNMENT
        bad = np.nonzero(offsets[1:] != expected_next)[0]
        if bad.size:
            j = int(bad[0]) + 1
            raise LayoutError(
                f"{name!r}: chunk {j} at offset {int(offsets[j])}, expected {int(expected_next[j - 1])} "
                f"(overlap or hole)"
            )
        cur = int(ends[-1])
        if cur > index_offset:
            raise LayoutError(f"{name!r}: chunk data runs past the index at {index_offset}")
    while group_cursor < len(groups) - 1:  # trailing groups that hold nothing (length 0)
        open_next_group()
    if group_cursor >= 0:
        pos = close_group(group_cursor)
    want = align_up(pos, C.INDEX_ALIGNMENT)
    if index_offset != want:
        raise LayoutError(f"index at offset {index_offset}, expected {want} (right after the data)")


def _check_files_group(tensors, groups, files) -> None:
    """Embedded files live in the last group, named FILES_GROUP, which holds no tensor; a
    group of that name exists only then."""
    last = len(groups) - 1
    for i, g in enumerate(groups):
        if g.name == C.FILES_GROUP and (not files or i != last):
            raise IndexSchemaError(f"group {i} is named {C.FILES_GROUP!r} but is not the group of the embedded files")
    if files and (not groups or groups[last].name != C.FILES_GROUP):
        raise IndexSchemaError(f"embedded files need a last group named {C.FILES_GROUP!r}")
    for f in files:
        if f.group != last:
            raise IndexSchemaError(f"file {f.name!r}: group {f.group}, expected the {C.FILES_GROUP!r} group {last}")
    for t in tensors:
        if files and t.group == last:
            raise IndexSchemaError(f"tensor {t.name!r} is in the {C.FILES_GROUP!r} group")


def _check_gpu_codecs(tensors, files) -> None:
    """GPU-only codecs (ANS) appear only in the streams of INT8_ROW tensors, and all INT8_ROW
    streams of one group share one codec (a group is one batched GPU decode); embedded files
    and RAW tensors stay readable by every reader."""
    group_codec: dict[int, tuple[C.Codec, str]] = {}
    for t in tensors:
        for j, s in enumerate(t.streams):
            if s.codec in C.GPU_ONLY_CODECS and t.encoding != C.Encoding.INT8_ROW:
                raise IndexSchemaError(
                    f"tensor {t.name!r}.streams[{j}]: codec {s.codec.name} is allowed only in the streams of "
                    f"INT8_ROW tensors, this one is {t.encoding.name}"
                )
            if t.encoding == C.Encoding.INT8_ROW:
                first = group_codec.setdefault(t.group, (s.codec, t.name))
                if first[0] != s.codec:
                    raise IndexSchemaError(
                        f"tensor {t.name!r}.streams[{j}]: codec {s.codec.name}, but INT8_ROW tensor {first[1]!r} of "
                        f"the same group uses {first[0].name} (one codec for all INT8_ROW streams of a group)"
                    )
    for f in files:
        if f.stream.codec in C.GPU_ONLY_CODECS:
            raise IndexSchemaError(f"file {f.name!r}: codec {f.stream.codec.name} is not allowed for embedded files")


def decode_index(data: bytes | memoryview, index_offset: int) -> Index:
    """Parse and validate index bytes. `index_offset` (from the header) bounds the data region.

    Raises:
        IndexSchemaError: not msgpack, or not matching the schema.
        UnsupportedVersion: unknown enum values or unknown required fields.
        LayoutError: offsets and lengths do not tile the data region as the spec requires.
    """
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs_hook,
            max_str_len=C.MAX_METADATA_VALUE_LENGTH,
            max_bin_len=C.MAX_INDEX_LENGTH,
            max_array_len=C.MAX_TENSORS,
            max_map_len=max(C.MAX_METADATA_ENTRIES, C.MAX_TENSORS),
            max_ext_len=0,
        )
    except IndexSchemaError:
        raise
    except UnicodeDecodeError as e:
        raise IndexSchemaError(f"index: a string is not valid UTF-8 ({e.reason})") from None
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise IndexSchemaError(f"index: not valid msgpack ({type(e).__name__}: {e})") from None
    top = _Fields(obj, "index", ("tensors", "groups"), ("aliases", "files", "metadata"))

    groups_raw = top.list("groups", C.MAX_GROUPS)
    groups = []
    for i, g in enumerate(groups_raw):
        gf = _Fields(g, f"groups[{i}]", ("name", "offset", "length"))
        groups.append(Group(name=gf.str("name"), offset=gf.int("offset"), length=gf.int("length")))
    group_names = [g.name for g in groups]
    if len(set(group_names)) != len(group_names):
        raise IndexSchemaError("index: duplicate group names")

    tensors_raw = top.list("tensors", C.MAX_TENSORS)
    tensors = tuple(_decode_tensor(t, i, len(groups)) for i, t in enumerate(tensors_raw))
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise IndexSchemaError(f"index: duplicate tensor name {t.name!r}")
        seen.add(t.name)

    aliases_raw = top.map("aliases", C.MAX_TENSORS)
    aliases = {}
    for alias, target in aliases_raw.items():
        if not isinstance(target, str) or not alias or len(alias) > C.MAX_NAME_LENGTH:
            raise IndexSchemaError(f"aliases[{alias!r}]: expected a tensor name")
        if alias in seen:
            raise IndexSchemaError(f"alias {alias!r} has the name of a stored tensor")
        if target not in seen:
            raise IndexSchemaError(f"alias {alias!r} points to {target!r}, which is not a stored tensor")
        aliases[alias] = target

    files_raw = top.list("files", C.MAX_FILES) if "files" in obj else []
    files = []
    file_names: set[str] = set()
    for i, fo in enumerate(files_raw):
        ff = _Fields(fo, f"files[{i}]", ("name", "group", "stream"))
        fname = ff.str("name")
        if fname.startswith("/") or ".." in fname.split("/"):
            raise IndexSchemaError(f"files[{i}].name: {fname!r} is absolute or has a '..' segment")
        if fname in file_names:
            raise IndexSchemaError(f"index: duplicate embedded file {fname!r}")
        file_names.add(fname)
        gid = ff.int("group", 0, max(len(groups) - 1, 0))
        length = _Fields(fo["stream"], f"file {fname!r}.stream", ("codec", "length", "chunk_size", "chunks")).int(
            "length", 0, C.MAX_EMBEDDED_FILE_LENGTH
        )
        files.append(EmbeddedFile(name=fname, group=gid, stream=_decode_stream(fo["stream"], f"file {fname!r}.stream", length)))

    meta_raw = top.map("metadata", C.MAX_METADATA_ENTRIES)
    for k, v in meta_raw.items():
        if not k or len(k) > C.MAX_NAME_LENGTH:
            raise IndexSchemaError(f"metadata key {k[:64]!r}: length {len(k)} not in [1, {C.MAX_NAME_LENGTH}]")
        if not isinstance(v, str):
            raise IndexSchemaError(f"metadata[{k!r}]: expected a string value, got {type(v).__name__}")

    _check_gpu_codecs(tensors, files)
    _check_files_group(tensors, groups, files)
    index = Index(
        tensors=tensors, groups=tuple(groups), aliases=aliases, files=tuple(files), metadata=dict(meta_raw)
    )
    _check_layout(index, index_offset)
    return index


def gpu_only_streams(index: Index) -> list[tuple[str, Stream]]:
    """(tensor name, stream) of every stream stored with a GPU-only codec (ANS)."""
    return [(t.name, s) for t in index.tensors for s in t.streams if s.codec in C.GPU_ONLY_CODECS]


def index_minor_version(index: Index) -> int:
    """The lowest minor format version covering every encoding and codec the index uses."""
    streams = [s for t in index.tensors for s in t.streams] + [f.stream for f in index.files]
    return C.minor_version_for({t.encoding for t in index.tensors}, {s.codec for s in streams})


def check_minor_version(index: Index, minor: int) -> None:
    """Reject a file whose header's minor version is below what its index uses.

    Raises:
        UnsupportedVersion: a feature newer than the file's stated minor version.
    """
    needed = index_minor_version(index)
    if minor < needed:
        # keyed by (enum, value): Encoding.INT8_ROW and Codec.ANS are equal as ints
        members = [t.encoding for t in index.tensors] + [s.codec for t in index.tensors for s in t.streams] + [
            f.stream.codec for f in index.files]
        used = sorted({(type(v).__name__, int(v)): v for v in members}.values(), key=lambda v: (type(v).__name__, v))
        newer = [f"{type(v).__name__.lower()} {v.name}" for v in used if C.FEATURE_MINOR.get(v, 0) > minor]
        raise UnsupportedVersion(f"the file says format 1.{minor}, but uses {', '.join(newer)}, "
                                 f"which needs minor {needed}")
