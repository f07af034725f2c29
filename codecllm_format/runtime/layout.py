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
class FusedSlice:
    """Sibling int8 weights that read the same input (a block's q/k/v projections, gate/up),
    decoded back to back: the rows of `members`, in order, form one [sum(rows), cols] int8
    matrix at q_offset, and their scales one array at scale_offset, so a single kernel launch
    computes every member's output."""

    members: tuple[str, ...]
    rows: tuple[int, ...]
    cols: int
    q_offset: int
    scale_offset: int
    scale_groups: int = 0


FUSED_ALIGNMENT = 16
"""Members of a fusion set after the first decode right behind the one before (their lengths
must be multiples of this, which keeps every chunk output 16-byte aligned, as nvCOMP wants)."""

FUSION_PATTERNS = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, OPT, ... attention
    ("gate_proj", "up_proj"),  # Llama-style MLP
    ("query", "key", "value"),  # BERT-style attention
    ("w1", "w3"),  # Mixtral experts
)
"""Names of sibling Linear layers (children of one module) that models call on the same input.
Only a layout hint: at run time a fused call is used only when the siblings really get the very
same input tensor (runtime/modules.py)."""


def _fusion_sets(tensors) -> list[list]:
    """Sibling int8 tensors (entries, in pattern order) that can be decoded back to back: same
    encoding, columns and scale grouping, and sizes that leave no alignment gap between members."""
    by_name = {t.name: t for t in tensors if t.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP)}
    sets = []
    for name, t in by_name.items():
        parent, _, leaf = name.rpartition(".")
        if leaf != "weight" or not parent:
            continue
        owner, _, child = parent.rpartition(".")
        for pattern in FUSION_PATTERNS:
            if child != pattern[0]:
                continue
            members = [by_name.get(f"{owner}.{c}.weight" if owner else f"{c}.weight") for c in pattern]
            if any(m is None for m in members):
                continue
            first = members[0]
            if any(m.encoding != first.encoding or len(m.shape) != 2 or m.shape[1] != first.shape[1]
                   or m.group_size != first.group_size or len(m.streams) != 2 for m in members):
                continue
            # the members' values (and scales) follow each other at FUSED_ALIGNMENT with no gap
            if any(m.streams[0].length % FUSED_ALIGNMENT or m.streams[1].length % FUSED_ALIGNMENT for m in members[:-1]):
                continue
            sets.append(members)
    return sets


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
    fused: dict[tuple[str, ...], FusedSlice] = dataclasses.field(default_factory=dict)
    """Sibling weights decoded back to back (FusedSlice), by their member names."""

    @property
    def cost(self) -> GroupCost:
        return GroupCost(self.gid, self.name, self.file_length, self.decoded_bytes)


def slice_views(buf, sl):
    """(int8 [rows, cols], scales) views of a TensorSlice or FusedSlice in a decoded uint8 buffer
    (a torch tensor): float32 scales [rows], or bfloat16 [rows, scale_groups] (int8_group)."""
    import torch  # noqa: PLC0415

    rows, cols = (sum(sl.rows), sl.cols) if isinstance(sl, FusedSlice) else sl.shape
    q = buf[sl.q_offset : sl.q_offset + rows * cols].view(torch.int8).view(rows, cols)
    if sl.scale_groups:
        n = rows * sl.scale_groups
        s = buf[sl.scale_offset : sl.scale_offset + n * 2].view(torch.bfloat16).view(rows, sl.scale_groups)
    else:
        s = buf[sl.scale_offset : sl.scale_offset + rows * 4].view(torch.float32)
    return q, s


def fill_on_cpu(cpu, layout: GroupLayout, out) -> None:
    """Decode every int8 tensor of `layout` with the CPU provider `cpu` (zstd, checksums checked)
    into `out` (uint8 torch tensor of at least layout.decoded_bytes), at the offsets a GPU decode
    would put them: the same buffer, without the GPU (no VRAM for a table decoded at load)."""
    for name, sl in layout.tensors.items():
        q, s = cpu.linear_weight(name)
        qv, sv = slice_views(out, sl)
        qv.copy_(q.reshape(qv.shape))
        sv.copy_(s.reshape(sv.shape))


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
        # Where each stream decodes to: in file order, except that the members of a fusion set
        # are placed together when the first of them comes up, values then scales.
        fusion = {m.name: members for members in _fusion_sets(tensors) for m in members}
        order: list[tuple] = []  # (tensor, stream index, alignment)
        placed: set[str] = set()
        for t in tensors:
            if t.name in placed:
                continue
            members = fusion.get(t.name, [t])
            for k in range(max(len(m.streams) for m in members)):
                order.extend((m, k, SLOT_ALIGNMENT if i == 0 else FUSED_ALIGNMENT)
                             for i, m in enumerate(members) if k < len(m.streams))
            placed.update(m.name for m in members)
        place: dict[tuple[str, int], int] = {}
        for t, k, alignment in order:
            stream = t.streams[k]
            pos = align_up(pos, alignment)
            place[(t.name, k)] = pos
            ch = stream.chunks
            in_off.append(ch["offset"].astype(np.int64) - g.offset)
            in_size.append(ch["stored"].astype(np.int64))
            out_off.append(pos + np.arange(ch.shape[0], dtype=np.int64) * stream.chunk_size)
            out_size.append(ch["raw"].astype(np.int64))
            sums.append(ch["checksum"])
            pos += stream.length
        for t in tensors:
            offsets = [place[(t.name, k)] for k in range(len(t.streams))]
            if t.encoding == C.Encoding.FLOAT_PLANES:
                planes[t.name] = PlaneSlice(t.name, tuple(t.shape), t.dtype, t.numel, offsets[0], offsets[1])
            else:
                groups = group_count(t.shape[1], t.group_size) if t.encoding == C.Encoding.INT8_GROUP else 0
                slices[t.name] = TensorSlice(t.name, (t.shape[0], t.shape[1]), offsets[0], offsets[1], groups)
        fused = {}
        for members in _fusion_sets(tensors):
            first = slices[members[0].name]
            row_bytes = first.shape[1]
            scale_row_bytes = first.scale_groups * 2 if first.scale_groups else 4
            rows_before = np.cumsum([0] + [m.shape[0] for m in members[:-1]]).tolist()
            if any(slices[m.name].q_offset != first.q_offset + r * row_bytes
                   or slices[m.name].scale_offset != first.scale_offset + r * scale_row_bytes
                   for m, r in zip(members, rows_before)):
                continue  # not back to back after all: the members stay separate
            fused[tuple(m.name for m in members)] = FusedSlice(
                tuple(m.name for m in members), tuple(m.shape[0] for m in members), first.shape[1],
                first.q_offset, first.scale_offset, first.scale_groups)
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
            fused=fused,
        )
        lay = layouts[gid]
        key = (len(lay.out_sizes), lay.decoded_bytes, xxh3_64(lay.out_sizes.tobytes() + lay.out_offsets.tobytes()))
        layouts[gid] = dataclasses.replace(lay, shape_key=key, codec=group_codec.name.lower())
    return layouts
