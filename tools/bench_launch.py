"""Host cost of one linear call at decode (M=1): bf16 F.linear against our int8 dispatch paths.

For each weight shape (default: Llama-2-7B's four), after a warm-up (which also compiles,
autotunes and builds the launch plans), times `--calls` back-to-back calls (200 by default) with
time.perf_counter, then synchronizes:

  enqueue us/call  host time to issue the calls (before the final synchronize): the launch cost
  wall us/call     until the GPU finished them too (the larger of host and GPU time)

median over `--repeats` runs. Methods:

  F.linear       torch.nn.functional.linear(x, W_bf16)                      (the baseline)
  module         CompressedLinear.forward, weights from a dict provider       (what a model runs)
  plan           kernels.int8_linear(..., plan=LinearPlan())                  (the cached dispatch)
  no-plan        kernels.int8_linear without a plan (layout looked up per call)
  normal         triton_kernels.int8_linear_triton: Triton's own launch path  (the old dispatch)

Every int8 result is checked bit for bit against the normal path; the table says whether the direct
launch is on (and why not, where it was switched off).

Usage (on a CUDA machine):  python tools/bench_launch.py [--json bench_launch.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

LLAMA2_7B = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--shapes", type=_parse_shapes, default=LLAMA2_7B, help="comma-separated OUTxIN (default Llama-2-7B's)")
    p.add_argument("--m", type=int, default=1, help="activation rows (default 1)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed run (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--bias", action="store_true", help="with a bias")
    p.add_argument("--json", help="write the results as JSON to this path")
    return p.parse_args(argv)


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_launch: no CUDA device; nothing to time", file=sys.stderr)
        return 2
    import triton

    from codecllm_format.runtime import CompressedLinear, kernels
    from codecllm_format.runtime import triton_kernels as tk

    if tk.INTERPRET:
        print("bench_launch: TRITON_INTERPRET is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    dev = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(dev)
    report = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "m": args.m,
        "calls": args.calls,
        "dtype": args.dtype,
        "results": [],
    }

    class DictProvider:
        device = dev

        def __init__(self):
            self.weights = {}

        def linear_weight(self, name):
            return self.weights[name]

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        enq, wall = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            enq.append((t1 - t0) / args.calls * 1e6)
            wall.append((t2 - t0) / args.calls * 1e6)
        return _median(enq), _median(wall)

    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, M={args.m}, {args.dtype}, "
          f"{args.calls} calls x {args.repeats} runs (median)", flush=True)  # fmt: skip
    ok = True
    with torch.no_grad():
        for n, k in args.shapes:
            gen = torch.Generator(device=dev).manual_seed(n + k)
            w = torch.randn(n, k, generator=gen, device=dev)
            s = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
            q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
            wb = kernels.dequantize(q, s, dtype)
            del w
            b = torch.randn(n, generator=gen, device=dev).to(dtype) if args.bias else None
            x = torch.randn(1, args.m, k, generator=gen, device=dev).to(dtype)
            provider = DictProvider()
            provider.weights["w"] = (q, s)
            lin = CompressedLinear("w", 0, provider, k, n, b)
            plan = kernels.LinearPlan()
            methods = {
                "F.linear": lambda: F.linear(x, wb, b),
                "module": lambda: lin(x),
                "plan": lambda: kernels.int8_linear(x, q, s, b, plan=plan),
                "no-plan": lambda: kernels.int8_linear(x, q, s, b),
                "normal": lambda: tk.int8_linear_triton(x, q, s, b),
            }
            ref = tk.int8_linear_triton(x, q, s, b)
            row = {"shape": [n, k]}
            for name, fn in methods.items():
                try:
                    enq, wall = timed(fn)
                    row[name] = {"enqueue_us": enq, "wall_us": wall}
                    if name != "F.linear":
                        same = torch.equal(fn().view(torch.int16), ref.view(torch.int16))
                        row[name]["bit_exact"] = same
                        ok &= same
                except Exception as e:  # keep measuring the others
                    row[name] = {"error": f"{type(e).__name__}: {e}"}
                    ok = False
            entry = plan.fused.entry(x) if isinstance(plan.fused, tk.LinearPlan) else None
            row["plan_entry"] = type(entry).__name__
            report["results"].append(row)
            _print_row(row)
            del q, s, wb, x, lin, provider, plan
            torch.cuda.empty_cache()
    on, why = tk.direct_launch_status()
    report["direct_launch"] = {"on": on, "why": why}
    report["stats"] = dict(tk.STATS)
    print(f"# direct launch: {'on' if on else 'OFF (' + str(why) + ')'}; int8 results bit-exact vs the normal path: {ok}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


_METHODS = ("F.linear", "module", "plan", "no-plan", "normal")
_printed_head = []


def _print_row(row):
    if not _printed_head:
        head = f"{'shape (out x in)':>17} " + " ".join(f"{m:>17}" for m in _METHODS) + "  entry"
        print(head)
        print(f"{'':>17} " + " ".join(f"{'enqueue / wall us':>17}" for _ in _METHODS))
        _printed_head.append(True)
    cells = []
    for m in _METHODS:
        r = row.get(m, {})
        if "error" in r:
            cells.append(f"{'ERROR':>17}")
        else:
            flag = "" if r.get("bit_exact", True) else "!"
            cells.append(f"{r['enqueue_us']:>8.1f} /{r['wall_us']:>6.1f}{flag:1}")
    print(f"{row['shape'][0]:>8}x{row['shape'][1]:<8} " + " ".join(cells) + f"  {row['plan_entry']}", flush=True)
    for m in _METHODS:
        if "error" in row.get(m, {}):
            print(f"   {m}: {row[m]['error'][:300]}")


if __name__ == "__main__":
    sys.exit(main())
