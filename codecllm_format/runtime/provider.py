"""Where compressed modules get their weights: the WeightProvider interface and the CPU one.

A provider hands out int8 weights (and their per-row float32 scales, or an int8_group tensor's
bfloat16 scales [rows, groups]) on its device, decoded from a .cllm file, and (optionally,
`float_weight`) lossless float_planes weights. The loader wraps each transformer block (a layer group of the file) in
begin_group / end_group calls, from forward hooks, so a provider can prefetch a group at its
begin and free or reuse the group's decoded buffers at its end. The GPU runtime implements the
same interface (runtime/gpu.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .. import constants as C
from ..errors import DecodeError, DeviceError, LoadError
from ..index import Stream
from ..quant import group_count
from ..reader import CllmFile


@runtime_checkable
class WeightProvider(Protocol):
    """What CompressedLinear / CompressedEmbedding need from a weight source.

    Names are stored tensor names of the file (aliases resolved by the caller or the provider).
    Returned tensors are on `device` and stay valid until end_group of the tensor's group; the
    caller must not keep them longer (the provider may reuse their memory).
    """

    device: torch.device

    def linear_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 in the stored shape, scales float32 [rows]) of an int8_row tensor."""
        ...

    def embedding_rows(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [n, dim], scales float32 [n]) of rows `ids` (flat, n = ids.numel()) of a table."""
        ...

    def begin_group(self, group: int) -> None:
        """The module of layer group `group` starts its forward (prefetch point)."""
        ...

    def end_group(self, group: int) -> None:
        """The module of layer group `group` finished its forward: its decoded buffers may go."""
        ...

    def close(self) -> None:
        """Release everything the provider holds (not the file: the loader owns it)."""
        ...


class CpuProvider:
    """Decodes on demand, on the CPU, per tensor: every call reads the tensor's chunks from the
    memory-mapped file (checksums checked), decodes them into fresh tensors and keeps no
    reference, so decoded weights are freed as soon as the caller drops them.

    Embedding rows are read by decoding only the chunks that hold the requested rows.

    Args:
        cllm: an open CllmFile (kept open by the caller).
        device: must be the CPU (None means the CPU).
        threads: zstd decoding threads (default: the file's setting).

    Raises:
        DeviceError: runtime options the CPU provider does not know.
    """

    OPTIONS = ("threads",)

    def __init__(self, cllm: CllmFile, *, device: torch.device | str | None = None, threads: int | None = None, **options):
        if device is not None and torch.device(device).type != "cpu":
            raise DeviceError(f"CpuProvider runs on the CPU, not on {device!r}")
        if options:
            raise DeviceError(
                f"runtime option(s) {sorted(options)} are not used on device 'cpu' "
                f"(the CPU provider takes: {', '.join(self.OPTIONS)})"
            )
        self.device = torch.device("cpu")
        self.cllm = cllm
        if threads is not None:
            if threads < 1:
                raise DeviceError(f"threads must be >= 1, got {threads}")
            cllm.threads = threads
        self._ends: dict[int, np.ndarray] = {}
        self.stats = {"linear_calls": 0, "embedding_calls": 0, "float_calls": 0, "bytes_decoded": 0}
        self._closed = False

    # --- helpers -------------------------------------------------------------------------------

    def _int8_entry(self, name: str):
        if self._closed:
            raise LoadError("the model was closed: its weight provider is no longer usable")
        e = self.cllm.entry(name)
        if e.encoding not in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP) or len(e.shape) != 2:
            raise LoadError(f"tensor {name!r} is not an int8_row or int8_group matrix (encoding {e.encoding.name}, shape {e.shape})")
        return e

    def _stream_ends(self, stream: Stream) -> np.ndarray:
        key = id(stream)
        ends = self._ends.get(key)
        if ends is None:
            ends = np.cumsum(stream.chunks["raw"].astype(np.int64))
            self._ends[key] = ends
        return ends

    def _gather_rows(self, stream: Stream, rows: np.ndarray, row_bytes: int, where: str) -> np.ndarray:
        """Bytes of `rows` (sorted unique row numbers) of a stream of fixed-size rows:
        decodes only the chunks that hold them. Returns uint8 [len(rows), row_bytes]."""
        ends = self._stream_ends(stream)
        starts = rows.astype(np.int64) * row_bytes
        first = np.searchsorted(ends, starts, side="right")
        last = np.searchsorted(ends, starts + row_bytes - 1, side="right")
        needed = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first.tolist(), last.tolist())]))
        # runs of consecutive chunks, each decoded as one sub-stream
        breaks = np.flatnonzero(np.diff(needed) != 1) + 1
        pieces, run_begin, run_offset, pos = [], [], [], 0
        for run in np.split(needed, breaks):
            c0, c1 = int(run[0]), int(run[-1])
            begin = int(ends[c0 - 1]) if c0 else 0
            length = int(ends[c1]) - begin
            sub = Stream(stream.codec, length, stream.chunk_size, stream.chunks[c0 : c1 + 1])
            buf = self.cllm.read_stream(sub, where=f"{where} chunks {c0}..{c1}")
            pieces.append(np.frombuffer(buf, dtype=np.uint8))
            run_begin.append(begin)
            run_offset.append(pos)
            pos += length
        self.stats["bytes_decoded"] += pos
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        run_begin_a = np.asarray(run_begin, dtype=np.int64)
        k = np.searchsorted(run_begin_a, starts, side="right") - 1
        offs = np.asarray(run_offset, dtype=np.int64)[k] + (starts - run_begin_a[k])
        return data[offs[:, None] + np.arange(row_bytes, dtype=np.int64)[None, :]]

    # --- WeightProvider --------------------------------------------------------------------

    def linear_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._int8_entry(name)
        raw = self.cllm.get_raw(name)
        self.stats["linear_calls"] += 1
        self.stats["bytes_decoded"] += raw.data.numel() + raw.scales.numel() * raw.scales.element_size()
        return raw.data, raw.scales

    def embedding_rows(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self._int8_entry(name)
        rows, dim = e.shape
        flat = ids.reshape(-1)
        grouped = e.encoding == C.Encoding.INT8_GROUP
        ng = group_count(dim, e.group_size) if grouped else 0
        if flat.numel() == 0:
            return torch.empty((0, dim), dtype=torch.int8), (
                torch.empty((0, ng), dtype=torch.bfloat16) if grouped else torch.empty(0, dtype=torch.float32))
        if flat.dtype.is_floating_point or flat.dtype == torch.bool:
            raise TypeError(f"embedding ids must be integers, got {flat.dtype}")
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= rows:
            raise IndexError(f"embedding {name!r}: id {lo if lo < 0 else hi} out of range [0, {rows})")
        uniq, inverse = torch.unique(flat.cpu(), sorted=True, return_inverse=True)
        u = uniq.numpy()
        where = f"tensor {e.name!r}"
        q = self._gather_rows(e.streams[0], u, dim, where + " values").view(np.int8)
        if grouped:  # bfloat16 [rows, groups]: numpy has no bfloat16, torch views the bits
            s = self._gather_rows(e.streams[1], u, ng * 2, where + " scales").view("<i2")
            s_t = torch.from_numpy(s.copy()).view(torch.bfloat16)[inverse]
            f = s_t.to(torch.float32)
            if f.numel() and not bool((torch.isfinite(f) & (f >= 0)).all()):
                raise DecodeError(f"{where}: a scale is negative, NaN or infinite")
        else:
            s = self._gather_rows(e.streams[1], u, 4, where + " scales").view("<f4").reshape(-1)
            s_t = torch.from_numpy(s.copy())[inverse]
        self.stats["embedding_calls"] += 1
        q_t = torch.from_numpy(q)[inverse]
        return q_t, s_t

    def float_weight(self, name: str) -> torch.Tensor:
        """The weight of a float_planes tensor, decoded bit-exact (in its stored dtype) for one
        forward: CompressedFloatLinear calls this. Optional in the WeightProvider protocol: a
        provider without it gets such weights as ordinary parameters decoded at load.

        Raises:
            LoadError: the tensor is not float_planes, or the provider was closed.
        """
        if self._closed:
            raise LoadError("the model was closed: its weight provider is no longer usable")
        e = self.cllm.entry(name)
        if e.encoding != C.Encoding.FLOAT_PLANES:
            raise LoadError(f"tensor {name!r} is not float_planes (encoding {e.encoding.name})")
        w = self.cllm.get_raw(name).data
        self.stats["float_calls"] += 1
        self.stats["bytes_decoded"] += sum(st.length for st in e.streams)
        return w

    def begin_group(self, group: int) -> None:
        pass

    def end_group(self, group: int) -> None:
        pass

    def close(self) -> None:
        self._closed = True
        self._ends.clear()
