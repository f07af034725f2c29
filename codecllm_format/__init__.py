"""codecllm_format: the .cllm compressed model format — converter, reader and runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from .constants import Codec, DType, Encoding  # noqa: E402
from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .reader import CllmFile, RawTensor, open_cllm  # noqa: E402
from .writer import CllmWriter  # noqa: E402
from .hub import HubError  # noqa: E402


def open(path, *, threads: int | None = None, filename: str | None = None, revision: str | None = None,  # noqa: A001
         token: str | bool | None = None, trust_gpu_codecs: bool = False) -> CllmFile:
    """Open and validate a .cllm file (see reader.open_cllm). `path` may also be a folder holding
    one .cllm or a Hugging Face repo id / hf:// URI (see codecllm_format.hub.resolve)."""
    from .hub import resolve

    return open_cllm(resolve(path, filename=filename, revision=revision, token=token), threads=threads,
                     trust_gpu_codecs=trust_gpu_codecs)


def load(path, *args, **kwargs):
    """Load a .cllm file as a runnable model (see codecllm_format.loader.load)."""
    from .loader import load as _load

    return _load(path, *args, **kwargs)


__all__ = ["__version__", "open", "load", "CllmFile", "CllmWriter", "RawTensor", "Codec", "DType", "Encoding", "HubError", *_errors_all]
