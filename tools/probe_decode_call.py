"""What one batched nvCOMP group decode costs the host, by chunk size, and whether it can be
captured in a CUDA graph.

A synthetic layer group (int8 values quantized from Gaussian weights, `--mib` MiB, chunked like a
.cllm at 64 KiB) is encoded on the GPU with merged chunks of each `--chunks` size (the runtime's
GroupDecoder.encode_packed), then for each:

  host us    time the decode call takes on the calling thread (streams idle), median
  gpu us     time the decode takes on the GPU (CUDA events), median; GB/s of decoded output
  gil        with --gil: how much a Python loop on the main thread slows down while another
             thread issues decode calls back to back (near 0%: nvCOMP releases the GIL, so a
             decode thread would take the call off the thread that launches compute)
  graph      with --graph: the decode captured in a torch.cuda.CUDAGraph on the decoder's
             stream (whether capture works; nvCOMP 6.0 on an H200: it does not, and a failed
             capture leaves the device unusable for the rest of the process, so it runs last)

Every decode is checked bit for bit against the source bytes.

    python tools/probe_decode_call.py --codec ans --chunks 65536,262144,1048576 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codecllm_format.runtime.layout import GroupLayout  # noqa: E402
from codecllm_format.runtime.nvcomp_decoder import GroupDecoder  # noqa: E402


def synthetic_layout(nbytes: int, chunk: int) -> GroupLayout:
    n = -(-nbytes // chunk)
    out_offsets = np.arange(n, dtype=np.int64) * chunk
    out_sizes = np.minimum(chunk, nbytes - out_offsets).astype(np.int64)
    zeros = np.zeros(n, dtype=np.int64)
    return GroupLayout(gid=0, name="probe", file_offset=0, file_length=0, in_offsets=zeros, in_sizes=zeros,
                       out_offsets=out_offsets, out_sizes=out_sizes, checksums=zeros.astype(np.uint64),
                       decoded_bytes=nbytes, tensors={}, shape_key=("probe", n, nbytes))


def gil_slowdown(dec, enc, layout, packed, out, seconds: float = 0.5) -> float:
    """Fraction by which a pure-Python loop on this thread slows down while another thread
    issues decode calls back to back."""
    import threading

    def spin(stop_at):
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
        return n

    base = spin(time.perf_counter() + seconds)
    stop = threading.Event()

    def worker():
        with torch.cuda.stream(dec.stream):
            while not stop.is_set():
                dec.decode(enc, layout, packed, out)
                dec.stream.synchronize()

    t = threading.Thread(target=worker)
    t.start()
    loaded = spin(time.perf_counter() + seconds)
    stop.set()
    t.join()
    return 1 - loaded / base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--codec", default="ans", choices=("ans", "zstd", "bitcomp", "gdeflate"))
    ap.add_argument("--mib", type=float, default=42.0, help="decoded group size (default 42: a TinyLlama block)")
    ap.add_argument("--chunks", default="65536,262144,1048576,4194304", help="merged chunk sizes to try (bytes)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--gil", action="store_true", help="measure whether decode calls hold the GIL")
    ap.add_argument("--graph", action="store_true", help="try CUDA graph capture (last: a failure poisons the process)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_decode_call needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    nbytes = int(args.mib * 2**20) // 256 * 256
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(nbytes, generator=g, device=dev)
    data = (w / w.abs().max() * 127 * 4).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)  # ~5-6 bits of entropy
    layout = synthetic_layout(nbytes, 65536)
    stream = torch.cuda.Stream(dev)
    dec = GroupDecoder(dev, stream)
    out = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "codec": args.codec,
               "decoded_bytes": nbytes, "date": time.strftime("%Y-%m-%d"), "by_chunk": {}}
    print(f"{args.codec}, {nbytes / 2**20:.1f} MiB group on {results['device']}")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        r: dict = {}
        try:
            packed, enc = dec.encode_packed(args.codec, layout, data, chunk_bytes=0 if chunk == 65536 else chunk)
        except Exception as e:  # noqa: BLE001 - report and go on with the next size
            print(f"  chunk {chunk}: encode failed: {type(e).__name__}: {e}")
            results["by_chunk"][chunk] = {"error": f"encode: {type(e).__name__}: {e}"}
            continue
        r["chunks"] = int(len(enc.in_sizes))
        r["ratio"] = nbytes / enc.length
        host, gpu = [], []
        for _ in range(args.repeats):
            out.zero_()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            t0 = time.perf_counter()
            dec.decode(enc, layout, packed, out)
            host.append((time.perf_counter() - t0) * 1e6)
            b.record(stream)
            b.synchronize()
            gpu.append(a.elapsed_time(b) * 1e3)
        r["exact"] = bool(torch.equal(out, data))
        r["host_us"] = statistics.median(host[2:])
        r["gpu_us"] = statistics.median(gpu[2:])
        r["gbps"] = nbytes / (r["gpu_us"] * 1e-6) / 1e9
        if args.gil:
            r["gil_slowdown"] = gil_slowdown(dec, enc, layout, packed, out)
        results["by_chunk"][chunk] = r
        print(f"  chunk {chunk:>8}: {r['chunks']:5d} chunks, ratio {r['ratio']:.3f}, exact {r['exact']}, host "
              f"{r['host_us']:.0f} us, GPU {r['gpu_us']:.0f} us ({r['gbps']:.0f} GB/s)"
              + (f", main-thread slowdown while a thread decodes {100 * r['gil_slowdown']:.0f}%" if args.gil else ""), flush=True)
        last = (packed, enc)
    if args.graph:
        packed, enc = last
        try:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                dec.decode(enc, layout, packed, out)
            out.zero_()
            torch.cuda.synchronize()
            reps = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                graph.replay()
                reps.append((time.perf_counter() - t0) * 1e6)
                torch.cuda.synchronize()
            results["graph"] = {"captured": True, "exact": bool(torch.equal(out, data)),
                                "replay_host_us": statistics.median(reps)}
        except Exception as e:  # noqa: BLE001 - the point is to learn whether it works
            results["graph"] = {"captured": False, "error": f"{type(e).__name__}: {e}"[:300]}
        print(f"  CUDA graph capture of a decode: {results['graph']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    import os

    os._exit(rc)
