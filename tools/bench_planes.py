"""Benchmark the GPU decode of a lossless (FLOAT_PLANES) bf16 tensor: nvCOMP ANS decode of the
exponent plane + the Triton re-interleave (runtime/planes.py), on one CUDA GPU.

    python tools/bench_planes.py [--numel N] [--chunk-kib 64] [--codec ans] [--reps 20]

A tensor of one Llama-2-7B transformer block's size (default 202,375,168 values: q, k, v, o
4096x4096 and gate, up, down 4096x11008) of random normal * 0.02 cast to bf16 is split into
planes on the CPU (codecllm_format.planes.split_planes, as the writer does). The exponent plane
is copied to the GPU, cut into chunks as the file's stream is, and transcoded to nvCOMP ANS on
the GPU (GroupDecoder.encode_packed, what the runtime does at load); the sign_mantissa plane
stays resident as plain bytes (in the file it is zstd raw blocks: nothing to gain from a codec).
Timed, with CUDA events after warm-up, median of --reps: ANS decode of the exponent chunks,
the interleave, and both back to back on one stream. Bit-exactness against the source tensor is
checked after the timed runs. Prints GB/s of bf16 output (2 bytes per value) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codecllm_format.planes import exponent_entropy_bits, split_planes  # noqa: E402
from codecllm_format.runtime.layout import GroupLayout  # noqa: E402
from codecllm_format.runtime.nvcomp_decoder import GroupDecoder  # noqa: E402
from codecllm_format.runtime.planes import interleave_planes  # noqa: E402

LLAMA7B_BLOCK = 4 * 4096 * 4096 + 3 * 4096 * 11008


def _time(fn, stream: torch.cuda.Stream, reps: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() on `stream`, by CUDA events."""
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        stream.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return float(np.median(times))


def _pipelined(args, decoder: GroupDecoder, exponent: torch.Tensor, sign_mantissa: torch.Tensor, t: torch.Tensor,
               n: int, cs: int, dev: torch.device) -> dict:
    """Decode in `args.parts` batches of whole chunks on the decoder's stream; interleave each
    batch on a second stream as soon as its decode is done (bf16: the batch's planes are
    contiguous slices). Median ms of the whole, and bit-exactness."""
    try:
        nchunks = -(-n // cs)
        per = -(-nchunks // args.parts)
        parts = []
        for c0 in range(0, nchunks, per):
            a, b = c0 * cs, min(n, (c0 + per) * cs)
            offs = np.arange(0, b - a, cs, dtype=np.int64)
            sizes = np.minimum(cs, (b - a) - offs).astype(np.int64)
            lay = GroupLayout(gid=len(parts) + 1, name=f"part{len(parts)}", file_offset=0, file_length=0,
                              in_offsets=offs, in_sizes=sizes, out_offsets=offs, out_sizes=sizes,
                              checksums=np.zeros(len(offs), np.uint64), decoded_bytes=b - a, tensors={},
                              shape_key=("bench-part", len(offs), cs, b - a))
            packed, enc = decoder.encode_packed(args.codec, lay, exponent[a:b])
            parts.append((a, b, lay, packed, enc))
        exp_out = torch.empty(n, dtype=torch.uint8, device=dev)
        out = torch.empty(n, dtype=torch.bfloat16, device=dev)
        dstream, istream = decoder.stream, torch.cuda.Stream(dev)
        for a, b, lay, packed, enc in parts:  # build the decompression configs (they synchronize)
            decoder.decode(enc, lay, packed, exp_out[a:b])
        dstream.synchronize()

        def run() -> None:
            for a, b, lay, packed, enc in parts:
                decoder.decode(enc, lay, packed, exp_out[a:b])
                ev = torch.cuda.Event()
                ev.record(dstream)
                istream.wait_event(ev)
                with torch.cuda.stream(istream):
                    interleave_planes(exp_out[a:b], sign_mantissa[a:b], torch.bfloat16, out=out[a:b])
            done = torch.cuda.Event()
            done.record(istream)
            dstream.wait_event(done)  # the next run's decode waits for this run's interleave

        ms = _time(run, dstream, args.reps)
        torch.cuda.synchronize()
        exact = bool(torch.equal(out.cpu().view(torch.int16), t.view(torch.int16)))
        return {"parts": len(parts), "ms": ms, "gbps": 2 * n / ms / 1e6, "bit_exact": exact}
    except Exception as e:  # report, keep the main figures
        return {"parts": args.parts, "error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=LLAMA7B_BLOCK, help="values of the bf16 tensor (default: one Llama-2-7B block)")
    p.add_argument("--chunk-kib", type=int, default=64, help="exponent chunk size in KiB (the file's chunk size; default 64)")
    p.add_argument("--codec", default="ans", help="nvCOMP codec of the exponent plane in memory (ans, zstd, bitcomp, gdeflate)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--parts", type=int, default=8,
                   help="also time a pipelined variant: the chunks in PARTS batches, batch i's interleave (on a "
                   "second stream) overlapping batch i+1's decode (0: skip)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results as well")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", torch.cuda.current_device())
    n = args.numel
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    e_np, s_np = split_planes(t)
    h = exponent_entropy_bits(e_np)
    exponent = torch.from_numpy(e_np).to(dev)
    sign_mantissa = torch.from_numpy(s_np).to(dev)
    del e_np, s_np

    cs = args.chunk_kib * 1024
    nchunks = -(-n // cs)
    out_offsets = np.arange(nchunks, dtype=np.int64) * cs
    out_sizes = np.minimum(cs, n - out_offsets).astype(np.int64)
    layout = GroupLayout(gid=0, name="bench", file_offset=0, file_length=0, in_offsets=out_offsets, in_sizes=out_sizes,
                         out_offsets=out_offsets, out_sizes=out_sizes, checksums=np.zeros(nchunks, np.uint64),
                         decoded_bytes=n, tensors={}, shape_key=("bench", nchunks, cs))
    stream = torch.cuda.Stream(dev)
    decoder = GroupDecoder(dev, stream)
    torch.cuda.synchronize()
    packed, enc = decoder.encode_packed(args.codec, layout, exponent)
    exp_out = torch.empty(n, dtype=torch.uint8, device=dev)
    out = torch.empty(n, dtype=torch.bfloat16, device=dev)

    def decode():
        decoder.decode(enc, layout, packed, exp_out)

    def interleave():
        interleave_planes(exp_out, sign_mantissa, torch.bfloat16, out=out)

    def both():
        decode()
        interleave()

    decode()  # builds the decompression config (synchronizes once)
    stream.synchronize()
    ms_decode = _time(decode, stream, args.reps)
    ms_inter = _time(interleave, stream, args.reps)
    ms_both = _time(both, stream, args.reps)
    stream.synchronize()
    exact_exp = bool(torch.equal(exp_out, exponent))
    exact = bool(torch.equal(out.cpu().view(torch.int16), t.view(torch.int16)))
    pipelined = _pipelined(args, decoder, exponent, sign_mantissa, t, n, cs, dev) if args.parts > 1 else None

    out_bytes = 2 * n
    stored = int(enc.in_sizes.sum()) + n  # exponent chunks in memory + raw sign/mantissa
    res = {
        "device": torch.cuda.get_device_name(dev), "numel": n, "codec": args.codec, "chunk_kib": args.chunk_kib,
        "exponent_entropy_bits": h, "exponent_bits_stored": 8 * int(enc.in_sizes.sum()) / n,
        "ratio_in_memory": stored / out_bytes, "ratio_entropy_bound": (h / 8 + 1) / 2,
        "ms_decode": ms_decode, "ms_interleave": ms_inter, "ms_decode_plus_interleave": ms_both,
        "gbps_decode_plus_interleave": out_bytes / ms_both / 1e6, "gbps_interleave_only": out_bytes / ms_inter / 1e6,
        "exponent_bit_exact": exact_exp, "bit_exact": exact,
    }
    print(f"{res['device']}: {n} bf16 values ({out_bytes / 1e9:.3f} GB), exponent plane {args.codec} in "
          f"{args.chunk_kib} KiB chunks")
    print(f"  exponent: entropy {h:.3f} bits, {args.codec} {res['exponent_bits_stored']:.3f} bits; in memory "
          f"{res['ratio_in_memory']:.4f} of bf16 (order-0 bound {res['ratio_entropy_bound']:.4f})")
    print(f"  {args.codec} decode {ms_decode:.3f} ms, interleave {ms_inter:.3f} ms "
          f"({res['gbps_interleave_only']:.0f} GB/s of bf16), both {ms_both:.3f} ms: "
          f"{res['gbps_decode_plus_interleave']:.0f} GB/s of bf16 output (median of {args.reps})")
    print(f"  bit-exact: {exact} (exponent plane {exact_exp})")
    if pipelined is not None:
        res["pipelined"] = pipelined
        if "error" in pipelined:
            print(f"  pipelined: failed ({pipelined['error']})")
        else:
            print(f"  pipelined in {pipelined['parts']} batches (interleave of batch i overlaps decode of i+1): "
                  f"{pipelined['ms']:.3f} ms, {pipelined['gbps']:.0f} GB/s of bf16 output; bit-exact {pipelined['bit_exact']}")
            exact = exact and pipelined["bit_exact"]
    if args.json:
        print(json.dumps(res))
    decoder.close()
    return 0 if exact and exact_exp else 1


if __name__ == "__main__":
    raise SystemExit(main())
