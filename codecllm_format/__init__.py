"""codecllm_format: the .cllm compressed model format — converter, reader and runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from .constants import Codec, DType, Encoding  # noqa: E402
from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .reader import CllmFile, RawTensor, open_cllm as open  # noqa: E402,A001
from .writer import CllmWriter  # noqa: E402


def load(path, *args, **kwargs):
    """Load a .cllm file as a runnable model (see codecllm_format.loader.load)."""
    from .loader import load as _load

    return _load(path, *args, **kwargs)


__all__ = ["__version__", "open", "load", "CllmFile", "CllmWriter", "RawTensor", "Codec", "DType", "Encoding", *_errors_all]
