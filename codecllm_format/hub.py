"""The Hugging Face Hub: load .cllm files by repo id, publish them with a model card, and
convert checkpoints that are already in the local Hugging Face cache.

Names that resolve to the Hub (everything else is a local path, untouched):

- `org/name` (one slash, a valid repo id) when no local file or folder of that name exists —
  local paths always win; a name ending in .cllm / .safetensors / .json stays a local path;
- `hf://org/name`, `hf://org/name/file.cllm`, `hf://org/name@rev/sub/file.cllm`
  (`hf://datasets/org/name/...` too) and Hugging Face web URLs (`https://huggingface.co/...`).

Only the one .cllm file is downloaded (`hf_hub_download`, HF cache honoured). With no file
named, the repo's files are listed (`HfApi.list_repo_files`; offline — HF_HUB_OFFLINE, or the
Hub unreachable — the cached snapshot's files) and the single .cllm is picked.

The cache folder and offline mode are read from the environment at call time (HF_HUB_CACHE,
HF_HOME, HF_HUB_OFFLINE), so setting them after huggingface_hub was imported still works.

Model cards list fidelity figures found in the file's metadata under keys starting with
"fidelity." or "eval." (e.g. "fidelity.perplexity_delta": "+0.57%").
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from . import __version__
from .errors import CllmError, ConversionError

LIBRARY_NAME = "codecllm"
PACKAGE = "codecllm-format"
SUFFIX = ".cllm"
LOCAL_SUFFIXES = (".cllm", ".safetensors", ".json")
"""A missing path ending like this is a mistyped local file, not a repo id."""
FIDELITY_PREFIXES = ("fidelity.", "eval.")
MAX_LISTED = 12

PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("Model", "feature-extraction"),
)
"""Architecture suffix -> Hub pipeline_tag (first match; the loader builds the same classes)."""

ENCODING_TAGS = {"int8_row": "int8", "int8_group": "int8", "raw": "raw", "float_planes": "lossless"}

CHECKPOINT_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.txt", "*.jinja",
    "1_Pooling/*", "README.md",
]
"""What cllm-convert reads from a cached repo (weights, config, tokenizer, pooling, card)."""


class HubError(CllmError):
    """A repo, revision or file cannot be found, reached or published."""


@dataclass(frozen=True)
class HubRef:
    """A file (or a repo whose single .cllm is meant) on the Hugging Face Hub."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None
    repo_type: str = "model"

    def __str__(self) -> str:
        s = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return s + (f"/{self.filename}" if self.filename else "")


# --- environment ---------------------------------------------------------------------------


def _true(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(os.path.expanduser(env)))
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"
    return Path(constants.HF_HUB_CACHE)


# --- names ---------------------------------------------------------------------------------


def _is_repo_id(s: str) -> bool:
    if s.count("/") != 1 or s.lower().endswith(LOCAL_SUFFIXES):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def _is_uri(s: str) -> bool:
    return s.startswith("hf://") or bool(re.match(r"https?://(www\.)?(huggingface\.co|hf\.co)/", s))


def parse_ref(path, *, filename: str | None = None, revision: str | None = None) -> HubRef | None:
    """The Hub file `path` names, or None when it is a local path.

    A str that is an hf:// URI or Hugging Face URL is always a Hub name; a str of the form
    org/name is one unless a local file or folder of that name exists; anything else is local.

    Raises:
        HubError: a malformed hf:// URI, a bucket, or filename=/revision= that contradict it.
    """
    if not isinstance(path, str):
        return None
    if _is_uri(path):
        from huggingface_hub.errors import HfUriError
        from huggingface_hub.utils import parse_hf_uri

        try:
            uri = parse_hf_uri(path)
        except HfUriError as e:
            raise HubError(str(e).strip()) from None
        if uri.type not in ("model", "dataset", "space"):
            raise HubError(f"{path}: a {uri.type} is not a repository; .cllm files are loaded from model or dataset repos")
        in_uri = uri.path_in_repo.strip("/") or None
        if filename is not None and in_uri is not None and filename != in_uri:
            raise HubError(f"{path} names the file {in_uri!r} but filename={filename!r} was passed")
        if revision is not None and uri.revision is not None and revision != uri.revision:
            raise HubError(f"{path} names the revision {uri.revision!r} but revision={revision!r} was passed")
        return HubRef(uri.id, filename or in_uri, revision or uri.revision, uri.type)
    if os.path.lexists(path) or not _is_repo_id(path):
        return None
    return HubRef(path, filename, revision)


# --- listing -------------------------------------------------------------------------------


def _names(items, limit: int = MAX_LISTED) -> str:
    items = sorted(items)
    if not items:
        return "none"
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _storage(ref: HubRef, cache: Path) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=ref.repo_id, repo_type=ref.repo_type)


def _download_hint(ref: HubRef, filename: str | None = None) -> str:
    cmd = f"hf download {ref.repo_id}" + (f" {filename}" if filename else "")
    if ref.repo_type != "model":
        cmd += f" --repo-type {ref.repo_type}"
    if ref.revision:
        cmd += f" --revision {ref.revision}"
    return cmd


def cached_files(ref: HubRef, cache: Path | None = None) -> tuple[str, list[str]]:
    """The commit and the files of `ref`'s revision (default main) in the local HF cache.

    Raises:
        HubError: the repo or the revision is not in the cache.
    """
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    cache = cache or cache_dir()
    storage = _storage(ref, cache)
    if not storage.is_dir():
        raise HubError(
            f"{ref.repo_id} is not in the local Hugging Face cache ({cache}) and the Hub cannot be asked "
            f"({_why_offline()}); download it first with `{_download_hint(ref)}`"
        )
    rev = ref.revision or "main"
    if REGEX_COMMIT_HASH.fullmatch(rev):
        commit = rev
    else:
        ref_file = storage / "refs" / rev
        if not ref_file.is_file():
            known = [p.relative_to(storage / "refs").as_posix() for p in (storage / "refs").rglob("*") if p.is_file()] \
                if (storage / "refs").is_dir() else []
            raise HubError(
                f"revision {rev!r} of {ref.repo_id} is not in the local Hugging Face cache ({_why_offline()}); "
                f"cached revisions: {_names(known)}"
            )
        commit = ref_file.read_text().strip()
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        raise HubError(f"commit {commit} of {ref.repo_id} is not in the local Hugging Face cache ({_why_offline()})")
    files = []
    for root, dirs, names in os.walk(snap):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = Path(root) / n
            if p.is_file():  # a dangling link is a file that was never fully downloaded
                files.append(p.relative_to(snap).as_posix())
    return commit, sorted(files)


def _why_offline() -> str:
    return "HF_HUB_OFFLINE is set" if is_offline() else "the Hub cannot be reached"


def _bug(e: Exception) -> bool:
    """Exceptions that are programming errors, never turned into HubError."""
    return isinstance(e, (TypeError, AttributeError, NameError, AssertionError, ImportError))


def _pick(files: list[str], where: str) -> str:
    found = sorted(f for f in files if f.endswith(SUFFIX))
    if not found:
        raise HubError(f"{where} holds no {SUFFIX} file (files: {_names(files)})")
    if len(found) > 1:
        raise HubError(
            f"{where} holds {len(found)} {SUFFIX} files: {_names(found)}; pick one with filename= "
            f"(or hf://org/name/FILE)"
        )
    return found[0]


def _hub_error(e: Exception, ref: HubRef, filename: str | None) -> HubError:
    """A one-line HubError for a huggingface_hub exception."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{filename} of {ref.repo_id}" if filename else ref.repo_id
    rev = f" at revision {ref.revision!r}" if ref.revision else ""
    if isinstance(e, LocalEntryNotFoundError):
        return HubError(
            f"{what}{rev} is not in the local Hugging Face cache ({cache_dir()}) and the Hub cannot be asked "
            f"({_why_offline()}); download it first with `{_download_hint(ref, filename)}`"
        )
    if isinstance(e, GatedRepoError):
        return HubError(f"{ref.repo_id} is gated: accept its conditions on the Hub, then pass token= (or run `hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{ref.repo_id}: no such {ref.repo_type} repo on the Hub (or it is private: pass token= or run `hf auth login`)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{ref.repo_id} has no revision {ref.revision!r}")
    if isinstance(e, EntryNotFoundError):
        return HubError(f"{ref.repo_id}{rev} has no file {filename!r}")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return HubError(f"{ref.repo_id}: not authorized (pass token= / --token, or run `hf auth login`)")
        return HubError(f"{ref.repo_id}: the Hub answered {status}: {_first_line(e)}")
    if _is_connection_error(e):
        return HubError(f"{what}: the Hub cannot be reached ({type(e).__name__}: {_first_line(e)})")
    return HubError(f"{what}: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _is_connection_error(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is not None and status >= 500
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub < 2 uses httpx / requests
        try:
            import httpx
        except ImportError:
            return False
    return isinstance(e, (httpx.ConnectError, httpx.TimeoutException))


# --- resolving -----------------------------------------------------------------------------


def download(ref: HubRef, *, token: str | bool | None = None, local_files_only: bool | None = None) -> Path:
    """The local path of `ref`'s .cllm file, downloaded into the HF cache when needed.

    Args:
        ref: repo, optional file (default: the repo's single .cllm), optional revision.
        token: passed to huggingface_hub (None: the saved login / HF_TOKEN).
        local_files_only: never ask the Hub (default: HF_HUB_OFFLINE).

    Raises:
        HubError: repo / revision / file not found, several or no .cllm files, Hub unreachable
            and nothing cached.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RevisionNotFoundError

    offline = is_offline() if local_files_only is None else local_files_only
    cache = cache_dir()
    filename = ref.filename
    if filename is None:
        files = None
        if not offline:
            try:
                api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
                files = api.list_repo_files(ref.repo_id, revision=ref.revision, repo_type=ref.repo_type)
                where = f"{ref.repo_id}" + (f" at revision {ref.revision!r}" if ref.revision else "")
            except RevisionNotFoundError as e:
                raise _hub_error(e, ref, None) from None
            except Exception as e:  # unreachable, private without a token, ...: fall back to the cache
                if _bug(e):
                    raise
                try:
                    commit, files = cached_files(ref, cache)
                except HubError as not_cached:
                    if _is_connection_error(e):  # say it is not cached, and why the Hub was not asked
                        raise HubError(f"{not_cached} ({type(e).__name__}: {_first_line(e)})") from None
                    raise _hub_error(e, ref, None) from None
                where = f"the cached snapshot of {ref.repo_id} ({ref.revision or 'main'}, commit {commit[:12]})"
                offline = offline or _is_connection_error(e)
        if files is None:
            commit, files = cached_files(ref, cache)
            where = (f"the cached snapshot of {ref.repo_id} ({ref.revision or 'main'}, commit {commit[:12]}; "
                     f"{_why_offline()}, so only cached files are seen)")
        filename = _pick(files, where)
    try:
        path = hf_hub_download(
            ref.repo_id, filename, revision=ref.revision, repo_type=ref.repo_type, cache_dir=cache, token=token,
            local_files_only=offline, library_name=LIBRARY_NAME, library_version=__version__,
        )
    except Exception as e:
        if _bug(e):
            raise
        if offline and _storage(ref, cache).is_dir():
            # say precisely what is missing: the revision, or the file in a cached revision
            commit, files = cached_files(ref, cache)
            raise HubError(
                f"{ref.repo_id} ({ref.revision or 'main'}, commit {commit[:12]}) has no file {filename!r} in the local "
                f"Hugging Face cache ({_why_offline()}); cached files: {_names(files)}; download it first with "
                f"`{_download_hint(ref, filename)}`"
            ) from None
        raise _hub_error(e, ref, filename) from None
    return Path(path)


def _pick_local(folder: Path, filename: str | None) -> Path:
    if filename is not None:
        return folder / filename
    found = [*folder.glob(f"*{SUFFIX}"), *folder.glob(f"*/*{SUFFIX}")]  # a repo downloaded with --local-dir
    files = [p.relative_to(folder).as_posix() for p in found
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return folder / _pick(files, f"the directory {folder}")


def resolve(path, *, filename: str | None = None, revision: str | None = None, token: str | bool | None = None,
            local_files_only: bool | None = None) -> Path:
    """The local .cllm file that `path` names: a local file, a local folder holding one .cllm
    (or `filename`), or a Hub repo / hf:// URI (downloaded into the HF cache; see `download`).

    Raises:
        HubError: see `download`; revision= with a local path; filename= with a local file.
    """
    ref = parse_ref(path, filename=filename, revision=revision)
    if ref is not None:
        return download(ref, token=token, local_files_only=local_files_only)
    p = Path(path)
    if revision is not None:
        hint = f" (write hf://{path} to mean the Hub repo)" if isinstance(path, str) and _is_repo_id(path) else ""
        raise HubError(f"revision={revision!r} applies to Hub repos, but {path} is a local path"
                       + ("" if p.exists() else " that does not exist") + hint)
    if p.is_dir():
        return _pick_local(p, filename)
    if filename is not None:
        raise HubError(f"filename={filename!r} applies to a repo or a folder, but {path} is "
                       + ("a file" if p.exists() else "neither a local folder nor a repo id (org/name)"))
    return p


# --- checkpoints in the local cache (cllm-convert org/name) --------------------------------


def checkpoint_source(path) -> tuple[Path, str | None]:
    """Where cllm-convert reads `path` from: (the path, None) for a local path, (the cached
    snapshot folder or file, repo id) for a repo id / hf:// URI. Never uses the network.

    Raises:
        ConversionError: the repo, its revision or its safetensors weights are not in the local
            Hugging Face cache.
    """
    try:
        ref = parse_ref(path)
    except HubError as e:
        raise ConversionError(str(e)) from None
    if ref is None:
        return Path(path), None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = f"download it first with `{_download_hint(ref)}`"
    try:
        snap = Path(snapshot_download(ref.repo_id, revision=ref.revision, repo_type=ref.repo_type,
                                      cache_dir=cache_dir(), local_files_only=True, allow_patterns=CHECKPOINT_PATTERNS))
    except LocalEntryNotFoundError:
        rev = f" (revision {ref.revision})" if ref.revision else ""
        raise ConversionError(f"{ref.repo_id}{rev}: not in the local Hugging Face cache ({cache_dir()}); {hint}") from None
    except Exception as e:
        if _bug(e):
            raise
        raise ConversionError(f"{ref.repo_id}: cannot be read from the local Hugging Face cache ({e}); {hint}") from None
    if ref.filename is not None:
        target = snap / ref.filename
        if not target.is_file():
            raise ConversionError(f"{ref}: not in the local Hugging Face cache ({cache_dir()}); "
                                  f"download it first with `{_download_hint(ref, ref.filename)}`")
        return target, ref.repo_id
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted({str(v) for v in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = []
        missing = [s for s in shards if not (snap / s).is_file()]
        if missing:
            raise ConversionError(f"{ref.repo_id}: shard(s) {_names(missing)} are not in the local Hugging Face cache; {hint}")
    elif not any(p.is_file() for p in snap.glob("*.safetensors")):
        cached = [p.name for p in snap.iterdir() if p.is_file()]
        raise ConversionError(f"{ref.repo_id}: no .safetensors weights in the local Hugging Face cache "
                              f"(cached: {_names(cached)}); {hint}")
    return snap, ref.repo_id


def default_output(path) -> Path | None:
    """cllm-convert's default output for a repo id: ./<name>.cllm; None for a local path."""
    try:
        ref = parse_ref(path) if isinstance(path, str) else None
    except HubError:
        return None
    if ref is None:
        return None
    stem = PurePosixPath(ref.filename).name.removesuffix(".safetensors") if ref.filename else ref.repo_id.split("/")[-1]
    return Path(stem + SUFFIX)


def source_card_metadata(folder: Path | None) -> dict[str, str]:
    """{'license': ...} from the YAML front matter of `folder`/README.md, when `folder` is a
    Hugging Face model folder (config.json beside it) with a model card."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return {}
    readme = Path(folder) / "README.md"
    try:
        if not readme.is_file() or readme.stat().st_size > 1 << 20:
            return {}
        text = readme.read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return {}
    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not m:
        return {}
    try:
        import yaml

        data = yaml.safe_load(m.group(1))
    except Exception:  # a broken card is no reason to fail a conversion
        return {}
    out = {}
    if isinstance(data, dict) and isinstance(data.get("license"), str):
        out["license"] = data["license"]
    return out


# --- model card ----------------------------------------------------------------------------


def pipeline_tag_for(architecture: str | None) -> str | None:
    """The Hub pipeline_tag of a transformers architecture name (None when unknown)."""
    if not architecture:
        return None
    for suffix, tag in PIPELINE_TAGS:
        if architecture.endswith(suffix):
            return tag
    return None


def _embedded_json(f, name: str) -> dict:
    if name not in f.file_names():
        return {}
    try:
        data = json.loads(f.read_file(name))
    except (ValueError, CllmError):
        return {}
    return data if isinstance(data, dict) else {}


def _usage(repo_id: str, pipeline: str | None, chat: bool) -> str:
    lines = ["```bash", f"pip install {PACKAGE}", "```", "", "```python", "import codecllm_format", "",
             f'm = codecllm_format.load("{repo_id}")   # downloads only the .cllm; the weights stay compressed']
    if pipeline == "text-generation":
        if chat:
            lines.append('print(m.generate("What is the capital of France?", chat=True, max_new_tokens=32))')
        else:
            lines.append('print(m.generate("The capital of France is", max_new_tokens=32))')
        lines += ['# on a GPU: codecllm_format.load(..., device="cuda", residency="host")', "```", "",
                  "or from the command line:", "", "```bash",
                  f'cllm-generate {repo_id} "What is the capital of France?"' + (" --chat" if chat else ""), "```"]
    elif pipeline == "feature-extraction":
        lines += ['out = m("A sentence to embed.")', "print(out.last_hidden_state.shape)", "```"]
    else:
        lines += ['out = m("Some text.")', "```"]
    return "\n".join(lines)


def model_card(f, repo_id: str) -> str:
    """The README.md (YAML front matter + text) of a .cllm file published as `repo_id`.

    Args:
        f: the open CllmFile.
        repo_id: where it is published (used in the usage snippet).
    """
    from huggingface_hub import ModelCardData

    from .stats import describe, human

    d = describe(f, floor=False)
    meta = d["metadata"]
    config = _embedded_json(f, "config.json")
    archs = config.get("architectures") or []
    arch = meta.get("architecture") or (str(archs[0]) if archs else None)
    model_type = meta.get("model_type") or config.get("model_type")
    pipeline = pipeline_tag_for(arch)
    source = meta.get("source")
    base_model = meta.get("base_model") or (source if source and _looks_published(source) else None)
    tags = ["cllm", LIBRARY_NAME] + list(dict.fromkeys(ENCODING_TAGS.get(e, e) for e in sorted(d["encodings"])))
    if isinstance(model_type, str) and model_type and model_type not in tags:
        tags.append(model_type)
    data = {"library_name": LIBRARY_NAME, "tags": tags, "pipeline_tag": pipeline,
            "license": meta.get("license"), "base_model": base_model}
    if base_model and ("int8_row" in d["encodings"] or "int8_group" in d["encodings"]):
        data["base_model_relation"] = "quantized"
    card_data = ModelCardData(**{k: v for k, v in data.items() if v})
    chat = "chat_template.jinja" in f.file_names() or "chat_template" in _embedded_json(f, "tokenizer_config.json")

    name = f.path.name
    enc = ", ".join(f"{n} {k}" for k, n in sorted(d["encodings"].items()))
    tied = f" ({len(d['aliases'])} tied)" if d["aliases"] else ""
    rows = [
        ("file", f"`{name}`, {human(d['file_bytes'])} ({d['file_bytes']:,} bytes)"),
        ("same tensors in bf16", f"{human(d['bf16_bytes'])} ({d['bf16_bytes']:,} bytes)"),
        ("size / bf16", f"{d['ratio_bf16']:.4f}" if d["ratio_bf16"] is not None else "-"),
        ("size / original dtypes", f"{d['ratio_logical']:.4f}" if d["ratio_logical"] is not None else "-"),
        ("tensors", f"{d['tensor_count']}: {enc}{tied}"),
        ("layer groups", str(d["groups"])),
        ("embedded files", ", ".join(f"`{n}`" for n in d["files"]) or "none"),
    ]
    what = f"`{arch}`" if arch else "a model"
    src = f" converted from [{base_model}](https://huggingface.co/{base_model})" if base_model else (
        f" converted from `{source}`" if source else "")
    parts = [
        "---", card_data.to_yaml(), "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"{what}{src}, in the `.cllm` format of [{PACKAGE}](https://pypi.org/project/{PACKAGE}/): "
        "linear weights, embeddings and lm_head as int8 with "
        f"{'one bfloat16 scale per group of input columns' if 'int8_group' in d['encodings'] else 'one float32 scale per row'}"
        ", everything else "
        "exact, all of it in independent zstd chunks with XXH3 checksums, plus the config and tokenizer. "
        "The loader keeps the weights compressed and decodes each layer right before it runs.", "",
        "## Compression", "", "| | |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows], "",
    ]
    fidelity = {k: v for k, v in meta.items() if k.startswith(FIDELITY_PREFIXES)}
    if fidelity:
        parts += ["## Fidelity", "", "| metric | value |", "| --- | --- |",
                  *[f"| {k.split('.', 1)[1]} | {v} |" for k, v in sorted(fidelity.items())], ""]
    parts += ["## Usage", "", _usage(repo_id, pipeline, chat), ""]
    prov = {k: meta[k] for k in ("created_by", "source", "quantize") if k in meta}
    if prov:
        parts += ["## Provenance", "", *[f"- {k}: `{v}`" for k, v in prov.items()], ""]
    return "\n".join(parts)


def _looks_published(source: str) -> bool:
    """A converter 'source' that is a Hub repo id (cllm-convert org/name records the repo id)."""
    return source.count("/") == 1 and not source.startswith((".", "/")) and _is_repo_id(source)


# --- push ----------------------------------------------------------------------------------


@dataclass
class PushPlan:
    """What a push uploads: (path in repo, local file or bytes), and where."""

    repo_id: str
    files: list[tuple[str, Path | bytes]]
    private: bool
    revision: str | None
    commit_message: str


def plan_push(file, repo_id: str, *, private: bool = False, revision: str | None = None,
              commit_message: str | None = None, verify: bool = True) -> PushPlan:
    """Check `file` and build the upload: the .cllm and its generated README.md.

    Raises:
        HubError: a bad repo id, a file that is not a .cllm, or one that fails verification.
        CllmError: the file cannot be read as .cllm.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .reader import open_cllm

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a repo id: {e}") from None
    if "/" not in repo_id:
        raise HubError(f"{repo_id!r}: give the repo as org/name (or user/name)")
    path = Path(file)
    if not path.name.endswith(SUFFIX):
        raise HubError(f"{path}: the file to publish must be named *{SUFFIX} (so that load('{repo_id}') finds it)")
    with open_cllm(path) as f:
        if verify:
            problems = f.verify()
            if problems:
                raise HubError(f"{path}: not sound ({len(problems)} problem(s), first: {problems[0]}); nothing was uploaded")
        card = model_card(f, repo_id)
    msg = commit_message or f"Upload {path.name} ({PACKAGE} {__version__})"
    return PushPlan(repo_id, [(path.name, path), ("README.md", card.encode())], private, revision, msg)


def write_plan(plan: PushPlan, folder) -> list[Path]:
    """Write the folder a push would upload (the .cllm hard-linked, or copied across file systems).

    Raises:
        HubError: the folder exists and is not empty.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise HubError(f"{folder}: exists and is not an empty folder (the dry run writes exactly what would be uploaded)")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, src in plan.files:
        dest = folder / name
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        written.append(dest)
    return written


def push(file, repo_id: str, *, private: bool = False, revision: str | None = None, commit_message: str | None = None,
         token: str | bool | None = None, dry_run=None, verify: bool = True,
         log: Callable[[str], None] = print) -> str:
    """Publish a .cllm file on the Hub with a generated model card (README.md).

    Creates the repo when needed (and the branch `revision`), then makes one commit holding the
    .cllm (uploaded as LFS/Xet, streamed from disk) and README.md (replacing the repo's card).

    Args:
        file: the .cllm file.
        repo_id: org/name.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main when missing; default main).
        commit_message: default "Upload NAME (codecllm-format VERSION)".
        token: passed to huggingface_hub (None: the saved login / HF_TOKEN).
        dry_run: a folder: write what would be uploaded there, upload nothing.
        verify: check every chunk of the file first.
        log: where progress lines go.

    Returns:
        The commit URL, or the dry-run folder.

    Raises:
        HubError: bad inputs, offline, not authorized, or any Hub failure.
    """
    plan = plan_push(file, repo_id, private=private, revision=revision, commit_message=commit_message, verify=verify)
    sizes = ", ".join(f"{n} ({_size_of(s)})" for n, s in plan.files)
    target = f"{'private ' if private else ''}model repo {repo_id}" + (f", branch {revision}" if revision else "")
    if dry_run is not None:
        written = write_plan(plan, dry_run)
        log(f"dry run: would create the {target} if missing, and commit {sizes} with message {plan.commit_message!r}")
        log(f"dry run: wrote {', '.join(str(p) for p in written)}; nothing was uploaded")
        return str(Path(dry_run))
    if is_offline():
        raise HubError("HF_HUB_OFFLINE is set: cannot upload (unset it, or use --dry-run DIR)")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    ref = HubRef(repo_id, revision=revision)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            others = [x for x in api.list_repo_files(repo_id, revision=revision)
                      if x.endswith(SUFFIX) and x != plan.files[0][0]]
        except Exception:  # listing is only for the warning below
            others = []
        if others:
            log(f"warning: {repo_id} also holds {_names(others)}: load('{repo_id}') will need filename=")
        log(f"uploading to the {target}: {sizes}")
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(s) if isinstance(s, Path) else s)
               for n, s in plan.files]
        info = api.create_commit(repo_id, ops, commit_message=plan.commit_message, revision=revision)
    except HubError:
        raise
    except Exception as e:
        if _bug(e):
            raise
        raise _hub_error(e, ref, None) from None
    url = getattr(info, "commit_url", None) or str(info)
    log(f"pushed: {url}")
    return url


def _size_of(src: Path | bytes) -> str:
    from .stats import human

    return human(len(src) if isinstance(src, bytes) else Path(src).stat().st_size)
