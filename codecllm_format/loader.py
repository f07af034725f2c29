"""load(): a .cllm file as a runnable transformers model whose int8 layers stay compressed.

The model is built from the embedded config.json on the meta device (no full-precision copy
is ever made), then:

- every nn.Linear / GPT-2 Conv1D whose weight is int8_row (or int8_group) in the file becomes a
  CompressedLinear, every such nn.Embedding a CompressedEmbedding: their forward asks the weight
  provider for the int8 weight, computes and drops it (decompress -> compute -> free);
- every nn.Linear whose weight is float_planes (lossless) becomes a CompressedFloatLinear when
  the provider has `float_weight` (the CPU one): the weight is decoded bit-exact for each
  forward and dropped; other float_planes tensors (embeddings, norms, weights tied to an
  embedding, or all of them on a provider without float_weight) are decoded at load;
- raw tensors (norms, biases, raw weights) become ordinary parameters / buffers;
- tied weights (file aliases, or transformers' tied keys when the file lacks lm_head) point at
  the same stored tensor;
- non-persistent buffers (rotary inv_freq, position_ids) are re-created the way
  transformers' from_pretrained does it: by the model's own _init_weights;
- forward hooks around every module named like a layer group of the file call the provider's
  begin_group / end_group (prefetch and free points of the GPU runtime); a group whose
  module encloses other groups ('model': embeddings + final norm) or has no forward of its own
  (a ModuleList), or that has no module at all, is bracketed around each of its compressed
  modules instead, so begin/end calls never nest.

Nothing is left on the meta device: the loader checks, and raises LoadError otherwise.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch
from torch import nn

from . import constants as C
from .errors import CodecUnavailable, DeviceError, LoadError, TrustRequired
from .hub import resolve as resolve_path
from .reader import CllmFile, open_cllm
from .runtime.modules import CompressedEmbedding, CompressedFloatLinear, CompressedLinear, FusedProjection
from .runtime.norms import fuse_rms_norms
from .runtime.provider import CpuProvider, WeightProvider

TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "text-generation": "AutoModelForCausalLM",
    "base": "AutoModel",
    "feature-extraction": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "fill-mask": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
"""task= names and the transformers Auto class each one builds."""

ARCH_SUFFIXES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("Model", "AutoModel"),
)
"""Fallback when config.architectures names a class transformers does not export."""

ALWAYS_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
"""Stale buffers of older checkpoints that transformers itself ignores."""

MAX_NAMES_IN_ERROR = 12


# --- small helpers ---------------------------------------------------------------------------


def _names(items, limit: int = MAX_NAMES_IN_ERROR) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


INT8_ENCODINGS = (C.Encoding.INT8_ROW, C.Encoding.INT8_GROUP)
"""Encodings whose layers stay compressed (CompressedLinear / CompressedEmbedding)."""


def resolve_device(device: str | torch.device) -> tuple[torch.device, Callable[..., WeightProvider]]:
    """The torch device and the provider class for `device`.

    Raises:
        DeviceError: not a device, CUDA missing, GPU runtime not installed, unsupported type.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"device={device!r} is not a device ({e}); use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cpu":
        return dev, CpuProvider
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f'device="{device}" but CUDA is not available (torch {torch.__version__}, '
                f"CUDA build: {torch.version.cuda or 'no'}); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f'device="{device}" does not exist: this machine has {count} CUDA device(s)')
        try:
            from .runtime.gpu import GpuProvider
        except ImportError as e:
            raise DeviceError(
                f'device="{device}" needs the GPU runtime, which cannot be imported ({e}); '
                "install codecllm-format[gpu]"
            ) from None
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev, GpuProvider
    raise DeviceError(f"device={device!r} ({dev.type}) is not supported: use 'cpu' or 'cuda[:N]'")


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        d = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(d, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
        dtype = d
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def _compute_dtype(dtype: torch.dtype | None, config, device: torch.device) -> torch.dtype:
    """dtype=None: the config's dtype (float32 when it has none); on the CPU float16 becomes
    float32 (CPU float16 matmuls are slow or missing)."""
    if dtype is not None:
        return dtype
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    if not isinstance(cfg, torch.dtype) or not cfg.is_floating_point:
        return torch.float32
    if device.type == "cpu" and cfg == torch.float16:
        return torch.float32
    return cfg


def _write_embedded_files(cllm: CllmFile, folder: Path) -> list[str]:
    written = []
    for name in cllm.file_names():
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            warnings.warn(f"{cllm.path.name}: skipping embedded file with unsafe name {name!r}", stacklevel=3)
            continue
        dest = folder.joinpath(*p.parts)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(cllm.read_file(name))
        except OSError as e:  # e.g. both "x" and "x/y" embedded: a file where a folder must go
            raise LoadError(f"{cllm.path.name}: embedded file {name!r} cannot be laid out ({e.strerror or e})") from None
        written.append(name)
    return written


def _read_config(cllm: CllmFile, folder: Path):
    import transformers

    if "config.json" not in cllm.file_names():
        raise LoadError(
            f"{cllm.path.name}: the embedded config.json is missing, so the model cannot be built; "
            "convert from a Hugging Face model folder (config.json beside the weights)"
        )
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise LoadError(f"{cllm.path.name}: the embedded config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{cllm.path.name}: the embedded config.json is not a JSON object")
    if "quantization_config" in raw:
        # The .cllm holds plain (re-quantized) weights: a source quantization (GGUF, GPTQ, ...)
        # no longer applies and would make transformers build quantized layers.
        raw.pop("quantization_config")
        (folder / "config.json").write_text(json.dumps(raw))
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # unknown model_type, malformed fields, custom code
        raise LoadError(
            f"{cllm.path.name}: transformers {transformers.__version__} cannot read the embedded config "
            f"(model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}): {e}"
        ) from None


def _auto(name: str):
    import transformers

    return getattr(transformers, name)


def choose_model_class(config, file_keys: set[str], task: str | None = None, auto_class=None):
    """The class to build: auto_class, else the task's Auto class, else config.architectures[0]
    (the transformers class of that name, or the Auto class of its suffix), else (no
    architectures) a causal LM when the file looks like one, else AutoModel.

    Raises:
        LoadError: an unknown task or an architecture transformers does not have.
    """
    import transformers

    if auto_class is not None:
        if isinstance(auto_class, str):
            try:
                return _auto(auto_class)
            except AttributeError:
                raise LoadError(f"auto_class={auto_class!r} is not a transformers class") from None
        return auto_class
    if task is not None:
        if task not in TASKS:
            raise LoadError(f"task={task!r} is not known; use one of {sorted(TASKS)} or pass auto_class=")
        return _auto(TASKS[task])
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        arch = str(archs[0])
        try:
            cls = getattr(transformers, arch)
        except (AttributeError, ImportError, RuntimeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            cfg_cls = getattr(cls, "config_class", None)
            if cfg_cls is None or isinstance(config, cfg_cls):
                return cls
        for suffix, auto in ARCH_SUFFIXES:
            if arch.endswith(suffix):
                return _auto(auto)
        raise LoadError(
            f"architecture {arch!r} is not in transformers {transformers.__version__}; pass task= or auto_class="
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_types

    if config.model_type in causal_types:
        prefixes = {k.split(".", 1)[0] for k in file_keys}
        if "lm_head" in prefixes or (bool(getattr(config, "tie_word_embeddings", False)) and prefixes & {"model", "transformer"}):
            return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _build_on_meta(cls, config, dtype: torch.dtype):
    import transformers

    try:
        with torch.device("meta"):
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                model = cls._from_config(config, dtype=dtype)
            else:
                model = cls.from_config(config, dtype=dtype)
    except Exception as e:
        raise LoadError(
            f"transformers cannot build {getattr(cls, '__name__', cls)} for model_type "
            f"{getattr(config, 'model_type', None)!r} from the embedded config: {type(e).__name__}: {e}"
        ) from None
    return model.eval()


# --- the model object ------------------------------------------------------------------------


def _is_text(x) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x))


class CllmModel:
    """A loaded .cllm model. Use `codecllm_format.load(path)`.

    Attributes:
        model: the transformers model (int8 layers replaced by compressed modules).
        tokenizer: the embedded tokenizer (None when the file has none).
        config: the transformers config.
        provider: the WeightProvider the compressed modules read from.
        file: the open CllmFile.
        fused_norms: how many RMSNorm modules run as runtime.norms.FusedRMSNorm (see load's fuse_norms).
    """

    def __init__(self, model, tokenizer, config, provider: WeightProvider, cllm: CllmFile, device: torch.device,
                 dtype: torch.dtype, hooks: list, fused_norms: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.provider = provider
        self.file = cllm
        self.device = device
        self.dtype = dtype
        self._hooks = hooks
        self.fused_norms = fused_norms

    def __repr__(self) -> str:
        n_lin = sum(isinstance(m, CompressedLinear) for m in self.model.modules())
        n_emb = sum(isinstance(m, CompressedEmbedding) for m in self.model.modules())
        n_float = sum(isinstance(m, CompressedFloatLinear) for m in self.model.modules())
        return (
            f"CllmModel({self.file.path.name!r}, {type(self.model).__name__}, device={self.device}, dtype={self.dtype}, "
            f"{n_lin} compressed linear, {n_emb} compressed embedding"
            + (f", {n_float} lossless compressed linear)" if n_float else ")")
        )

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LoadError(f"{self.file.path.name} has no usable embedded tokenizer: pass token ids instead of text")
        return self.tokenizer

    def _encode(self, texts: list[str], add_special_tokens: bool = True):
        tok = self._need_tokenizer()
        if len(texts) > 1 and tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        enc = tok(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=add_special_tokens)
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, inputs=None, max_new_tokens: int | None = None, *, chat: bool = False, **kwargs):
        """Generate like transformers' model.generate, or from text.

        Args:
            inputs: token ids (a tensor: returns ids, prompt included, as transformers does), or a
                prompt string / list of prompts (returns the decoded new text / list of texts).
            max_new_tokens: passed to transformers.
            chat: apply the tokenizer's chat template to a string prompt (as one user message).
            **kwargs: any transformers generate() argument (do_sample, temperature, ...).

        Raises:
            LoadError: text given but the file has no tokenizer.
            ValueError: chat=True without a chat template, or with token ids.
        """
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        if not _is_text(inputs):
            if chat:
                raise ValueError("chat=True needs a text prompt (the chat template is applied to text)")
            if torch.is_tensor(inputs):
                inputs = inputs.to(self.device)
            kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            with torch.no_grad():
                return self.model.generate(inputs, **kwargs)
        single = isinstance(inputs, str)
        prompts = [inputs] if single else list(inputs)
        tok = self._need_tokenizer()
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"chat=True but the tokenizer of {self.file.path.name} has no chat template")
            prompts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = self._encode(prompts, add_special_tokens=not chat)
        finally:
            tok.padding_side = old_side
        if kwargs.get("pad_token_id") is None and getattr(self.model.generation_config, "pad_token_id", None) is None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else self.model.generation_config.eos_token_id
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
            if pad is not None:
                kwargs["pad_token_id"] = pad
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return texts[0] if single else texts

    def __call__(self, *args, **kwargs):
        """Run the model's forward (no gradients). A string or list of strings as the first
        argument is tokenized (padded) first. Encoders (AutoModel) return hidden states."""
        if args and _is_text(args[0]):
            texts = [args[0]] if isinstance(args[0], str) else list(args[0])
            kwargs = {**self._encode(texts), **kwargs}
            args = args[1:]
        args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def close(self) -> None:
        """Remove the hooks, close the provider and the file."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        try:
            self.provider.close()
        finally:
            self.file.close()

    def __enter__(self) -> "CllmModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- binding the file's tensors to the model -------------------------------------------------


class _Slot:
    """One parameter or persistent buffer of the model, as found on its (meta) owners."""

    def __init__(self, name: str, kind: str, tensor: torch.Tensor):
        self.name = name
        self.kind = kind  # "param" | "buffer"
        self.tensor = tensor
        self.owners: list[tuple[nn.Module, str]] = []
        self.source: str | None = None  # stored tensor name in the file (aliases resolved)


def _model_slots(model: nn.Module) -> tuple[dict[str, _Slot], list[tuple[str, nn.Module, str]]]:
    """All parameters and persistent buffers by qualified name (shared ones under every name),
    and the non-persistent buffers as (name, owner, leaf)."""
    slots: dict[str, _Slot] = {}
    non_persistent = []
    seen_np = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for leaf, p in mod._parameters.items():
            if p is None:
                continue
            s = slots.setdefault(prefix + leaf, _Slot(prefix + leaf, "param", p))
            s.owners.append((mod, leaf))
        for leaf, b in mod._buffers.items():
            if b is None:
                continue
            if leaf in mod._non_persistent_buffers_set:
                if (id(mod), leaf) not in seen_np:
                    seen_np.add((id(mod), leaf))
                    non_persistent.append((prefix + leaf, mod, leaf))
                continue
            s = slots.setdefault(prefix + leaf, _Slot(prefix + leaf, "buffer", b))
            s.owners.append((mod, leaf))
    return slots, non_persistent


def _prefix_mapping(model, slot_names, file_keys: set[str]) -> tuple[Callable[[str], str], Callable[[str], str | None]]:
    """Functions model name -> file name and file name -> model name (None: outside the model),
    choosing the base_model_prefix convention that matches the file best (as transformers
    does when a base-model checkpoint is loaded into a model with a head, or back)."""
    p = getattr(model, "base_model_prefix", "") or ""
    same = (lambda n: n, lambda f: f)
    if not p:
        return same
    dot = p + "."
    known = set(slot_names) | {n for n, _ in model.named_modules()}

    def add_to_file(n):  # the file has the prefix, the model does not
        return dot + n

    def strip_from_file(f):
        return f[len(dot):] if f.startswith(dot) else None

    def drop_for_file(n):  # the model has the prefix, the file does not
        return n[len(dot):] if n.startswith(dot) else n

    def add_back(f):
        return dot + f if dot + f in known else f

    candidates = [same, (add_to_file, strip_from_file), (drop_for_file, add_back)]
    scores = [sum(fn(n) in file_keys for n in slot_names) for fn, _ in candidates]
    return candidates[max(range(3), key=lambda i: (scores[i], -i))]


def _ignored(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def _replaceable(mod: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'embedding' when the module can be swapped for a compressed one
    without changing what its forward computes."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = None
    if isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
        return "linear"
    if Conv1D is not None and isinstance(mod, Conv1D) and type(mod).forward is Conv1D.forward:
        return "conv1d"
    if isinstance(mod, nn.Embedding) and type(mod).forward is nn.Embedding.forward and mod.max_norm is None:
        return "embedding"
    return None


def _set_tensor(owner: nn.Module, leaf: str, kind: str, value: torch.Tensor) -> None:
    if kind == "param":
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def _nearest_pretrained(model, name: str):
    """The PreTrainedModel (model or a sub-model) closest above module `name`."""
    import transformers

    best = model
    parts = name.split(".") if name else []
    mod = model
    for part in parts:
        mod = getattr(mod, part, None)
        if mod is None:
            break
        if isinstance(mod, transformers.PreTrainedModel):
            best = mod
    return best


def _sentinel_fill(t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)


def _still_sentinel(t: torch.Tensor) -> bool:
    if t.numel() == 0 or t.dtype == torch.bool:
        return False
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return bool(torch.isnan(t).all())
    return bool((t == torch.iinfo(t.dtype).min).all())


def _init_buffers(model, items: list[tuple[str, nn.Module, str, str]], device: torch.device | Callable[[str], torch.device]) -> None:
    """Re-create tensors that meta init left empty (non-persistent buffers, keys the model
    says may be missing) with the model's own _init_weights, as from_pretrained does.
    `device` may be a function of the tensor's qualified name (a multi-device placement)."""
    from transformers import initialization as hf_init

    by_module: dict[int, tuple[str, nn.Module, list]] = {}
    for name, owner, leaf, kind in items:
        cur = (owner._parameters if kind == "param" else owner._buffers)[leaf]
        value = torch.empty_like(cur, device=device(name) if callable(device) else device)
        _sentinel_fill(value)
        if kind == "param":
            value = nn.Parameter(value, requires_grad=False)
        _set_tensor(owner, leaf, kind, value)
        mname = name.rsplit(".", 1)[0] if "." in name else ""
        by_module.setdefault(id(owner), (mname, owner, []))[2].append((name, leaf, kind))
    failed = []
    with torch.no_grad(), hf_init.guard_torch_init_functions():
        for mname, owner, entries in by_module.values():
            keep = {leaf: p.detach().clone() for leaf, p in owner._parameters.items() if p is not None and getattr(p, "_is_hf_initialized", False)}
            _nearest_pretrained(model, mname)._init_weights(owner)
            for leaf, saved in keep.items():  # belt and braces: loaded values are never re-initialized
                owner._parameters[leaf].data.copy_(saved)
            for name, leaf, kind in entries:
                t = (owner._parameters if kind == "param" else owner._buffers)[leaf]
                if _still_sentinel(t):
                    failed.append(name)
                else:
                    t._is_hf_initialized = True
    if failed:
        raise LoadError(
            f"{type(model).__name__}: cannot re-create {_names(failed)} (not stored in the file and "
            "not initialized by the model's _init_weights)"
        )


def _unshared_sources(model, cllm: CllmFile, kind: str, encodings) -> set[str]:
    """Stored names of the weights of `kind` modules ("linear", "embedding") that share their
    weight with no other module and are stored in one of `encodings`."""
    slots, _ = _model_slots(model)
    file_keys = set(cllm.keys())
    to_file, _ = _prefix_mapping(model, slots.keys(), file_keys)
    uses = defaultdict(int)
    for s in slots.values():
        uses[id(s.tensor)] += 1
    out = set()
    for mname, mod in model.named_modules():
        s = slots.get(f"{mname}.weight" if mname else "weight")
        if s is None or _replaceable(mod) != kind or uses[id(s.tensor)] > 1:
            continue
        fname = to_file(s.name)
        if fname in file_keys and cllm.entry(fname).encoding in encodings:
            out.add(cllm.entry(fname).name)
    return out


def _float_linear_sources(model, cllm: CllmFile) -> set[str]:
    """Stored names of the lossless (float_planes) weights `_bind` decodes per forward: those of
    nn.Linear modules that share their weight with nothing (a GPU provider streams these; tables
    and tied weights are loaded once as parameters)."""
    if not any(t.encoding == C.Encoding.FLOAT_PLANES for t in cllm.index.tensors):
        return set()
    return _unshared_sources(model, cllm, "linear", (C.Encoding.FLOAT_PLANES,))


def _embedding_only_sources(model, cllm: CllmFile) -> set[str]:
    """Stored names of the int8 tables `_bind` makes CompressedEmbedding modules of and that no
    other module uses (not tied to an output head): a GPU provider serves their rows without
    streaming the whole table each forward. A table also stored under another name (an alias
    target) may be a head's, so it is left out."""
    return _unshared_sources(model, cllm, "embedding", INT8_ENCODINGS) - set(cllm.index.aliases.values())


def _bind(model, cllm: CllmFile, provider: WeightProvider, device: torch.device,
          place: Callable[[str], torch.device] | None = None) -> list:
    """Swap int8 layers for compressed modules, load raw tensors, re-create buffers, hook
    groups. Returns the hook handles. `place` (tensor name -> device) puts raw tensors and
    re-created buffers on several devices (a multi-GPU split); None: all on `device`.

    Raises:
        LoadError: missing / unexpected / mis-shaped tensors, buffers that cannot be re-created,
            anything left on the meta device.
    """
    slots, non_persistent = _model_slots(model)
    file_keys = set(cllm.keys())
    to_file, to_model = _prefix_mapping(model, slots.keys(), file_keys)

    # 1. each slot's source: the file's tensor under that name, else through a tie
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    by_identity: dict[int, list[_Slot]] = defaultdict(list)
    for s in slots.values():
        by_identity[id(s.tensor)].append(s)
    for s in slots.values():
        fname = to_file(s.name)
        if fname in file_keys:
            s.source = cllm.entry(fname).name
    for s in slots.values():
        if s.source is None:
            partners = [o for o in by_identity[id(s.tensor)] if o.source is not None]
            if partners:
                s.source = partners[0].source
            elif s.name in tied and tied[s.name] in slots and slots[tied[s.name]].source is not None:
                s.source = slots[tied[s.name]].source
    ignore_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []) + list(ALWAYS_IGNORED_UNEXPECTED)
    missing = [s.name for s in slots.values() if s.source is None and not _ignored(s.name, ignore_missing)]
    to_initialize = [s for s in slots.values() if s.source is None and _ignored(s.name, ignore_missing)]
    used = {to_file(s.name) for s in slots.values() if s.source is not None}
    unexpected = []
    for k in file_keys - used:
        m = to_model(k)
        if m is None:
            continue  # outside the base model (a head that was not asked for)
        if not _ignored(m, ignore_unexpected):
            unexpected.append(k)
    mismatched = []
    for s in slots.values():
        if s.source is not None:
            e = cllm.entry(s.source)
            if tuple(e.shape) != tuple(s.tensor.shape):
                mismatched.append(f"{s.name} (file {tuple(e.shape)}, model {tuple(s.tensor.shape)})")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_names(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_names(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch: {_names(mismatched)}")
        raise LoadError(f"{cllm.path.name} does not fit {type(model).__name__}: " + "; ".join(parts))

    # 2. which modules become compressed
    module_names: dict[int, list[str]] = defaultdict(list)
    parents: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    modules: dict[int, nn.Module] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        module_names[id(mod)].append(mname)
        modules[id(mod)] = mod
        for cname, child in mod._modules.items():
            if child is not None:
                parents[id(child)].append((mod, cname))
    plans: dict[int, tuple[str, str]] = {}  # module id -> (kind, stored weight name)
    compressed_slots: set[str] = set()
    # lossless Linear weights decoded per forward, where the provider can (float_weight): the
    # same rule that tells a GPU provider which planes to stream
    float_sources = _float_linear_sources(model, cllm) if hasattr(provider, "float_weight") else set()
    for mid, mod in modules.items():
        kind = _replaceable(mod)
        if kind is None:
            continue
        wname = f"{module_names[mid][0]}.weight" if module_names[mid][0] else "weight"
        s = slots.get(wname)
        if s is None or s.source is None:
            continue
        encoding = cllm.entry(s.source).encoding
        if encoding == C.Encoding.FLOAT_PLANES:
            # others (shared with a tied embedding, or no float_weight): a parameter decoded at load
            if kind != "linear" or s.source not in float_sources:
                continue
            kind = "float_linear"
        elif encoding not in INT8_ENCODINGS:
            continue
        plans[mid] = (kind, s.source)
        for n in module_names[mid]:
            compressed_slots.add(f"{n}.weight" if n else "weight")

    # 3. raw tensors (and int8 tensors of modules that cannot stay compressed: dequantized)
    loaded: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
    made: dict[tuple[int, str], torch.Tensor] = {}
    for s in slots.values():
        if s.name in compressed_slots or s.source is None:
            continue
        target = s.tensor.dtype
        where = place(s.name) if place is not None else device
        key = (s.source, target, where)
        if key not in loaded:
            e = cllm.entry(s.source)
            if e.encoding in INT8_ENCODINGS:
                t = cllm.get_tensor(s.source, dtype=target if target.is_floating_point else None)
            else:
                t = cllm.get_raw(s.source).data
            if t.dtype != target:
                t = t.to(target)
            loaded[key] = t.to(where)
        mkey = (id(s.tensor), s.kind)
        if mkey not in made:
            v = loaded[key]
            made[mkey] = nn.Parameter(v, requires_grad=False) if s.kind == "param" else v
            made[mkey]._is_hf_initialized = True
        for owner, leaf in s.owners:
            _set_tensor(owner, leaf, s.kind, made[mkey])

    # 4. swap modules
    groups = cllm.index.groups
    new_modules: dict[int, nn.Module] = {}
    for mid, (kind, source) in plans.items():
        mod = modules[mid]
        gid = cllm.entry(source).group
        if kind == "float_linear":
            bias = mod._parameters.get("bias")
            if bias is not None and bias.is_meta:
                raise LoadError(f"bias of {module_names[mid][0]} was not loaded")
            new = CompressedFloatLinear(source, gid, provider, mod.in_features, mod.out_features, bias,
                                        dtype=mod.weight.dtype)
        elif kind == "embedding":
            new = CompressedEmbedding(source, gid, provider, mod.num_embeddings, mod.embedding_dim,
                                      dtype=mod.weight.dtype, padding_idx=mod.padding_idx)
        else:
            bias = mod._parameters.get("bias")
            if bias is not None and bias.is_meta:
                raise LoadError(f"bias of {module_names[mid][0]} was not loaded")
            if kind == "linear":
                new = CompressedLinear(source, gid, provider, mod.in_features, mod.out_features, bias, "linear")
            else:
                new = CompressedLinear(source, gid, provider, mod.nx, mod.nf, bias, "conv1d")
        new.train(mod.training)
        new_modules[mid] = new
        for parent, cname in parents[mid]:
            parent._modules[cname] = new

    # 4b. sibling projections decoded back to back by the provider: one launch for all of them
    _link_fusions(new_modules.values(), provider)

    # 5. buffers meta init left empty, and keys the model allows to be missing
    items = [(name, owner, leaf, "buffer") for name, owner, leaf in non_persistent]
    for s in to_initialize:
        items.extend((s.name, owner, leaf, s.kind) for owner, leaf in s.owners)
    if items:
        _init_buffers(model, items, place if place is not None else device)

    # 6. nothing may be left on meta
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None and b.is_meta]
    if left:
        raise LoadError(f"{type(model).__name__}: {_names(left)} would be left uninitialized (on the meta device)")

    # 7. group hooks: begin_group / end_group around the module of each layer group
    return _hook_groups(model, groups, to_model, provider)


def _link_fusions(modules, provider: WeightProvider) -> int:
    """Link CompressedLinear siblings whose weights the provider decodes back to back
    (provider.fusion_sets / fused_weight) into a FusedProjection. A set is skipped where a
    member's weight serves several modules, a member keeps a non-"linear" layout, or only some
    members have a bias. Returns how many sets were linked."""
    if not hasattr(provider, "fusion_sets"):
        return 0
    by_source: dict[str, list[CompressedLinear]] = defaultdict(list)
    for m in modules:
        if isinstance(m, CompressedLinear):
            by_source[m.name].append(m)
    linked = 0
    for names in provider.fusion_sets():
        found = [by_source.get(n, []) for n in names]
        if any(len(f) != 1 or f[0].layout != "linear" for f in found):
            continue
        members = [f[0] for f in found]
        biases = [m.bias for m in members]
        if all(b is None for b in biases):
            bias = None
        elif all(b is not None for b in biases) and len({(b.device, b.dtype) for b in biases}) == 1:
            bias = torch.cat([b.detach() for b in biases])
        else:
            continue
        FusedProjection(members, provider, bias)
        linked += 1
    return linked


def _hook_groups(model, groups, to_model, provider: WeightProvider) -> list:
    """Register begin_group / end_group hooks. A group's module is the module named like the
    group (a transformer block, 'model.layers.3'), unless it encloses modules of other groups
    (a group named after a top-level module, 'model', holding the embeddings and final norm):
    then, as for groups without a module, each compressed module of the group is hooked on its
    own. So calls never nest, and every linear_weight / embedding_rows call of a group comes
    between its begin_group and end_group. A provider whose `needs_group_hooks` is False (a GPU
    provider holding every group resident: nothing to schedule) gets none: hooks cost host time
    on every call of every block."""
    if not getattr(provider, "needs_group_hooks", True):
        return []
    handles = []
    named = dict(model.named_modules())
    compressed = {n: m for n, m in named.items()
                  if isinstance(m, (CompressedLinear, CompressedEmbedding, CompressedFloatLinear))}

    def hook_pair(mod: nn.Module, gid: int):
        def pre(_m, _args):
            provider.begin_group(gid)

        def post(_m, _args, _out):
            provider.end_group(gid)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))

    candidates: dict[int, str] = {}
    for gid, g in enumerate(groups):
        mname = to_model(g.name)
        # containers (ModuleList, ModuleDict) have no forward of their own: hooks would never fire
        if mname and mname in named and type(named[mname]).forward is not nn.Module.forward:
            candidates[gid] = mname

    def inside(child: str, parent: str) -> bool:
        return child == parent or child.startswith(parent + ".")

    hooked: dict[int, str] = {}
    for gid, mname in candidates.items():
        encloses_other = any(o != gid and inside(other, mname) and other != mname for o, other in candidates.items())
        encloses_other = encloses_other or any(
            m.group != gid and inside(n, mname) for n, m in compressed.items()
        )
        if not encloses_other:
            hook_pair(named[mname], gid)
            hooked[gid] = mname
    for mname, mod in compressed.items():
        owner = hooked.get(mod.group)
        if owner is not None and inside(mname, owner):
            continue
        hook_pair(mod, mod.group)
    return handles


# --- entry point -----------------------------------------------------------------------------


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    device_map: str | list | tuple | None = None,
    task: str | None = None,
    auto_class=None,
    tokenizer: bool = True,
    filename: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_gpu_codecs: bool = False,
    fuse_norms: bool | None = None,
    **runtime_options: Any,
) -> CllmModel:
    """Load a .cllm file as a runnable model whose int8 weights stay compressed.

    Args:
        path: the .cllm file, a folder holding one, or a Hugging Face repo id ("org/name",
            "hf://org/name[@rev]/file.cllm"; an existing local path of that name wins): only the
            .cllm is downloaded, into the HF cache (HF_HUB_OFFLINE honoured). See codecllm_format.hub.
        filename, revision, token: the file in the repo (default: its single .cllm), the
            branch / tag / commit, and the Hub token.
        device: "cpu" (CpuProvider; the default) or "cuda[:N]" (runtime.gpu.GpuProvider).
        device_map: split the transformer blocks over several GPUs as a pipeline
            (runtime/multi.py): "auto" (every visible GPU), a list of GPUs ([0, 1],
            ["cuda:0", "cuda:1"]) or "0,1". Each GPU gets its own provider, residency plan,
            slots and prefetch for its blocks; embeddings run on the first GPU, the final
            norm and head on the last. max_vram= is then one budget for every GPU, a list
            (one per GPU) or a dict {GPU: budget}; without residency= and max_vram=, the
            residency is "auto" under each GPU's free memory. device must be left out (or "cuda").
        dtype: compute dtype; None: the config's dtype (float32 if none; float16 -> float32 on CPU).
        task: build the Auto class of this task (see TASKS) instead of config.architectures.
        auto_class: a transformers class (or its name) to build, overriding task/architectures.
        tokenizer: load the embedded tokenizer (False skips it).
        trust_gpu_codecs: needed to load a file whose int8 weights are stored as nvCOMP ANS
            (`cllm-convert --codec ans`; GPU only): nvCOMP's ANS decoder assumes valid input and
            an ANS chunk cannot be checked on the CPU, so pass True only for files you trust.
        fuse_norms: replace the model's RMSNorm modules by runtime.norms.FusedRMSNorm (one
            F.rms_norm kernel + the weight multiply instead of eight ops; each module checked
            against its own forward first; equal within one rounding, not bit for bit). None
            (default): on CUDA only, where decoding at batch 1 is bound by kernel launches;
            False keeps transformers' modules (and, for a lossless file, transformers' outputs
            bit for bit).
        **runtime_options: passed to the provider's constructor (threads=; GPU: residency=, max_vram=, ...).

    Returns:
        A CllmModel (.model, .tokenizer, .config, .generate(), __call__).

    Raises:
        DeviceError: the device does not exist or cannot be used; a device_map that names a
            missing GPU, is not understood, or comes with device="cpu".
        FormatError (and subclasses): the file is not a sound .cllm file.
        HubError: the repo, revision or file cannot be found (or the Hub reached, with nothing cached).
        LoadError: no embedded config, an architecture transformers cannot build, tensors that do
            not match the model's parameters; with device_map: a model without transformer
            blocks, budgets that cannot hold the split, a max_vram spec that is not understood.
        CodecUnavailable: an ANS file on a device other than CUDA (before anything is built).
        TrustRequired: an ANS file without trust_gpu_codecs=True (before anything is built).
    """
    devices = None
    if device_map is None:
        dev, provider_cls = resolve_device("cpu" if device is None else device)
    else:
        from .runtime.multi import resolve_device_map

        devices = resolve_device_map(device_map, device)
        dev, provider_cls = resolve_device(devices[0])
    dtype = _parse_dtype(dtype)
    path = resolve_path(path, filename=filename, revision=revision, token=token)
    factory = None
    if devices is not None:
        from .runtime.multi import gpu_factory as factory
    if fuse_norms is None:
        fuse_norms = all(d.type == "cuda" for d in (devices or [dev]))
    return _load_resolved(path, dev, provider_cls, dtype, task=task, auto_class=auto_class, tokenizer=tokenizer,
                          devices=devices, factory=factory, runtime_options=runtime_options,
                          trust_gpu_codecs=trust_gpu_codecs, fuse_norms=fuse_norms)


def _load_resolved(path, dev: torch.device, provider_cls, dtype: torch.dtype | None, *, task=None, auto_class=None,
                   tokenizer: bool = True, devices: list[torch.device] | None = None, factory=None,
                   runtime_options: dict | None = None, trust_gpu_codecs: bool = False,
                   fuse_norms: bool = False) -> CllmModel:
    """load() after the arguments were checked: `devices` (with `factory`, see
    runtime/multi.py) splits the model over those devices; None loads it on `dev` with one
    `provider_cls`. CPU tests call it with devices=[cpu, cpu] to run the split's code path."""
    runtime_options = dict(runtime_options or {})
    cllm = open_cllm(path, trust_gpu_codecs=trust_gpu_codecs)
    provider = None
    try:
        _check_gpu_only_codecs(cllm, dev, trust_gpu_codecs)
        with tempfile.TemporaryDirectory(prefix="cllm-load-") as tmp:
            folder = Path(tmp)
            _write_embedded_files(cllm, folder)
            config = _read_config(cllm, folder)
            cls = choose_model_class(config, set(cllm.keys()), task=task, auto_class=auto_class)
            compute = _compute_dtype(dtype, config, dev)
            model = _build_on_meta(cls, config, compute)
            _load_generation_config(model, folder)
            tok = _load_tokenizer(cllm, folder) if tokenizer else None
        if getattr(provider_cls, "streams_planes", False) and "planes" not in runtime_options:
            # (a multi-GPU split loads lossless weights as parameters: MultiDeviceProvider has no float_weight)
            single = devices is None or len(devices) == 1
            runtime_options["planes"] = _float_linear_sources(model, cllm) if single else set()
        if getattr(provider_cls, "streams_planes", False) and "embeddings" not in runtime_options:
            runtime_options["embeddings"] = _embedding_only_sources(model, cllm)
        if devices is None:
            provider = provider_cls(cllm, device=dev, **runtime_options)
            hooks = _bind(model, cllm, provider, dev)
        elif len(devices) == 1:  # a device map of one GPU: the one-device runtime, budget as for a split
            from .runtime.multi import budgets_for

            residency = runtime_options.pop("residency", None)
            budgets = budgets_for(runtime_options.pop("max_vram", None), residency, devices)
            if residency is None and budgets[0] is not None:
                residency = "auto"
            opts = {**runtime_options, **({"residency": residency} if residency else {}),
                    **({"max_vram": budgets[0]} if budgets[0] is not None else {})}
            provider = provider_cls(cllm, device=dev, **opts)
            hooks = _bind(model, cllm, provider, dev)
        else:
            from .runtime import multi

            residency = runtime_options.pop("residency", None)
            budgets = multi.budgets_for(runtime_options.pop("max_vram", None), residency, devices)
            slots_, _ = _model_slots(model)
            _, to_model = _prefix_mapping(model, slots_.keys(), set(cllm.keys()))
            placement = multi.place_model(model, cllm, to_model, devices, residency, budgets,
                                          slots=runtime_options.get("slots", 2), reserve=runtime_options.get("reserve"))
            provider = multi.MultiDeviceProvider(cllm, placement, factory, runtime_options)
            hooks = _bind(model, cllm, provider, dev, place=placement.device_of)
            hooks += multi.attach_device_hooks(model, placement)
            if all(d.type == "cuda" for d in devices):
                model.hf_device_map = placement.hf_device_map()
        for p in model.parameters():
            p.requires_grad_(False)
        fused = fuse_rms_norms(model, compute) if fuse_norms else 0
        return CllmModel(model, tok, model.config, provider, cllm, dev, compute, hooks, fused_norms=fused)
    except BaseException:
        if provider is not None:
            provider.close()
        cllm.close()
        raise


def _check_gpu_only_codecs(cllm: CllmFile, device: torch.device, trusted: bool) -> None:
    """A file with GPU-only (ANS) int8 streams loads only on CUDA, and only when trusted."""
    codecs = cllm.gpu_only_codecs
    if not codecs:
        return
    from .codecs.ans import CONVERT_HINT, TRUST_HINT  # noqa: PLC0415

    names = ", ".join(sorted(c.name for c in codecs))
    if device.type != "cuda":
        raise CodecUnavailable(
            f"{cllm.path.name}: its int8 weights are stored with the GPU-only codec {names} (cllm-convert --codec ans), "
            f"which only nvCOMP on a CUDA GPU decodes: load it with device='cuda' and nvidia-nvcomp >= 6.0 installed, "
            f"{CONVERT_HINT}"
        )
    if not trusted:
        raise TrustRequired(f"{cllm.path.name}: its int8 weights are stored with the GPU-only codec {names}; {TRUST_HINT}")


def _load_generation_config(model, folder: Path) -> None:
    from transformers import GenerationConfig

    if not hasattr(model, "generation_config"):
        return
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except Exception as e:
            warnings.warn(f"embedded generation_config.json ignored ({e})", stacklevel=3)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt")


def _load_tokenizer(cllm: CllmFile, folder: Path):
    if not any(n in cllm.file_names() for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        warnings.warn(f"{cllm.path.name}: the embedded tokenizer cannot be loaded ({type(e).__name__}: {e})", stacklevel=3)
        return None
