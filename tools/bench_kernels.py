"""Benchmark the fused int8 Triton kernels against bf16 F.linear and naive dequantize+linear.

For Llama-2-7B linear shapes (out x in: 4096x4096, 11008x4096, 4096x11008, 32000x4096) and
activation rows M (default 1, 4, 16, 128), times on the GPU, with triton.testing.do_bench (median
after warm-up; do_bench also flushes L2 before every run) while rotating among several weight
buffers (together well over L2), and with CUDA-graph replays of all buffers back to back (no launch
gaps; --no-graph to skip):

  bf16       F.linear(x, W_bf16)                       (reads 2 bytes a weight)
  reference  kernels.int8_linear_reference             (dequantize to bf16, then F.linear)
  triton     triton_kernels.int8_linear_triton         (the dispatch int8_linear uses)
  gemv/gemm  the same kernels with the path forced     (M <= 16; shows the crossover)
  gemv-i2f   GEMV with the plain int8->float conversion (FAST_CVT=False, default config; M <= 16)

Prints a table (us, effective GB/s = stored weight bytes / time, speed-up over bf16, relative error
of the output against float64) and writes everything, plus the autotuner's choices and per-config
timings, the device and the measured device-copy bandwidth, as JSON to --json.

Usage (on a CUDA machine):  python tools/bench_kernels.py --json bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback

LLAMA2_7B = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, b = part.lower().split("x")
        out.append((int(a), int(b)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--json", help="write all results as JSON to this path")
    p.add_argument("--shapes", type=_parse_shapes, default=LLAMA2_7B,
                   help="comma-separated OUTxIN weight shapes (default: Llama-2-7B's four)")  # fmt: skip
    p.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 128],
                   help="comma-separated activation row counts (default 1,4,16,128)")  # fmt: skip
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--rotate-mb", type=float, default=256.0,
                   help="int8 weight buffers to rotate among, in MB (default 256; at least 2 buffers)")  # fmt: skip
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--no-autotune", action="store_true", help="CODECLLM_TRITON_AUTOTUNE=0: default configs only")
    p.add_argument("--device", default="cuda")
    p.add_argument("--group", type=int, default=0,
                   help="int8_group scales: one bfloat16 scale per GROUP input columns (a power of two; "
                   "default 0: per-row float32 scales)")
    return p.parse_args(argv)


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    if args.no_autotune:
        os.environ["CODECLLM_TRITON_AUTOTUNE"] = "0"
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing to time", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from codecllm_format.runtime import kernels
    from codecllm_format.runtime import triton_kernels as tk

    if tk.INTERPRET:
        print("bench_kernels: TRITON_INTERPRET is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(dev)
    report = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "total_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "autotune": tk.AUTOTUNE,
        "gemv_max_m": tk.GEMV_MAX_M,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: (v if not isinstance(v, list) else [list(t) if isinstance(t, tuple) else t for t in v])
                 for k, v in vars(args).items()},  # fmt: skip
        "copy_bandwidth_gbs": None,
        "results": [],
        "errors": [],
    }

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    # device-to-device copy ceiling (bytes read + written)
    try:
        a = torch.empty(2**30 // 4, dtype=torch.float32, device=dev).normal_()
        b = torch.empty_like(a)
        ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        report["copy_bandwidth_gbs"] = 2 * a.numel() * 4 / (ms * 1e-3) / 1e9
        del a, b
    except Exception as e:
        report["errors"].append(f"copy bandwidth: {e!r}")
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {report['copy_bandwidth_gbs'] or float('nan'):.0f} GB/s (read+write), dtype {args.dtype}, "
          f"autotune {tk.AUTOTUNE}", flush=True)  # fmt: skip

    def timing_do_bench(fns):
        it = [0]

        def call():
            fns[it[0] % len(fns)]()
            it[0] += 1

        return triton.testing.do_bench(call, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    def timing_graph(fns):
        """Median of replays of one graph running every buffer's call once, per call."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + args.rep_ms / 1e3
        while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / len(fns))
        del g
        return _median(times)

    for n, k in args.shapes:
        int8_bytes = n * k + (n * -(-k // args.group) * 2 if args.group else 4 * n)
        n_buf = max(2, min(32, math.ceil(args.rotate_mb * 1e6 / int8_bytes)))
        try:
            gen = torch.Generator(device=dev).manual_seed(n * 31 + k)
            qs, ss, ws = [], [], []
            for _ in range(n_buf):
                w = torch.randn(n, k, generator=gen, device=dev, dtype=torch.float32)
                if args.group:
                    from codecllm_format.quant import quantize_int8_groups

                    q, s = quantize_int8_groups(w, args.group, torch.bfloat16)
                else:
                    s = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
                    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
                qs.append(q)
                ss.append(s)
                ws.append(kernels.dequantize(q, s, dtype))  # the bf16 weight F.linear reads
                del w
        except Exception as e:
            report["errors"].append(f"{n}x{k}: allocating {n_buf} buffers: {e!r}")
            print(f"{n}x{k}: could not allocate buffers: {e!r}", flush=True)
            save()
            continue
        for m in args.m:
            x = torch.randn(m, k, generator=gen, device=dev, dtype=torch.float32).to(dtype)
            if args.group:
                ref64 = x.double() @ kernels.dequantize(qs[0], ss[0], torch.float64).t()
            else:
                ref64 = x.double() @ (qs[0].double() * ss[0].double()[:, None]).t()
            methods = {
                "bf16": (lambda i: F.linear(x, ws[i]), 2 * n * k),
                "reference": (lambda i: kernels.int8_linear_reference(x, qs[i], ss[i]), int8_bytes),
                "triton": (lambda i: tk.int8_linear_triton(x, qs[i], ss[i]), int8_bytes),
            }
            if m <= 16:
                methods["gemv"] = (lambda i: tk.int8_linear_triton(x, qs[i], ss[i], path="gemv"), int8_bytes)
                methods["gemm"] = (lambda i: tk.int8_linear_triton(x, qs[i], ss[i], path="gemm"), int8_bytes)
                methods["gemv-i2f"] = (
                    lambda i: tk.int8_linear_triton(x, qs[i], ss[i], path="gemv", config={"FAST_CVT": False}),
                    int8_bytes,
                )
            bf16_us = None
            for name, (fn, nbytes) in methods.items():
                row = {"shape": [n, k], "m": m, "method": name, "buffers": n_buf, "weight_bytes": nbytes}
                try:
                    before = {t: getattr(t, "configs_timings", None) for t in (tk._gemv_tuned, tk._gemm_tuned)}
                    t0 = time.perf_counter()
                    y = fn(0)  # warm-up: compiles and autotunes
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t0
                    for t, old in before.items():
                        new = getattr(t, "configs_timings", None)
                        if new is not None and new is not old:
                            row.setdefault("autotune_ms", {}).update({str(c): v for c, v in new.items()})
                    row["rel_err"] = ((y.double() - ref64).norm() / ref64.norm()).item()
                    row["nonfinite"] = int((~torch.isfinite(y)).sum())
                    fns = [lambda i=i, fn=fn: fn(i) for i in range(n_buf)]
                    us = timing_do_bench(fns) * 1e3
                    row["us"] = us
                    row["gbs"] = nbytes / (us * 1e-6) / 1e9
                    if not args.no_graph:
                        try:
                            gus = timing_graph(fns) * 1e3
                            row["graph_us"] = gus
                            row["graph_gbs"] = nbytes / (gus * 1e-6) / 1e9
                        except Exception as e:
                            row["graph_error"] = repr(e)
                    if name == "bf16":
                        bf16_us = us
                    if bf16_us:
                        row["speedup_vs_bf16"] = bf16_us / us
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    report["errors"].append(f"{n}x{k} M={m} {name}: {traceback.format_exc(limit=3)}")
                    torch.cuda.synchronize()
                report["results"].append(row)
                _print_row(row)
            del x, ref64
            save()
        del qs, ss, ws
        torch.cuda.empty_cache()

    report["best_configs"] = tk.best_configs()
    save()
    _print_table(report)
    return 1 if report["errors"] else 0


_HEAD = (f"{'shape (out x in)':>16} {'M':>4} {'method':>10} {'us':>9} {'GB/s':>7} {'x bf16':>7} "
         f"{'graph us':>9} {'graph GB/s':>10} {'rel err':>9}")  # fmt: skip


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else format("-", ">" + spec.split(".")[0].lstrip(">"))


def _print_row(r):
    if "error" in r:
        print(f"{r['shape'][0]:>7}x{r['shape'][1]:<8} {r['m']:>4} {r['method']:>10}  ERROR {r['error'][:200]}", flush=True)
        return
    flag = "" if r.get("nonfinite", 0) == 0 and r.get("rel_err", 1) <= 1e-2 else "  <-- WRONG"
    print(f"{r['shape'][0]:>7}x{r['shape'][1]:<8} {r['m']:>4} {r['method']:>10} {_fmt(r.get('us'), '9.1f')} "
          f"{_fmt(r.get('gbs'), '7.0f')} {_fmt(r.get('speedup_vs_bf16'), '7.2f')} {_fmt(r.get('graph_us'), '9.1f')} "
          f"{_fmt(r.get('graph_gbs'), '10.0f')} {_fmt(r.get('rel_err'), '9.2e')}{flag}", flush=True)  # fmt: skip


def _print_table(report):
    print()
    print(f"# {report['device']}: us = median per call (do_bench, L2 flushed); graph = CUDA-graph replay of all "
          f"buffers back to back; GB/s = stored weight bytes / time; copy ceiling "
          f"{report['copy_bandwidth_gbs'] or float('nan'):.0f} GB/s (read+write)")  # fmt: skip
    print(_HEAD)
    for r in report["results"]:
        _print_row(r)
    if report["errors"]:
        print(f"# {len(report['errors'])} error(s); see the JSON")


if __name__ == "__main__":
    sys.exit(main())
