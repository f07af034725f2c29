"""GpuProvider: int8 weights for CompressedLinear on a CUDA device, by residency tier.

Decompress -> compute -> free in fixed memory: streaming tiers share `slots` output buffers
(int8 + scales) and the staged tiers up to two staging buffers (compressed bytes), all allocated
once at load. Ordering is by CUDA events only — no host synchronization on the per-layer path:

  copy stream:    [H2D group g -> staging[j]]  (waits: the decode that last read staging[j])
  decode stream:  [nvCOMP decode staging[j] -> slot[k]]  (waits: copy done; compute done with slot[k])
  compute stream: waits decode done, runs the block, records "slot[k] free" at end_group

Staging buffers are taken in turn (with 2 slots, staging[k] goes with slot[k]): copies and decodes
each run in scheduling order, so a third slot costs one more output buffer only (plan.STAGING_BUFFERS).

While group g computes, the next group (learned from the order groups are used) is already
copied and decoded into the other slot (prefetch). No chunk reaches nvCOMP before its
checksum passed: memory tiers verify every chunk at load; the disk tier verifies a group the
first time it is read.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..checksums import xxh3_64
from ..codecs.ans import TRUST_HINT, check_ans_chunk_sizes
from ..codecs.zstd import check_frame_structure
from ..errors import ChecksumError, CllmError, DecodeError, DeviceError, TrustRequired
from .. import constants as C
from ..reader import CllmFile
from ..writer import DTYPE_TO_TORCH
from .cuda_copy import HostToDevice
from .disk import GroupReader
from .layout import GroupLayout, build_layouts, fill_on_cpu, slice_views
from .planes import interleave_planes
from .nvcomp_decoder import EncodedGroup, GroupDecoder, file_encoding, import_nvcomp
from .plan import STAGED_TIERS, ResidencyPlan, plan_residency
from .timeline import Timeline

log = logging.getLogger("codecllm_format.runtime")

READ_SLICE = 4 * 1024 * 1024
"""Disk tier: a group is copied out of the page cache in slices of this size ..."""
READ_THREADS = min(4, os.cpu_count() or 1)
"""... by this many threads at once."""


class _DeviceAlias:
    """A CUDA array interface over pinned host memory, for torch.as_tensor: with unified virtual
    addressing, pinned host memory is mapped into every device's address space under its host
    address, so kernels can read it in place (over PCIe)."""

    def __init__(self, host: torch.Tensor):
        self._host = host  # keeps the memory alive as long as the CUDA tensor
        self.__cuda_array_interface__ = {"shape": (host.numel(),), "typestr": "|u1", "data": (host.data_ptr(), False),
                                         "version": 3, "strides": None}


def _map_host_table(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """`host` (pinned, uint8) as a CUDA tensor on `device` over the same memory, or None where
    that is not possible (torch would copy instead, or the GPU does not read it back right)."""
    try:
        mapped = torch.as_tensor(_DeviceAlias(host), device=device)
        if mapped.data_ptr() != host.data_ptr() or mapped.device != device:
            return None
        probe = torch.arange(0, host.numel(), max(1, host.numel() // 61), device=device)
        if not torch.equal(mapped.index_select(0, probe).cpu(), host.index_select(0, probe.cpu())):
            return None
        return mapped
    except (RuntimeError, TypeError, ValueError) as e:
        log.info("pinned host memory cannot be mapped for the GPU (%s): embedding rows gathered on the CPU", e)
        return None


@dataclass
class _Slot:
    index: int
    out: torch.Tensor
    gid: int | None = None
    free_event: torch.cuda.Event | None = None
    """Recorded on the compute stream when the slot's group finished computing."""
    ready_event: torch.cuda.Event | None = None
    """Recorded on the decode stream when the slot holds the decoded group."""
    last_used: int = -1
    """Scheduling clock of the last group put in the slot (least recently used goes first)."""
    events: tuple | None = None
    """(ready, free, copied) events of this slot, created once and recorded again for each group:
    a wait enqueued on a stream refers to the record before it, so reuse is safe (a host-side
    synchronize on a re-recorded event waits for the newer record: later, never too early)."""


def verify_group(f: CllmFile, layout: GroupLayout, data: memoryview | bytes | None = None) -> None:
    """Check every int8 chunk of a group on the CPU before the GPU sees it: its checksum, then
    that it is exactly one zstd frame declaring its decoded size (nvCOMP assumes valid input);
    for an ANS group (whose bitstream the CPU cannot parse), the size rules only.

    Raises:
        ChecksumError, DecodeError: naming the group, chunk and file offset.
    """
    buf = data if data is not None else f.group_bytes(layout.gid)
    try:
        for i, (off, size, raw, expected) in enumerate(
            zip(layout.in_offsets.tolist(), layout.in_sizes.tolist(), layout.out_sizes.tolist(),
                layout.checksums.tolist())
        ):
            chunk = buf[off : off + size]
            actual = xxh3_64(chunk)
            where = f"group {layout.name!r} chunk {i} at offset {layout.file_offset + off}"
            if actual != expected:
                raise ChecksumError(
                    f"{where}: checksum mismatch (stored {expected:#018x}, computed {actual:#018x}); "
                    f"refusing to send it to the GPU"
                )
            if layout.codec == "ans":
                check_ans_chunk_sizes(size, raw, where)
            else:
                check_frame_structure(chunk, raw, where)
    finally:
        if data is None and isinstance(buf, memoryview):
            buf.release()


class GpuProvider:
    """WeightProvider for CUDA devices (see runtime/provider.py for the protocol).

    Args:
        f: the open file (kept open; its mmap serves the disk tier and raw reads).
        device: a CUDA device.
        residency: "gpu", "gpu-compressed", "host", "disk" or "auto" (with max_vram). Default:
            "auto" when max_vram is given, else "host" (the least VRAM).
        max_vram: budget for weights + reserve, bytes or "6GiB".
        slots: streaming buffers; with prefetch, groups are scheduled as many ahead as there are
            slots besides the one computing (2: one ahead; 3: two ahead). Where the host->GPU
            copies are the bound, 3 keeps the link busy across token boundaries too: TinyLlama's
            host tier on an H200 ran at 91-98% of its PCIe bound with 3 against 74-90% with 2
            (2026-11-27, once its norms were fused), for one more decoded buffer of VRAM (the
            slots share at most two staging buffers).
        verify: check chunk checksums before any chunk reaches the GPU (default True).
            False skips that for trusted files: a corrupt file may then decode to garbage.
        prefetch: decode the next group while the current one computes.
        codec: in-memory codec of the host and gpu-compressed tiers: "zstd", "ans" (nvCOMP ANS,
            decodes ~10x faster than zstd) or "auto" (ans). Groups whose file codec (zstd, or ANS
            in a file written with --codec ans) is that codec are used as they are; the others
            are transcoded once at load (round trip checked). The disk tier always reads the
            file's codec. A file with ANS groups needs f.trust_gpu_codecs (TrustRequired), and
            refuses codec="zstd" (CllmError: an in-memory zstd copy would only decode slower).
        chunk_bytes: in-memory copies of the host and gpu-compressed tiers merge the file's chunks
            into chunks of up to this many bytes (0, the default: keep the file's; a group whose
            chunks already are the in-memory codec is then re-encoded once at load). Measured on
            an H200 (2026-11-27): a 42 MiB ANS group decodes in 195 us with 64 KiB chunks, 183 us
            at 256 KiB and 558 us at 1 MiB (too few chunks to fill the GPU); the TinyLlama host
            tier ran at 0.700x / 0.667x / 0.631x bf16 with 0 / 256 KiB / 1 MiB.
        read_ahead: disk tier: groups read ahead from the file into pinned memory by a
            worker thread (read_ahead + 1 pinned buffers of the largest group).
        verbose: print the residency plan (it is always logged at INFO).
        planes: lossless (float_planes) weights to stream and serve through float_weight (None:
            all; the loader passes the nn.Linear weights it decodes per forward).
        groups: serve only these layer groups (None: all). A multi-GPU split (runtime/multi.py)
            gives each device's provider the groups placed on that device.
        embeddings: int8 tables only ever looked up by rows (the loader passes the embedding
            tables no Linear shares). Outside residency="gpu", a group holding nothing else is
            not streamed: it is decoded once at load into pinned host memory (host RAM: its int8
            size, e.g. 131 MB for Llama-2-7B's), and each lookup is one GPU gather reading the
            asked rows straight from there over PCIe (unified addressing; no copy of the table,
            no host synchronization). Where the GPU cannot map that memory, rows are gathered on
            the CPU instead (a zstd table: decoding only the chunks that hold them).
    """

    streams_planes = True  # the loader passes `planes=` (see float_weight)

    def __init__(
        self,
        f: CllmFile,
        device: torch.device | str = "cuda",
        residency: str | None = None,
        max_vram: int | str | None = None,
        slots: int = 2,
        verify: bool = True,
        prefetch: bool = True,
        reserve: int | str | None = None,
        codec: str = "auto",
        verbose: bool = False,
        cpu_fallback=None,
        read_ahead: int = 2,
        groups: set[int] | None = None,
        planes: set[str] | None = None,
        chunk_bytes: int = 0,
        embeddings: set[str] | None = None,
    ):
        if not torch.cuda.is_available():
            raise DeviceError('device="cuda" but CUDA is not available (no GPU, or a CPU-only PyTorch build)')
        import_nvcomp()  # clear CodecUnavailable before any allocation
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {self.device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        self.file = f
        if codec not in ("auto", "zstd", "ans", "bitcomp", "gdeflate"):
            raise CllmError(f"codec must be 'auto', 'zstd', 'ans', 'bitcomp' or 'gdeflate', got {codec!r}")
        self.codec = "ans" if codec == "auto" else codec
        self.verify = verify
        self.prefetch = prefetch
        if read_ahead < 1:
            raise CllmError(f"read_ahead must be at least 1, got {read_ahead}")
        self.read_ahead = read_ahead
        if chunk_bytes and not C.MIN_CHUNK_SIZE <= int(chunk_bytes) <= C.MAX_CHUNK_SIZE:
            raise CllmError(f"chunk_bytes must be 0 or in [{C.MIN_CHUNK_SIZE}, {C.MAX_CHUNK_SIZE}], got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        if cpu_fallback is None:
            from .provider import CpuProvider  # noqa: PLC0415

            cpu_fallback = CpuProvider(f)
        self.cpu_fallback = cpu_fallback
        if residency is None:
            residency = "auto" if max_vram is not None else "host"
        self.layouts = build_layouts(f.index, planes)
        if groups is not None:
            self.layouts = {g: lay for g, lay in self.layouts.items() if g in groups}
        if any(lay.codec == "ans" for lay in self.layouts.values()):
            if not f.trust_gpu_codecs:
                raise TrustRequired(f"{f.path.name}: its int8 weights are stored with the GPU-only codec ANS; {TRUST_HINT}")
            if self.codec == "zstd":  # an in-memory zstd copy of ANS chunks would only decode slower
                raise CllmError(f"codec='zstd': {f.path.name} stores its int8 weights as nvCOMP ANS, which the tiers use "
                                f"as stored; use codec='auto' (or 'ans'), or load a zstd file")
        # Tables used only by row lookups are served from host memory (no table crosses PCIe per token)
        self._host_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mapped_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the same memory, as CUDA tensors
        rows_only = {g for g, lay in self.layouts.items()
                     if lay.tensors and not lay.planes and set(lay.tensors) <= set(embeddings or ())}
        if residency != "gpu" and rows_only:
            self._rows_only = {g: self.layouts.pop(g) for g in sorted(rows_only)}
        else:
            self._rows_only = {}
        self._tensor_group = {name: gid for gid, lay in self.layouts.items() for name in lay.tensors}
        self._planes_group = {name: gid for gid, lay in self.layouts.items() for name in lay.planes}
        # Lossless (float_planes) weights are re-interleaved per use into one scratch buffer.
        self._float_bytes = max((ps.numel * DTYPE_TO_TORCH[ps.dtype].itemsize
                                 for lay in self.layouts.values() for ps in lay.planes.values()), default=0)
        with torch.cuda.device(self.device):
            self.copy_stream = torch.cuda.Stream(self.device)
            self._h2d = HostToDevice(self.copy_stream)
            self.decode_stream = torch.cuda.Stream(self.device)
            self.decoder = GroupDecoder(self.device, self.decode_stream)
            self._decode_scratch = self._decode_scratch_by_tier()
            self.plan: ResidencyPlan = plan_residency(
                [lay.cost for lay in self.layouts.values()], residency, max_vram, slots=slots, reserve=reserve,
                scratch_bytes=self._float_bytes, decode_scratch={t: n for t, (_, n) in self._decode_scratch.items()},
            )
            self._check_ans_bounds()
            self._load()
            self._load_host_tables()
            self._settle_codecs()
        self._next: dict[int, int] = {}
        self._resident_views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # linear_weight's views, by asked name
        self._slot_views: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # by (name, slot index)
        # (group, slot index, staging index or None) -> (source view, prepared decode)
        self._bound: dict[tuple[int, int, int | None], tuple] = {}
        self._last_gid: int | None = None
        self._active: dict[int, _Slot] = {}
        self._transient: list[int] = []
        self._current: int | None = None
        self._clock = 0
        self._compute_stream = torch.cuda.current_stream(self.device)
        self.stats = {"decodes": 0, "copies": 0, "prefetched": 0, "float_calls": 0}
        self.timeline: Timeline | None = None
        """Attach a runtime.timeline.Timeline to record when each group's copy, decode and compute ran."""
        self._planes_checked: set[str] = set()
        summary = self.plan.summary() + f"\n  in-memory codec of host/gpu-compressed groups: {self.codec}"
        if self._rows_only:
            names = ", ".join(lay.name for lay in self._rows_only.values())
            summary += f"\n  embedding rows looked up in host memory, not streamed: {names}"
        if self._float_scratch is not None:
            summary += f"\n  lossless weights re-interleaved per use into a {self._float_scratch.numel() / 2**20:.1f} MiB buffer"
        log.info(summary)
        if verbose:
            print(summary)

    # --- load ---------------------------------------------------------------------------

    def _check_ans_bounds(self) -> None:
        """ANS groups of the file: no stored chunk may exceed nvCOMP's compressed-size bound for
        its raw size (index data only, before any chunk reaches the GPU).

        Raises:
            DecodeError: naming the group, chunk and file offset.
        """
        bounds: dict[int, int] = {}
        for lay in [*self.layouts.values(), *self._rows_only.values()]:
            if lay.codec != "ans":
                continue
            for i, (off, size, raw) in enumerate(zip(lay.in_offsets.tolist(), lay.in_sizes.tolist(), lay.out_sizes.tolist())):
                if raw not in bounds:
                    bounds[raw] = self.decoder.max_compressed_size("ans", raw)
                if size > bounds[raw]:
                    raise DecodeError(f"group {lay.name!r} chunk {i} at offset {lay.file_offset + off}: {size} stored bytes "
                                      f"for {raw} raw bytes, over nvCOMP's ANS bound of {bounds[raw]}: not an ANS chunk")

    def _decode_scratch_by_tier(self) -> dict[str, tuple[str, int]]:
        """(codec, nvCOMP scratch bytes) each streaming tier decodes with every forward: the disk
        tier the file's codec, the others the in-memory codec (estimated on the file's chunks)."""
        shapes = [(len(lay.out_sizes), int(lay.out_sizes.max()), int(lay.out_sizes.sum()))
                  for lay in self.layouts.values() if len(lay.out_sizes)]
        codecs = {"disk": {lay.codec for lay in self.layouts.values()}, "host": {self.codec}, "gpu-compressed": {self.codec}}
        out = {}
        for tier, names in codecs.items():
            for name in names:
                if name in ("zstd", "ans"):
                    n = self.decoder.scratch_estimate(name, shapes)
                    if n > out.get(tier, ("", 0))[1]:
                        out[tier] = (name, n)
        return out

    def _load_host_tables(self) -> None:
        """Row-only tables: decoded once here into pinned host memory, which the GPU reads rows
        from directly (see _map_host_table): a zstd table on the CPU (no VRAM beyond the plan,
        even for a large vocabulary), an ANS table on the GPU (only nvCOMP decodes ANS), both
        with their checksums checked first. Where the GPU can't map that memory, rows are
        gathered on the CPU: from this copy for an ANS table, by decoding the chunks that hold
        them for a zstd one (no copy kept)."""
        for g, lay in self._rows_only.items():
            host = torch.empty(lay.decoded_bytes, dtype=torch.uint8, pin_memory=True)
            if lay.codec == "ans":
                compressed = self._group_to_device(g, lay)
                out = torch.empty(lay.decoded_bytes, dtype=torch.uint8, device=self.device)
                self._decode_now(g, compressed, out, lay=lay)
                host.copy_(out)
                del compressed, out
            else:
                fill_on_cpu(self.cpu_fallback, lay, host)
            mapped = _map_host_table(host, self.device)
            if mapped is None and lay.codec != "ans":
                continue
            for name, sl in lay.tensors.items():
                self._host_tables[name] = self._views(host, sl)
                if mapped is not None:
                    self._mapped_tables[name] = self._views(mapped, sl)

    def _group_to_device(self, g: int, lay: GroupLayout | None = None) -> torch.Tensor:
        """The group's stored (zstd) bytes on the GPU, checksums verified first."""
        lay = lay or self.layouts[g]
        view = self.file.group_bytes(g)
        host = torch.frombuffer(bytearray(view), dtype=torch.uint8) if lay.file_length else torch.empty(0, dtype=torch.uint8)
        view.release()
        if self.verify:
            verify_group(self.file, lay, memoryview(host.numpy()))
            self._verified.add(g)
        return host.to(self.device)

    def _decode_now(self, g: int, src: torch.Tensor, out: torch.Tensor, enc: EncodedGroup | None = None,
                    lay: GroupLayout | None = None) -> None:
        lay = lay or self.layouts[g]
        self.decode_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.decoder.decode(enc or file_encoding(lay), lay, src, out)
        self.decode_stream.synchronize()
        self.decoder.forget(src)

    def _load(self) -> None:
        tiers = self.plan.tiers
        dev = self.device
        self.resident: dict[int, torch.Tensor] = {}
        self.dev_store: dict[int, torch.Tensor] = {}
        self.host_store: dict[int, torch.Tensor] = {}
        self.encoded: dict[int, EncodedGroup] = {g: file_encoding(lay) for g, lay in self.layouts.items()}
        self._verified: set[int] = set()
        scratch = None
        for g, tier in tiers.items():
            lay = self.layouts[g]
            # the file's codec (zstd, or ANS) is used as it is, unless chunks are to be merged
            transcode = self.codec != lay.codec or bool(self.chunk_bytes)
            if tier == "disk":
                continue
            if tier == "host" and not transcode:
                view = self.file.group_bytes(g)
                pinned = torch.empty(lay.file_length, dtype=torch.uint8, pin_memory=True)
                pinned.numpy()[:] = np.frombuffer(view, dtype=np.uint8)
                view.release()
                if self.verify:
                    verify_group(self.file, lay, memoryview(pinned.numpy()))
                    self._verified.add(g)
                self.host_store[g] = pinned
                continue
            compressed = self._group_to_device(g)
            if tier == "gpu":
                out = torch.empty(lay.decoded_bytes, dtype=torch.uint8, device=dev)
                self._decode_now(g, compressed, out)
                self.resident[g] = out
                continue
            if not transcode:  # gpu-compressed, as in the file
                self.dev_store[g] = compressed
                continue
            # Transcode the file's codec -> the in-memory one, once, and prove the round trip bit-exact.
            if scratch is None or scratch.numel() < 2 * lay.decoded_bytes:
                scratch = torch.empty(2 * max(l.decoded_bytes for l in self.layouts.values()), dtype=torch.uint8, device=dev)
            scratch.zero_()  # alignment gaps between streams are never written by a decode
            decoded = scratch[: lay.decoded_bytes]
            check = scratch[lay.decoded_bytes : 2 * lay.decoded_bytes]
            self._decode_now(g, compressed, decoded)
            del compressed
            packed, enc = self.decoder.encode_packed(self.codec, lay, decoded, self.chunk_bytes)
            self._decode_now(g, packed, check, enc)
            if not torch.equal(decoded, check):
                raise DecodeError(f"group {lay.name!r}: {self.codec} transcoding did not round-trip; use codec='zstd'")
            self.encoded[g] = enc
            if tier == "host":
                pinned = torch.empty(enc.length, dtype=torch.uint8, pin_memory=True)
                pinned.copy_(packed)
                self.host_store[g] = pinned
            else:
                self.dev_store[g] = packed
        del scratch
        # Streaming slots, sized from the actual encodings.
        staged = [self.encoded[g].length for g, t in tiers.items() if t in STAGED_TIERS]
        self.plan.staging_bytes = max(staged) if staged else 0
        self.plan.resident_bytes = sum(self.resident[g].numel() for g in self.resident) + sum(
            self.dev_store[g].numel() for g in self.dev_store)
        float_bytes = self._float_bytes
        self._float_scratch = torch.empty(float_bytes, dtype=torch.uint8, device=dev) if float_bytes else None
        self.slots: list[_Slot] = []
        for k in range(self.plan.slots):
            out = torch.empty(self.plan.slot_bytes, dtype=torch.uint8, device=dev)
            self.slots.append(_Slot(k, out, events=(torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event())))
        n_staging = self.plan.staging_buffers
        self.stagings = [torch.empty(self.plan.staging_bytes, dtype=torch.uint8, device=dev) for _ in range(n_staging)]
        # per staging buffer: recorded on the decode stream after the decode that read it (None: unused yet)
        self._staging_read: list[torch.cuda.Event | None] = [None] * n_staging
        self._staging_events = [torch.cuda.Event() for _ in range(n_staging)]
        self._copies = 0
        disk = {g: self.layouts[g].file_length for g, t in tiers.items() if t == "disk"}
        self.disk_reader = GroupReader(self._read_group_into, disk, buffers=self.read_ahead + 1) if disk else None
        self._copy_pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cllm-disk-copy") if disk else None

    def _settle_codecs(self) -> None:
        """Codecs used only at load (zstd for transcoding, the gpu tier or the row tables) hold
        device scratch: release those no streamed group decodes at run time; reserve the scratch
        of those that do."""
        tiers = self.plan.tiers
        needed = {self.encoded[g].codec for g, t in tiers.items() if t != "gpu"}
        for name in self.decoder.codecs_in_use():
            if name not in needed:
                self.decoder.release_codec(name)
        for tier in {t for t in tiers.values() if t != "gpu"}:
            codec, nbytes = self._decode_scratch.get(tier, ("", 0))
            if codec in needed:
                self.decoder.reserve_scratch(codec, nbytes)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    # --- scheduling -------------------------------------------------------------------------

    def _pick_slot(self, exclude: set[int]) -> _Slot:
        """The least recently used slot not holding a group in `exclude`."""
        candidates = [s for s in self.slots if s.gid not in exclude]
        if not candidates:
            raise RuntimeError("all streaming slots are in use (too many groups active at once)")
        return min(candidates, key=lambda s: s.last_used)

    def _schedule(self, gid: int, exclude: set[int]) -> _Slot:
        """Enqueue copy + decode of group `gid` into a free slot; returns the slot."""
        lay = self.layouts[gid]
        tier = self.plan.tiers[gid]
        slot = self._pick_slot(exclude)
        if slot.gid is not None:
            self._active.pop(slot.gid, None)
        self._clock += 1
        slot.last_used = self._clock
        slot.gid = gid
        enc = self.encoded[gid]
        trace = self.timeline.scheduled(gid, tier, enc.length) if self.timeline is not None else None
        j = None  # staging buffer: with as many as slots, the slot's own; else the next in turn
        if tier != "gpu-compressed":
            n = len(self.stagings)
            j = slot.index if n == len(self.slots) else self._copies % n
            self._copies += 1
        key = (gid, slot.index, j)
        bound = self._bound.get(key)
        if bound is None:  # this group's source view and prepared decode into this slot, once
            src = self.dev_store[gid] if j is None else self.stagings[j][: enc.length]
            bound = self._bound[key] = (src, self.decoder.bind(enc, lay, src, slot.out))
        src, decode = bound
        if j is not None:
            disk_buffer = None
            if tier == "disk":
                host, disk_buffer = self.disk_reader.take(gid)  # read ahead on the reader's thread
            else:
                host = self.host_store[gid]
            if self._staging_read[j] is not None:  # the decode that last read this staging buffer
                self.copy_stream.wait_event(self._staging_read[j])
            if trace is not None:
                self.timeline.mark(trace, "copy_start", self.copy_stream)
            self._h2d.copy(src, host)
            copied = slot.events[2]
            copied.record(self.copy_stream)
            if trace is not None:
                self.timeline.mark(trace, "copy_end", self.copy_stream)
            self.stats["copies"] += 1
            if disk_buffer is not None:
                self.disk_reader.give_back(disk_buffer, copied)
                self._read_ahead_after(gid)
            self.decode_stream.wait_event(copied)
        if slot.free_event is not None:
            self.decode_stream.wait_event(slot.free_event)
        if trace is not None:
            self.timeline.mark(trace, "decode_start", self.decode_stream)
        decode()
        if trace is not None:
            self.timeline.mark(trace, "decode_end", self.decode_stream)
        slot.ready_event = slot.events[0]
        slot.ready_event.record(self.decode_stream)
        if j is not None:
            self._staging_read[j] = self._staging_events[j]
            self._staging_read[j].record(self.decode_stream)
        slot.free_event = None
        self.stats["decodes"] += 1
        self._active[gid] = slot
        return slot

    def _acquire(self, gid: int) -> _Slot:
        slot = self._active.get(gid)
        if slot is None:
            busy = {self._current} if self._current not in (None, gid) else set()
            slot = self._schedule(gid, exclude=busy)
        if self.timeline is not None:
            trace = self.timeline.acquired(gid, self.plan.tiers[gid], self.encoded[gid].length)
            self.timeline.mark(trace, "wait_start", self._compute_stream)
        self._compute_stream.wait_event(slot.ready_event)
        if self.timeline is not None:
            self.timeline.mark(trace, "compute_start", self._compute_stream)
        return slot

    def _read_group_into(self, gid: int, dst: np.ndarray) -> None:
        """Copy a disk-tier group from the file mapping into pinned memory (on the reader's
        thread); verify it the first time it is read."""
        view = self.file.group_bytes(gid)
        try:
            src = np.frombuffer(view, dtype=np.uint8)
            # one thread copies ~5 GB/s out of the page cache: split the group over a few
            slices = [slice(a, min(a + READ_SLICE, len(src))) for a in range(0, len(src), READ_SLICE)]
            list(self._copy_pool.map(lambda sl: np.copyto(dst[sl], src[sl]), slices))
            del src
        finally:
            view.release()
        if self.verify and gid not in self._verified:
            verify_group(self.file, self.layouts[gid], memoryview(dst))
            self._verified.add(gid)

    def _read_ahead_after(self, gid: int) -> None:
        """Ask the disk reader for the groups expected after `gid` (learned order)."""
        for _ in range(self.read_ahead):
            gid = self._next.get(gid)
            if gid is None or self.plan.tiers.get(gid) != "disk":
                return
            self.disk_reader.request(gid)

    def _release_transients(self) -> None:
        for gid in self._transient:
            slot = self._active.get(gid)
            if slot is not None:
                slot.free_event = slot.events[1]
                slot.free_event.record(self._compute_stream)
            if self.timeline is not None:
                self.timeline.released(gid, self._compute_stream)
        self._transient.clear()

    def _note_order(self, gid: int) -> None:
        if self._last_gid is not None and self._last_gid != gid:
            self._next[self._last_gid] = gid
        self._last_gid = gid

    def _prefetch_after(self, gid: int) -> None:
        """Schedule the streamed groups expected after `gid` (learned order), as many as there
        are slots besides the one `gid` computes in: with slots=3, two groups ahead."""
        if not self.prefetch:
            return
        keep = {gid} if self._current is None else {gid, self._current}  # never evict a group in use
        nxt = gid
        for _ in range(len(self.slots) - len(keep)):
            nxt = self._next.get(nxt)
            if nxt is None or nxt in keep:
                return
            if self.plan.tiers.get(nxt, "gpu") == "gpu":
                continue  # resident: nothing to fetch, look further (it uses no slot)
            if nxt not in self._active:
                self._schedule(nxt, exclude=keep)
                self.stats["prefetched"] += 1
            keep.add(nxt)

    # --- WeightProvider ---------------------------------------------------------------------

    def begin_group(self, group: int) -> None:
        # the stream the block computes on (read once per group: scheduling uses it many times)
        self._compute_stream = torch.cuda.current_stream(self.device)
        self._release_transients()
        self._current = group
        if group not in self.layouts:
            return
        self._note_order(group)
        if self.plan.tiers[group] != "gpu":
            self._acquire(group)
        self._prefetch_after(group)

    def end_group(self, group: int) -> None:
        self._current = None
        slot = self._active.get(group)
        if slot is not None:
            slot.free_event = slot.events[1]
            slot.free_event.record(self._compute_stream)
        if self.timeline is not None:
            self.timeline.released(group, self._compute_stream)

    def _group_buffer(self, gid: int) -> torch.Tensor:
        """The decoded bytes of group `gid` for the current forward: its resident buffer (gpu
        tier) or the slot it is (being) decoded into."""
        if self.plan.tiers[gid] == "gpu":
            return self.resident[gid]
        if gid != self._current:
            # A layer outside any hooked block (e.g. lm_head): decode on demand, free lazily.
            self._compute_stream = torch.cuda.current_stream(self.device)
            self._release_transients()
            self._note_order(gid)
            slot = self._acquire(gid)
            self._transient.append(gid)
            self._prefetch_after(gid)
        else:
            slot = self._active[gid]
        return slot.out

    def linear_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._resident_views.get(name)
        if hit is not None:  # gpu tier: the same two views every call
            return hit
        stored = self.file.index.aliases.get(name, name)
        gid = self._tensor_group[stored]
        return self._cached_views(name, stored, gid, self.layouts[gid].tensors[stored])

    def _cached_views(self, asked, key, gid: int, sl) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of slice `sl` of group `gid` for this forward: of its resident buffer (cached
        under `asked`, the name callers use), or of the slot it is decoded into (cached per slot
        under `key`: a slot's buffer lives as long as the provider, so its views do too)."""
        if self.plan.tiers[gid] == "gpu":
            views = self._resident_views[asked] = self._views(self.resident[gid], sl)
            return views
        buf = self._group_buffer(gid)
        slot = self._active[gid]
        views = self._slot_views.get((key, slot.index))
        if views is None:
            views = self._slot_views[(key, slot.index)] = self._views(buf, sl)
        return views

    @property
    def needs_group_hooks(self) -> bool:
        """Whether the loader must bracket each group's forward with begin_group / end_group:
        only groups that stream need it (all resident: nothing to schedule or prefetch)."""
        return any(t != "gpu" for t in self.plan.tiers.values())

    @property
    def row_lookup_tables(self) -> list[str]:
        """Embedding tables served by row lookups in host memory instead of being streamed."""
        return [name for lay in self._rows_only.values() for name in lay.tensors]

    def fusion_sets(self) -> list[tuple[str, ...]]:
        """Sibling weights decoded back to back (see layout.FusedSlice), by member names: the
        loader links their modules so that one launch computes all of them (runtime/modules.py)."""
        return [members for lay in self.layouts.values() for members in lay.fused]

    def fused_weight(self, members: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 rows of every member, back to back ([sum of rows, cols]), and their scales:
        views of the group's decoded buffer, valid like linear_weight's."""
        hit = self._resident_views.get(members)
        if hit is not None:
            return hit
        gid = self._tensor_group[members[0]]
        return self._cached_views(members, members, gid, self.layouts[gid].fused[members])

    def float_weight(self, name: str) -> torch.Tensor:
        """A lossless (float_planes) weight for one forward, bit-exact: its planes are decoded
        with the group (nvCOMP, in the slot; resident in the gpu tier) and re-interleaved here
        into one scratch buffer (runtime/planes.py), valid until the next float_weight call on
        this stream. Tensors outside the streamed layouts are decoded on the CPU."""
        name = self.file.index.aliases.get(name, name)
        gid = self._planes_group.get(name)
        if gid is None:
            return self.cpu_fallback.float_weight(name).to(self.device, non_blocking=True)
        ps = self.layouts[gid].planes[name]
        buf = self._group_buffer(gid)
        dtype = DTYPE_TO_TORCH[ps.dtype]
        k = C.FLOAT_PLANES_LAYOUT[ps.dtype][2]
        out = self._float_scratch[: ps.numel * dtype.itemsize].view(dtype)
        validate = ps.dtype == C.DType.F16 and name not in self._planes_checked  # spare bits, once
        interleave_planes(buf[ps.exp_offset : ps.exp_offset + ps.numel],
                          buf[ps.sm_offset : ps.sm_offset + k * ps.numel], dtype, out=out,
                          validate=validate, where=f"tensor {name!r}")
        self._planes_checked.add(name)
        self.stats["float_calls"] += 1
        return out.view(ps.shape)

    _views = staticmethod(slice_views)

    def embedding_rows(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.file.index.aliases.get(name, name)
        gid = self._tensor_group.get(name)
        # Rows on the GPU from the decoded table: resident (gpu tier), or the group decoded into
        # a slot like any streamed group where the file stores it as ANS (the CPU cannot decode
        # ANS: its fallback would run nvCOMP once per call, outside the pipeline). Rows of a zstd
        # table in a streaming tier are decoded on the CPU, only the chunks that hold them.
        if gid is not None and (self.plan.tiers[gid] == "gpu" or self.layouts[gid].codec == "ans"):
            q, s = self.linear_weight(name)
            flat = ids.reshape(-1).to(self.device)
            return q.index_select(0, flat), s.index_select(0, flat)
        table = self._mapped_tables.get(name)
        if table is not None:  # pinned host memory the GPU gathers from: no copy, no synchronization
            flat = ids.reshape(-1).to(self.device, non_blocking=True)
            return table[0].index_select(0, flat), table[1].index_select(0, flat)
        table = self._host_tables.get(name)
        if table is not None:  # an ANS table decoded at load into host memory
            flat = ids.reshape(-1).cpu()
            lo, hi = (int(flat.min()), int(flat.max())) if flat.numel() else (0, 0)
            if lo < 0 or hi >= table[0].shape[0]:
                raise IndexError(f"embedding {name!r}: id {lo if lo < 0 else hi} out of range [0, {table[0].shape[0]})")
            return (table[0].index_select(0, flat).to(self.device, non_blocking=True),
                    table[1].index_select(0, flat).to(self.device, non_blocking=True))
        q, s = self.cpu_fallback.embedding_rows(name, ids.reshape(-1).cpu())
        return q.to(self.device), s.to(self.device)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        if self.disk_reader is not None:
            self.disk_reader.close()
            self._copy_pool.shutdown(wait=True)
        self.decoder.close()
        self.slots.clear()
        self.stagings.clear()
        self._host_tables.clear()
        self._mapped_tables.clear()
        self._resident_views.clear()
        self._slot_views.clear()
        self._bound.clear()
        self.resident.clear()
        self.dev_store.clear()
        self.host_store.clear()
        self._active.clear()
