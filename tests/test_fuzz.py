"""Property-based fuzzing of the reader (issue 7): mutants of small valid files either read
exactly as an independent decoder says, or fail with a CllmError; within 1 s and 4 x file
size + 64 MiB each. The harness (seeds, mutators, oracle, guards) is tools/fuzz.py, which
also runs long campaigns; here hypothesis drives the same mutators, derandomized (the same
cases on every run), without an example database.

Memory: each case runs under RLIMIT_AS = current address space + 4 x file size + 64 MiB,
which every allocator (Python, numpy, torch's CPU allocator, libzstd) is subject to, so an
allocation over the bound fails and the property reports it; tracemalloc's peak is checked
against the same bound for Python and numpy allocations (it cannot see torch's).
"""

from __future__ import annotations

import sys
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import fuzz  # noqa: E402

import hostile_builder as hb  # noqa: E402
from codecllm_format.errors import IndexSchemaError  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")

FUZZ_SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=fuzz.TIME_LIMIT_S),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


class HypothesisChooser:
    """Mutator choices drawn from hypothesis (so failures shrink to small positions and values)."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]

    def binary(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


class Harness:
    def __init__(self, folder: Path):
        self.seeds = fuzz.build_seeds()
        self.contents = [fuzz.read_all(fuzz.write_case(folder / f"seed{k}.cllm", s))[0] for k, s in enumerate(self.seeds)]
        self.path = folder / "case.cllm"
        self.cases = 0

    def check(self, m: fuzz.Mutant) -> None:
        fuzz.write_case(self.path, m.blob)
        bound = fuzz.memory_bound(len(m.blob))
        tracemalloc.start()  # only around the case: tracing hypothesis too would cost 5x
        try:
            out = fuzz.run_case(self.path, len(m.blob))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.cases += 1
        bad = fuzz.violations(m, out, self.seeds, self.contents)
        if peak > bound:
            bad.append(f"Python allocations peaked at {peak} bytes, bound {bound}")
        assert not bad, f"seed {m.seed}, mutations {m.steps}, {len(m.blob)} bytes:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool growing mid-case under the address-space limit
    try:
        yield Harness(tmp_path_factory.mktemp("fuzz"))
    finally:
        torch.set_num_threads(threads)


def test_seeds_are_valid_and_cover_the_format(harness):
    """The seeds read cleanly and hold what the mutators need: int8_row and raw tensors,
    multi-chunk streams, aliases, embedded files, an empty tensor, several groups."""
    import codecllm_format as cf

    kinds = set()
    for k, blob in enumerate(harness.seeds):
        with cf.open(fuzz.write_case(harness.path, blob)) as f:
            assert f.verify() == []
            kinds |= {t.encoding for t in f.index.tensors}
            kinds |= {"multi-chunk"} if any(s.num_chunks > 1 for t in f.index.tensors for s in t.streams) else set()
            kinds |= {"alias"} if f.index.aliases else set()
            kinds |= {"files"} if f.index.files else set()
            kinds |= {"empty"} if any(t.numel == 0 for t in f.index.tensors) else set()
            kinds |= {"groups"} if len(f.index.groups) >= 3 else set()
    assert kinds >= {cf.Encoding.RAW, cf.Encoding.INT8_ROW, "multi-chunk", "alias", "files", "empty", "groups"}


@settings(max_examples=2500, **FUZZ_SETTINGS)
@given(data=st.data())
def test_raw_mutations(harness, data):
    """Bit flips, overwrites, truncations, splices, insertions, deletions: no checksum fixed,
    so an accepted mutant must read exactly as its seed (verify() then reports the padding)."""
    harness.check(fuzz.mutate(harness.seeds, HypothesisChooser(data), family="raw"))


@settings(max_examples=5000, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fixed_mutations(harness, data):
    """Header fields, index fields re-encoded as msgpack, msgpack bytes, zstd frame bytes and
    whole frames, with checksums recomputed: CllmError, or output equal to the independent
    decoder's."""
    harness.check(fuzz.mutate(harness.seeds, HypothesisChooser(data), family="fixed"))


@settings(max_examples=2500, **FUZZ_SETTINGS)
@given(data=st.data())
def test_stacked_mutations(harness, data):
    """1-3 mutations of both families stacked."""
    harness.check(fuzz.mutate(harness.seeds, HypothesisChooser(data)))


# --- the harness can fail (so a green run means something) -------------------------------------


def test_mutators_reach_deep_validation(harness, tmp_path):
    """Each fixed mutator gets past the checksums to the check it targets (seeded, 150 cases
    each): if a change of the reader made them stop early, the fuzzing would test nothing."""
    import random

    want = {
        "header_field": {"LayoutError", "UnsupportedVersion", "FormatError", None},
        "index_field": {"IndexSchemaError", "UnsupportedVersion", "LayoutError", None},
        "index_semantic": {"IndexSchemaError", "LayoutError", "DecodeError", None},
        "index_bytes": {"IndexSchemaError"},
        "chunk_bytes": {"DecodeError", None},
        "chunk_frame": {"DecodeError", None},
        "splice": {"FormatError", "TruncatedFile", None},
    }
    path = tmp_path / "m.cllm"
    for name, expected in want.items():
        seen = set()
        for i in range(150):
            ch = fuzz.RandomChooser(random.Random(f"deep:{name}:{i}"))
            k = ch.integer(0, len(harness.seeds) - 1)
            m = fuzz.Mutant(fuzz.MUTATORS[name](harness.seeds[k], harness.seeds, ch), k, [name])
            out = fuzz.run_case(fuzz.write_case(path, m.blob), len(m.blob))
            assert not fuzz.violations(m, out, harness.seeds, harness.contents), (name, i)
            seen.add(out.error)
        assert expected <= seen, f"{name}: outcomes {seen}, expected at least {expected}"


def test_guard_enforces_the_memory_bound():
    """An allocation over the bound fails under the guard, for torch and for Python."""
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        with fuzz.Guard(64 << 20):
            torch.empty(256 << 20, dtype=torch.uint8)
    with pytest.raises(MemoryError):
        with fuzz.Guard(64 << 20):
            bytearray(256 << 20)
    with fuzz.Guard(64 << 20):
        torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # within the bound: fine


def test_oracle_catches_a_wrong_answer(harness):
    """violations() flags an accepted file whose output differs from the independent decoder's,
    a raw mutant that does not read as its seed, a missing padding report, a foreign exception."""
    blob = harness.seeds[0]
    content = harness.contents[0]
    good = fuzz.Outcome(None, content=content, problems=[])
    assert fuzz.violations(fuzz.Mutant(blob, 0, ["bit_flip"]), good, harness.seeds, harness.contents) == []
    name = content["keys"][0]
    shape, dtype, data = content["tensors"][name]
    wrong = {**content, "tensors": {**content["tensors"], name: (shape, dtype, bytes([data[0] ^ 1]) + data[1:])}}
    bad = fuzz.violations(fuzz.Mutant(blob, 0, ["index_field"]), fuzz.Outcome(None, content=wrong, problems=[]),
                          harness.seeds, harness.contents)
    assert any("independent decoder" in b for b in bad), bad
    padded = hb.patch(blob, 100, b"\x01")  # non-zero header padding: readable, verify() must say so
    bad = fuzz.violations(fuzz.Mutant(padded, 0, ["overwrite"]), good, harness.seeds, harness.contents)
    assert any("padding" in b for b in bad), bad
    bad = fuzz.violations(fuzz.Mutant(blob, 0, ["bit_flip"]), fuzz.Outcome("foreign", foreign="KeyError: 'x'"),
                          harness.seeds, harness.contents)
    assert bad and "other than a CllmError" in bad[0]


# --- regressions found by fuzzing ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[0, 2**47, 2**47], [2**31, 2**31, 0], [0] + [2**16] * 7])
def test_empty_tensor_with_overflowing_strides(harness, shape, tmp_path):
    """Found by tools/fuzz.py (campaign 11): an empty tensor whose other dimensions multiply past
    2^63 has no bytes, so every length check passed, and get_tensor() raised torch's
    RuntimeError('Stride calculation overflowed'). Now rejected at open (FORMAT.md 6.2, 14.17)."""
    import codecllm_format as cf

    def e(o):
        hb.tensor(o, "empty")["shape"] = shape

    path = fuzz.write_case(tmp_path / "empty.cllm", hb.edit_index(harness.seeds[2], e))
    with pytest.raises(IndexSchemaError, match="'empty'.shape.*strides would overflow"):
        cf.open(path)
    out = fuzz.run_case(path, path.stat().st_size)
    assert out.error == "IndexSchemaError" and out.foreign is None


def test_empty_tensor_at_the_limit_reads(harness, tmp_path):
    """The largest allowed empty shapes still read (torch and numpy can create them)."""
    import codecllm_format as cf

    for shape in ([0, 2**47], [2**45, 0, 2**14]):
        path = fuzz.write_case(tmp_path / "ok.cllm", hb.edit_index(harness.seeds[2], lambda o: hb.tensor(o, "empty").update(shape=shape)))
        with cf.open(path) as f:
            assert tuple(f.get_tensor("empty").shape) == tuple(shape)
        m = fuzz.Mutant(path.read_bytes(), 2, ["index_semantic"])
        assert fuzz.violations(m, fuzz.run_case(path, len(m.blob)), harness.seeds, harness.contents) == []


def test_nested_index_costs_a_bounded_amount(harness, tmp_path):
    """The one known case over the per-file bound (SECURITY.md): an index of 1,000+ nested
    msgpack arrays each claiming 100,000 elements makes msgpack preallocate ~80 MiB before it
    stops at its nesting limit, whatever the file's size. Bounded: under a 160 MiB address-space
    limit the open fails with IndexSchemaError, not MemoryError."""
    import codecllm_format as cf

    bomb = b"\xdd\x00\x01\x86\xa0" * 3000
    path = fuzz.write_case(tmp_path / "nested.cllm", hb.with_index_bytes(harness.seeds[0], bomb))
    with fuzz.Guard(160 << 20):
        with pytest.raises(IndexSchemaError, match="not valid msgpack"):
            cf.open(path)
