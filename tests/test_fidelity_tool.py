"""tools/fidelity.py end to end on tiny random models (causal LM and encoder): the lossless file
is exact, the int8 file is close, and the report has every field the README table quotes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import make_folder  # noqa: E402

from tools import fidelity  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fidelity_report(tmp_path, arch, monkeypatch):
    monkeypatch.setattr(fidelity, "PASSAGE", " ".join(["the quick brown fox jumps over the lazy dog"] * 6))
    folder = tmp_path / arch
    make_folder(arch, folder)
    out = tmp_path / "report.json"
    assert fidelity.main([str(folder), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["sqnr_db"]["tensors"] > 0 and r["sqnr_db"]["min"] > 20
    assert r["int8_ratio_bf16"] < r["none_ratio_bf16"]
    assert r["none_lossless_tensors"] > 0 and r["int8_lossless_tensors"] == 0  # the control is float_planes
    if arch == "llama":
        lm = r["lm"]
        assert lm["lossless"]["kl_mean"] == 0 and lm["lossless"]["perplexity"] == lm["original"]["perplexity"]
        assert 0 < lm["int8"]["kl_mean"] < 0.1
    else:
        enc = r["encoder"]
        assert enc["lossless"]["cosine_min"] > 0.999999
        assert 0.99 < enc["int8"]["cosine_min"] < 1.0
