"""Per-group GPU timeline of a streaming provider: when each group's copy, decode and compute ran.

A diagnostic (tools/bench_generate.py, tools/profile_decode.py), off by default: while a
`Timeline` is attached to a GpuProvider (`provider.timeline = Timeline()`), the provider records
CUDA timing events on its three streams around each group it uses:

  copy_start / copy_end      the H2D copy of the compressed group (host and disk tiers)
  decode_start / decode_end  the nvCOMP decode into the slot
  wait_start / compute_start the compute stream reaching the group, and going on once the
                             group's decode is done (the difference is the stall)
  compute_end                the compute stream done with the group (end of the block)

Recording costs host time (one event per mark), so tok/s measured with a timeline attached is
not the figure to report; the stalls and overlap are.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

MARKS = ("copy_start", "copy_end", "decode_start", "decode_end", "wait_start", "compute_start", "compute_end")


@dataclass
class GroupUse:
    """One use of one group by a forward pass, with its CUDA events by mark name."""

    gid: int
    tier: str
    compressed_bytes: int
    events: dict[str, torch.cuda.Event] = field(default_factory=dict)


class Timeline:
    """Collects GroupUse records from a provider; `report()` turns them into milliseconds."""

    def __init__(self) -> None:
        self.uses: list[GroupUse] = []
        self._pending: dict[int, GroupUse] = {}  # scheduled (copy/decode enqueued), not yet used
        self._open: dict[int, GroupUse] = {}  # in use by the compute stream

    # --- called by the provider -----------------------------------------------------------

    def mark(self, use: GroupUse, what: str, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        use.events[what] = event

    def scheduled(self, gid: int, tier: str, compressed_bytes: int) -> GroupUse:
        use = self._pending[gid] = GroupUse(gid, tier, compressed_bytes)
        return use

    def acquired(self, gid: int, tier: str, compressed_bytes: int) -> GroupUse:
        use = self._pending.pop(gid, None) or GroupUse(gid, tier, compressed_bytes)
        self.uses.append(use)
        self._open[gid] = use
        return use

    def released(self, gid: int, stream: torch.cuda.Stream) -> None:
        use = self._open.pop(gid, None)
        if use is not None:
            self.mark(use, "compute_end", stream)

    # --- analysis -------------------------------------------------------------------------

    def report(self) -> dict:
        """Milliseconds per use (relative to the first mark) and totals: copy, decode and stall
        time, and the share of copy+decode time hidden behind compute ("overlap")."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        uses = [u for u in self.uses if "wait_start" in u.events and "compute_end" in u.events]
        if not uses:
            return {"uses": [], "groups": 0}
        t0 = min((e for u in uses for e in u.events.values()), key=lambda e: uses[0].events["wait_start"].elapsed_time(e))
        rows = []
        for u in uses:
            t = {k: t0.elapsed_time(e) for k, e in u.events.items()}
            row = {"gid": u.gid, "tier": u.tier, "compressed_bytes": u.compressed_bytes, **{k: round(v, 4) for k, v in t.items()}}
            row["stall_ms"] = max(0.0, t["compute_start"] - t["wait_start"])
            row["compute_ms"] = t["compute_end"] - t["compute_start"]
            if "copy_start" in t:
                row["copy_ms"] = t["copy_end"] - t["copy_start"]
            if "decode_start" in t:
                row["decode_ms"] = t["decode_end"] - t["decode_start"]
            rows.append(row)
        return {**summarize(rows), "uses": rows}


def summarize(rows: list[dict]) -> dict:
    """Totals over some of report()'s rows (all of them, or e.g. the decode steps only): span
    from the first wait to the last compute end, copy / decode / stall / compute milliseconds,
    copy GB/s, and the share of copy+decode time hidden behind compute ("overlap")."""
    if not rows:
        return {"groups": 0}
    span = max(r["compute_end"] for r in rows) - min(r["wait_start"] for r in rows)
    copy = sum(r.get("copy_ms", 0.0) for r in rows)
    decode = sum(r.get("decode_ms", 0.0) for r in rows)
    stall = sum(r["stall_ms"] for r in rows)
    copied = sum(r["compressed_bytes"] for r in rows if "copy_ms" in r)
    streamed = [r for r in rows if "decode_ms" in r]
    return {
        "groups": len(rows),
        "span_ms": span,
        "copy_ms": copy,
        "decode_ms": decode,
        "stall_ms": stall,
        "compute_ms": sum(r["compute_ms"] for r in rows),
        "copy_gbps": copied / (copy / 1000) / 1e9 if copy else None,
        "overlap": 1.0 - stall / (copy + decode) if copy + decode else None,
        "median_stall_ms": statistics.median(r["stall_ms"] for r in streamed) if streamed else 0.0,
    }
