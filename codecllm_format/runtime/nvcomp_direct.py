"""Per-forward group decodes through nvCOMP's C API (libnvcomp, the library under nvCOMP's
Python package, loaded with the loader that package ships).

nvCOMP's Python API does per-chunk work on the host at every call (about 0.15 us per chunk:
0.1 ms for a TinyLlama block of 672 chunks, 0.5 ms for a Llama-2-7B block of 3,100), which the
streaming tiers pay once per layer group per token. The batched C functions take device tables
of chunk pointers and sizes; here those tables are built once per (group, source buffer, output
buffer) and kept on the device, so a decode is one C call of a few microseconds.

Only the two codecs the runtime streams use it (ANS, Zstd; their decompression options and
signatures are those of nvCOMP 6.0's nvcomp/ans.h and nvcomp/zstd.h). Anything missing (another
nvCOMP major version, a symbol, the library) leaves the Python API in charge:
`direct_unavailable()` says why. CODECLLM_NVCOMP_DIRECT=0 switches it off.

The first decode of every table is checked: the stream is synchronized and every chunk's
status and decoded size are read back (DecodeError otherwise); later decodes of the same
table only enqueue work.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

from ..errors import DecodeError

SUCCESS = 0
NVCOMP_TYPE_BITS = 0xFF  # ANS: read the data type from the bitstream


class AnsDecompressOpts(ctypes.Structure):
    """nvcompBatchedANSDecompressOpts_t (nvCOMP 6.0): 64 bytes."""

    _fields_ = [("backend", ctypes.c_int), ("data_type", ctypes.c_int), ("max_sub_chunk_count", ctypes.c_uint8),
                ("states_per_lane", ctypes.c_uint8), ("skip_validate", ctypes.c_uint8), ("reserved", ctypes.c_char * 53)]


class ZstdDecompressOpts(ctypes.Structure):
    """nvcompBatchedZstdDecompressOpts_t (nvCOMP 6.0): 64 bytes."""

    _fields_ = [("backend", ctypes.c_int), ("reserved", ctypes.c_char * 60)]


def _default_opts(codec: str):
    if codec == "ans":
        return AnsDecompressOpts(0, NVCOMP_TYPE_BITS, 0, 0, 0)  # nvcompBatchedANSDecompressDefaultOpts
    return ZstdDecompressOpts(0)  # nvcompBatchedZstdDecompressDefaultOpts


_SYMBOLS = {"ans": ("ANS", AnsDecompressOpts), "zstd": ("Zstd", ZstdDecompressOpts)}
CODECS = tuple(_SYMBOLS)

_lock = threading.Lock()
_state: dict = {}


def _bind(lib, codec: str):
    """(temp_size_fn, decompress_fn) of `codec` with their ctypes signatures."""
    name, opts = _SYMBOLS[codec]
    temp = getattr(lib, f"nvcompBatched{name}DecompressGetTempSize")
    temp.restype = ctypes.c_int
    temp.argtypes = [ctypes.c_size_t, ctypes.c_size_t, opts, ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t,
                     ctypes.c_void_p]
    dec = getattr(lib, f"nvcompBatched{name}DecompressAsync")
    dec.restype = ctypes.c_int
    dec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, opts, ctypes.c_void_p, ctypes.c_void_p]
    return temp, dec


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        why = None
        fns = {}
        if os.environ.get("CODECLLM_NVCOMP_DIRECT", "1").lower() in ("0", "false", "off", "no"):
            why = "switched off (CODECLLM_NVCOMP_DIRECT=0)"
        else:
            try:
                import nvidia.libnvcomp as libpkg  # noqa: PLC0415 - the wheel nvidia-nvcomp depends on

                version = str(getattr(libpkg, "__version__", "0"))
                if not version.startswith("6."):
                    why = f"libnvcomp {version}: the C signatures used here are nvCOMP 6's"
                else:
                    lib = libpkg.load_library()
                    if lib is None:
                        why = "libnvcomp could not be loaded"
                    else:
                        for codec in CODECS:
                            fns[codec] = _bind(lib, codec)
            except Exception as e:  # noqa: BLE001 - any failure means: use the Python API
                why = f"{type(e).__name__}: {e}"
                fns = {}
        if ctypes.sizeof(AnsDecompressOpts) != 64 or ctypes.sizeof(ZstdDecompressOpts) != 64:
            why, fns = "decompression options are not 64 bytes", {}
        _state.update(why=why, fns=fns)
        return _state


def direct_unavailable(codec: str | None = None) -> str | None:
    """Why decodes of `codec` (any, when None) go through the Python API, or None."""
    st = _load()
    if st["why"] is not None:
        return st["why"]
    if codec is not None and codec not in st["fns"]:
        return f"codec {codec!r} is decoded through the Python API"
    return None


def chunk_table(src_ptr: int, in_offsets, in_sizes, out_ptr: int, out_offsets, out_sizes) -> np.ndarray:
    """The int64 [4, n] table a batched decode reads: compressed chunk addresses, compressed
    sizes, output buffer sizes, output chunk addresses."""
    return np.stack([
        src_ptr + np.asarray(in_offsets, dtype=np.int64),
        np.asarray(in_sizes, dtype=np.int64),
        np.asarray(out_sizes, dtype=np.int64),
        out_ptr + np.asarray(out_offsets, dtype=np.int64),
    ])


class DirectBatch:
    """One prepared decode: device tables plus the buffers they point into (kept alive)."""

    __slots__ = ("table", "actual", "statuses", "n", "max_out", "total_out", "expected", "src", "out", "checked",
                 "args", "temp")

    def __init__(self, table: torch.Tensor, n: int, out_sizes: np.ndarray, src: torch.Tensor, out: torch.Tensor):
        self.table = table
        self.n = n
        self.max_out = int(out_sizes.max()) if n else 0
        self.total_out = int(out_sizes.sum())
        self.expected = out_sizes
        self.actual = torch.empty(n, dtype=torch.int64, device=table.device)
        self.statuses = torch.empty(n, dtype=torch.int32, device=table.device)
        self.src, self.out = src, out
        self.checked = False
        self.args = None  # the C call's arguments, built at the first decode ...
        self.temp = None  # ... with this scratch buffer (rebuilt if the scratch grew since)


class DirectDecoder:
    """Batched decodes of one codec on one stream through libnvcomp.

    Args:
        codec: "ans" or "zstd".
        device: the CUDA device.
        stream: the torch CUDA stream every decode is enqueued on.
    """

    def __init__(self, codec: str, device: torch.device, stream: torch.cuda.Stream):
        why = direct_unavailable(codec)
        if why is not None:
            raise RuntimeError(why)
        self.codec = codec
        self.device = device
        self.stream = stream
        self._temp_size_fn, self._decode_fn = _load()["fns"][codec]
        self._opts = _default_opts(codec)
        self._temp = torch.empty(0, dtype=torch.uint8, device=device)

    def temp_bytes(self, num_chunks: int, max_chunk: int, total: int) -> int:
        """nvCOMP's temporary memory for decoding `num_chunks` chunks of at most `max_chunk` and
        `total` decoded bytes (no work is enqueued)."""
        temp = ctypes.c_size_t(0)
        status = self._temp_size_fn(num_chunks, max_chunk, self._opts, ctypes.byref(temp), total, self.stream.cuda_stream)
        if status != SUCCESS:
            raise DecodeError(f"nvCOMP {self.codec}: temporary size query failed (status {status})")
        return int(temp.value)

    def reserve(self, nbytes: int) -> None:
        """Grow the scratch to `nbytes` now (load time), so decodes never allocate it later."""
        if nbytes > self._temp.numel():
            self.stream.synchronize()  # decodes in flight may still use the old scratch
            self._temp = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def prepare(self, src: torch.Tensor, in_offsets, in_sizes, out: torch.Tensor, out_offsets, out_sizes) -> DirectBatch:
        """Device tables for decoding the chunks at `in_offsets` of `src` into `out` (a host->device
        copy of the tables; nvCOMP's scratch grows to fit)."""
        out_sizes = np.asarray(out_sizes, dtype=np.int64)
        n = len(out_sizes)
        table = torch.from_numpy(chunk_table(src.data_ptr(), in_offsets, in_sizes, out.data_ptr(), out_offsets, out_sizes))
        with torch.cuda.stream(self.stream):
            batch = DirectBatch(table.to(self.device, non_blocking=False), n, out_sizes, src, out)
        self.reserve(self.temp_bytes(n, batch.max_out, batch.total_out))
        return batch

    def decode(self, batch: DirectBatch, where: str = "") -> None:
        """Enqueue the batch's decode on the stream; the first decode of a batch is checked
        (synchronizes; DecodeError naming the first bad chunk)."""
        args = batch.args
        if args is None or batch.temp is not self._temp:
            t = batch.table
            row = t.stride(0) * t.element_size()
            base = t.data_ptr()
            args = batch.args = (base, base + row, base + 2 * row, batch.actual.data_ptr(), batch.n,
                                 self._temp.data_ptr() if self._temp.numel() else None, self._temp.numel(),
                                 base + 3 * row, self._opts, batch.statuses.data_ptr(), self.stream.cuda_stream)
            batch.temp = self._temp
        status = self._decode_fn(*args)
        if status != SUCCESS:
            raise DecodeError(f"{where}: nvCOMP {self.codec} decode could not be launched (status {status})")
        if not batch.checked:
            self.stream.synchronize()
            statuses = batch.statuses.cpu().numpy()
            actual = batch.actual.cpu().numpy()
            bad = np.flatnonzero((statuses != SUCCESS) | (actual != batch.expected))
            if bad.size:
                i = int(bad[0])
                raise DecodeError(f"{where}: nvCOMP {self.codec} could not decode chunk {i} (status {int(statuses[i])}, "
                                  f"{int(actual[i])} bytes decoded for {int(batch.expected[i])}); "
                                  f"{bad.size} of {batch.n} chunks failed")
            batch.checked = True
