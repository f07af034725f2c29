"""Per-row vs group-wise int8 scales (issue #9 item 4): bytes and quality on real models.

For every 2-D float tensor that the converter quantizes (`convert.choose_encoding`), this tool
quantizes it per row (INT8_ROW, today's default) and group-wise (one scale per `group_size`
consecutive columns of a row, scales rounded to float32, bfloat16 or float16), and measures:

- bytes: the stored size of the int8 values and of the scales as the writer stores them (64 KiB
  chunks; zstd level 1 for int8 values, level 6 for streams <= 1 MiB else 3; every chunk
  padded to 16 bytes; 24 bytes of chunk record in the index per chunk). The whole-file figure
  of a variant is the real INT8_ROW file (written by `convert`) minus its int8 tensors' streams
  plus the variant's; with `--real` the int8-g* variants the converter supports are also
  written and their real sizes printed.
- quality: per-tensor SQNR against the original weights; for causal LMs the perplexity on the
  fixed passage (tools/eval_texts.py) and the mean KL divergence (original || variant) of the
  next-token distributions; for encoders the cosine of mean-pooled sentence embeddings.
  The model holds the dequantized float32 weights (what `codecllm_format.load(..., dtype=
  torch.float32)` runs).

    python tools/measure_scales.py smollm2 minilm [--groups 64,128,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codecllm_format.constants as C  # noqa: E402
from codecllm_format.codecs import get_codec  # noqa: E402
from codecllm_format.convert import choose_encoding, convert, open_checkpoint, read_tensor  # noqa: E402
from codecllm_format.quant import (  # noqa: E402
    dequantize_int8_groups,
    dequantize_int8_rows,
    quantize_int8_groups,
    quantize_int8_rows,
    sqnr_db,
)
from codecllm_format.writer import INT8_LEVEL, SMALL_STREAM_BYTES, SMALL_STREAM_LEVEL, DEFAULT_LEVEL, tensor_bytes  # noqa: E402
from tools.eval_texts import PASSAGE, SENTENCES  # noqa: E402
from tools.fidelity import _ppl, resolve  # noqa: E402

SCALE_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_CODECS = {lvl: get_codec(C.Codec.ZSTD, level=lvl) for lvl in (INT8_LEVEL, SMALL_STREAM_LEVEL, DEFAULT_LEVEL)}


def stored_bytes(t: torch.Tensor, int8: bool, threads: int = 2) -> int:
    """Bytes a stream of `t` costs in a .cllm file as CllmWriter writes it: chunk frames, each
    padded to 16, plus its 24-byte chunk records in the index."""
    data = tensor_bytes(t)
    n = len(data)
    if int8:
        level = INT8_LEVEL
    else:
        level = SMALL_STREAM_LEVEL if n <= SMALL_STREAM_BYTES else DEFAULT_LEVEL
    cs = C.DEFAULT_CHUNK_SIZE
    chunks = [data[o : o + cs] for o in range(0, n, cs)]
    frames = _CODECS[level].encode(chunks, threads=threads)
    return sum(-(-len(f) // C.CHUNK_ALIGNMENT) * C.CHUNK_ALIGNMENT + C.CHUNK_RECORD_SIZE for f in frames)


def variants(groups: list[int], scale_dtypes: list[str]) -> list[tuple[str, int | None, str]]:
    out: list[tuple[str, int | None, str]] = [("row", None, "f32")]
    for g in groups:
        for sd in scale_dtypes:
            out.append((f"g{g}-{sd}", g, sd))
    return out


def quantize_variant(w: torch.Tensor, group: int | None, sd: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scales, dequantized float32) of one variant."""
    if group is None:
        q, s = quantize_int8_rows(w)
        return q, s, dequantize_int8_rows(q, s)
    q, s = quantize_int8_groups(w, group, SCALE_DTYPES[sd])
    return q, s, dequantize_int8_groups(q, s, group)


def measure(model: str, groups: list[int], scale_dtypes: list[str], tmp: Path, real: bool) -> dict:
    folder = resolve(model)
    ckpt = open_checkpoint(folder)
    row_file = tmp / f"{model}-row.cllm"
    report_row = convert(folder, row_file, quantize="int8", overwrite=True)
    names = [n for n, st in ckpt.tensors.items() if choose_encoding(st, "int8", None) == C.Encoding.INT8_ROW]
    vs = variants(groups, scale_dtypes)
    res = {v[0]: {"q_bytes": 0, "scale_bytes": 0, "scale_raw_bytes": 0, "sqnr": {}, "weights": {}} for v in vs}
    handles: dict = {}
    stored_once = set(names) - set(report_row.aliases)  # a tied tensor is stored once (an alias)
    for name in names:
        st = ckpt.tensors[name]
        fh = handles.setdefault(st.shard, open(st.shard, "rb", buffering=0))
        w = read_tensor(st, fh)
        for vname, g, sd in vs:
            q, s, deq = quantize_variant(w, g, sd)
            r = res[vname]
            if name in stored_once:
                r["q_bytes"] += stored_bytes(q, True)
                r["scale_bytes"] += stored_bytes(s, False)
                r["scale_raw_bytes"] += s.numel() * s.element_size()
            r["sqnr"][name] = sqnr_db(w, deq)
            r["weights"][name] = deq
    for fh in handles.values():
        fh.close()
    base = res["row"]
    row_total = report_row.output_bytes
    other = row_total - base["q_bytes"] - base["scale_bytes"]
    out: dict = {"model": model, "bf16_bytes": report_row.bf16_bytes, "row_file_bytes": row_total,
                 "int8_tensors": len(names), "variants": {}}
    for vname, g, sd in vs:
        r = res[vname]
        total = other + r["q_bytes"] + r["scale_bytes"]
        sq = sorted(r["sqnr"].values())
        out["variants"][vname] = {
            "group": g, "scale_dtype": sd, "q_bytes": r["q_bytes"], "scale_bytes": r["scale_bytes"],
            "scale_raw_bytes": r["scale_raw_bytes"], "file_bytes": total, "vs_row": total / row_total,
            "ratio_bf16": total / report_row.bf16_bytes,
            "sqnr_min": sq[0], "sqnr_median": sq[len(sq) // 2],
            "sqnr_mean": sum(sq) / len(sq),
        }
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    weights = {v: res[v]["weights"] for v, _, _ in vs}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch.endswith("ForCausalLM") or (not arch and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        out["kind"] = "causal-lm"
        q = causal_lm(folder, weights)
    else:
        out["kind"] = "encoder"
        q = encoder(folder, weights)
    out["original"] = q.pop("original", None)
    for v, m in q.items():
        out["variants"][v].update(m)
    if real:
        out["real"] = {}
        for g in groups:
            path = tmp / f"{model}-g{g}.cllm"
            try:
                rep = convert(folder, path, quantize=f"int8-g{g}", overwrite=True)
            except Exception as e:  # the converter may not offer this group size
                out["real"][f"g{g}"] = f"not written: {e}"
                continue
            out["real"][f"g{g}"] = {"file_bytes": rep.output_bytes, "vs_row": rep.output_bytes / row_total}
    return out


def _swap(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            key = name if name in sd else next((k for k in sd if k.endswith(name) or name.endswith(k)), None)
            if key is None:
                raise KeyError(f"{name} not in the model")
            sd[key].copy_(w)


def causal_lm(folder: Path, weights: dict[str, dict[str, torch.Tensor]]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PASSAGE, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    nll = {}
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), -1)
        out["original"] = {"perplexity": _ppl(ref, ids), "tokens": ids.shape[1]}
        for v, ws in weights.items():
            _swap(model, ws)
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            kl = (ref.exp() * (ref - logp)).sum(-1).double()
            nll[v] = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0].double()
            out[v] = {"perplexity": _ppl(logp, ids), "kl_mean": kl.mean().item(),
                      "kl_sem": (kl.std() / math.sqrt(kl.numel())).item()}
    # paired against per-row scales: mean NLL difference and its standard error over positions
    # (a perplexity change is significant only when |dnll| is well above dnll_se)
    base = nll.get("row")
    if base is not None:
        for v, x in nll.items():
            d = x - base
            out[v]["dnll_vs_row"] = d.mean().item()
            out[v]["dnll_se"] = (d.std() / math.sqrt(d.numel())).item() if v != "row" else 0.0
    return out


def encoder(folder: Path, weights: dict[str, dict[str, torch.Tensor]]) -> dict:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        want = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
        for v, ws in weights.items():
            _swap(model, ws)
            got = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
            cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
            out[v] = {"cosine_min": cos.min().item(), "cosine_mean": cos.mean().item(),
                      "one_minus_cos_mean": (1 - cos.double()).mean().item()}
    return out


def table(r: dict) -> str:
    lm = r["kind"] == "causal-lm"
    head = "| variant | file bytes | vs INT8_ROW | of bf16 | scales stored (raw) | SQNR min / median dB | "
    head += "perplexity | NLL vs row (± s.e.) | KL mean (± s.e.) |" if lm else "cosine min | 1 - cosine mean |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for v, m in r["variants"].items():
        q = (f"{m['perplexity']:.4f} | {m['dnll_vs_row']:+.4f} ± {m['dnll_se']:.4f} | "
             f"{m['kl_mean']:.2e} ± {m['kl_sem']:.1e} |" if lm
             else f"{m['cosine_min']:.6f} | {m['one_minus_cos_mean']:.2e} |")
        lines.append(f"| {v} | {m['file_bytes']:,} | {m['vs_row'] * 100 - 100:+.2f}% | {m['ratio_bf16']:.4f} | "
                     f"{m['scale_bytes']:,} ({m['scale_raw_bytes']:,}) | {m['sqnr_min']:.1f} / {m['sqnr_median']:.1f} | {q}")
    if lm and r.get("original"):
        lines.append(f"\noriginal perplexity {r['original']['perplexity']:.4f} on {r['original']['tokens']} tokens")
    for g, m in (r.get("real") or {}).items():
        lines.append(f"\nreal file {g}: " + (m if isinstance(m, str) else f"{m['file_bytes']:,} B ({m['vs_row'] * 100 - 100:+.2f}% vs INT8_ROW)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="smollm2, minilm, or HF model folders")
    ap.add_argument("--groups", default="64,128,256")
    ap.add_argument("--scale-dtypes", default="f32,bf16,f16")
    ap.add_argument("--real", action="store_true", help="also write the converter's int8-gN files")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    groups = [int(g) for g in args.groups.split(",") if g]
    sds = [s for s in args.scale_dtypes.split(",") if s]
    results = []
    with tempfile.TemporaryDirectory(prefix="cllm-scales-") as tmp:
        for m in args.models:
            r = measure(m, groups, sds, Path(tmp), args.real)
            results.append(r)
            print(f"\n## {m} ({r['int8_tensors']} int8 tensors; INT8_ROW file {r['row_file_bytes']:,} B)\n")
            print(table(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
