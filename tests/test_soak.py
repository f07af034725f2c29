"""Soak (issue 7): 1,000 generate calls on one loaded model leak nothing. After a warm-up, the
process's resident memory stays within 1% of its level (sampled every 50 calls), and the
number of open file descriptors and of threads does not grow. The GPU variant (marker gpu,
skipped without CUDA) runs the `host` residency tier and also holds torch.cuda.memory_allocated
flat.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_folder  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format.convert import convert  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

CALLS = 1000
WARMUP = 100
SAMPLE_EVERY = 50


def status(field: str) -> int:
    """A numeric field of /proc/self/status (VmRSS in kB, Threads)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def snapshot(cuda: bool = False) -> dict[str, int]:
    gc.collect()
    snap = {"rss_kb": status("VmRSS"), "fds": open_fds(), "threads": status("Threads"),
            "py_threads": threading.active_count()}
    if cuda:
        torch.cuda.synchronize()
        snap["cuda_allocated"] = torch.cuda.memory_allocated()
    return snap


def soak(model, prompts: list, cuda: bool = False) -> tuple[dict, list[dict]]:
    """CALLS generate calls cycling through `prompts`; (snapshot after warm-up, later snapshots).
    Also checks that every call gives the answer the first round gave (greedy decoding)."""
    answers = {}
    base, samples = None, []
    for i in range(CALLS):
        k = i % len(prompts)
        out = model.generate(prompts[k], max_new_tokens=2, do_sample=False)
        out = out.tolist() if torch.is_tensor(out) else out
        if k in answers:
            assert out == answers[k], f"call {i}: prompt {k} gave {out}, earlier {answers[k]}"
        else:
            answers[k] = out
        if i + 1 == WARMUP:
            base = snapshot(cuda)
        elif i + 1 > WARMUP and (i + 1) % SAMPLE_EVERY == 0:
            samples.append(snapshot(cuda))
    return base, samples


def check_flat(base: dict, samples: list[dict], name: str = "soak") -> None:
    report = os.environ.get("CODECLLM_SOAK_REPORT")
    if report:  # a directory: keep the series for benchmarks/RESULTS.md
        import json

        Path(report).mkdir(parents=True, exist_ok=True)
        (Path(report) / f"{name}.json").write_text(json.dumps({"base": base, "samples": samples}, indent=1))
    assert len(samples) == (CALLS - WARMUP) // SAMPLE_EVERY
    worst = max(s["rss_kb"] for s in samples)
    assert worst <= base["rss_kb"] * 1.01, (
        f"RSS grew from {base['rss_kb']} kB to {worst} kB (>1%): {[s['rss_kb'] for s in samples]}"
    )
    for key in ("fds", "threads", "py_threads", "cuda_allocated"):
        if key in base:
            values = [s[key] for s in samples]
            assert max(values) <= base[key], f"{key} grew: {base[key]} after warm-up, then {values}"


@pytest.fixture(scope="module")
def tiny_llama_cllm(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("soak")
    make_folder("llama", folder / "model")
    return convert(folder / "model", folder / "model.cllm").output


def test_cpu_soak(tiny_llama_cllm):
    """Token ids and text prompts (the tokenizer path too), batch 1 and 2."""
    with cf.load(tiny_llama_cllm) as m:
        prompts = [
            torch.tensor([[2, 10, 11, 12]]),
            "the quick brown fox",
            torch.tensor([[2, 20, 21], [2, 30, 31]]),
            ["paris is the capital of", "what is"],
        ]
        base, samples = soak(m, prompts)
    check_flat(base, samples, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_gpu_soak_streaming_tiers(tmp_path, tier):
    """The host tier streams every layer group from pinned memory (the disk tier: from the file,
    through the read-ahead thread's pinned ring) through the decode slots on every forward:
    VRAM (memory_allocated), host RSS, threads and open files stay flat over 1,000 calls."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    path = convert(tmp_path / "model", tmp_path / "model.cllm", chunk_size=16384).output
    with cf.load(path, device="cuda", residency=tier) as m:
        prompts = [torch.tensor([[1, 5, 9, 200]]), torch.tensor([[1, 7], [1, 8]])]
        base, samples = soak(m, prompts, cuda=True)
    check_flat(base, samples, f"gpu-{tier}")
