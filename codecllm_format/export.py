"""Export a .cllm file back to a Hugging Face model folder (cllm-export).

Two formats:
- ``safetensors``: every embedded file as stored, plus model.safetensors (or shards and
  model.safetensors.index.json). Raw and lossless (float_planes) tensors are written bit-exact;
  int8_row tensors are dequantized (float32(q) * scale, then cast to their logical dtype or `dtype`).
- ``compressed-tensors``: an int8 per-output-channel, weight-only (W8A16) checkpoint. Each
  quantized Linear gets NAME.weight_scale (float32, shape [out, 1]) and its int8 values, either
  packed 4 per int32 (q + 128, little end first) as NAME.weight_packed with NAME.weight_shape
  (``ct_format="pack-quantized"``, the default: vLLM serves weight-only int8 through this format
  only, with CompressedTensorsWNA16), or as int8 NAME.weight (``"int-quantized"``: the
  compressed-tensors library reads it, but vLLM routes int-quantized to its W8A8 schemes, which
  need input_activations). Embeddings, lm_head and raw tensors are written dequantized / as
  stored, and config.json gains a ``quantization_config``. A file converted with int8_group
  scales (``--quantize int8-gN``) exports with the "group" strategy (group_size N,
  NAME.weight_scale [out, in / N] in bfloat16), which needs every quantized Linear's input
  features to be a multiple of N (compressed-tensors has no partial groups).

Tied weights: a name that the file aliases to another is written as its own copy, except
lm_head.weight when config.tie_word_embeddings is true, which is left out (transformers
re-ties it on load, as save_pretrained does). The output is built in a temporary folder beside
OUT and renamed at the end: an interruption leaves nothing at OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from . import constants as C
from .errors import CllmError
from .reader import CllmFile, open_cllm
from .writer import DTYPE_TO_TORCH

FORMATS = ("safetensors", "compressed-tensors")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
"""Name fragments of embedding tables: 2-D int8 tensors that are not Linear weights."""
CONV1D_MODEL_TYPES = ("gpt2", "gpt_bigcode", "openai-gpt")
"""Models whose projections are transformers Conv1D ([in, out] weights): our per-row scales are
per input channel there, which compressed-tensors' per-output-channel scheme cannot express."""


class ExportWarning(UserWarning):
    """Something the export could do but that the user should know (e.g. no config.json)."""


@dataclass
class ExportReport:
    out: Path
    format: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    shards: int = 0
    total_bytes: int = 0
    quantized: list[str] = field(default_factory=list)
    omitted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (f"wrote {self.out}: {self.tensors} tensors in {self.shards} shard(s), {self.total_bytes} bytes of weights, "
             f"{len(self.files)} embedded file(s) ({self.format})")
        if self.quantized:
            s += f"; {len(self.quantized)} Linear layers kept int8"
        if self.omitted:
            s += f"; left out (tied, re-tied on load): {', '.join(self.omitted)}"
        return s


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16'/'bf16'/torch.bfloat16 -> torch.bfloat16; None stays None.

    Raises:
        CllmError: not a floating dtype this exporter writes.
    """
    if text is None or isinstance(text, torch.dtype):
        return text
    try:
        return DTYPES[str(text).lower().removeprefix("torch.")]
    except KeyError:
        raise CllmError(f"unsupported --dtype {text!r}: choose float32, bfloat16 or float16") from None


def _safe_relpath(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CllmError(f"embedded file name {name!r} would leave the output folder; refusing to write it")
    return p


def _export_names(f: CllmFile, config: dict | None) -> tuple[list[str], list[str]]:
    """The tensor names to write (file order) and those left out as re-tied on load."""
    names = f.keys()
    tie = bool((config or {}).get("tie_word_embeddings", False))
    omitted = []
    if tie:
        for n in names:
            if n.split(".")[-2:] == ["lm_head", "weight"]:
                target = f.index.aliases.get(n, n)
                others = [m for m in names if m != n and f.index.aliases.get(m, m) == target]
                if others:  # the embedding holds the same tensor under its own name
                    omitted.append(n)
    return [n for n in names if n not in omitted], omitted


def _is_quantized_linear(f: CllmFile, name: str) -> bool:
    e = f.entry(name)
    if e.encoding not in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP) or not name.endswith(".weight") or len(e.shape) != 2:
        return False
    low = name.lower()
    return not any(h in low for h in EMBEDDING_HINTS) and "lm_head" not in name.split(".")


CT_FORMATS = ("pack-quantized", "int-quantized")


def pack_int8_to_int32(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' 8-bit packing: u = q + 128, four per int32 along a row, the first in
    the lowest byte. Needs a column count divisible by 4."""
    rows, cols = q.shape
    u = (q.to(torch.int64) + 128).reshape(rows, cols // 4, 4)
    packed = (u << torch.tensor([0, 8, 16, 24])).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _quantization_config(ignore: list[str], ct_format: str, group_size: int | None = None) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": ct_format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8, "type": "int", "symmetric": True,
                    "strategy": "channel" if group_size is None else "group",
                    "dynamic": False, "group_size": group_size, "block_structure": None, "actorder": None,
                    "observer": "minmax", "observer_kwargs": {},
                },
                "input_activations": None,
                "output_activations": None,
                "format": ct_format,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def export(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "safetensors",  # noqa: A002
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    ct_format: str = "pack-quantized",
) -> ExportReport:
    """Write a Hugging Face folder from a .cllm file.

    Args:
        path: the .cllm file.
        out: the folder to create.
        format: "safetensors" (dequantized) or "compressed-tensors" (int8 per-channel Linear layers).
        dtype: dtype of dequantized int8 tensors (default: each tensor's logical dtype). Raw
            and float_planes tensors are always written exactly as stored (bit for bit).
        max_shard_size: shard the weights above this many bytes (int or "5GB", "10MB", ...).
        overwrite: replace an existing `out`.
        ct_format: compressed-tensors layout, "pack-quantized" (vLLM) or "int-quantized".

    Returns:
        ExportReport.

    Raises:
        CllmError: `out` exists without overwrite, unsupported format or dtype, unreadable file,
        an embedded file name that escapes `out`, compressed-tensors without config.json or for
        a Conv1D model.
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise CllmError(f"unsupported export format {format!r}: choose one of {', '.join(FORMATS)}")
    if ct_format not in CT_FORMATS:
        raise CllmError(f"unsupported compressed-tensors format {ct_format!r}: choose one of {', '.join(CT_FORMATS)}")
    target_dtype = parse_dtype(dtype)
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CllmError(f"{out} already exists; pass --force to replace it")
    report = ExportReport(out=out, format=format)

    with open_cllm(path) as f:
        files = f.file_names()
        config = None
        if "config.json" in files:
            try:
                config = json.loads(f.read_file("config.json"))
            except ValueError:
                raise CllmError(f"{path}: the embedded config.json is not valid JSON") from None
        else:
            if format == "compressed-tensors":
                raise CllmError(f"{path} has no embedded config.json: a compressed-tensors export needs one "
                                "for its quantization_config")
            msg = f"{path} has no embedded config.json: writing the weights only (transformers cannot load the folder as is)"
            warnings.warn(msg, ExportWarning, stacklevel=2)
            report.warnings.append(msg)
        names, report.omitted = _export_names(f, config)

        quantized: set[str] = set()
        if format == "compressed-tensors":
            if str(config.get("model_type", "")) in CONV1D_MODEL_TYPES:
                raise CllmError(f"model_type {config.get('model_type')!r} uses Conv1D projections ([in, out] weights): "
                                "its per-row int8 scales are per input channel, which compressed-tensors cannot express; "
                                "use --format safetensors")
            quantized = {n for n in names if _is_quantized_linear(f, n)}
            group_sizes = {f.entry(n).group_size for n in quantized}
            if len(group_sizes) > 1:
                raise CllmError(f"{path} mixes int8 Linear weights with different scale groupings "
                                f"({', '.join('per row' if g is None else f'groups of {g}' for g in sorted(group_sizes, key=str))}): "
                                "one compressed-tensors scheme cannot express them; use --format safetensors")
            group_size = next(iter(group_sizes), None)
            if group_size is not None:
                partial = sorted(n for n in quantized if f.entry(n).shape[1] % group_size)
                if partial:
                    raise CllmError(f"{partial[0]} has {f.entry(partial[0]).shape[1]} input features, not a multiple of its "
                                    f"scale group size {group_size}: compressed-tensors' group strategy has no partial groups; "
                                    "use --format safetensors (or convert with a group size that divides it)")
            if ct_format == "pack-quantized":
                odd = sorted(n for n in quantized if f.entry(n).shape[1] % 4)
                if odd:
                    raise CllmError(f"{odd[0]} has {f.entry(odd[0]).shape[1]} input features, not a multiple of 4: "
                                    "pack-quantized needs that; use --ct-format int-quantized")
            if not quantized:
                raise CllmError(f"{path} holds no int8 Linear weights to export as compressed-tensors "
                                "(was it converted with --quantize none?); use --format safetensors")
            ignore = sorted({n.removesuffix(".weight") for n in names
                             if n.endswith(".weight") and n not in quantized and len(f.entry(n).shape) == 2
                             and not any(h in n.lower() for h in EMBEDDING_HINTS)})
            config = dict(config)
            config["quantization_config"] = _quantization_config(ignore, ct_format, group_size)
            report.quantized = sorted(quantized)

        # sizes of what will be written, for sharding: (name, nbytes)
        def out_dtype(name: str) -> torch.dtype:
            e = f.entry(name)
            if e.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP):
                return torch.int8 if name in quantized else (target_dtype or DTYPE_TO_TORCH[e.dtype])
            return DTYPE_TO_TORCH[e.dtype]

        sizes: dict[str, int] = {}
        for n in names:
            e = f.entry(n)
            numel = 1
            for d in e.shape:
                numel *= d
            sizes[n] = numel * out_dtype(n).itemsize
            if n in quantized:
                scale_bytes = (e.shape[0] * 4 if e.group_size is None
                               else e.shape[0] * (e.shape[1] // e.group_size) * 2)
                sizes[n] += scale_bytes + (16 if ct_format == "pack-quantized" else 0)
        # the factory only needs sizes: placeholders stand for tensors (it skips str values)
        split = split_state_dict_into_shards_factory(
            {n: (n,) for n in names}, get_storage_size=lambda n: sizes[n[0]], get_storage_id=lambda n: None,
            filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
        )

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            weight_map: dict[str, str] = {}
            for fname, keys in split.filename_to_tensors.items():
                shard: dict[str, torch.Tensor] = {}
                for n in keys:
                    if n in quantized:
                        raw = f.get_raw(n)
                        mod = n.removesuffix(".weight")
                        if ct_format == "pack-quantized":
                            shard[mod + ".weight_packed"] = pack_int8_to_int32(raw.data)
                            shard[mod + ".weight_shape"] = torch.tensor(raw.data.shape, dtype=torch.int64)
                        else:
                            shard[n] = raw.data
                        # per row: [out, 1] float32; int8_group: [out, in / group_size] bfloat16
                        shard[mod + ".weight_scale"] = raw.scales.reshape(raw.scales.shape[0], -1).contiguous()
                        for k in shard:
                            if k.startswith(mod + ".weight"):
                                weight_map[k] = fname
                    else:
                        e = f.entry(n)
                        shard[n] = f.get_tensor(n, out_dtype(n) if e.encoding in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP) else None)
                        weight_map[n] = fname
                    report.tensors += 1
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                report.total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
                del shard
            report.shards = len(split.filename_to_tensors)
            if split.is_sharded:
                index = {"metadata": {"total_size": report.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for name in files:
                rel = _safe_relpath(name)
                dest = tmp.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if name == "config.json" and format == "compressed-tensors":
                    dest.write_text(json.dumps(config, indent=2) + "\n")
                else:
                    dest.write_bytes(f.read_file(name))
                report.files.append(name)
            if out.exists() or out.is_symlink():  # overwrite: move the old one aside, then swap
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
            else:
                os.replace(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CllmError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return report
