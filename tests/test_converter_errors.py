"""The converter's bad inputs and bad days: every failure is a ConversionError that names the
problem, and the target path never holds a partial file (nor is a temp file left beside it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import codecllm_format as cf
from codecllm_format.convert import convert
from codecllm_format.errors import ConversionError
from codecllm_format.writer import PARTIAL_SUFFIX
from conftest import write_small_cllm


def leftovers(folder: Path) -> list[str]:
    """Names of .cllm outputs and partial temp files in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".cllm", PARTIAL_SUFFIX)))


def convert_fails(inp: Path, out: Path, fragment: str, **kwargs) -> ConversionError:
    """convert() raises a ConversionError mentioning `fragment`; nothing is left at `out`."""
    existed = out.exists()
    before = out.read_bytes() if existed else None
    with pytest.raises(ConversionError) as info:
        convert(inp, out, **kwargs)
    assert fragment in str(info.value), f"{info.value!r} does not mention {fragment!r}"
    if existed:
        assert out.read_bytes() == before
    else:
        assert not out.exists()
    if out.parent.is_dir():
        assert not [n for n in leftovers(out.parent) if n.endswith(PARTIAL_SUFFIX)]
    return info.value


# --- the input is missing or not safetensors ------------------------------------------------


def test_missing_input(tmp_path: Path):
    convert_fails(tmp_path / "nope.safetensors", tmp_path / "out.cllm", "no such file or folder")


@pytest.mark.parametrize(
    "kind,content",
    [
        ("text", b"these are not the weights you are looking for\n" * 10),
        ("random-bytes", bytes((i * 7919 + 13) % 256 for i in range(4096))),
        ("empty", b""),
        ("eight-bytes", (100).to_bytes(8, "little")),
    ],
)
def test_not_safetensors(kind: str, content: bytes, tmp_path: Path):
    inp = tmp_path / "model.safetensors"
    inp.write_bytes(content)
    convert_fails(inp, tmp_path / "out.cllm", "not a readable safetensors file")


def test_cllm_file_as_input(tmp_path: Path):
    """A .cllm input is transcoded only when a codec is asked for (cllm-convert FILE.cllm --codec);
    without one, the error says so and nothing is written. A .cllm renamed .safetensors is
    still not a safetensors file."""
    inp = write_small_cllm(tmp_path / "model.cllm")
    convert_fails(inp, tmp_path / "out.cllm", f"{inp} is already a .cllm file; to rewrite it with another int8 codec, "
                  "pass --codec ans or --codec zstd")
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(inp.read_bytes())
    convert_fails(renamed, tmp_path / "out.cllm", f"{renamed}: not a readable safetensors file")


def _header_and_data(small_safetensors: Path) -> tuple[bytes, bytes]:
    blob = small_safetensors.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return blob[8 : 8 + n], blob[8 + n :]


@pytest.mark.parametrize(
    "defect",
    ["json-garbled", "header-length-past-eof", "offsets-past-data", "truncated-data", "header-not-a-map"],
)
def test_corrupt_safetensors_header(defect: str, small_safetensors: Path, tmp_path: Path):
    header, data = _header_and_data(small_safetensors)
    if defect == "json-garbled":
        header = header.replace(b'"dtype"', b'"dtype"::', 1)
    elif defect == "header-length-past-eof":
        header = header + b" " * 0  # same header, announced as much longer below
    elif defect == "offsets-past-data":
        meta = json.loads(header)
        name = next(k for k in meta if k != "__metadata__")
        a, b = meta[name]["data_offsets"]
        meta[name]["data_offsets"] = [a, b + 10_000_000]
        header = json.dumps(meta).encode()
    elif defect == "truncated-data":
        data = data[: len(data) // 2]
    elif defect == "header-not-a-map":
        header = b"[1, 2, 3]"
    length = len(header) + (1 << 40 if defect == "header-length-past-eof" else 0)
    inp = tmp_path / "model.safetensors"
    inp.write_bytes(length.to_bytes(8, "little") + header + data)
    convert_fails(inp, tmp_path / "out.cllm", "not a readable safetensors file")


def test_unsupported_dtype(tmp_path: Path):
    inp = tmp_path / "fp8.safetensors"
    save_file({"w": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, str(inp))
    convert_fails(inp, tmp_path / "out.cllm", "tensor 'w': dtype F8_E4M3 is not supported")


def test_no_tensors(tmp_path: Path):
    inp = tmp_path / "empty.safetensors"
    save_file({}, str(inp))
    convert_fails(inp, tmp_path / "out.cllm", "holds no tensors")


# --- folders and sharded checkpoints ---------------------------------------------------------


def test_folder_without_safetensors(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    convert_fails(folder, tmp_path / "out.cllm", "no .safetensors weights in this folder")


def test_folder_with_pytorch_bin_gets_a_hint(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 16)
    err = convert_fails(folder, tmp_path / "out.cllm", "pytorch_model.bin")
    assert "save_pretrained" in str(err)


def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"model.layers.0.w": torch.randn(8, 8)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.1.w": torch.randn(8, 8)}, str(folder / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            "model.layers.0.w": "model-00001-of-00002.safetensors",
            "model.layers.1.w": "model-00002-of-00002.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_index_points_to_missing_shard(tmp_path: Path):
    folder = _sharded(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    convert_fails(folder, tmp_path / "out.cllm", "shard model-00002-of-00002.safetensors is missing")


def test_sharded_index_not_json(tmp_path: Path):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{weight_map: ")
    convert_fails(folder, tmp_path / "out.cllm", "not a valid safetensors index")


def test_sharded_index_without_weight_map(tmp_path: Path):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    convert_fails(folder, tmp_path / "out.cllm", "not a valid safetensors index")


def test_sharded_index_shard_leaves_the_folder(tmp_path: Path):
    folder = _sharded(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.w"] = "../elsewhere.safetensors"
    save_file({"x": torch.zeros(1)}, str(tmp_path / "elsewhere.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_fails(folder, tmp_path / "out.cllm", "leaves the folder")


def test_same_tensor_in_two_shards(tmp_path: Path):
    folder = _sharded(tmp_path)
    save_file({"model.layers.0.w": torch.randn(8, 8)}, str(folder / "model-00002-of-00002.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_fails(folder, tmp_path / "out.cllm", "tensor 'model.layers.0.w' is in both")


def test_bad_config_json(small_safetensors: Path, tmp_path: Path):
    (small_safetensors.parent / "config.json").write_text("{not json")
    convert_fails(small_safetensors, tmp_path / "out.cllm", "config.json: not valid JSON")


# --- the output ------------------------------------------------------------------------------


def test_output_exists_without_force(small_safetensors: Path, tmp_path: Path):
    out = tmp_path / "out.cllm"
    out.write_bytes(b"precious")
    convert_fails(small_safetensors, out, "exists (pass --force to overwrite)")
    report = convert(small_safetensors, out, overwrite=True)
    assert report.output == out
    with cf.open(out) as f:
        assert f.verify() == []


def test_output_would_overwrite_input(small_safetensors: Path):
    convert_fails(small_safetensors, small_safetensors, "output would overwrite the input", overwrite=True)


def test_output_is_a_folder(small_safetensors: Path, tmp_path: Path):
    (tmp_path / "dir.cllm").mkdir()
    with pytest.raises(ConversionError, match="output is a folder"):
        convert(small_safetensors, tmp_path / "dir.cllm")


def test_output_folder_missing(small_safetensors: Path, tmp_path: Path):
    convert_fails(small_safetensors, tmp_path / "no" / "such" / "out.cllm", "output folder does not exist")


def test_bad_options(small_safetensors: Path, tmp_path: Path):
    out = tmp_path / "out.cllm"
    convert_fails(small_safetensors, out, "--quantize must be int8 or none", quantize="int4")
    convert_fails(small_safetensors, out, "is not a valid regular expression", keep_regex="(")


# --- the weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_that_would_be_quantized(bad: float, tmp_path: Path):
    w = torch.randn(16, 32)
    w[3, 5] = bad
    inp = tmp_path / "model.safetensors"
    save_file({"model.layers.0.ok": torch.randn(16, 32), "model.layers.1.proj.weight": w}, str(inp))
    out = tmp_path / "out.cllm"
    err = convert_fails(inp, out, "tensor 'model.layers.1.proj.weight' holds NaN or infinity")
    assert "--keep-regex" in str(err)
    # the advice works: kept raw, the value survives exactly
    convert(inp, out, keep_regex=r"proj\.weight")
    with cf.open(out) as f:
        got = f.get_tensor("model.layers.1.proj.weight")
    assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got.nan_to_num(), w.nan_to_num())
    # raw (--quantize none) needs no advice
    convert(inp, out, quantize="none", overwrite=True)


def test_non_finite_1d_tensor_is_fine(tmp_path: Path):
    """Only quantized tensors must be finite; a raw NaN is stored as is."""
    b = torch.tensor([1.0, float("nan"), -float("inf")])
    inp = tmp_path / "model.safetensors"
    save_file({"bias": b}, str(inp))
    convert(inp, tmp_path / "out.cllm")
    with cf.open(tmp_path / "out.cllm") as f:
        got = f.get_tensor("bias")
    assert torch.equal(got.isnan(), b.isnan()) and got[2] == b[2]


# --- out of disk space and interruption --------------------------------------------------------


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from codecllm_format.convert import convert
    from codecllm_format.errors import CllmError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = []
    for out, limit in zip(sys.argv[2::2], sys.argv[3::2]):
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))  # soft limit only
        try:
            convert(sys.argv[1], out, quantize="none", chunk_size=4096, threads=1)
            results.append({"raised": None})
        except CllmError as e:
            results.append({"raised": type(e).__name__, "message": str(e)})
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE / SIGXFSZ semantics of Linux")
def test_out_of_disk_space(tmp_path: Path):
    """A file size limit makes write() fail with EFBIG (as a full disk fails with ENOSPC),
    here in the header padding (3000 bytes), in the data (64 KiB) and near the end (the index):
    a ConversionError, nothing at the target, no temp file left."""
    inp = tmp_path / "in" / "model.safetensors"
    inp.parent.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.w": torch.randn(64, 256, generator=g) for i in range(4)}, str(inp))
    full = tmp_path / "full.cllm"
    convert(inp, full, quantize="none", chunk_size=4096, threads=1)
    size = full.stat().st_size
    limits = [3000, 64 * 1024, size - 200]
    outdirs = []
    args = [sys.executable, "-c", DISK_FULL_SCRIPT, str(inp)]
    for i, limit in enumerate(limits):
        outdirs.append(tmp_path / f"out{i}")
        outdirs[-1].mkdir()
        args += [str(outdirs[-1] / "model.cllm"), str(limit)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    for outdir, result in zip(outdirs, results):
        out = outdir / "model.cllm"
        assert result["raised"] == "ConversionError", result
        assert "file size limit reached" in result["message"] and str(out) in result["message"], result
        assert "nothing was written" in result["message"]
        assert list(outdir.iterdir()) == []


class Interrupt:
    """A progress callback that raises KeyboardInterrupt (Ctrl-C) on its n-th call."""

    def __init__(self, n: int):
        self.n = n
        self.calls = 0

    def __call__(self, _nbytes: int) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("at_call", [1, 3])
def test_interrupted_conversion_leaves_nothing(at_call: int, tmp_path: Path):
    inp = tmp_path / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.w": torch.randn(32, 64, generator=g) for i in range(4)}, str(inp))
    out = tmp_path / "model.cllm"
    progress = Interrupt(at_call)
    with pytest.raises(KeyboardInterrupt):
        convert(inp, out, progress=progress)
    assert progress.calls == at_call
    assert leftovers(tmp_path) == []
    # and an existing output survives an interrupted overwrite untouched
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        convert(inp, out, progress=Interrupt(at_call), overwrite=True)
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == ["model.cllm"]


def test_interrupt_before_writing(small_safetensors: Path, tmp_path: Path):
    def on_start(total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(small_safetensors, tmp_path / "x.cllm", on_start=on_start)
    assert leftovers(tmp_path) == []


def test_ans_codec_with_group_scales_is_refused_before_anything(small_safetensors: Path, tmp_path: Path):
    """Codec ANS holds int8_row streams only (spec section 11): --codec ans with --quantize int8-gN
    is refused up front, on any machine, and nothing is written."""
    convert_fails(small_safetensors, tmp_path / "out.cllm", "--codec ans stores int8_row weights only",
                  quantize="int8-g128", codec="ans")
