"""Per-group decode layouts: where each chunk of the group's int8 (int8_row) and lossless
(float_planes) tensors sits in the group's byte range, and where its decoded bytes go in a slot. Built from the index alone (no torch-CUDA), tested on the CPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import constants as C
from ..checksums import xxh3_64
from ..quant import group_count
from ..index import Index, align_up
from .plan import GroupCost

SLOT_ALIGNMENT = 256
"""Decoded streams start at 256-byte boundaries in a slot (coalesced loads, any dtype view)."""


@dataclass(frozen=True)
class TensorSlice:
    """Where one int8_row / int8_group tensor's values and scales sit in a decoded slot (byte
    offsets). scale_groups 0: float32 scales [rows]; > 0 (int8_group): bfloat16 scales
    [rows, scale_groups]."""

    name: str
    shape: tuple[int, int]
    q_offset: int
    scale_offset: int
    scale_groups: int = 0


@dataclass(frozen=True)
class PlaneSlice:
    """Where one float_planes tensor's decoded planes sit in a slot (byte offsets): `numel`
    exponent bytes at exp_offset, then k * numel sign/mantissa bytes at sm_offset."""

    name: str
    shape: tuple[int, ...]
    dtype: C.DType
    numel: int
    exp_offset: int
    sm_offset: int


@dataclass(frozen=True)
class GroupLayout:
    gid: int
    name: str
    file_offset: int
    file_length: int
    in_offsets: np.ndarray
    """Chunk offsets relative to the group's first byte."""
    in_sizes: np.ndarray
    out_offsets: np.ndarray
    """Decoded chunk offsets in the slot."""
    out_sizes: np.ndarray
    checksums: np.ndarray
    decoded_bytes: int
    tensors: dict[str, TensorSlice]
    shape_key: tuple = ()
    """Equal for groups whose decoded chunks have the same sizes and places (e.g. all
    transformer blocks): such groups can share one nvCOMP decompression config."""
    codec: str = "zstd"
    """Codec of the group's int8 chunks in the file ("zstd" or "ans": one per group, spec 11)."""
    planes: dict[str, PlaneSlice] = dataclasses.field(default_factory=dict)
    """The group's float_planes tensors (decoded to planes in the slot, interleaved per use)."""

    @property
    def cost(self) -> GroupCost:
        return GroupCost(self.gid, self.name, self.file_length, self.decoded_bytes)


def build_layouts(index: Index, planes: set[str] | None = None) -> dict[int, GroupLayout]:
    """A GroupLayout for every group holding int8_row, int8_group or float_planes tensors (other groups are
    not streamed). A group decodes in one batched call of one codec: float_planes tensors whose
    chunks use another codec than the group's int8 tensors (an ANS file) are left out.
    `planes`: the float_planes tensors to stream (None: all of them; the loader passes the
    Linear weights it decodes per forward, not tables it loads once)."""
    per_group: dict[int, list] = {}
    for t in index.tensors:
        if t.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP) or (
                t.encoding == C.Encoding.FLOAT_PLANES and (planes is None or t.name in planes)):
            per_group.setdefault(t.group, []).append(t)
    layouts = {}
    for gid, tensors in per_group.items():
        int8 = [t for t in tensors if t.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP)]
        group_codec = (int8 or tensors)[0].streams[0].codec
        tensors = [t for t in tensors if all(st.codec == group_codec for st in t.streams)]
        g = index.groups[gid]
        in_off, in_size, out_off, out_size, sums = [], [], [], [], []
        slices, planes = {}, {}
        pos = 0
        for t in tensors:
            offsets = []
            for stream in t.streams:
                pos = align_up(pos, SLOT_ALIGNMENT)
                offsets.append(pos)
                ch = stream.chunks
                in_off.append(ch["offset"].astype(np.int64) - g.offset)
                in_size.append(ch["stored"].astype(np.int64))
                out_off.append(pos + np.arange(ch.shape[0], dtype=np.int64) * stream.chunk_size)
                out_size.append(ch["raw"].astype(np.int64))
                sums.append(ch["checksum"])
                pos += stream.length
            if t.encoding == C.Encoding.FLOAT_PLANES:
                planes[t.name] = PlaneSlice(t.name, tuple(t.shape), t.dtype, t.numel, offsets[0], offsets[1])
            else:
                groups = group_count(t.shape[1], t.group_size) if t.encoding == C.Encoding.INT8_GROUP else 0
                slices[t.name] = TensorSlice(t.name, (t.shape[0], t.shape[1]), offsets[0], offsets[1], groups)
        layouts[gid] = GroupLayout(
            gid=gid,
            name=g.name,
            file_offset=g.offset,
            file_length=g.length,
            in_offsets=np.concatenate(in_off),
            in_sizes=np.concatenate(in_size),
            out_offsets=np.concatenate(out_off),
            out_sizes=np.concatenate(out_size),
            checksums=np.concatenate(sums),
            decoded_bytes=align_up(pos, SLOT_ALIGNMENT),
            tensors=slices,
            planes=planes,
        )
        lay = layouts[gid]
        key = (len(lay.out_sizes), lay.decoded_bytes, xxh3_64(lay.out_sizes.tobytes() + lay.out_offsets.tobytes()))
        layouts[gid] = dataclasses.replace(lay, shape_key=key, codec=group_codec.name.lower())
    return layouts
