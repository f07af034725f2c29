"""Generation benchmark on one GPU: ONE process, ONE run, same prompt for every variant.

  (a) bf16 transformers model fully on the GPU         (the speed to match)
  (b) accelerate cpu_offload of the same model         (the low-memory baseline)
  (c) every cllm residency tier of the same weights     (int8 + zstd .cllm)

Random weights for a model shape (TinyLlama-1.1B, Llama-2-7B, or tiny for a smoke test), built on
the meta device and initialised on the GPU; quantized on the GPU, written as .cllm with the real
writer. Batch 1, 16-token prompt, greedy, after a warm-up. Prints tok/s, peak VRAM and ratios to
(a) and (b); writes JSON.

With --devices 0,1 (a pipeline split over those GPUs) it also runs
  (a2) the bf16 model dispatched over the same GPUs by accelerate, as transformers'
       from_pretrained(device_map="auto") does (balanced, no decoder layer split)
and loads every cllm tier with load(device_map=[0, 1]); peak VRAM is reported per GPU
(peak_vram_gib is then their sum).

    python tools/bench_generate.py --shape tinyllama --json out.json
    python tools/bench_generate.py --shape llama2-7b --devices 0,1 --no-offload --json out.json
    python tools/bench_generate.py --shape llama2-7b --tiers disk,host --file-codec ans   # ANS in the file
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Count nvCOMP's scratch memory in torch's statistics, so peak VRAM figures are complete.
os.environ.setdefault("CODECLLM_NVCOMP_TORCH_ALLOCATOR", "1")
# Nothing here uses NCCL (GPUs exchange activations by peer copies); NVLink multicast stays off anyway.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codecllm_format as cf  # noqa: E402
from codecllm_format.quant import quantize_int8_rows  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}
GiB = 1024**3


def build_reference(shape: str, device: str):
    """bf16 LlamaForCausalLM with transformers' random init (N(0, 0.02) weights), built on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                      torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # transformers' own init, run on the GPU (fast even for 7B)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return model


def write_cllm(model, path: Path, threads: int, int8_codec: str = "zstd") -> float:
    """Quantize every 2-D weight on the GPU and write the .cllm with the real writer (int8 streams
    in `int8_codec`: zstd, or nvCOMP ANS compressed on the GPU)."""
    from codecllm_format.convert import group_of, natural_key

    t0 = time.perf_counter()
    config_json = model.config.to_json_string().encode()
    state = dict(model.state_dict())
    groups: dict[str, list[str]] = {}
    for name in state:
        groups.setdefault(group_of(name), []).append(name)
    with cf.CllmWriter(path, threads=threads, metadata={"source": "bench_generate random weights"},
                       int8_codec=int8_codec) as w:
        for gname in sorted(groups, key=natural_key):
            w.begin_group(gname)
            for name in sorted(groups[gname], key=natural_key):
                t = state[name]
                if t.dim() == 2:
                    q, s = quantize_int8_rows(t)
                    w.add_int8_tensor(name, q.cpu(), s.cpu(), t.dtype)
                else:
                    w.add_tensor(name, t.cpu())
        w.add_file("config.json", config_json)
        w.finish()
    return time.perf_counter() - t0


def time_generate(generate, prompt: torch.Tensor, new_tokens: int, warmup_tokens: int = 4, repeats: int = 1,
                  devices: list[int] | None = None) -> dict:
    """Median tok/s over `repeats` greedy generations of `new_tokens` after a warm-up (CUDA
    events around each); peak VRAM over the timed runs (with `devices`: per GPU, and their sum)."""
    generate(prompt, warmup_tokens)
    for d in devices or [None]:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    runs = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = generate(prompt, new_tokens)
        end.record()
        end.synchronize()
        for d in devices or []:  # the last token came back to the first GPU: the others are done
            torch.cuda.synchronize(d)
        produced = out.shape[-1] - prompt.shape[-1]
        runs.append(produced / (start.elapsed_time(end) / 1000))
    runs.sort()
    r = {"tok_s": runs[len(runs) // 2], "tok_s_runs": runs, "new_tokens": produced,
         "peak_vram_gib": torch.cuda.max_memory_allocated() / GiB, "tokens": out[0, -produced:].tolist()}
    if devices:
        r["peak_vram_gib_per_gpu"] = [torch.cuda.max_memory_allocated(d) / GiB for d in devices]
        r["peak_vram_gib"] = sum(r["peak_vram_gib_per_gpu"])
    return r


def dispatch_bf16(model, devices: list[int]):
    """The bf16 model spread over `devices` as from_pretrained(device_map="auto") does it:
    accelerate's balanced max_memory, decoder layers kept whole, AlignDevicesHooks. Returns the
    device map."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or ["LlamaDecoderLayer"])
    free = {d: int(torch.cuda.mem_get_info(d)[0] * 0.9) for d in devices}
    balanced = get_balanced_memory(model, max_memory=free, no_split_module_classes=no_split, dtype=torch.bfloat16)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=torch.bfloat16)
    dispatch_model(model, device_map=device_map)
    return device_map


def decode_only_peak(provider) -> float:
    """GiB above the current allocation while every streamed group is decoded once (slots,
    nvCOMP scratch): the runtime's own share of the peak, without the model's compute."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for gid in provider.layouts:
        if provider.plan.tiers[gid] != "gpu":
            provider.begin_group(gid)
            provider.end_group(gid)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def pinned_h2d_gbps(nbytes: int = 256 * 1024 * 1024) -> float:
    """Measured pinned host->GPU bandwidth (GB/s), median of 10 copies."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dev.copy_(host, non_blocking=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times = sorted(times[2:])
    return nbytes / (times[len(times) // 2] / 1000) / 1e9


def stream_profile(provider) -> dict:
    """Per-layer timeline pieces of a streaming tier, for the largest transformer-block group:
    H2D copy time and GPU decode time (each alone, median of 10, CUDA events), with GB/s."""
    gids = [g for g, t in provider.plan.tiers.items() if t != "gpu" and ".layers." in provider.layouts[g].name]
    if not gids or not provider.slots:
        return {}
    g = max(gids, key=lambda x: provider.layouts[x].decoded_bytes)
    lay, enc, slot = provider.layouts[g], provider.encoded[g], provider.slots[0]
    tier = provider.plan.tiers[g]
    src = provider.dev_store[g] if tier == "gpu-compressed" else provider.stagings[0][: enc.length]
    out = {"group": lay.name, "codec": enc.codec, "compressed_bytes": enc.length, "decoded_bytes": lay.decoded_bytes}

    def timed(fn, stream):
        ts = []
        for _ in range(12):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(stream)
            fn()
            e.record(stream)
            e.synchronize()
            ts.append(s.elapsed_time(e))
        ts = sorted(ts[2:])
        return ts[len(ts) // 2]

    torch.cuda.synchronize()
    if tier == "disk":  # the staging buffer must hold this group's bytes: nvCOMP assumes valid input
        view = provider.file.group_bytes(g)
        src.copy_(torch.frombuffer(bytearray(view), dtype=torch.uint8))
        view.release()
    if tier == "host":
        host = provider.host_store[g]
        with torch.cuda.stream(provider.copy_stream):
            ms = timed(lambda: src.copy_(host, non_blocking=True), provider.copy_stream)
        out["copy_ms"] = ms
        out["copy_gbps"] = enc.length / (ms / 1000) / 1e9
    ms = timed(lambda: provider.decoder.decode(enc, lay, src, slot.out), provider.decode_stream)
    out["decode_ms"] = ms
    out["decode_gbps_of_output"] = lay.decoded_bytes / (ms / 1000) / 1e9
    torch.cuda.synchronize()
    return out


def generation_timeline(m, prompt: torch.Tensor, new_tokens: int = 8) -> dict:
    """Per-group timeline of one generation with a streaming tier (runtime/timeline.py): copy,
    decode and stall milliseconds per token, and the share of copy+decode hidden behind compute.
    The first token (prefill) is left out; event recording slows the host, so no tok/s here."""
    from codecllm_format.runtime.timeline import Timeline, summarize

    provider = m.provider
    if not hasattr(provider, "timeline") or all(t == "gpu" for t in provider.plan.tiers.values()):
        return {}
    m.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)  # prefill: not traced
    provider.timeline = tl = Timeline()
    try:
        m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        provider.timeline = None
    rep = tl.report()
    uses = rep.pop("uses")
    if not uses:
        return {}
    starts = [i for i, r in enumerate(uses) if r["gid"] == uses[0]["gid"]]  # one per forward
    if len(starts) < 2:
        return {}
    steady = uses[starts[1]:]  # the traced run's own prefill left out
    tokens = len(starts) - 1
    per_token = len(steady) / tokens
    total = summarize(steady)
    out = {"tokens": tokens, "groups_per_token": per_token, "gpu_span_ms_per_token": total["span_ms"] / tokens,
           "overlap": total["overlap"], "copy_gbps": total["copy_gbps"]}
    for k in ("copy_ms", "decode_ms", "stall_ms", "compute_ms"):
        out[k.replace("_ms", "_ms_per_token")] = total[k] / tokens
    worst = sorted(steady, key=lambda r: -r["stall_ms"])[:5]
    out["worst_stalls"] = [{k: r.get(k) for k in ("gid", "tier", "stall_ms", "copy_ms", "decode_ms", "compute_ms")} for r in worst]
    out["one_token"] = steady[: int(round(per_token))]
    return out


def print_timeline(name: str, t: dict) -> None:
    if not t:
        return
    ov = f"{100 * t['overlap']:.0f}%" if t["overlap"] is not None else "-"
    gb = f", copy {t['copy_gbps']:.1f} GB/s" if t["copy_gbps"] else ""
    print(f"   {name} timeline per token: GPU span {t['gpu_span_ms_per_token']:.2f} ms, copy {t['copy_ms_per_token']:.2f} ms, "
          f"decode {t['decode_ms_per_token']:.2f} ms, compute {t['compute_ms_per_token']:.2f} ms, stall "
          f"{t['stall_ms_per_token']:.2f} ms; overlap {ov}{gb}", flush=True)
    for r in t["worst_stalls"][:3]:
        print(f"      worst stall: group {r['gid']} ({r['tier']}) {r['stall_ms']:.3f} ms "
              f"(copy {r.get('copy_ms') or 0:.3f}, decode {r.get('decode_ms') or 0:.3f}, compute {r['compute_ms']:.3f})")


def hf_generate(model):
    def run(prompt, n):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    return run


def time_graphs(results: dict, name: str, model, prompt: torch.Tensor, args) -> None:
    """Time `model` with a static KV cache and a CUDA graph per decode step (tools/graph_decode.py);
    record it as `name+graphs`, with whether its tokens equal the eager run's."""
    from tools.graph_decode import GraphGenerator

    try:
        gen = GraphGenerator(model, max_len=prompt.shape[-1] + args.new_tokens + 8)
        r = time_generate(gen.generate, prompt, args.new_tokens, repeats=args.repeats)
    except Exception as e:  # report, do not abort the other variants
        print(f"{name}+graphs: failed ({type(e).__name__}: {e})", flush=True)
        results.setdefault("failures", {})[f"{name}+graphs"] = f"{type(e).__name__}: {e}"
        return
    r["same_tokens_as_eager"] = r["tokens"] == results["variants"][name]["tokens"]
    results["variants"][f"{name}+graphs"] = r
    del gen
    free()
    print(f"{name} + static cache + CUDA graphs: {r['tok_s']:.2f} tok/s, peak {r['peak_vram_gib']:.3f} GiB, "
          f"same tokens as eager: {r['same_tokens_as_eager']}", flush=True)


def free():
    gc.collect()
    torch.cuda.empty_cache()


def run_split_tier(path: Path, tier: str, devices: list[int], prompt: torch.Tensor, args, results: dict) -> dict:
    """One cllm tier loaded with load(device_map=devices): tok/s, per-GPU peak VRAM (load included,
    above what each GPU held before), per-GPU plan, tokens."""
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    base = [torch.cuda.memory_allocated(d) for d in devices]
    t0 = time.perf_counter()
    options = {"residency": tier} if tier != "auto" else {}  # auto: each GPU's free memory is its budget
    m = cf.load(path, device_map=devices, dtype=torch.bfloat16, tokenizer=False, **options)
    load_s = time.perf_counter() - t0
    loaded = [torch.cuda.memory_allocated(d) - b for d, b in zip(devices, base)]
    r = time_generate(lambda p, n: m.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False), prompt,
                      args.new_tokens, repeats=args.repeats, devices=devices)
    plan = m.provider.plan
    r["load_seconds"] = load_s
    r["peak_vram_gib_per_gpu"] = [(torch.cuda.max_memory_allocated(d) - b) / GiB for d, b in zip(devices, base)]
    r["peak_vram_gib"] = sum(r["peak_vram_gib_per_gpu"])
    r["resident_after_load_gib_per_gpu"] = [x / GiB for x in loaded]
    r["plan_weight_vram_gib_per_gpu"] = [p.plan.weight_vram / GiB for p in m.provider.providers]
    r["blocks_per_gpu"] = [plan.block_device.count(i) for i in range(len(devices))]
    r["tiers_per_gpu"] = [sorted(set(p.plan.tiers.values())) for p in m.provider.providers]
    streamed = sum(p.encoded[g].length for p in m.provider.providers for g, t in p.plan.tiers.items() if t in ("host", "disk"))
    if streamed:
        r["streamed_bytes_per_token"] = streamed
        r["pcie_bound_tok_s"] = results["pinned_h2d_gbps"] * 1e9 / streamed
        r["of_pcie_bound"] = r["tok_s"] / r["pcie_bound_tok_s"]
    print(f"cllm {tier} over {devices}: {r['tok_s']:.2f} tok/s, peak per GPU "
          f"{', '.join(f'{x:.3f}' for x in r['peak_vram_gib_per_gpu'])} GiB (plan "
          f"{', '.join(f'{x:.3f}' for x in r['plan_weight_vram_gib_per_gpu'])}; blocks {r['blocks_per_gpu']}; "
          f"tiers {r['tiers_per_gpu']}), load {load_s:.1f} s", flush=True)
    if streamed:
        print(f"   PCIe bound (one GPU's link) {r['pcie_bound_tok_s']:.2f} tok/s "
              f"({streamed / 1e9:.2f} GB/token): {100 * r['of_pcie_bound']:.0f}% of it", flush=True)
    m.close()
    del m
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--offload-tokens", type=int, default=None, help="new tokens for the cpu_offload baseline (default: --new-tokens)")
    ap.add_argument("--tiers", default="gpu,gpu-compressed,host,disk")
    ap.add_argument("--no-offload", action="store_true")
    ap.add_argument("--workdir", default=None, help="where to write the .cllm (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported); offload runs once")
    ap.add_argument("--graphs", action="store_true",
                    help="also time bf16 and the cllm gpu tier with a static KV cache and a CUDA graph per decode step")
    ap.add_argument("--devices", default=None, metavar="0,1",
                    help="split over these GPUs (cllm: load(device_map=...); bf16: accelerate's balanced dispatch); "
                    "default: one GPU")
    ap.add_argument("--max-vram", default=None, help='budget of the "auto" tier (e.g. 0.35GiB; list auto in --tiers)')
    ap.add_argument("--reserve", default=None, help='VRAM the "auto" plan keeps for the KV cache and activations')
    ap.add_argument("--slots", type=int, default=None, help="streaming slots of the streaming tiers (default: the runtime's, 2)")
    ap.add_argument("--file-codec", choices=("zstd", "ans"), default="zstd",
                    help="codec of the int8 weights in the .cllm (ans: cllm-convert --codec ans; the tiers then use it "
                    "as stored, the disk tier decodes ANS)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_generate needs a CUDA GPU", file=sys.stderr)
        return 2
    devices = None
    if args.devices:
        try:
            devices = [int(d) for d in args.devices.split(",")]
        except ValueError:
            ap.error(f"--devices takes GPU indices like 0,1, got {args.devices!r}")
        if len(devices) < 2 or len(set(devices)) != len(devices) or max(devices) >= torch.cuda.device_count():
            ap.error(f"--devices needs 2 or more distinct GPUs of the {torch.cuda.device_count()} visible, got {args.devices!r}")
        torch.cuda.set_device(devices[0])
    dev = f"cuda:{devices[0]}" if devices else "cuda"
    results: dict = {"shape": args.shape, "file_codec": args.file_codec, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens, "variants": {}}
    if devices:
        results["devices"] = devices
        results["device_names"] = [torch.cuda.get_device_name(d) for d in devices]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, SHAPES[args.shape]["vocab_size"], (1, 16), generator=g).to(dev)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cllm-bench-"))
    path = work / f"{args.shape}.cllm"

    results["pinned_h2d_gbps"] = pinned_h2d_gbps()
    print(f"pinned host->GPU: {results['pinned_h2d_gbps']:.1f} GB/s", flush=True)
    model = build_reference(args.shape, dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["bf16_weight_gib"] = weight_bytes / GiB
    results["write_seconds"] = write_cllm(model, path, args.threads, args.file_codec)
    results["file_gib"] = path.stat().st_size / GiB
    print(f"wrote {path} ({results['file_gib']:.2f} GiB = {path.stat().st_size / weight_bytes:.3f} of bf16) "
          f"in {results['write_seconds']:.1f} s", flush=True)

    r = time_generate(hf_generate(model), prompt, args.new_tokens, repeats=args.repeats, devices=devices)
    results["variants"]["bf16-resident"] = r
    print(f"bf16 resident: {r['tok_s']:.2f} tok/s, peak {r['peak_vram_gib']:.3f} GiB", flush=True)
    if args.graphs:
        time_graphs(results, "bf16-resident", model, prompt, args)
    first_tier_tokens = None

    if devices:
        from accelerate.hooks import remove_hook_from_module

        device_map = dispatch_bf16(model, devices)
        free()
        r = time_generate(hf_generate(model), prompt, args.new_tokens, repeats=args.repeats, devices=devices)
        r["device_map_gpus"] = sorted({v for v in device_map.values() if isinstance(v, int)})
        results["variants"]["bf16-device_map-auto"] = r
        print(f"bf16 accelerate device_map over {devices}: {r['tok_s']:.2f} tok/s, peak per GPU "
              f"{', '.join(f'{x:.3f}' for x in r['peak_vram_gib_per_gpu'])} GiB", flush=True)
        remove_hook_from_module(model, recurse=True)
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map
        model.to(dev)
        free()

    if not args.no_offload:
        from accelerate import cpu_offload

        model.to("cpu")
        free()
        cpu_offload(model, execution_device=torch.device(dev))
        r = time_generate(hf_generate(model), prompt, args.offload_tokens or args.new_tokens, warmup_tokens=2)
        results["variants"]["accelerate-cpu_offload"] = r
        print(f"accelerate cpu_offload: {r['tok_s']:.2f} tok/s, peak {r['peak_vram_gib']:.3f} GiB", flush=True)
    del model
    free()

    for tier in [t for t in args.tiers.split(",") if t]:
        if devices:
            results["variants"][f"cllm-{tier}"] = r = run_split_tier(path, tier, devices, prompt, args, results)
            first_tier_tokens = first_tier_tokens or r["tokens"]
            r["same_tokens_as_first_tier"] = r["tokens"] == first_tier_tokens
            free()
            continue
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        budget = {"max_vram": args.max_vram, "reserve": args.reserve} if tier == "auto" else {}
        if args.slots and tier != "gpu":
            budget["slots"] = args.slots
        try:
            m = cf.load(path, device=dev, dtype=torch.bfloat16, residency=tier, tokenizer=False, **budget,
                        trust_gpu_codecs=args.file_codec == "ans")  # our own file
        except cf.CllmError as e:  # e.g. a budget these slots cannot fit: record it, bench the other tiers
            print(f"cllm {tier}: not loaded: {e}", flush=True)
            results["variants"][f"cllm-{tier}"] = {"error": str(e)}
            continue
        load_s = time.perf_counter() - t0
        loaded = torch.cuda.memory_allocated()
        r = time_generate(lambda p, n: m.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False), prompt,
                          args.new_tokens, repeats=args.repeats)
        r["load_seconds"] = load_s
        r["peak_vram_gib"] = (torch.cuda.max_memory_allocated() - base) / GiB
        r["resident_after_load_gib"] = (loaded - base) / GiB
        r["decode_only_peak_gib"] = decode_only_peak(m.provider) + (torch.cuda.memory_allocated() - base) / GiB
        r["plan_weight_vram_gib"] = m.provider.plan.weight_vram / GiB
        r["tier_counts"] = {t: list(m.provider.plan.tiers.values()).count(t) for t in sorted(set(m.provider.plan.tiers.values()))}
        r["stream_profile"] = stream_profile(m.provider)
        streamed = sum(m.provider.encoded[g].length for g, t in m.provider.plan.tiers.items() if t in ("host", "disk"))
        if streamed:
            r["streamed_bytes_per_token"] = streamed
            r["pcie_bound_tok_s"] = results["pinned_h2d_gbps"] * 1e9 / streamed
            r["of_pcie_bound"] = r["tok_s"] / r["pcie_bound_tok_s"]
        first_tier_tokens = first_tier_tokens or r["tokens"]
        r["same_tokens_as_first_tier"] = r["tokens"] == first_tier_tokens
        results["variants"][f"cllm-{tier}"] = r
        print(f"cllm {tier}: {r['tok_s']:.2f} tok/s, peak {r['peak_vram_gib']:.3f} GiB (after load "
              f"{r['resident_after_load_gib']:.3f}, decode-only {r['decode_only_peak_gib']:.3f}, plan "
              f"{r['plan_weight_vram_gib']:.3f}), load {load_s:.1f} s; groups per tier {r['tier_counts']}", flush=True)
        if "pcie_bound_tok_s" in r:
            print(f"   PCIe bound {r['pcie_bound_tok_s']:.2f} tok/s ({r['streamed_bytes_per_token'] / 1e9:.2f} GB/token): "
                  f"{100 * r['of_pcie_bound']:.0f}% of it", flush=True)
        if r["stream_profile"]:
            print(f"   per layer group: {r['stream_profile']}", flush=True)
        r["timeline"] = generation_timeline(m, prompt)
        print_timeline(tier, r["timeline"])
        if args.graphs and tier == "gpu":
            time_graphs(results, "cllm-gpu", m.model, prompt, args)
        m.close()
        del m
        free()

    base = results["variants"]["bf16-resident"]
    off = results["variants"].get("accelerate-cpu_offload")
    print(f"\n{args.shape} on {results['device']} ({results['date']}), batch 1, 16-token prompt, {args.new_tokens} new tokens, greedy")
    print(f"{'variant':<26} {'tok/s':>8} {'peak GiB':>9} {'x bf16':>7} {'x offload':>9}  peak GiB per GPU")
    for name, r in results["variants"].items():
        if "error" in r:
            print(f"{name:<26} not loaded: {r['error']}")
            continue
        xo = f"{r['tok_s'] / off['tok_s']:.2f}" if off else "-"
        per = " + ".join(f"{x:.3f}" for x in r.get("peak_vram_gib_per_gpu", []))
        print(f"{name:<26} {r['tok_s']:>8.2f} {r['peak_vram_gib']:>9.3f} {r['tok_s'] / base['tok_s']:>7.2f} {xo:>9}  {per}")
    if "cllm-gpu+graphs" in results["variants"] and "bf16-resident+graphs" in results["variants"]:
        v = results["variants"]
        results["graphs_gpu_over_bf16"] = v["cllm-gpu+graphs"]["tok_s"] / v["bf16-resident+graphs"]["tok_s"]
        print(f"with static cache + CUDA graphs on both: cllm gpu / bf16 = {results['graphs_gpu_over_bf16']:.2f}x")
    if devices:  # ready for benchmarks/RESULTS.md
        print(f"\n| variant | tok/s (runs) | peak GiB per GPU {devices} | x bf16 1 GPU | blocks per GPU | same tokens |")
        print("| --- | --- | --- | ---: | --- | --- |")
        for name, r in results["variants"].items():
            if "error" in r:
                continue
            runs = ", ".join(f"{x:.2f}" for x in r["tok_s_runs"])
            per = " / ".join(f"{x:.3f}" for x in r.get("peak_vram_gib_per_gpu", []))
            same = {True: "yes", False: "**no**"}.get(r.get("same_tokens_as_first_tier"), "-")
            print(f"| {name} | {r['tok_s']:.2f} ({runs}) | {per} | {r['tok_s'] / base['tok_s']:.2f} | "
                  f"{r.get('blocks_per_gpu', '-')} | {same} |")
    for r in results["variants"].values():
        r.pop("tokens", None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.workdir:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # With nvCOMP's scratch routed through torch's allocator (set above, so peaks are complete),
    # nvCOMP 6 can crash in its own teardown at interpreter exit, after everything is written:
    # leave without running it.
    os._exit(rc)
