"""safetensors checkpoint (file, sharded folder, Hugging Face model folder) -> .cllm.

Streaming: tensors are read one at a time through safetensors' lazy `safe_open`, encoded,
compressed and written, so peak memory is about twice the largest tensor plus buffers.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from . import __version__
from . import constants as C
from .checksums import xxh3_64
from .errors import CllmError, ConversionError
from .hub import checkpoint_source, source_card_metadata
from .hub import default_output as hub_default_output
from .quant import NonFiniteError, quantize_int8_groups, quantize_int8_rows
from .stats import bf16_size, human
from .writer import PARTIAL_SUFFIX, CllmWriter, tensor_bytes

EMBEDDED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
"""Files beside the weights that are embedded when present (config, tokenizer, pooling)."""

SUPERSEDED_BY_TOKENIZER_JSON = ("vocab.txt", "vocab.json", "merges.txt")
"""Slow-tokenizer vocabularies that tokenizer.json holds in full: not embedded when it is
present (transformers' tokenizers backend reads tokenizer.json alone). For all-MiniLM-L6-v2,
vocab.txt would add 0.22% of the bf16 size (benchmarks/RESULTS.md)."""

BLOCK_RE = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)\.")
"""A tensor whose name matches belongs to the layer group named by the first group; any other
tensor to the group of its top-level module ('embeddings', 'lm_head'): each group pads to
4096 bytes, which costs 0.1% of a small model when every small tensor has its own."""

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


def natural_key(name: str) -> tuple:
    """Sort key that orders 'layers.2' before 'layers.10'."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def group_of(name: str) -> str:
    """Layer group of a tensor: its transformer block ('model.layers.3'), else its top-level
    module ('model' for 'model.norm.weight', 'lm_head' for 'lm_head.weight')."""
    m = BLOCK_RE.match(name)
    if m:
        return m.group(1)
    return name.split(".", 1)[0] or name


@dataclass
class SourceTensor:
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = -1
    """Absolute file offset of the tensor's bytes (from the safetensors header)."""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * SAFETENSORS_DTYPES[self.dtype].itemsize if self.dtype in SAFETENSORS_DTYPES else 0


@dataclass
class Checkpoint:
    """What was found at the input path: tensors by name, and the folder of side files."""

    tensors: dict[str, SourceTensor]
    aux_dir: Path | None
    label: str
    shards: list[Path] = field(default_factory=list)
    ties: dict[str, str] = field(default_factory=dict)
    """Tensors left out of the file as duplicates of another (safetensors.torch.save_model
    records them in the header metadata as {removed name: kept name})."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _shards_of(path: Path) -> tuple[list[Path], Path | None]:
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            return _shards_from_index(index), path
        single = path / "model.safetensors"
        if single.is_file():
            return [single], path
        found = sorted(path.glob("*.safetensors"))
        if found:
            return found, path
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".ckpt"))
        hint = f" (found {others[:3]}: load them with transformers and save with save_pretrained(safe_serialization=True))" if others else ""
        raise ConversionError(f"{path}: no .safetensors weights in this folder{hint}")
    if path.name.endswith(".safetensors.index.json"):
        return _shards_from_index(path), path.parent
    return [path], path.parent


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()}, key=natural_key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
    paths = []
    for s in shards:
        p = index.parent / s
        if Path(s).is_absolute() or ".." in Path(s).parts:
            raise ConversionError(f"{index}: shard path {s!r} leaves the folder")
        if not p.is_file():
            raise ConversionError(f"{index}: shard {s} is missing")
        paths.append(p)
    return paths


def _data_offsets(shard: Path) -> dict[str, int]:
    """Absolute offset of each tensor's bytes in a safetensors file (8-byte little-endian
    header length, JSON header with data_offsets relative to the end of the header)."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def read_tensor(st: SourceTensor, fh) -> torch.Tensor:
    """Read one tensor with plain reads into a fresh tensor. (safe_open's get_tensor maps
    the file, and every page it touched stays in the process's RSS until the handle
    closes: a whole shard, several GB.)

    Raises:
        ConversionError: the file ends before the tensor does.
    """
    n = st.nbytes
    buf = torch.empty(n, dtype=torch.uint8)
    if n:
        view = memoryview(buf.numpy())
        fh.seek(st.offset)
        pos = 0
        while pos < n:
            got = fh.readinto(view[pos:])
            if not got:
                raise ConversionError(f"{st.shard}: ends inside tensor {st.name!r} (offset {st.offset + pos}, needs {n} bytes)")
            pos += got
    return buf.view(SAFETENSORS_DTYPES[st.dtype]).reshape(st.shape)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Find and read the headers of a checkpoint's safetensors files. A Hugging Face repo id
    ("org/name", not an existing local path) is read from the local HF cache, never the network.

    Raises:
        ConversionError: missing input, not safetensors, unreadable header, duplicate tensors,
            a repo id that is not in the local Hugging Face cache.
    """
    path, repo_id = checkpoint_source(path)
    shards, aux = _shards_of(path)
    tensors: dict[str, SourceTensor] = {}
    shard_meta: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:  # validates the header and the offsets
                shard_meta.update(f.metadata() or {})
                offsets = _data_offsets(shard)
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = sl.get_dtype()
                    if name in tensors:
                        raise ConversionError(f"tensor {name!r} is in both {tensors[name].shard.name} and {shard.name}")
                    tensors[name] = SourceTensor(name, shard, dtype, tuple(sl.get_shape()), offsets[name])
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{shard}: not a readable safetensors file ({e})") from None
        except Exception as e:  # safetensors raises plain exceptions for some header problems
            if isinstance(e, CllmError):
                raise
            raise ConversionError(f"{shard}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not tensors:
        raise ConversionError(f"{path}: the checkpoint holds no tensors")
    for t in tensors.values():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {t.name!r}: dtype {t.dtype} is not supported by .cllm v1")
    ties = {k: v for k, v in shard_meta.items()
            if isinstance(v, str) and v in tensors and k not in tensors and "." in k and not k.startswith("__")}
    return Checkpoint(tensors=tensors, aux_dir=aux, label=repo_id or path.name, shards=shards, ties=ties)


PLANE_DTYPES = ("BF16", "F16", "F32")
"""safetensors dtypes the lossless float_planes encoding takes (F64 and integers stay raw)."""


QUANTIZE_HELP = ("int8 or none (lossless), or int8-gN (int8 with one bfloat16 scale per N input columns, N a power of two "
                 f"in [{C.MIN_GROUP_SIZE}, {C.MAX_GROUP_SIZE}], e.g. int8-g64; int8-group is int8-g{C.DEFAULT_GROUP_SIZE})")


def parse_quantize(quantize: str) -> tuple[C.Encoding | None, int | None]:
    """`quantize` as (encoding of 2-D float tensors, group size): "int8" -> INT8_ROW,
    "int8-gN" -> INT8_GROUP with group size N ("int8-group": N = C.DEFAULT_GROUP_SIZE),
    "none" -> (None, None).

    Raises:
        ConversionError: anything else, or N not a power of two in [MIN_GROUP_SIZE, MAX_GROUP_SIZE].
    """
    if quantize == "none":
        return None, None
    if quantize == "int8":
        return C.Encoding.INT8_ROW, None
    if quantize == "int8-group":
        return C.Encoding.INT8_GROUP, C.DEFAULT_GROUP_SIZE
    m = re.fullmatch(r"int8-g(\d{1,5})", quantize) if isinstance(quantize, str) else None
    if m is not None:
        g = int(m.group(1))
        if C.MIN_GROUP_SIZE <= g <= C.MAX_GROUP_SIZE and not g & (g - 1):
            return C.Encoding.INT8_GROUP, g
    raise ConversionError(f"--quantize must be {QUANTIZE_HELP}; got {quantize!r}")


def choose_encoding(t: SourceTensor, quantize: str, keep: re.Pattern | None) -> C.Encoding:
    """int8_row (quantize "int8") or int8_group ("int8-gN") for 2-D float tensors (linear
    weights, embeddings, lm_head); those matching `keep` are kept lossless (float_planes for
    bf16/f16/f32, else raw); other tensors (norms, biases, integer buffers) raw. quantize="none":
    every bf16/f16/f32 tensor float_planes (lossless, smaller than raw), any other dtype raw."""
    encoding, _ = parse_quantize(quantize)
    if encoding is None or (keep is not None and keep.search(t.name)):
        return C.Encoding.FLOAT_PLANES if t.dtype in PLANE_DTYPES else C.Encoding.RAW
    if len(t.shape) == 2 and t.dtype in ("F32", "F16", "BF16", "F64") and t.shape[0] > 0 and t.shape[1] > 0:
        return encoding
    return C.Encoding.RAW


def default_output(path: Path) -> Path:
    from_hub = hub_default_output(path)  # org/name -> ./name.cllm
    if from_hub is not None:
        return from_hub
    path = Path(path)
    if path.is_dir():
        return path.parent / (path.resolve().name + ".cllm")
    if path.name.endswith(".safetensors.index.json"):
        return path.parent / (path.parent.resolve().name + ".cllm")
    return path.with_suffix(".cllm")


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove temp files left beside `target` by converters that died (pid no longer alive)."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}"):
        m = re.search(r"\.(\d+)-[0-9a-f]+" + re.escape(PARTIAL_SUFFIX) + "$", p.name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


@dataclass
class ConversionReport:
    input_bytes: int
    bf16_bytes: int
    output_bytes: int
    seconds: float
    tensors: int
    int8_tensors: int
    aliases: dict[str, str]
    files: list[str]
    output: Path
    planes_tensors: int = 0
    """Tensors written lossless as float_planes."""

    @property
    def ratio(self) -> float:
        return self.output_bytes / max(1, self.input_bytes)

    @property
    def ratio_bf16(self) -> float:
        return self.output_bytes / max(1, self.bf16_bytes)

    def summary(self) -> str:
        mbps = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        return (
            f"wrote {self.output} — {self.tensors} tensors ({self.int8_tensors} int8"
            f"{', ' + str(self.planes_tensors) + ' lossless' if self.planes_tensors else ''}"
            f"{', ' + str(len(self.aliases)) + ' tied' if self.aliases else ''}), {len(self.files)} embedded files\n"
            f"input {human(self.input_bytes)} ({self.input_bytes} B) -> output {human(self.output_bytes)} ({self.output_bytes} B): "
            f"{self.ratio:.3f} of input, {self.ratio_bf16:.3f} of bf16; {self.seconds:.1f} s, {mbps:.0f} MB/s"
        )


def convert(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    quantize: str = "int8",
    level: int | None = None,
    chunk_size: int = C.DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
    keep_regex: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    metadata: dict[str, str] | None = None,
    codec: str | None = None,
    trust_gpu_codecs: bool = False,
) -> ConversionReport:
    """Convert a safetensors checkpoint to .cllm (or an existing .cllm to another int8 codec:
    see transcode_cllm, used when `input_path` is a .cllm file).

    Args:
        input_path: a .safetensors file, a sharded folder or index, or an HF model folder.
        output_path: target (default: input stem + .cllm). Written atomically.
        quantize: "int8" (2-D float tensors to int8_row), "int8-gN" (to int8_group with
            group size N, e.g. "int8-g128") or "none" (lossless: bf16/f16/f32 tensors
            float_planes, other dtypes raw).
        level, chunk_size, threads: zstd settings (level None: the writer's per-stream defaults).
        keep_regex: tensors whose names match stay lossless (float_planes, or raw for other dtypes).
        overwrite: replace an existing output.
        progress: called with increments of input bytes processed.
        on_start: called once with the total input bytes.
        codec: codec of int8 tensors: "zstd" (None: the default, portable) or "ans" (nvCOMP
            ANS, compressed on the GPU: a GPU-only file, format 1.1; spec section 11). A .cllm
            input needs it explicitly (it is then transcoded).
        trust_gpu_codecs: (.cllm input) allow decoding its ANS chunks on the GPU.

    Returns:
        A ConversionReport.

    Raises:
        ConversionError: bad input, existing output, non-finite weights, out of disk space.
        CodecUnavailable: codec="ans" without a CUDA GPU and nvCOMP >= 6.0 (nothing written).
    """
    if Path(input_path).suffix == ".cllm" and Path(input_path).is_file():
        if codec is None:
            raise ConversionError(f"{input_path} is already a .cllm file; to rewrite it with another int8 codec, "
                                  f"pass --codec ans or --codec zstd")
        return transcode_cllm(input_path, output_path, codec=codec, threads=threads, overwrite=overwrite,
                              trust_gpu_codecs=trust_gpu_codecs, level=level)
    codec = codec or "zstd"
    _, group_size = parse_quantize(quantize)
    if codec == "ans" and group_size is not None:
        raise ConversionError(f"--codec ans stores int8_row weights only (spec/FORMAT.md section 11); "
                              f"--quantize {quantize} files stay zstd: drop --codec ans or use --quantize int8")
    _check_codec(codec)
    keep = None
    if keep_regex:
        try:
            keep = re.compile(keep_regex)
        except re.error as e:
            raise ConversionError(f"--keep-regex {keep_regex!r} is not a valid regular expression ({e})") from None
    t0 = time.perf_counter()
    ckpt = open_checkpoint(input_path)
    out = Path(output_path) if output_path is not None else default_output(input_path)
    if out.is_dir():
        raise ConversionError(f"{out}: output is a folder")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists (pass --force to overwrite)")
    if any(out.resolve() == s.resolve() for s in ckpt.shards):
        raise ConversionError(f"{out}: output would overwrite the input")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent}: output folder does not exist")
    clean_stale_partials(out)
    if on_start is not None:
        on_start(ckpt.nbytes)

    meta = {
        C.META_CREATED_BY: f"codecllm-format {__version__}",
        C.META_SOURCE: ckpt.label,
        C.META_QUANTIZE: quantize if group_size is None else f"int8-g{group_size}",  # int8-group: its size
    }
    side_files: dict[str, bytes] = {}
    if ckpt.aux_dir is not None:
        for name in EMBEDDED_FILES:
            p = ckpt.aux_dir / name
            if p.is_file():
                side_files[name] = p.read_bytes()
        if "tokenizer.json" in side_files:
            for name in SUPERSEDED_BY_TOKENIZER_JSON:
                side_files.pop(name, None)
    if "config.json" in side_files:
        try:
            cfg = json.loads(side_files["config.json"])
            if cfg.get("architectures"):
                meta["architecture"] = str(cfg["architectures"][0])
            if cfg.get("model_type"):
                meta["model_type"] = str(cfg["model_type"])
        except (ValueError, AttributeError, TypeError):
            raise ConversionError(f"{ckpt.aux_dir / 'config.json'}: not valid JSON") from None
    meta.update(source_card_metadata(ckpt.aux_dir))  # the source model card's license
    if codec == "ans":
        meta["int8_codec"] = _ans_label()
    meta.update(metadata or {})

    groups: dict[str, list[SourceTensor]] = {}
    for t in ckpt.tensors.values():
        groups.setdefault(group_of(t.name), []).append(t)
    handles: dict[Path, object] = {}  # shard -> unbuffered file, used by the worker thread only
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    int8 = 0
    planes = 0
    bf16_bytes = 0
    order = [(g, st) for g in sorted(groups, key=natural_key) for st in sorted(groups[g], key=lambda t: natural_key(t.name))]

    def prepare(st: SourceTensor) -> tuple:
        """Read one tensor, detect a tie, quantize: runs on a worker thread, one tensor ahead
        of the writer (which compresses the previous one meanwhile), in file order."""
        nonlocal bf16_bytes
        if st.shard not in handles:
            handles[st.shard] = open(st.shard, "rb", buffering=0)
        tensor = read_tensor(st, handles[st.shard])
        bf16_bytes += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
        key = (tuple(tensor.shape), str(tensor.dtype), xxh3_64(tensor_bytes(tensor))) if tensor.numel() else None
        if key is not None and key in seen:
            other = seen[key]
            earlier = read_tensor(ckpt.tensors[other], handles[ckpt.tensors[other].shard])
            if torch.equal(earlier.view(torch.uint8) if earlier.dtype != torch.bool else earlier,
                           tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor):
                return ("alias", other)
            del earlier
        if key is not None:
            seen[key] = st.name
        enc = choose_encoding(st, quantize, keep)
        if enc not in (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP):
            return ("raw", tensor, enc)
        try:
            if enc == C.Encoding.INT8_GROUP:
                q, scales = quantize_int8_groups(tensor, group_size, torch.bfloat16)
            else:
                q, scales = quantize_int8_rows(tensor)
        except NonFiniteError:
            raise ConversionError(
                f"tensor {st.name!r} holds NaN or infinity and cannot be quantized; "
                f"keep it raw with --keep-regex '{re.escape(st.name)}'"
            ) from None
        return ("int8", q, scales, tensor.dtype)

    torch_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cllm-prepare")
    try:
        # the writer's zstd threads do the parallel work; torch's own intra-op threads would
        # only fight them (and the 1 MiB quantization blocks are too small to split)
        torch.set_num_threads(1)
        with CllmWriter(out, chunk_size=chunk_size, level=level, threads=threads or os.cpu_count() or 1, metadata=meta,
                        int8_codec=codec) as w:
            began: set[str] = set()
            nxt = pool.submit(prepare, order[0][1]) if order else None
            for i, (gname, st) in enumerate(order):
                item = nxt.result()
                nxt = pool.submit(prepare, order[i + 1][1]) if i + 1 < len(order) else None
                if item[0] == "alias":
                    aliases[st.name] = item[1]
                    if progress is not None:
                        progress(st.nbytes)
                    continue
                if gname not in began:
                    w.begin_group(gname)
                    began.add(gname)
                if item[0] == "int8":
                    w.add_int8_tensor(st.name, item[1], item[2], dtype=item[3], progress=progress,
                                      group_size=group_size)
                    int8 += 1
                else:
                    w.add_tensor(st.name, item[1], item[2], progress=progress)
                    planes += item[2] == C.Encoding.FLOAT_PLANES
                del item
            for alias, target in ckpt.ties.items():
                aliases[alias] = aliases.get(target, target)
            for alias, target in aliases.items():
                w.add_alias(alias, target)
            for name, data in side_files.items():
                w.add_file(name, data)
            w.finish()
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise ConversionError(f"out of disk space writing {out}; nothing was written") from None
        if e.errno == 27:  # EFBIG
            raise ConversionError(f"file size limit reached writing {out}; nothing was written") from None
        raise ConversionError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        for fh in handles.values():
            fh.close()
        handles.clear()
    return ConversionReport(
        input_bytes=ckpt.nbytes,
        bf16_bytes=bf16_bytes,
        output_bytes=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        tensors=len(ckpt.tensors),
        int8_tensors=int8,
        planes_tensors=planes,
        aliases=aliases,
        files=list(side_files),
        output=out,
    )


# --- int8 codec choice and .cllm -> .cllm transcoding ------------------------------------------


def _check_codec(codec: str) -> None:
    """Fail fast (before reading or writing anything) on an unknown codec, or on "ans" without
    a GPU encoder."""
    if codec not in ("zstd", "ans"):
        raise ConversionError(f"--codec must be zstd or ans, got {codec!r}")
    if codec == "ans":
        from .codecs.ans import gpu_decoder_unavailable  # noqa: PLC0415
        from .errors import CodecUnavailable  # noqa: PLC0415

        reason = gpu_decoder_unavailable()
        if reason is not None:
            raise CodecUnavailable(f"--codec ans compresses int8 weights on a GPU with nvCOMP: {reason}; nothing was written")


def _ans_label() -> str:
    """Informative metadata value naming the ANS encoder (metadata never changes decoding)."""
    try:
        import importlib  # noqa: PLC0415

        return f"ans (nvCOMP {importlib.import_module('nvidia.nvcomp').__version__})"
    except Exception:  # noqa: BLE001
        return "ans"


def transcode_cllm(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    codec: str = "ans",
    threads: int | None = None,
    overwrite: bool = False,
    trust_gpu_codecs: bool = False,
    level: int | None = None,
) -> ConversionReport:
    """Rewrite a .cllm file with another codec for its int8_row tensors, without re-quantizing:
    the int8 values and scales are decoded and re-compressed bit for bit (zstd -> ANS on a GPU,
    or ANS -> zstd), streams already in the target codec and RAW tensors are copied chunk by
    chunk (checksums checked), groups, aliases, embedded files and metadata are kept.

    Args:
        input_path: the source .cllm; output_path: the target (default: INPUT-CODEC.cllm).
        codec: "ans" or "zstd"; threads, level: zstd settings of re-compressed streams.
        trust_gpu_codecs: allow decoding the source's ANS chunks on the GPU (ANS -> zstd).

    Raises:
        ConversionError: missing input, existing output, output == input, write failure.
        CodecUnavailable, TrustRequired: ANS work without a GPU / without trust (nothing written).
        FormatError: the source file is not sound.
    """
    from .index import Stream  # noqa: PLC0415
    from .reader import open_cllm  # noqa: PLC0415
    from .writer import DTYPE_TO_TORCH, PrecompressedStream  # noqa: PLC0415

    _check_codec(codec)
    t0 = time.perf_counter()
    src_path = Path(input_path)
    if not src_path.is_file():
        raise ConversionError(f"{src_path}: no such file")
    out = Path(output_path) if output_path is not None else src_path.with_name(f"{src_path.stem}-{codec}.cllm")
    if out.is_dir():
        raise ConversionError(f"{out}: output is a folder")
    if out.exists() and out.resolve() == src_path.resolve():
        raise ConversionError(f"{out}: output would overwrite the input")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists (pass --force to overwrite)")
    clean_stale_partials(out)
    target = C.Codec.ANS if codec == "ans" else C.Codec.ZSTD
    with open_cllm(src_path, trust_gpu_codecs=trust_gpu_codecs) as f:
        index = f.index
        int8_cs = next((t.streams[0].chunk_size for t in index.tensors if t.encoding == C.Encoding.INT8_ROW),
                       C.DEFAULT_CHUNK_SIZE)
        meta = dict(index.metadata)
        meta[C.META_CREATED_BY] = f"codecllm-format {__version__}"
        meta.pop("int8_codec", None)
        if codec == "ans":
            meta["int8_codec"] = _ans_label()
        by_group: dict[int, list] = {}
        for t in index.tensors:
            by_group.setdefault(t.group, []).append(t)

        def copied(stream: Stream, where: str) -> PrecompressedStream:
            views = f.stored_chunks(stream, where)  # checksums checked
            try:
                chunks = [bytes(v) for v in views]
            finally:
                for v in views:
                    v.release()
            return PrecompressedStream(stream.codec, stream.length, stream.chunk_size, chunks)

        int8 = 0
        try:
            with CllmWriter(out, chunk_size=int8_cs, level=level, threads=threads or os.cpu_count() or 1,
                            metadata=meta, int8_codec=codec) as w:
                for gid, g in enumerate(index.groups):
                    if g.name == C.FILES_GROUP:
                        continue
                    w.begin_group(g.name)
                    for t in by_group.get(gid, []):
                        where = f"tensor {t.name!r}"
                        if t.encoding == C.Encoding.INT8_ROW:
                            int8 += 1
                        if t.encoding == C.Encoding.INT8_ROW and any(s.codec != target for s in t.streams):
                            raw = f.get_raw(t.name)
                            w.add_int8_tensor(t.name, raw.data, raw.scales, dtype=DTYPE_TO_TORCH[t.dtype])
                            del raw
                        else:
                            w.add_precompressed_tensor(t.name, t.shape, t.dtype, t.encoding,
                                                       [copied(s, where) for s in t.streams])
                for alias, tgt in index.aliases.items():
                    w.add_alias(alias, tgt)
                for name in f.file_names():
                    w.add_file(name, f.read_file(name))
                w.finish()
        except OSError as e:
            raise ConversionError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
        report = ConversionReport(
            input_bytes=f.file_size, bf16_bytes=sum(bf16_size(t) for t in index.tensors),
            output_bytes=out.stat().st_size, seconds=time.perf_counter() - t0, tensors=len(index.tensors),
            int8_tensors=int8, aliases=dict(index.aliases), files=f.file_names(), output=out,
        )
    return report
