"""Shared fixtures: small, valid, deterministic .cllm files and safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codecllm_format import CllmWriter, Encoding


def small_tensors(seed: int = 0) -> dict[str, tuple[str, torch.Tensor, Encoding]]:
    """{name: (group, tensor, encoding)} of a small model: several groups, an int8_row tensor
    of two chunks, a raw tensor of three chunks (with 4 KiB chunks), odd dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": ("embed", torch.randn(40, 64, generator=g), Encoding.INT8_ROW),
        "model.layers.0.attn.weight": ("model.layers.0", torch.randn(64, 96, generator=g), Encoding.INT8_ROW),
        "model.layers.0.attn.bias": ("model.layers.0", torch.randn(3000, generator=g), Encoding.RAW),
        "model.layers.0.mask": ("model.layers.0", torch.arange(10) % 3 == 0, Encoding.RAW),
        "model.layers.0.idx": ("model.layers.0", torch.arange(7, dtype=torch.int64) * -5, Encoding.RAW),
        "model.layers.1.norm.weight": ("model.layers.1", torch.randn(64, generator=g).half(), Encoding.RAW),
    }


def write_small_cllm(path: Path, *, chunk_size: int = 4096, seed: int = 0) -> Path:
    """Write the small model of `small_tensors` with CllmWriter, plus a tied alias, an
    embedded config.json and metadata."""
    with CllmWriter(path, chunk_size=chunk_size, metadata={"source": "conftest"}) as w:
        group = None
        for name, (gname, t, enc) in small_tensors(seed).items():
            if gname != group:
                w.begin_group(gname)
                group = gname
            w.add_tensor(name, t, enc)
        w.add_alias("lm_head.weight", "embed.weight")
        w.add_file("config.json", b'{"model_type": "test"}')
        w.finish()
    return path


@pytest.fixture
def small_cllm(tmp_path: Path) -> Path:
    """A small valid multi-group .cllm file (see small_tensors) in a fresh folder."""
    return write_small_cllm(tmp_path / "small.cllm")


@pytest.fixture
def small_safetensors(tmp_path: Path) -> Path:
    """A small safetensors checkpoint (2-D float weights, a bias, an int tensor)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "model.layers.0.mlp.weight": torch.randn(32, 48, generator=g),
            "model.layers.0.mlp.bias": torch.randn(32, generator=g),
            "model.layers.1.mlp.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16),
            "model.embed.weight": torch.randn(50, 48, generator=g),
            "model.position_ids": torch.arange(16, dtype=torch.int64),
        },
        str(path),
    )
    return path
