"""runtime/timeline.py's arithmetic, on the CPU: stand-in events with known times (in ms)."""

from __future__ import annotations

import pytest

from codecllm_format.runtime.timeline import GroupUse, Timeline, summarize


class _Event:
    """What Timeline.report needs of a CUDA event: elapsed_time(other) in ms."""

    def __init__(self, t: float):
        self.t = t

    def elapsed_time(self, other: "_Event") -> float:
        return other.t - self.t


def _use(tl: Timeline, gid: int, tier: str, nbytes: int, **times) -> GroupUse:
    u = GroupUse(gid, tier, nbytes, {k: _Event(v) for k, v in times.items()})
    tl.uses.append(u)
    return u


def test_report_sums_copy_decode_stall_and_overlap():
    tl = Timeline()
    # group 1: copied 0-2, decoded 2-3, compute reached it at 1 and waited until 3 (stall 2)
    _use(tl, 1, "host", 2_000_000, copy_start=0.0, copy_end=2.0, decode_start=2.0, decode_end=3.0,
         wait_start=1.0, compute_start=3.0, compute_end=5.0)
    # group 2: prefetched during group 1: no stall
    _use(tl, 2, "host", 2_000_000, copy_start=2.0, copy_end=4.0, decode_start=4.0, decode_end=4.5,
         wait_start=5.0, compute_start=5.0, compute_end=7.0)
    # gpu-compressed group: decode only
    _use(tl, 3, "gpu-compressed", 500, decode_start=6.0, decode_end=6.5, wait_start=7.0, compute_start=7.25,
         compute_end=8.0)
    # still in use (no compute_end): left out
    _use(tl, 4, "host", 1, copy_start=8.0, copy_end=9.0, wait_start=8.0, compute_start=9.0)
    rep = tl.report()
    assert rep["groups"] == 3
    assert rep["span_ms"] == pytest.approx(7.0)  # first wait_start 1.0 -> last compute_end 8.0
    assert rep["copy_ms"] == pytest.approx(4.0)
    assert rep["decode_ms"] == pytest.approx(2.0)
    assert rep["stall_ms"] == pytest.approx(2.25)
    assert rep["compute_ms"] == pytest.approx(2.0 + 2.0 + 0.75)
    assert rep["overlap"] == pytest.approx(1 - 2.25 / 6.0)
    assert rep["copy_gbps"] == pytest.approx(4_000_000 / 0.004 / 1e9)
    assert rep["median_stall_ms"] == pytest.approx(0.25)
    assert [u["gid"] for u in rep["uses"]] == [1, 2, 3]
    assert "copy_ms" not in rep["uses"][2]
    # totals over a subset (bench_generate: the decode steps only)
    later = summarize(rep["uses"][1:])
    assert later["groups"] == 2 and later["span_ms"] == pytest.approx(3.0)
    assert later["copy_ms"] == pytest.approx(2.0) and later["stall_ms"] == pytest.approx(0.25)
    assert summarize([]) == {"groups": 0}


def test_provider_bookkeeping_pairs_schedules_with_uses():
    tl = Timeline()
    s1 = tl.scheduled(5, "host", 10)
    assert tl.acquired(5, "host", 10) is s1  # the prefetched record is the one used
    fresh = tl.acquired(6, "gpu-compressed", 3)  # used without a schedule in sight
    assert fresh is not s1 and fresh.gid == 6
    assert [u.gid for u in tl.uses] == [5, 6]
    assert tl.report() == {"uses": [], "groups": 0}  # nothing finished yet
