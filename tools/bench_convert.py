"""Conversion benchmark: a synthetic Llama-shaped bf16 checkpoint -> .cllm, measured.

Builds a sharded safetensors checkpoint of about --size-gb of bf16 weights (hidden 2048,
intermediate 5632, vocab 32000 by default; gaussian weights with a few outlier columns, as
real linear layers have), written shard by shard so memory stays at one shard. Then runs the
real converter (codecllm_format.convert.convert, what cllm-convert calls) in a subprocess and
reports wall time (of convert() and of the whole process), throughput in total
and per core, CPU time, the output ratio, and the child's peak RSS (VmHWM polled from
/proc/PID/status, and getrusage(RUSAGE_CHILDREN).ru_maxrss) against the bound
1 GiB + 2 x the largest tensor.

Targets (measured, not asserted): >= 300 MB/s of bf16 input per core used; peak RSS within
the bound. Usage:

    python tools/bench_convert.py                       # ~2.2 GB in /tmp, deleted afterwards
    python tools/bench_convert.py --size-gb 0.5 --profile
    python tools/bench_convert.py --json result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 1024**3


def llama_shapes(hidden: int, intermediate: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-style decoder (untied lm_head), in file order."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def layers_for(size_bytes: float, hidden: int, intermediate: int, vocab: int) -> int:
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    return max(1, -(-int(size_bytes - fixed) // per_layer))


def synth_tensor(name: str, shape: tuple[int, ...], seed: int):
    """Deterministic bf16 tensor: N(0, 0.02) with 1 in 256 columns scaled up 8-32x (outliers);
    norm weights around 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    t = torch.randn(shape, generator=g).mul_(0.02)
    cols = shape[1]
    idx = torch.randperm(cols, generator=g)[: max(1, cols // 256)]
    t[:, idx] *= torch.empty(len(idx)).uniform_(8, 32, generator=g)
    return t.to(torch.bfloat16)


def build_checkpoint(folder: Path, size_gb: float, hidden: int, intermediate: int, vocab: int,
                     shard_bytes: int) -> dict:
    """Write a sharded bf16 checkpoint (model-0000N-of-0000M.safetensors + index + config)."""
    from safetensors.torch import save_file

    layers = layers_for(size_gb * 1e9, hidden, intermediate, vocab)
    shapes = llama_shapes(hidden, intermediate, vocab, layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = 0
    largest = 0
    for i, members in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in members:
            t = synth_tensor(name, shape, seed=_stable_seed(name))
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "vocab_size": vocab, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"layers": layers, "shards": len(shards), "input_bytes": total, "largest_tensor_bytes": largest,
            "tensors": len(shapes)}


def describe_checkpoint(folder: Path) -> dict:
    """The same summary as build_checkpoint's, read from an existing checkpoint's headers."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    total = largest = count = 0
    layers = set()
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 2
                for d in sl.get_shape():
                    n *= d
                total += n
                largest = max(largest, n)
                count += 1
                parts = name.split(".")
                if "layers" in parts:
                    layers.add(parts[parts.index("layers") + 1])
    return {"layers": len(layers), "shards": len(shards), "input_bytes": total, "largest_tensor_bytes": largest,
            "tensors": count}


def _stable_seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def _poll_hwm(pid: int, stop: threading.Event, out: dict) -> None:
    """Sample VmHWM/VmRSS of `pid` until it exits (VmHWM is the kernel's own peak)."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, val = line.split(":", 1)
                    kb = int(val.split()[0])
                    out[key] = max(out.get(key, 0), kb * 1024)
        except (OSError, ValueError):
            break
        stop.wait(0.05)


CHILD_EPILOGUE = (
    "import json, resource, re; "
    "st = open('/proc/self/status').read(); "
    "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', st).group(1)) * 1024; "
    "ru = resource.getrusage(resource.RUSAGE_SELF); "
    "open({report!r}, 'w').write(json.dumps({{'vmhwm': hwm, 'utime': ru.ru_utime, 'stime': ru.ru_stime, "
    "'convert_seconds': rep.seconds, 'cpu_at_start': cpu0}}))"
)


def run_conversion(src: Path, out: Path, threads: int, level: int | None, chunk_size: str | None,
                   profile: Path | None) -> dict:
    """Run convert() in a child process; return wall time, CPU time and peak RSS.

    The child reports its own VmHWM just before exiting (exact); the parent also polls it
    (a cross-check) and reads getrusage(RUSAGE_CHILDREN), whose ru_maxrss can include the
    parent's pages copied at fork, before exec."""
    kwargs = {"overwrite": True, "threads": threads}
    if level is not None:
        kwargs["level"] = level
    if chunk_size:
        kwargs["chunk_size"] = int(chunk_size)
    report = out.with_suffix(".rss.json")
    epilogue = CHILD_EPILOGUE.format(report=str(report))
    call = f"rep = convert({str(src)!r}, {str(out)!r}, **{kwargs!r})"
    prologue = "import sys, time; from codecllm_format.convert import convert; cpu0 = time.process_time(); "
    if profile:
        code = (
            prologue + "import cProfile; p = cProfile.Profile(); p.enable(); "
            f"{call}; p.disable(); p.dump_stats({str(profile)!r}); {epilogue}"
        )
    else:
        code = prologue + f"{call}; {epilogue}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    peaks: dict = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_hwm, args=(proc.pid, stop, peaks), daemon=True)
    poller.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"the conversion failed with exit status {rc}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    own = json.loads(report.read_text())
    return {
        "process_seconds": wall,
        "seconds": own["convert_seconds"],
        "process_cpu_seconds": cpu,
        "cpu_seconds": own["utime"] + own["stime"] - own["cpu_at_start"],
        "peak_rss_child": own["vmhwm"],
        "peak_rss_polled": peaks.get("VmHWM", 0),
        "peak_rss_rusage": after.ru_maxrss * 1024,  # Linux: KiB; the largest child so far
    }


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.2, help="bf16 checkpoint size in GB (default 2.2)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-gb", type=float, default=0.5, help="shard size in GB (bounds the builder's memory)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="converter threads (default: all cores)")
    p.add_argument("--level", type=int, default=None, help="zstd level (default: the converter's)")
    p.add_argument("--chunk-size", default=None, help="chunk size (default: the converter's)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--checkpoint", type=Path, help="convert this existing bf16 checkpoint instead of building one (kept)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    p.add_argument("--profile", action="store_true", help="cProfile the converter; print the top functions")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cllm-bench-", dir=args.workdir))
    src = work / "synthetic-llama"
    out = work / "synthetic-llama.cllm"
    try:
        t0 = time.perf_counter()
        if args.checkpoint:
            src = args.checkpoint
            info = describe_checkpoint(src)
        else:
            info = build_checkpoint(src, args.size_gb, args.hidden, args.intermediate, args.vocab,
                                    int(args.shard_gb * 1e9))
            print(f"built {info['input_bytes'] / 1e9:.2f} GB bf16 checkpoint ({info['layers']} layers, "
                  f"{info['tensors']} tensors, {info['shards']} shards) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        prof = work / "convert.prof" if args.profile else None
        load0 = os.getloadavg()
        res = run_conversion(src, out, args.threads, args.level, args.chunk_size, prof)
        load1 = os.getloadavg()
        out_bytes = out.stat().st_size
        inp = info["input_bytes"]
        bound = GiB + 2 * info["largest_tensor_bytes"]
        peak = max(res["peak_rss_child"], res["peak_rss_polled"])
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "load_average_before_after": [round(load0[0], 2), round(load1[0], 2)],
            **info,
            "threads": args.threads,
            "seconds": round(res["seconds"], 2),
            "process_seconds": round(res["process_seconds"], 2),
            "cpu_seconds": round(res["cpu_seconds"], 2),
            "process_cpu_seconds": round(res["process_cpu_seconds"], 2),
            "cores_used": round(res["cpu_seconds"] / res["seconds"], 2),
            "mb_per_s": round(inp / 1e6 / res["seconds"], 1),
            "mb_per_s_per_thread": round(inp / 1e6 / res["seconds"] / args.threads, 1),
            "mb_per_cpu_second": round(inp / 1e6 / max(res["cpu_seconds"], 1e-9), 1),
            "output_bytes": out_bytes,
            "ratio_of_bf16": round(out_bytes / inp, 4),
            "peak_rss_bytes": peak,
            "peak_rss_polled": res["peak_rss_polled"],
            "peak_rss_child": res["peak_rss_child"],
            "peak_rss_rusage": res["peak_rss_rusage"],
            "rss_bound_bytes": bound,
            "rss_within_bound": peak <= bound,
            "throughput_target_met": inp / 1e6 / res["seconds"] / args.threads >= 300,
        }
        print(f"input {inp / 1e9:.2f} GB bf16 -> {out_bytes / 1e9:.3f} GB ({result['ratio_of_bf16']:.4f} of bf16)")
        print(f"convert() {result['seconds']:.1f} s (process {result['process_seconds']:.1f} s with Python and torch "
              f"start-up): {result['mb_per_s']:.0f} MB/s total, {result['mb_per_s_per_thread']:.0f} MB/s "
              f"per thread ({args.threads} threads), {result['mb_per_cpu_second']:.0f} MB per CPU-second "
              f"({result['cores_used']:.2f} cores busy on average); target >= 300 MB/s per core")
        print(f"peak RSS {peak / GiB:.3f} GiB (child's VmHWM at exit; polled {res['peak_rss_polled'] / GiB:.3f}, "
              f"rusage {res['peak_rss_rusage'] / GiB:.3f} incl. the fork of this process); bound 1 GiB + 2 x {info['largest_tensor_bytes'] / 2**20:.0f} MiB "
              f"= {bound / GiB:.3f} GiB: {'within' if result['rss_within_bound'] else 'OVER'}")
        print(f"machine: {result['machine']}; load average {load0[0]:.2f} before, {load1[0]:.2f} after")
        if prof is not None:
            import pstats

            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(15)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
