"""Probe nvCOMP's Python API on the GPU machine: API docs, bit-exactness of batched zstd decode
of CPU-written frames, and decode throughput per codec. Usage: python tools/probe_nvcomp.py"""
import sys, time, traceback
import numpy as np
import torch
import zstandard
from nvidia import nvcomp

def section(name):
    print(f"\n===== {name}", flush=True)

section("versions")
print("nvcomp", nvcomp.__version__, "cuda", nvcomp.__cuda_version__, "torch", torch.__version__, torch.cuda.get_device_name())
print([n for n in dir(nvcomp) if not n.startswith("_")])
if "--doc" in sys.argv:
    for obj in (nvcomp.Codec, nvcomp.as_arrays, nvcomp.as_array, nvcomp.BatchArray, nvcomp.DecompressConfig, nvcomp.Array, nvcomp.CudaStream):
        section(f"help {getattr(obj, '__name__', obj)}")
        try:
            print(obj.__doc__)
            for m in dir(obj):
                if not m.startswith("_"):
                    a = getattr(obj, m)
                    print(f"--- {m}:", (getattr(a, "__doc__", "") or "")[:3000])
        except Exception:
            traceback.print_exc()

def timeit(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return float(np.median(ts))

section("zstd batched decode of CPU frames")
rng = np.random.default_rng(0)
n = 64 << 20
w = rng.standard_normal(n // 4096 * 4096).astype(np.float32).reshape(-1, 4096)
q = np.clip(np.round(w / (np.abs(w).max(1, keepdims=True) / 127)), -127, 127).astype(np.int8)
raw = q.tobytes()
cs = 65536
cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
frames = [cctx.compress(raw[i:i + cs]) for i in range(0, len(raw), cs)]
offs, pos, buf = [], 0, bytearray()
for f in frames:
    pad = (-pos) % 16
    buf += b"\0" * pad; pos += pad
    offs.append(pos); buf += f; pos += len(f)
print("chunks", len(frames), "ratio", len(raw) / len(buf))
host = torch.frombuffer(bytes(buf), dtype=torch.uint8).pin_memory()
dev = host.cuda()
sizes = [len(f) for f in frames]
out_t = torch.empty(len(raw), dtype=torch.int8, device="cuda")
try:
    codec = nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW)
    srcs = nvcomp.as_arrays(dev, offsets=offs, sizes=sizes) if True else None
    print("srcs", type(srcs), len(srcs))
    outs = nvcomp.as_arrays(out_t.view(torch.uint8), offsets=list(range(0, len(raw), cs)), sizes=[min(cs, len(raw) - i) for i in range(0, len(raw), cs)])
    res = codec.decode(srcs, out=outs)
    torch.cuda.synchronize()
    print("decode result", type(res))
    ok = torch.equal(out_t.cpu(), torch.from_numpy(q.reshape(-1)))
    print("bit-exact vs CPU:", ok)
    ms = timeit(lambda: codec.decode(srcs, out=outs))
    print(f"zstd decode {len(raw)/ms/1e6:.1f} GB/s (ms {ms:.3f})")
except Exception:
    traceback.print_exc()

section("H2D")
dst = torch.empty_like(host, device="cuda")
ms = timeit(lambda: dst.copy_(host, non_blocking=True))
print(f"pinned H2D {host.numel()/ms/1e6:.1f} GB/s")

section("other codecs on int8 (GPU encode, decode)")
qt = torch.from_numpy(q.reshape(-1)).cuda()
for alg, kw in [("ANS", {}), ("Bitcomp", {}), ("GDeflate", {}), ("LZ4", {}), ("Zstd", {}), ("Cascaded", {})]:
    try:
        c = nvcomp.Codec(algorithm=alg, bitstream_kind=nvcomp.BitstreamKind.RAW, **kw)
        chunks = nvcomp.as_arrays(qt.view(torch.uint8), offsets=list(range(0, len(raw), cs)), sizes=[cs] * (len(raw) // cs))
        enc = c.encode(chunks)
        torch.cuda.synchronize()
        comp = sum(enc[i].buffer_size for i in range(len(enc))) if hasattr(enc[0], "buffer_size") else -1
        dec_out = nvcomp.as_arrays(torch.empty_like(qt).view(torch.uint8), offsets=list(range(0, len(raw), cs)), sizes=[cs] * (len(raw) // cs))
        ms_e = timeit(lambda: c.encode(chunks), reps=5)
        ms_d = timeit(lambda: c.decode(enc, out=dec_out))
        print(f"{alg:9s} ratio {len(raw)/comp:.3f} encode {len(raw)/ms_e/1e6:.0f} GB/s decode {len(raw)/ms_d/1e6:.0f} GB/s")
    except Exception as e:
        print(alg, "failed:", type(e).__name__, e)
