"""Byte-level helpers to build hostile .cllm files from a valid one.

Every helper takes and returns the whole file as `bytes`, so a test reads as a recipe:
start from a valid file, change one thing, and (unless the point is a bad checksum) keep
every *other* check passing by fixing the header checksum, the index checksum, the index
length and the file length. That way each hostile file exercises exactly one defect.

    blob = path.read_bytes()
    blob = edit_index(blob, lambda ix: ix["tensors"][0].update(dtype=99))
    blob = with_header(blob, flags=1)
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterable

import msgpack

from codecllm_format import constants as C
from codecllm_format.checksums import xxh3_64

HEADER_FIELDS = (
    "magic", "major", "minor", "flags", "index_offset", "index_length",
    "index_checksum", "file_length", "reserved", "header_checksum",
)
RECORD = struct.Struct("<QIIQ")
ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# --- header -------------------------------------------------------------------------------


def read_header(blob: bytes) -> dict[str, Any]:
    """The header's fields by name (HEADER_FIELDS)."""
    return dict(zip(HEADER_FIELDS, C.HEADER_STRUCT.unpack(blob[: C.HEADER_SIZE])))


def pack_header(fields: dict[str, Any], *, fix_checksum: bool = True) -> bytes:
    """64 header bytes from `fields`; the header checksum is recomputed unless fix_checksum=False."""
    values = [fields[k] for k in HEADER_FIELDS]
    packed = C.HEADER_STRUCT.pack(*values)
    if fix_checksum:
        head = packed[: C.HEADER_CHECKSUM_OFFSET]
        packed = head + struct.pack("<Q", xxh3_64(head))
    return packed


def with_header(blob: bytes, *, fix_checksum: bool = True, **changes: Any) -> bytes:
    """The file with some header fields changed (and, by default, a correct header checksum)."""
    fields = read_header(blob)
    unknown = set(changes) - set(HEADER_FIELDS)
    if unknown:
        raise KeyError(f"no header field(s) {sorted(unknown)}")
    fields.update(changes)
    return pack_header(fields, fix_checksum=fix_checksum) + blob[C.HEADER_SIZE :]


# --- index --------------------------------------------------------------------------------


def split(blob: bytes) -> tuple[bytes, bytes]:
    """(bytes before the index, index bytes) as the header places them."""
    h = read_header(blob)
    return blob[: h["index_offset"]], blob[h["index_offset"] : h["index_offset"] + h["index_length"]]


def index_obj(blob: bytes) -> dict[str, Any]:
    """The index as plain msgpack objects (maps, lists, bytes for chunk tables)."""
    return msgpack.unpackb(split(blob)[1], raw=False, strict_map_key=False)


def pack_index(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def assemble(data: bytes, index: bytes, **header_changes: Any) -> bytes:
    """A file from a data region (header + padding + groups; its length is the index offset)
    and index bytes: the header gets the matching offset, length, checksums and file length."""
    fields = read_header(data)
    fields.update(
        index_offset=len(data), index_length=len(index), index_checksum=xxh3_64(index),
        file_length=len(data) + len(index),
    )
    fields.update(header_changes)
    return pack_header(fields) + data[C.HEADER_SIZE :] + index


def with_index_bytes(blob: bytes, index: bytes) -> bytes:
    """The file with its index replaced by `index` (any bytes), every length and checksum fixed."""
    return assemble(split(blob)[0], index)


def edit_index(blob: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """Decode the index, let `edit` change it in place (its return value is ignored, so
    `lambda o: o.pop("groups")` works), re-encode it with msgpack and fix the header."""
    obj = index_obj(blob)
    edit(obj)
    return with_index_bytes(blob, pack_index(obj))


def map_with_pairs(pairs: Iterable[tuple[Any, Any]]) -> bytes:
    """A msgpack map from (key, value) pairs, in order: duplicates and odd keys allowed."""
    pairs = list(pairs)
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_header(len(pairs)) + b"".join(packer.pack(k) + packer.pack(v) for k, v in pairs)


# --- chunk tables ------------------------------------------------------------------------


def records(stream: dict[str, Any]) -> list[list[int]]:
    """[offset, stored, raw, checksum] of each chunk of a stream map."""
    raw = stream["chunks"]
    return [list(RECORD.unpack_from(raw, i)) for i in range(0, len(raw), RECORD.size)]


def set_records(stream: dict[str, Any], recs: Iterable[Iterable[int]]) -> None:
    stream["chunks"] = b"".join(RECORD.pack(*r) for r in recs)


def tensor(obj: dict[str, Any], name: str) -> dict[str, Any]:
    """The tensor map named `name` in an index object."""
    for t in obj["tensors"]:
        if t["name"] == name:
            return t
    raise KeyError(name)


def stream_of(obj: dict[str, Any], name: str, stream: int = 0) -> dict[str, Any]:
    """Stream `stream` of tensor `name`, or the stream of embedded file `name`."""
    for t in obj["tensors"]:
        if t["name"] == name:
            return t["streams"][stream]
    for f in obj.get("files", []):
        if f["name"] == name:
            return f["stream"]
    raise KeyError(name)


def chunk_location(blob: bytes, name: str, stream: int = 0, chunk: int = 0) -> tuple[int, int]:
    """(offset, stored length) of one chunk."""
    off, stored, _raw, _ck = records(stream_of(index_obj(blob), name, stream))[chunk]
    return off, stored


def layout_items(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(item name, item map, stream map) in layout order: tensors' streams, then files."""
    out = [(t["name"], t, s) for t in obj["tensors"] for s in t["streams"]]
    out += [(f["name"], f, f["stream"]) for f in obj.get("files", [])]
    return out


def relayout(
    blob: bytes,
    replace: dict[tuple[str, int, int], bytes] | None = None,
    *,
    raw: dict[tuple[str, int, int], int] | None = None,
    fix_checksums: bool = True,
) -> bytes:
    """Rebuild the data region with some chunks' stored bytes replaced, keeping the layout
    rules (16-byte chunks, 4096-byte groups, no holes) and fixing offsets, stored lengths,
    chunk checksums (unless fix_checksums=False), group offsets/lengths and the header.

    Args:
        replace: {(item name, stream index, chunk index): new stored bytes}.
        raw: {(item name, stream index, chunk index): raw length to write into the record}.
    """
    replace = replace or {}
    raw = raw or {}
    obj = index_obj(blob)
    out = bytearray(blob[: C.DATA_START])
    streams_by_item: dict[str, int] = {}
    current_group = None
    for name, item, stream in layout_items(obj):
        sidx = streams_by_item.get(name, 0)
        streams_by_item[name] = sidx + 1
        gid = item["group"]
        if gid != current_group:
            if current_group is not None:
                g = obj["groups"][current_group]
                g["length"] = len(out) - g["offset"]
                out += b"\0" * (align_up(len(out), C.GROUP_ALIGNMENT) - len(out))
            obj["groups"][gid]["offset"] = len(out)
            current_group = gid
        recs = records(stream)
        for ci, rec in enumerate(recs):
            off, stored, _raw, ck = rec
            data = replace.get((name, sidx, ci), blob[off : off + stored])
            out += b"\0" * (align_up(len(out), C.CHUNK_ALIGNMENT) - len(out))
            rec[0], rec[1] = len(out), len(data)
            if (name, sidx, ci) in raw:
                rec[2] = raw[(name, sidx, ci)]
            if fix_checksums:
                rec[3] = xxh3_64(data)
            out += data
        set_records(stream, recs)
    if current_group is not None:
        g = obj["groups"][current_group]
        g["length"] = len(out) - g["offset"]
    out += b"\0" * (align_up(len(out), C.INDEX_ALIGNMENT) - len(out))
    return assemble(bytes(out), pack_index(obj))


# --- raw byte edits (no checksum fixes) ---------------------------------------------------


def patch(blob: bytes, offset: int, data: bytes) -> bytes:
    """The file with `data` written over it at `offset` (nothing else is fixed)."""
    if offset < 0 or offset + len(data) > len(blob):
        raise IndexError(f"patch [{offset}, +{len(data)}) outside a {len(blob)}-byte file")
    return blob[:offset] + data + blob[offset + len(data) :]


def flip_bit(blob: bytes, offset: int, bit: int = 0) -> bytes:
    return patch(blob, offset, bytes([blob[offset] ^ (1 << bit)]))


# --- zstd frames by hand ------------------------------------------------------------------


def rle_zstd_frame(declared_size: int | None, total: int, block: int = 1 << 16, byte: int = 0,
                   window_log: int | None = None) -> bytes:
    """A zstd frame of RLE blocks that decodes to `total` copies of `byte` while its header
    declares `declared_size` (None: no content size). 4 bytes per block: a 1 GiB frame is
    ~64 KiB with 64 KiB blocks.

    With a declared size and no window_log the frame is single-segment (window = declared
    size); with window_log the header carries a window descriptor (window = 2**window_log).
    """
    if total <= 0 or block <= 0 or block > 1 << 17:
        raise ValueError("need total > 0 and 0 < block <= 128 KiB")
    out = bytearray(ZSTD_MAGIC)
    if declared_size is not None and window_log is None:
        out.append(0b11_1_0_0_0_00)  # 8-byte content size, single segment
        out += struct.pack("<Q", declared_size)
    else:
        wl = window_log if window_log is not None else 17
        fcs_flag = 0b11 if declared_size is not None else 0
        out.append(fcs_flag << 6)
        out.append((wl - 10) << 3)  # window descriptor: exponent, mantissa 0
        if declared_size is not None:
            out += struct.pack("<Q", declared_size)
    left = total
    while left:
        n = min(block, left)
        left -= n
        head = (1 if not left else 0) | (1 << 1) | (n << 3)  # last flag, RLE, size
        out += head.to_bytes(3, "little") + bytes([byte])
    return bytes(out)
