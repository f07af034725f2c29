"""Where a decode step's host time goes: bf16 transformers against cllm tiers, same process.

For a model shape of tools/bench_generate.py (random weights, built on the GPU), this

  1. times greedy generation with the variants interleaved (A B C A B C ...), so that drift in
     the machine's speed between runs hits every variant alike; median tok/s and the median of
     the per-round ratios to bf16;
  2. counts what one decoded token launches (torch.profiler: CUDA kernel launches, memcpys,
     CUDA API calls, per token);
  3. profiles the host side of one generation with cProfile and prints the functions with the
     most own time (tottime), per token.

Eager HF decoding at batch 1 is bound by host time (Python + launches), not by the GPU, for
every shape up to 7B on an H100/H200: this says which calls cost it.

    python tools/profile_decode.py --shape tinyllama --tiers gpu,host --json out.json
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CODECLLM_NVCOMP_TORCH_ALLOCATOR", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import codecllm_format as cf  # noqa: E402
from codecllm_format.runtime.norms import fuse_rms_norms  # noqa: E402
from bench_generate import SHAPES, build_reference, generation_timeline, hf_generate, print_timeline, write_cllm  # noqa: E402


def _time_one(generate, prompt, n) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = generate(prompt, n)
    end.record()
    end.synchronize()
    return (out.shape[-1] - prompt.shape[-1]) / (start.elapsed_time(end) / 1000)


def interleaved(variants: dict, prompt, n: int, rounds: int) -> dict:
    """Median tok/s per variant and median per-round ratio to the first variant."""
    for gen in variants.values():
        gen(prompt, 4)  # warm-up (compiles, autotunes, builds launch plans)
        gen(prompt, n)
    runs = {k: [] for k in variants}
    for _ in range(rounds):
        for k, gen in variants.items():
            runs[k].append(_time_one(gen, prompt, n))
    first = next(iter(variants))
    return {k: {"tok_s": statistics.median(v), "runs": v,
                "ratio_to_first": statistics.median(a / b for a, b in zip(v, runs[first]))} for k, v in runs.items()}


def launch_counts(generate, prompt, n: int) -> dict:
    """Per generated token: kernel launches, memcpy/memset calls, all CUDA runtime/driver calls."""
    from torch.profiler import ProfilerActivity, profile

    generate(prompt, 2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(prompt, n)
        torch.cuda.synchronize()
    kernels = memcpy = api = 0
    names: dict[str, int] = {}
    for e in prof.events():
        dev_type = str(getattr(e, "device_type", ""))
        if "CUDA" in dev_type:
            if "Memcpy" in e.name or "Memset" in e.name:
                memcpy += 1
            else:
                kernels += 1
                names[e.name[:60]] = names.get(e.name[:60], 0) + 1
        elif e.name.startswith(("cuda", "cu")) and not e.name.startswith("cudnn"):
            api += 1
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {"kernels_per_token": kernels / n, "memcpy_per_token": memcpy / n, "cuda_api_per_token": api / n,
            "top_kernels_per_token": {k: v / n for k, v in top}}


def host_profile(generate, prompt, n: int, top: int) -> str:
    generate(prompt, 2)
    pr = cProfile.Profile()
    pr.enable()
    generate(prompt, n)
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(top)
    s.write("\n---- codecllm's own functions and the module hooks, by cumulative time ----\n")
    st.sort_stats("cumulative").print_stats(r"codecllm_format|module.py:\d+\(inner\)|_call_hooks", top)
    return f"(cProfile of {n} tokens; divide times by {n} for per-token)\n" + s.getvalue()


def probe_decode_blocking(provider, repeats: int = 15) -> dict:
    """Host time of one nvCOMP group decode call (GroupDecoder.decode) on a host-tier provider:
    with idle streams, and while the decode stream waits on a pending host->GPU copy of the
    group. If the second is about the copy's duration, nvCOMP blocks the calling thread until the
    stream's earlier work is done (then the prefetch stalls the thread that launches compute)."""
    import statistics as st

    p = provider
    gid = next(g for g, t in p.plan.tiers.items() if t == "host" and len(p.layouts[g].tensors) > 3)
    enc, lay, slot = p.encoded[gid], p.layouts[gid], p.slots[0]
    src, host = p.stagings[0][: enc.length], p.host_store[gid]
    src.copy_(host)
    torch.cuda.synchronize()
    idle, pending, copy_ms = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        p.decoder.decode(enc, lay, src, slot.out)
        idle.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(p.copy_stream):
            a.record()
            src.copy_(host, non_blocking=True)
            b.record()
        p.decode_stream.wait_event(b)
        t0 = time.perf_counter()
        p.decoder.decode(enc, lay, src, slot.out)
        pending.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        copy_ms.append(a.elapsed_time(b) * 1e3)
    r = {"group_bytes": enc.length, "decode_call_us_idle": st.median(idle), "decode_call_us_copy_pending": st.median(pending),
         "copy_us": st.median(copy_ms)}
    print(f"  nvCOMP decode call, host time: idle streams {r['decode_call_us_idle']:.0f} us; with a pending "
          f"{enc.length / 1e6:.1f} MB copy ({r['copy_us']:.0f} us) before it {r['decode_call_us_copy_pending']:.0f} us")
    return r


def _decoder_layers(model):
    """The ModuleList of a causal LM's decoder blocks (the longest ModuleList in the model)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def block_times(model, generate, prompt, n: int = 16) -> dict:
    """Host and GPU time of each decoder block at decode steps (hooks on the blocks: perf_counter
    and CUDA events around each block's forward), for any model, bf16 included: if a block's GPU
    time equals its host time, the GPU waits for the host (host-bound); a block whose host time
    jumps when another tier streams hints at a host synchronization."""
    layers = _decoder_layers(model)
    recs: list = []

    def pre(mod, args):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        recs.append(["pre", time.perf_counter(), e])

    def post(mod, args, out):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        recs.append(["post", time.perf_counter(), e])

    # prepend: the block's time includes the loader's own begin_group hook (its end_group runs before `post`)
    handles = [m.register_forward_pre_hook(pre, prepend=True) for m in layers] + [m.register_forward_hook(post) for m in layers]
    try:
        generate(prompt, 2)
        torch.cuda.synchronize()
        recs.clear()
        e0 = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        e0.record()  # the GPU is idle: fires at about t0 (aligns GPU and host clocks)
        generate(prompt, n)
        torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    steps = [recs[i : i + 2 * len(layers)] for i in range(0, len(recs), 2 * len(layers))][1:]  # no prefill
    host, gpu, between_host, between_gpu = [], [], [], []
    for k, step in enumerate(steps):
        for a, b in zip(step[0::2], step[1::2]):
            host.append((b[1] - a[1]) * 1e6)
            gpu.append(a[2].elapsed_time(b[2]) * 1e3)
        if k + 1 < len(steps):  # end of this step's last block -> next step's first block
            between_host.append((steps[k + 1][0][1] - step[-1][1]) * 1e6)
            between_gpu.append(step[-1][2].elapsed_time(steps[k + 1][0][2]) * 1e3)
    # how far the GPU runs behind the host when it reaches a block (launch latency if it waits
    # for the host; growing within a step if the GPU is the bottleneck)
    lag = [(t0 + e0.elapsed_time(r[2]) / 1000 - r[1]) * 1e6 for step in steps for r in step[0::2]]
    med = statistics.median
    return {"blocks": len(layers), "block_host_us": med(host), "block_gpu_us": med(gpu),
            "gpu_lag_us_median": med(lag), "gpu_lag_us_max": max(lag),
            "between_steps_host_us": med(between_host) if between_host else None,
            "between_steps_gpu_us": med(between_gpu) if between_gpu else None}


def sync_points(generate, prompt, n: int = 4) -> dict:
    """Host synchronizations per generated token (torch.cuda.set_sync_debug_mode), by where in
    our code or transformers' they happen (innermost frame outside torch)."""
    import traceback
    import warnings

    where: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        key = f"{str(message)[:60]} @ " + (f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?")
        where[key] = where.get(key, 0) + 1

    generate(prompt, 2)
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(prompt, n)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {k: v / n for k, v in sorted(where.items(), key=lambda kv: -kv[1])}


def probe_group_hooks(provider, repeats: int = 200) -> dict:
    """Host time of the per-group scheduling a streaming tier adds to each block: begin_group +
    end_group over the provider's block groups in order (each begin acquires its group and
    prefetches the next), per group, idle GPU. The gpu tier has no hooks (nothing to schedule)."""
    p = provider
    gids = [g for g in p.layouts if p.plan.tiers[g] != "gpu" and ".layers." in p.layouts[g].name]
    if not gids:
        return {}
    for g in gids * 2:  # learn the order, warm the view caches
        p.begin_group(g)
        p.end_group(g)
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, repeats // len(gids))):
        t0 = time.perf_counter()
        for g in gids:
            p.begin_group(g)
            p.end_group(g)
        times.append((time.perf_counter() - t0) / len(gids) * 1e6)
        torch.cuda.synchronize()
    r = {"tier": sorted({p.plan.tiers[g] for g in gids}), "hooks_us_per_group": statistics.median(times)}
    print(f"  {'/'.join(r['tier'])}: begin_group + end_group host time {r['hooks_us_per_group']:.0f} us per group (idle GPU)")
    return r


ABLATIONS = ("no_copy", "no_decode")


def ablate_pipeline(provider, no_copy: int = 0, no_decode: int = 0) -> dict:
    """Turn a streaming provider's per-group H2D copies and/or decodes into no-ops (after load:
    the resident groups are already decoded), so that timing shows what each costs; the weights
    the model then computes with are garbage. Returns the ablations applied (for the variant name)."""
    if no_copy and not no_decode:
        raise SystemExit("no_copy needs no_decode (nvCOMP would decode another group's stale bytes; gpu-compressed "
                         "is the tier without copies)")
    done = {}
    if no_copy:
        provider._h2d.copy = lambda dst, src: None
        done["no_copy"] = 1
    if no_decode:
        provider._bound.clear()
        provider.decoder.bind = lambda *a, **k: (lambda: None)
        done["no_decode"] = 1
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--tiers", default="gpu,host")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top", type=int, default=30, help="functions shown per cProfile")
    ap.add_argument("--host-chunks", default=None, metavar="0,1048576",
                    help="also load the host tier once per in-memory chunk size listed (chunk_bytes=; 0: the file's chunks)")
    ap.add_argument("--variant", action="append", default=[], metavar="TIER:key=val[,key=val]",
                    help="also load TIER with these load/runtime options (ints), e.g. host:slots=3 or host:fuse_norms=0; "
                         "no_decode=1 (with or without no_copy=1) turns the streaming decodes (and copies) into no-ops "
                         "(timing only: the weights are garbage) to see what each costs the host (repeatable)")
    ap.add_argument("--file-codec", choices=("zstd", "ans"), default="zstd", help="codec of the int8 weights in the file")
    ap.add_argument("--bf16-fused-norms", action="store_true",
                    help="also time bf16 with the RMSNorm modules fused as cllm fuses them (runtime/norms.py)")
    ap.add_argument("--no-profile", action="store_true", help="timing only")
    ap.add_argument("--sync-debug", action="store_true", help="count host synchronizations per token, by call site")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="folder for the cProfile texts")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, SHAPES[args.shape]["vocab_size"], (1, 16), generator=g).cuda()
    work = Path(tempfile.mkdtemp(prefix="cllm-prof-"))
    path = work / f"{args.shape}.cllm"
    model = build_reference(args.shape, "cuda")
    write_cllm(model, path, os.cpu_count(), args.file_codec)
    variants = {"bf16": hf_generate(model)}
    if args.bf16_fused_norms:  # the same norm kernels as ours, on a copy of the bf16 model
        fused_model = copy.deepcopy(model)
        print(f"bf16-fusednorms: {fuse_rms_norms(fused_model, torch.bfloat16)} RMSNorm modules fused")
        variants["bf16-fusednorms"] = hf_generate(fused_model)
    loaded: dict = {}  # variant name -> CllmModel
    for tier in [t for t in args.tiers.split(",") if t]:
        m = cf.load(path, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False,
                    trust_gpu_codecs=args.file_codec == "ans")  # our own file
        loaded[f"cllm-{tier}"] = m
        variants[f"cllm-{tier}"] = (lambda mm: lambda p, n: mm.generate(p, max_new_tokens=n, min_new_tokens=n,
                                                                       do_sample=False))(m)
    extra = [f"host:chunk_bytes={c}" for c in (args.host_chunks or "").split(",") if c] + args.variant
    for spec in extra:
        tier, _, opts = spec.partition(":")
        kw = {k: int(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
        ablate = {k: kw.pop(k) for k in ABLATIONS if k in kw}
        try:
            m = cf.load(path, device="cuda", dtype=torch.bfloat16, residency=tier, tokenizer=False,
                        trust_gpu_codecs=args.file_codec == "ans", **kw)
        except cf.CllmError as e:  # e.g. a budget these slots cannot fit: say so, time the others
            print(f"variant {spec}: not loaded: {e}", flush=True)
            continue
        kw.update(ablate_pipeline(m.provider, **ablate))
        name = f"cllm-{tier}-" + "-".join(f"{k}{v}" for k, v in kw.items())  # plain file names (no '@', '=')
        loaded[name] = m
        variants[name] = (lambda mm: lambda p, n: mm.generate(p, max_new_tokens=n, min_new_tokens=n,
                                                             do_sample=False))(m)
    results = {"shape": args.shape, "file_codec": args.file_codec, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "timing": interleaved(variants, prompt, args.new_tokens, args.rounds)}
    print(f"{args.shape} on {results['device']}, interleaved x{args.rounds}, {args.new_tokens} new tokens")
    for k, r in results["timing"].items():
        print(f"  {k:<20} {r['tok_s']:8.2f} tok/s  ratio to bf16 (median of rounds) {r['ratio_to_first']:.3f}  "
              f"runs {', '.join(f'{x:.1f}' for x in r['runs'])}")
    results["timeline"] = {}
    for name, m in loaded.items():
        t = results["timeline"][name] = generation_timeline(m, prompt, 16)
        print_timeline(name, t)
    results["blocks"] = {}
    models = {"bf16": model, **({"bf16-fusednorms": fused_model} if args.bf16_fused_norms else {}),
              **{name: m.model for name, m in loaded.items()}}
    for name, gen in variants.items():
        b = results["blocks"][name] = block_times(models[name], gen, prompt)
        print(f"  {name:<26} per block: host {b['block_host_us']:.0f} us, GPU {b['block_gpu_us']:.0f} us; between steps: "
              f"host {b['between_steps_host_us']:.0f} us, GPU {b['between_steps_gpu_us']:.0f} us; GPU behind the host by "
              f"{b['gpu_lag_us_median']:.0f} us (median), {b['gpu_lag_us_max']:.0f} us (max)")
    if args.sync_debug:
        results["syncs_per_token"] = {}
        for name, gen in variants.items():
            sp = results["syncs_per_token"][name] = sync_points(gen, prompt)
            print(f"  {name}: host synchronizations per token: " + ("; ".join(f"{v:.1f}x {k}" for k, v in sp.items()) or "none"))
    results["group_hooks"] = {}
    for name, m in loaded.items():
        if hasattr(m.provider, "begin_group"):
            results["group_hooks"][name] = probe_group_hooks(m.provider)
    host = [m for m in loaded.values() if "host" in m.provider.plan.tiers.values()]
    if host:
        results["decode_blocking"] = probe_decode_blocking(host[0].provider)
    if not args.no_profile:
        results["launches"] = {}
        for k, gen in variants.items():
            c = results["launches"][k] = launch_counts(gen, prompt, 16)
            print(f"  {k:<20} per token: {c['kernels_per_token']:.0f} kernels, {c['memcpy_per_token']:.1f} memcpy/set, "
                  f"{c['cuda_api_per_token']:.0f} CUDA API calls")
            for name, v in c["top_kernels_per_token"].items():
                print(f"      {v:6.1f}  {name}")
        out = Path(args.out) if args.out else work
        out.mkdir(parents=True, exist_ok=True)
        for k, gen in variants.items():
            text = host_profile(gen, prompt, 32, args.top)
            (out / f"cprofile_{args.shape}_{args.file_codec}_{k}.txt").write_text(text)
            print(f"\n==== {k} ====\n" + "\n".join(text.splitlines()[:args.top + 12]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # nvCOMP's teardown with torch's allocator can crash at exit (see bench_generate)
