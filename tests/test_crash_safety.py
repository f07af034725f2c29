"""Crash safety of the converter (issue 7): `cllm-convert` SIGKILLed at seeded points of its run
never leaves a partial file at the target path; what it leaves is a temp file named
`.NAME.<pid>-<hex>.cllm-partial` beside it, which the next conversion removes
(convert.clean_stale_partials) while a live converter's temp file is left alone. A real full
disk (a small tmpfs in a private mount namespace) fails cleanly too.

(A file size limit, RLIMIT_FSIZE -> EFBIG, and Ctrl-C are covered by test_converter_errors.py.)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import codecllm_format as cf
from codecllm_format.convert import clean_stale_partials

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL, /proc and mount namespaces")

TARGET = "model.cllm"
PARTIAL_RE = re.compile(r"^\." + re.escape(TARGET) + r"\.(\d+)-[0-9a-f]+\.cllm-partial$")
KILL_POINTS = 10
SEED = 7


def converter_command(inp: Path, out: Path, *extra: str) -> list[str]:
    """The installed cllm-convert script (beside this interpreter), else the same entry point."""
    script = Path(sys.executable).parent / "cllm-convert"
    args = [str(inp), "-o", str(out), "--quiet", "--threads", "2", *extra]
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from codecllm_format.cli import convert_main; sys.exit(convert_main())", *args]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """~100 MB of float32 weights (24 matrices of 1024 x 1024): about a second of conversion
    on two cores, long enough to kill it at many points."""
    folder = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(12):
        tensors[f"model.layers.{i}.mlp.up.weight"] = torch.randn(1024, 1024, generator=g)
        tensors[f"model.layers.{i}.mlp.down.weight"] = torch.randn(1024, 1024, generator=g)
        tensors[f"model.layers.{i}.norm.weight"] = torch.rand(1024, generator=g)
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory) -> bytes:
    """The bytes an uninterrupted run writes (the writer is deterministic)."""
    out = tmp_path_factory.mktemp("ref") / TARGET
    r = subprocess.run(converter_command(checkpoint, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    blob = out.read_bytes()
    with cf.open(out) as f:
        assert f.verify() == []
    return blob


def partials(folder: Path) -> dict[Path, int]:
    """Temp files of the converter in `folder`: {path: pid in its name}."""
    out = {}
    for p in folder.iterdir():
        m = PARTIAL_RE.match(p.name)
        if m:
            out[p] = int(m.group(1))
    return out


def run_and_kill(cmd: list[str], folder: Path, point: tuple[str, float]) -> dict:
    """Start the converter and SIGKILL it when `point` is reached:
    ("time", s): s seconds after the start (interpreter start-up, imports);
    ("bytes", n): its temp file has reached n bytes;
    ("target", 0): the target exists (just after the rename)."""
    kind, value = point
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    own = None
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > 120:
                pytest.fail(f"the converter did not reach {point} in 120 s")
            if own is None:
                own = next((p for p, pid in partials(folder).items() if pid == proc.pid), None)
            if kind == "time" and time.monotonic() - t0 >= value:
                break
            if kind == "bytes" and own is not None:
                try:
                    if own.stat().st_size >= value:
                        break
                except FileNotFoundError:  # renamed into place meanwhile
                    break
            if kind == "target" and (folder / TARGET).exists():
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    return {"pid": proc.pid, "rc": rc, "saw_partial": own is not None, "stderr": stderr}


def kill_points(size: int) -> list[tuple[str, float]]:
    """KILL_POINTS points spread over a run, from a fixed seed: one during start-up, seven at
    stratified fractions of the output size, one with all data written (index, header, fsync,
    rename in flight), one just after the rename."""
    rng = random.Random(SEED)
    points = [("time", rng.uniform(0.05, 0.5))]
    bins = KILL_POINTS - 3
    points += [("bytes", int(size * (i + rng.random()) / bins)) for i in range(bins)]
    points += [("bytes", size - 1), ("target", 0)]
    return points


def test_sigkill_never_leaves_a_partial_target(checkpoint, reference, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / TARGET
    cmd = converter_command(checkpoint, target, "--force")
    results = []
    for point in kill_points(len(reference)):
        before = partials(folder)
        r = run_and_kill(cmd, folder, point)
        results.append((point, r))
        # the target is absent or complete: the bytes of an uninterrupted run, verified
        if target.exists():
            assert target.read_bytes() == reference, f"{point}: the target holds a partial or different file"
            with cf.open(target) as f:
                assert f.verify() == []
        else:
            assert point[0] != "target", f"{point}: the target vanished"
        # nothing else beside it but temp files of killed converters, with the documented name
        others = [p.name for p in folder.iterdir() if p != target and p not in partials(folder)]
        assert others == [], f"{point}: unexpected files {others}"
        left = partials(folder)
        r["left_partial"] = r["pid"] in left.values()
        for p, pid in left.items():
            assert pid == r["pid"] or p in before, f"{point}: {p.name} belongs to no killed converter"
        if r["rc"] == -signal.SIGKILL and r["saw_partial"]:
            # it got past start-up, so it removed every stale temp file before creating its own
            assert not (set(before) & set(left)), f"{point}: stale temp files survived a new run: {sorted(map(str, before))}"
        else:
            assert r["rc"] in (-signal.SIGKILL, 0), f"{point}: exit code {r['rc']}: {r['stderr']}"
    killed_mid_write = sum(1 for point, r in results if point[0] == "bytes" and r["rc"] == -signal.SIGKILL and r["saw_partial"])
    assert killed_mid_write >= 5, f"only {killed_mid_write} kills landed while writing: {results}"
    assert sum(r["left_partial"] for _, r in results) >= 5, f"few kills left a temp file: {results}"
    # the next (complete) run cleans up and writes the same file
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert partials(folder) == {}
    assert sorted(p.name for p in folder.iterdir()) == [TARGET]
    assert target.read_bytes() == reference


def test_live_converters_temp_file_is_kept(checkpoint, reference, tmp_path):
    """clean_stale_partials removes only temp files whose converter is dead."""
    target = tmp_path / TARGET
    proc = subprocess.Popen(converter_command(checkpoint, target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not partials(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        mine = partials(tmp_path)
        assert list(mine.values()) == [proc.pid], "the converter's temp file did not appear"
        assert clean_stale_partials(target) == []
        assert set(partials(tmp_path)) >= set(mine)
    finally:
        proc.kill()
        proc.wait()
    if not target.exists():  # killed before the rename (nearly always)
        assert set(clean_stale_partials(target)) == set(mine)
    assert partials(tmp_path) == {}


# --- a real full disk --------------------------------------------------------------------------

DISK_FULL_SCRIPT = r"""
set -u
dir="$2"
mount -t tmpfs -o size="$1" tmpfs "$dir" || exit 77
shift 2
"$@" > /dev/null 2> "$OUT/stderr"
echo $? > "$OUT/rc"
ls -A "$dir" > "$OUT/listing"
"""


def _private_tmpfs_works() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="cannot mount a tmpfs in a private mount namespace here")
@pytest.mark.parametrize("size", ["64k", "2m", "20m"])
def test_disk_full(size: str, checkpoint, reference, tmp_path):
    """cllm-convert into a tmpfs too small for the output (64 KiB: fails in the header padding
    or first chunks; 2 MiB: in the data; 20 MiB: near the end) exits with 'out of disk space',
    and leaves nothing on that disk. The tmpfs lives in a private mount namespace."""
    assert len(reference) > 20 * 2**20
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "result"
    out.mkdir()
    target = mnt / TARGET
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", DISK_FULL_SCRIPT, "sh", size, str(mnt),
           *converter_command(checkpoint, target)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(out)})
    assert r.returncode == 0, r.stderr
    rc = int((out / "rc").read_text())
    stderr = (out / "stderr").read_text()
    assert rc == 1, stderr
    assert "out of disk space" in stderr and "nothing was written" in stderr and "Traceback" not in stderr, stderr
    assert (out / "listing").read_text().split() == []
