"""Console scripts: cllm-convert, cllm-info, cllm-verify, cllm-generate, cllm-push. Thin
wrappers: every CllmError is printed as one line 'cllm-X: error: ...' and exits non-zero, never
a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from . import __version__
from . import constants as C
from .errors import CllmError


def _run(prog: str, body: Callable[[], int], interrupted: str = "interrupted") -> int:
    try:
        return body()
    except CllmError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        return int(float(num) * mult)
    except (ValueError, OverflowError):  # OverflowError: 'inf'
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 1M)") from None


def _quantize(text: str) -> str:
    from .convert import parse_quantize
    from .errors import ConversionError

    try:
        parse_quantize(text)
    except ConversionError:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose int8, int8-group, int8-gN with N a power of two in "
            f"[{C.MIN_GROUP_SIZE}, {C.MAX_GROUP_SIZE}], or none)") from None
    return text


# --- cllm-convert --------------------------------------------------------------------------


def convert_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cllm-convert",
        description=(
            "Convert a safetensors checkpoint to a .cllm file: 2-D float weights (linear layers, "
            "embeddings, lm_head) become int8 with one float32 scale per row; everything else is "
            "kept exact. All data is cut into independent zstd-compressed chunks with checksums. "
            "Memory stays at about twice the largest tensor; the output appears only when complete."
        ),
        epilog="examples:\n  cllm-convert model.safetensors\n  cllm-convert ./Llama-2-7b-hf -o llama2-7b.cllm --threads 8\n"
        "  cllm-convert model.safetensors --quantize none     # lossless: float byte planes + zstd (bf16: ~0.67x)\n"
        "  cllm-convert ./Llama-2-7b-hf --codec ans            # GPU-only file: int8 as nvCOMP ANS (needs a GPU)\n"
        "  cllm-convert model.cllm --codec ans -o model-ans.cllm   # transcode a .cllm, no re-quantization\n"
        "  cllm-convert model.safetensors --quantize int8-g128  # int8, one bfloat16 scale per 128 columns",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a .safetensors file, a sharded folder (model.safetensors.index.json), a Hugging Face model folder, "
                   "a repo id (org/name) already in the local Hugging Face cache (no network), or a .cllm file to "
                   "transcode to --codec (int8 values kept bit for bit)")
    p.add_argument("-o", "--output", help="output path (default: the input's stem + .cllm)")
    p.add_argument("--quantize", type=_quantize, default="int8", metavar="{int8,int8-group,int8-gN,none}",
                   help="int8: per-row int8 for 2-D float tensors (default); int8-gN: int8 with one bfloat16 scale "
                   f"per N columns (N a power of two in [{C.MIN_GROUP_SIZE}, {C.MAX_GROUP_SIZE}]; int8-group: "
                   f"N = {C.DEFAULT_GROUP_SIZE}; format 1.1); none: lossless, bit-exact: bf16/f16/f32 tensors as float "
                   "byte planes (exponent entropy-coded, sign+mantissa as is; format 1.1), other dtypes raw")
    p.add_argument("--level", type=int, default=None,
                   help="zstd level of all data, -7..22 (default: 1 for int8 values, 3 for raw tensors, "
                   "6 for scales and tensors under 1 MiB, 19 for embedded files)")
    p.add_argument("--chunk-size", type=_size, default=C.DEFAULT_CHUNK_SIZE, help="raw bytes per chunk (default 64K; 4K..16M)")
    p.add_argument("--threads", type=int, default=None, help="compression threads (default: all cores)")
    p.add_argument("--keep-regex", help="tensors whose names match this regular expression are kept lossless "
                   "(float byte planes, or raw for non-float dtypes; e.g. 'lm_head|embed')")
    p.add_argument("--codec", choices=("zstd", "ans"), default=None,
                   help="codec of int8 weights: zstd (default; portable, any reader) or ans (nvCOMP ANS, compressed on "
                   "the GPU: the file is GPU-only, loads with no transcoding and decodes ~20x faster from disk; needs "
                   "a CUDA GPU and nvidia-nvcomp >= 6.0)")
    p.add_argument("--trust-gpu-codecs", action="store_true",
                   help="(.cllm input with ANS chunks) allow decoding them with nvCOMP; only for files you trust")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    if not C.MIN_CHUNK_SIZE <= args.chunk_size <= C.MAX_CHUNK_SIZE:
        p.error(f"--chunk-size must be between {C.MIN_CHUNK_SIZE} and {C.MAX_CHUNK_SIZE}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.level is not None and not -7 <= args.level <= 22:
        p.error(f"--level must be between -7 and 22, got {args.level}")

    def body() -> int:
        from tqdm import tqdm

        from .convert import convert

        bar = None

        def on_start(total: int) -> None:
            nonlocal bar
            if not args.quiet:
                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr,
                           disable=None)  # None: no bar when stderr is not a terminal (logs, pipes)

        try:
            report = convert(
                args.input, args.output, quantize=args.quantize, level=args.level, chunk_size=args.chunk_size,
                threads=args.threads, keep_regex=args.keep_regex, overwrite=args.force, codec=args.codec,
                trust_gpu_codecs=args.trust_gpu_codecs,
                progress=(lambda n: bar.update(n)) if not args.quiet else None, on_start=on_start,
            )
        finally:
            if bar is not None:
                bar.close()
        if not args.quiet:
            print(report.summary(), file=sys.stderr)
        return 0

    return _run("cllm-convert", body, "interrupted; nothing was written")


# --- cllm-info -------------------------------------------------------------------------------


def info_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cllm-info",
        description="Show what a .cllm file holds: version, tensors, encodings, sizes and ratios, "
        "the order-0 entropy floor of its int8 data and float exponent planes, embedded files and metadata.",
    )
    p.add_argument("file", help="the .cllm file to describe")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--no-floor", action="store_true", help="skip the entropy floor (it decodes every int8 and float_planes tensor)")
    p.add_argument("--tensors", action="store_true", help="list every tensor (default: the 20 largest)")
    args = p.parse_args(argv)

    def body() -> int:
        from .reader import open_cllm
        from .stats import describe, human

        with open_cllm(args.file) as f:
            d = describe(f, floor=not args.no_floor)
        if args.json:
            print(json.dumps(d, indent=2))
            return 0
        print(f"{d['path']}: .cllm v{d['version']}, {human(d['file_bytes'])} ({d['file_bytes']} bytes)")
        for k, v in d["metadata"].items():
            print(f"  {k}: {v}")
        enc = ", ".join(f"{n} {k}" for k, n in d["encodings"].items())
        print(f"tensors: {d['tensor_count']} ({enc}); {len(d['aliases'])} tied; {d['groups']} layer groups; index {human(d['index_bytes'])}")
        rows = d["tensors"] if args.tensors else sorted(d["tensors"], key=lambda t: -t["stored_bytes"])[:20]
        w = max([len(t["name"]) for t in rows] + [4])
        print(f"\n  {'name':<{w}}  {'shape':<16} {'dtype':<5} {'encoding':<12} {'stored':>10} {'of bf16':>8}")
        for t in rows:
            ratio = f"{t['ratio_bf16']:.3f}" if t["ratio_bf16"] is not None else "-"
            print(f"  {t['name']:<{w}}  {str(tuple(t['shape'])):<16} {t['dtype']:<5} {t['encoding']:<12} {human(t['stored_bytes']):>10} {ratio:>8}")
        if not args.tensors and len(d["tensors"]) > len(rows):
            print(f"  ... {len(d['tensors']) - len(rows)} more (--tensors lists all)")
        for alias, target in d["aliases"].items():
            print(f"  {alias} -> {target} (tied)")
        print(f"\ntotal: {human(d['file_bytes'])} = {d['ratio_bf16']:.4f} of bf16 ({human(d['bf16_bytes'])}), "
              f"{d['ratio_logical']:.4f} of the original dtypes ({human(d['logical_bytes'])})")
        if len(d.get("codecs", [])) > 1 or d.get("codecs") == ["ans"]:
            print(f"codecs: {', '.join(d['codecs'])} (ans chunks are GPU-only: nvCOMP decodes them)")
        if d.get("floor_skipped"):
            print(f"floor: not computed ({d['floor_skipped']})")
        if "floor_bytes" in d:
            print(f"floor (order-0 entropy of int8 values + scales, of float exponents + raw sign/mantissa; "
                  f"raw tensors as stored): {human(d['floor_bytes'])} = "
                  f"{d['floor_ratio_bf16']:.4f} of bf16; this file is {100 * d['over_floor']:+.2f}% over it")
        if d["files"]:
            print("embedded files: " + ", ".join(f"{n} ({human(s)})" for n, s in d["files"].items()))
        return 0

    return _run("cllm-info", body)


# --- cllm-verify -----------------------------------------------------------------------------


def verify_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cllm-verify",
        description="Check a .cllm file completely: header, index, every chunk's checksum, a strict "
        "decode of every chunk, and zero padding. Exit 0 when sound, 1 with a report when not.",
    )
    p.add_argument("file", help="the .cllm file to check")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is sound")
    p.add_argument("--trust-gpu-codecs", action="store_true",
                   help="decode ANS chunks on the GPU with nvCOMP too (only for files you trust: nvCOMP assumes valid input); "
                   "without it their checksums and sizes are checked and they are reported as not decoded")
    p.add_argument("--strict", action="store_true", help="exit 1 when some chunks could not be decoded (ANS without GPU or trust)")
    args = p.parse_args(argv)

    def body() -> int:
        from .reader import open_cllm

        undecoded: list[str] = []
        with open_cllm(args.file, trust_gpu_codecs=args.trust_gpu_codecs) as f:
            problems = f.verify(undecoded=undecoded)
            chunks = sum(s.num_chunks for _, _, s in f.index.iter_streams())
        if undecoded and args.strict:
            problems = problems + undecoded
        if problems:
            print(f"{args.file}: NOT SOUND — {len(problems)} problem(s):", file=sys.stderr)
            for pr in problems[:100]:
                print(f"  {pr}", file=sys.stderr)
            if len(problems) > 100:
                print(f"  ... and {len(problems) - 100} more", file=sys.stderr)
            return 1
        if undecoded:  # sound as far as this process can check: say what it could not
            print(f"{args.file}: OK, PARTLY — header, index, padding, checksums and sizes of {chunks} chunks verified; "
                  f"{len(undecoded)} ANS stream(s) not decoded (--strict makes this an error), e.g.\n  {undecoded[0]}",
                  file=sys.stderr)
            return 0
        if not args.quiet:
            print(f"{args.file}: OK — header, index and {chunks} chunks verified")
        return 0

    return _run("cllm-verify", body)


# --- cllm-generate ---------------------------------------------------------------------------


def generate_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cllm-generate",
        description="Load a .cllm file (weights stay compressed; each layer is decoded right before "
        "it runs) and print the text generated after a prompt. Greedy unless --sample.",
        epilog='examples:\n  cllm-generate model.cllm "The capital of France is"\n'
        '  cllm-generate chat.cllm "What is the capital of France?" --chat --max-new-tokens 64',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="a .cllm file with an embedded config and tokenizer")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    p.add_argument("--device-map", default=None, metavar="auto|0,1",
                   help="split the layers over several GPUs as a pipeline: auto (every visible GPU) or a "
                   "comma-separated list of GPU indices; --max-vram may then list one budget per GPU (6GiB,10GiB)")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16 (default: the model's)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample (with the model's generation settings) instead of greedy")
    gpu = p.add_argument_group("GPU options (with --device cuda or --device-map)")
    gpu.add_argument("--residency", choices=("gpu", "gpu-compressed", "host", "disk", "auto"), default=None,
                     help="where the int8 weights live: gpu (decoded once, fastest), gpu-compressed (compressed in "
                     "VRAM, decoded per forward), host (compressed in pinned RAM, streamed: least VRAM; the default), "
                     "disk (read from the file each forward), auto (fastest mix that fits --max-vram)")
    gpu.add_argument("--max-vram", default=None, help="VRAM budget for weights + KV cache, e.g. 6GiB (with --residency auto)")
    gpu.add_argument("--slots", type=int, default=None,
                     help="streaming buffers of the streaming tiers (default 2: one group prefetched ahead; 3 keeps the "
                     "copies going across token boundaries when the host->GPU link is the bound, for one more buffer)")
    gpu.add_argument("--codec", choices=("auto", "zstd", "ans"), default=None,
                     help="in-memory codec of the host/gpu-compressed tiers (default auto = nvCOMP ANS)")
    gpu.add_argument("--no-fuse-norms", action="store_true",
                     help="keep transformers' RMSNorm modules (by default on CUDA each runs as one fused kernel plus "
                     "the weight multiply: fewer launches, equal within one rounding)")
    gpu.add_argument("--trust-gpu-codecs", action="store_true",
                     help="allow loading a file whose int8 weights are stored as nvCOMP ANS (cllm-convert --codec ans): "
                     "nvCOMP decodes them without the checks zstd chunks get; only for files you trust")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.slots is not None and args.slots < 1:
        p.error("--slots must be >= 1")
    runtime = {k: v for k, v in (("residency", args.residency), ("max_vram", args.max_vram), ("codec", args.codec),
                                 ("slots", args.slots)) if v is not None}
    if args.device_map is not None:
        if args.device is not None and args.device != "cuda":
            p.error(f"--device-map splits the model over GPUs: leave --device out (got --device {args.device})")
        if args.max_vram is not None and "," in args.max_vram:
            runtime["max_vram"] = [v.strip() for v in args.max_vram.split(",")]
    elif runtime and not (args.device or "cpu").startswith("cuda"):
        p.error("--residency, --max-vram, --slots and --codec need --device cuda or --device-map")
    where = {"device_map": args.device_map} if args.device_map is not None else {"device": args.device or "cpu"}

    def body() -> int:
        from .loader import load

        try:
            model = load(args.file, dtype=args.dtype, trust_gpu_codecs=args.trust_gpu_codecs,
                         fuse_norms=False if args.no_fuse_norms else None, **where, **runtime)
        except ValueError as e:  # a bad --dtype
            raise CllmError(str(e)) from None
        with model:
            text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, do_sample=args.sample)
        print(text)
        return 0

    def guarded() -> int:
        try:
            return body()
        except ValueError as e:  # chat without a template
            print(f"cllm-generate: error: {e}", file=sys.stderr)
            return 1

    return _run("cllm-generate", guarded)


# --- cllm-push -------------------------------------------------------------------------------


def push_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cllm-push",
        description="Publish a .cllm file on the Hugging Face Hub: create the repo when needed, then commit the "
        ".cllm (streamed from disk, stored as a large file) and a generated model card (README.md, replacing the "
        "repo's) with the compression summary and a usage snippet. Others then run codecllm_format.load(\"org/name\").",
        epilog="examples:\n  cllm-push smollm2.cllm my-org/SmolLM2-135M-Instruct-cllm\n"
        "  cllm-push model.cllm me/model-cllm --private --revision int8\n"
        "  cllm-push model.cllm me/model-cllm --dry-run out/   # writes what would be uploaded, uploads nothing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="the .cllm file to publish")
    p.add_argument("repo_id", metavar="org/name", help="the model repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", default=None, help="commit to this branch (created from main when missing)")
    p.add_argument("--commit-message", metavar="M", default=None, help="the commit message")
    p.add_argument("--dry-run", metavar="DIR", default=None,
                   help="write the folder that would be uploaded (.cllm hard link + README.md) to DIR; upload nothing")
    p.add_argument("--token", metavar="T", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum pass over the whole file before uploading")
    args = p.parse_args(argv)

    def body() -> int:
        from .hub import push

        push(args.file, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
             token=args.token, dry_run=args.dry_run, verify=not args.no_verify)
        return 0

    return _run("cllm-push", body, "interrupted; the Hub keeps only complete commits")


# --- cllm-export -----------------------------------------------------------------------------


def export_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cllm-export",
        description="Export a .cllm file back to a Hugging Face model folder: the embedded config and tokenizer "
        "files as stored, plus safetensors weights (raw and lossless tensors bit-exact, int8 tensors dequantized), or an "
        "int8 per-channel compressed-tensors checkpoint. OUT appears only when complete.",
        epilog="examples:\n  cllm-export model.cllm ./model-hf\n  cllm-export model.cllm ./model-bf16 --dtype bfloat16 --max-shard-size 2GB\n"
        "  cllm-export model.cllm ./model-w8 --format compressed-tensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="the .cllm file")
    p.add_argument("out", help="the folder to create")
    p.add_argument("--format", choices=("safetensors", "compressed-tensors"), default="safetensors",
                   help="safetensors: dequantized weights (default); compressed-tensors: int8 Linear weights + per-channel scales")
    p.add_argument("--dtype", default=None, help="dtype of dequantized int8 tensors: float32, bfloat16, float16 (default: each tensor's original)")
    p.add_argument("--ct-format", choices=("pack-quantized", "int-quantized"), default="pack-quantized",
                   help="compressed-tensors layout: pack-quantized (int8 packed in int32, what vLLM serves as W8A16; "
                   "default) or int-quantized (plain int8 weights)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="largest shard (default 5GB; e.g. 2GB, 500M)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    args = p.parse_args(argv)

    def body() -> int:
        import warnings

        from .export import ExportWarning, export

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)
            report = export(args.file, args.out, format=args.format, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, overwrite=args.force, ct_format=args.ct_format)
        for w in report.warnings:
            print(f"cllm-export: warning: {w}", file=sys.stderr)
        if not args.quiet:
            print(report.summary(), file=sys.stderr)
        return 0

    return _run("cllm-export", body, "interrupted; nothing was written")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_main())
