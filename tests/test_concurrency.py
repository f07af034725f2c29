"""Concurrency (issue 7): two threads generating with two loaded models give the results each
model gives alone; one file loaded by two processes at once (multiprocessing, spawn) gives the
logits of one process alone; one open file read by several threads at once (get_tensor and
verify) gives the single-thread results.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_folder  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format.convert import convert  # noqa: E402

PROMPTS = [
    torch.tensor([[2, 10, 11, 12]]),
    torch.tensor([[2, 20, 21], [2, 30, 31]]),
    torch.tensor([[2, 40, 41, 42, 43, 44]]),
]
ROUNDS = 8


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[Path]:
    """Two different tiny models: a Llama and a GPT-2."""
    folder = tmp_path_factory.mktemp("conc")
    paths = []
    for arch, seed in (("llama", 0), ("gpt2", 1)):
        make_folder(arch, folder / arch, seed=seed)
        paths.append(convert(folder / arch, folder / f"{arch}.cllm").output)
    return paths


def work(m) -> list:
    """Greedy generations and full-forward logits for every prompt."""
    out = []
    for ids in PROMPTS:
        out.append(m.generate(ids, max_new_tokens=4, do_sample=False))
        out.append(m(ids).logits)
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_two_models_in_two_threads(two_models):
    models = [cf.load(p) for p in two_models]
    try:
        alone = [work(m) for m in models]
        assert not same(alone[0], alone[1])
        start = threading.Barrier(2)
        results: list[list] = [[], []]
        errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                start.wait()
                for _ in range(ROUNDS):
                    results[k].append(work(models[k]))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a generating thread hung"
        assert not errors, errors
        for k in range(2):
            assert len(results[k]) == ROUNDS
            for r, got in enumerate(results[k]):
                assert same(got, alone[k]), f"model {k}, round {r}: results differ from the model alone"
    finally:
        for m in models:
            m.close()


def _logits_in_process(path: str, barrier, queue) -> None:
    """Spawned worker: load the file, wait for the other worker, return the logits."""
    torch.set_num_threads(1)
    with cf.load(path) as m:
        barrier.wait(timeout=120)
        logits = [m(ids).logits for ids in PROMPTS]
    queue.put([t.numpy() for t in logits])


def test_one_file_two_processes(two_models):
    path = str(two_models[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        with cf.load(path) as m:
            reference = [m(ids).logits.numpy() for ids in PROMPTS]
    finally:
        torch.set_num_threads(threads)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_logits_in_process, args=(path, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for g in got:
        assert len(g) == len(reference)
        for a, b in zip(g, reference):
            assert a.shape == b.shape and (a == b).all()


THREADS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, torch
    import codecllm_format as cf

    f = cf.open(sys.argv[1])
    ref = {k: f.get_tensor(k) for k in f.keys()}
    assert f.verify() == []
    errors = []
    start = threading.Barrier(4)

    def work(kind):
        start.wait()
        try:
            for _ in range(int(sys.argv[2])):
                if kind == "verify":
                    errors.extend(f.verify())
                else:
                    errors.extend(k for k in f.keys() if not torch.equal(f.get_tensor(k), ref[k]))
        except Exception as e:
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(k,)) for k in ("verify", "verify", "get", "get")]
    [t.start() for t in ts]
    [t.join() for t in ts]
    print(errors[:5])
    sys.exit(1 if errors else 0)
    """
)


def test_one_open_file_many_threads(tmp_path):
    """Regression: verify() from two threads on one open file shared one zstd decompression
    context: spurious 'Data corruption detected' and, with readers alongside, segfaults. (In a
    subprocess, so a crash fails this test instead of the run.)"""
    path = tmp_path / "many.cllm"
    g = torch.Generator().manual_seed(0)
    with cf.CllmWriter(path, chunk_size=4096) as w:
        w.begin_group("a")
        for i in range(6):
            w.add_tensor(f"t{i}", torch.randn(256, 512, generator=g), cf.Encoding.INT8_ROW)
            w.add_tensor(f"r{i}", torch.randn(20000, generator=g), cf.Encoding.RAW)
        w.finish()
    r = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(path), "15"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit code {r.returncode}: {r.stdout} {r.stderr[-2000:]}"
