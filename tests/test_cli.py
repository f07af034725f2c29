"""The console scripts, run as the installed executables in subprocesses: exit codes (0 ok,
1 error or unsound file, 2 usage), one 'cllm-X: error: ...' line per error and never a
traceback, help for every option, cllm-info --json, the converter's summary and --quiet.

Each script start imports torch (~3 s), so every subprocess of this module is started at
once from one fixture (as many at a time as there are cores) and the tests read the results;
variations of the same code paths run in-process through the entry-point functions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hostile_builder as hb
import codecllm_format as cf
from codecllm_format import cli
from codecllm_format.convert import convert
from conftest import write_small_cllm

BIN = Path(sys.executable).parent
SCRIPTS = {"cllm-convert": "convert_main", "cllm-info": "info_main", "cllm-verify": "verify_main"}
ATTN = "model.layers.0.attn.weight"
TIED = ({"lm_head.weight": "model.embed_tokens.weight"}, {"model.embed_tokens.weight": "lm_head.weight"})
"""One of the tied pair is stored, the other is an alias (the converter keeps the first in its
group order)."""


def script(name: str) -> list[str]:
    """The installed console script, or the same entry point through this interpreter."""
    exe = BIN / name
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-c", f"import sys; from codecllm_format.cli import {SCRIPTS[name]} as m; sys.exit(m())"]


FSIZE_LAUNCHER = textwrap.dedent(
    """
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: write() gets EFBIG
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), hard))
    os.execv(sys.argv[2], sys.argv[2:])
    """
)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def llama_folder(folder: Path) -> Path:
    """A tiny Llama-style Hugging Face folder: config, generation config, tied embeddings."""
    folder.mkdir()
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "head_dim": 8,
        "torch_dtype": "float32", "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(64, 16, generator=g)
    norm = lambda: torch.rand(16, generator=g) + 0.5  # noqa: E731 - distinct, or they'd be deduplicated
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "model.norm.weight": norm()}
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
            p + "self_attn.k_proj.weight": torch.randn(8, 16, generator=g),
            p + "self_attn.v_proj.weight": torch.randn(8, 16, generator=g),
            p + "self_attn.o_proj.weight": torch.randn(16, 16, generator=g),
            p + "mlp.gate_proj.weight": torch.randn(32, 16, generator=g),
            p + "mlp.up_proj.weight": torch.randn(32, 16, generator=g),
            p + "mlp.down_proj.weight": torch.randn(16, 32, generator=g),
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
        })
    save_file(sd, str(folder / "model.safetensors"))
    return folder


class Workspace:
    """Inputs for every invocation, the invocations, and (after run()) their results."""

    def __init__(self, root: Path):
        self.root = root
        g = torch.Generator().manual_seed(0)
        self.model = root / "model.safetensors"  # 1 MiB of float32: the summary shows real sizes
        save_file({f"model.layers.{i}.mlp.weight": torch.randn(128, 512, generator=g) for i in range(4)}
                  | {"model.norm.weight": torch.randn(512, generator=g)}, str(self.model))
        self.hf = llama_folder(root / "tiny-llama")
        self.out = root / "out"
        self.out.mkdir()
        self.good = write_small_cllm(root / "good.cllm")
        self.hf_cllm = convert(self.hf, root / "tiny-llama.cllm").output
        blob = self.good.read_bytes()
        off, stored = hb.chunk_location(blob, ATTN, 0, 0)
        self.corrupt = root / "corrupt.cllm"
        self.corrupt.write_bytes(hb.flip_bit(blob, off + stored // 2, 1))
        self.truncated = root / "truncated.cllm"
        self.truncated.write_bytes(blob[:-10])
        self.text = root / "notes.txt"
        self.text.write_text("just some text\n")
        self.full_dir = root / "full"
        self.full_dir.mkdir()
        c, i, v = script("cllm-convert"), script("cllm-info"), script("cllm-verify")
        self.invocations: dict[str, list[str]] = {
            "convert-ok": c + [str(self.model), "-o", str(self.out / "a.cllm")],
            "convert-quiet": c + [str(self.model), "-o", str(self.out / "q.cllm"), "--quiet"],
            "convert-hf-folder": c + [str(self.hf), "-o", str(self.out / "hf.cllm"), "--threads", "1"],
            "convert-missing": c + [str(root / "nope.safetensors")],
            "convert-bad-level": c + [str(self.model), "--level", "99"],
            "convert-disk-full": [sys.executable, "-c", FSIZE_LAUNCHER, str(64 * 1024)] + c
            + [str(self.model), "-o", str(self.full_dir / "model.cllm")],
            "convert-help": c + ["--help"],
            "info-json": i + [str(self.hf_cllm), "--json"],
            "info-not-cllm": i + [str(self.text)],
            "verify-ok": v + [str(self.good)],
            "verify-corrupt": v + [str(self.corrupt)],
            "verify-truncated": v + [str(self.truncated)],
        }
        self.results: dict[str, Result] = {}

    def run(self) -> None:
        env = dict(os.environ, COLUMNS="100", PYTHONWARNINGS="ignore")

        def one(item: tuple[str, list[str]]) -> tuple[str, Result]:
            name, argv = item
            r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=self.root)
            return name, Result(argv, r.returncode, r.stdout, r.stderr)

        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            self.results = dict(pool.map(one, self.invocations.items()))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    w = Workspace(tmp_path_factory.mktemp("cli"))
    w.run()
    return w


def no_traceback(r: Result) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr


def one_error_line(r: Result, prog: str, fragment: str) -> str:
    """Exit 1, nothing on stdout, and exactly one stderr line 'prog: error: ...fragment...'."""
    no_traceback(r)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def usage_error(r: Result, prog: str, fragment: str) -> None:
    """Exit 2 (argparse), the last line 'prog: error: ...'."""
    no_traceback(r)
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and fragment in last, last


# --- cllm-convert -----------------------------------------------------------------------------

SUMMARY = re.compile(r"input [\d.]+ \w+ \((\d+) B\) -> output [\d.]+ \w+ \((\d+) B\): ([\d.]+) of input, ([\d.]+) of bf16")


def test_convert_prints_summary(ws: Workspace):
    r = ws.results["convert-ok"]
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    out = ws.out / "a.cllm"
    m = SUMMARY.search(r.stderr)
    assert m, r.stderr
    inp_b, out_b, ratio, ratio_bf16 = map(float, m.groups())
    in_bytes = 4 * (4 * 128 * 512 + 512)
    assert inp_b == in_bytes
    assert out_b == out.stat().st_size
    assert ratio == pytest.approx(out.stat().st_size / in_bytes, abs=0.001)
    assert ratio_bf16 == pytest.approx(2 * ratio, abs=0.002)
    assert f"wrote {out}" in r.stderr and "5 tensors (4 int8)" in r.stderr
    with cf.open(out) as f:
        assert f.verify() == [] and len(f.keys()) == 5


def test_convert_quiet_prints_nothing(ws: Workspace):
    r = ws.results["convert-quiet"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    with cf.open(ws.out / "q.cllm") as f:
        assert f.verify() == []


def test_convert_hf_folder(ws: Workspace):
    r = ws.results["convert-hf-folder"]
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert "1 tied" in r.stderr and "2 embedded files" in r.stderr, r.stderr
    with cf.open(ws.out / "hf.cllm") as f:
        assert f.index.aliases in TIED
        assert json.loads(f.read_file("config.json"))["model_type"] == "llama"
        assert f.metadata()["architecture"] == "LlamaForCausalLM"


def test_convert_errors_are_one_line(ws: Workspace):
    one_error_line(ws.results["convert-missing"], "cllm-convert", "no such file or folder")


def test_convert_disk_full(ws: Workspace):
    line = one_error_line(ws.results["convert-disk-full"], "cllm-convert", "file size limit reached")
    assert "nothing was written" in line
    assert list(ws.full_dir.iterdir()) == []


def test_convert_usage_errors(ws: Workspace):
    usage_error(ws.results["convert-bad-level"], "cllm-convert", "--level must be between -7 and 22")


# --- cllm-info ---------------------------------------------------------------------------------


def test_info_json(ws: Workspace):
    r = ws.results["info-json"]
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    size = ws.hf_cllm.stat().st_size
    assert d["file_bytes"] == size
    assert d["version"] == "1.0"
    assert d["aliases"] in TIED
    assert set(d["files"]) == {"config.json", "generation_config.json"}
    assert d["metadata"]["model_type"] == "llama"
    stored = {t["name"]: t for t in d["tensors"]}
    assert len(stored) == 2 * 9 + 2  # one of the tied pair is an alias
    # sizes and ratios agree with the file and with each other
    with cf.open(ws.hf_cllm) as f:
        for name, t in stored.items():
            e = f.entry(name)
            assert t["stored_bytes"] == e.stored_length
            assert t["bf16_bytes"] == 2 * e.numel
            assert t["ratio_bf16"] == pytest.approx(e.stored_length / (2 * e.numel))
    assert d["bf16_bytes"] == sum(t["bf16_bytes"] for t in stored.values())
    assert d["ratio_bf16"] == pytest.approx(size / d["bf16_bytes"])
    assert d["encodings"] == {"int8_row": 2 * 7 + 1, "raw": 2 * 2 + 1}
    assert 0 < d["floor_bytes"] <= sum(t["stored_bytes"] for t in stored.values()) * 1.5


def test_info_errors_are_one_line(ws: Workspace):
    one_error_line(ws.results["info-not-cllm"], "cllm-info", "not a .cllm file")


# --- cllm-verify -------------------------------------------------------------------------------


def test_verify_ok(ws: Workspace):
    r = ws.results["verify-ok"]
    assert r.returncode == 0, r.stderr
    with cf.open(ws.good) as f:
        chunks = sum(s.num_chunks for _, _, s in f.index.iter_streams())
    assert r.stdout.strip() == f"{ws.good}: OK — header, index and {chunks} chunks verified"
    assert r.stderr == ""


def test_verify_corrupt_file_exits_1_with_a_report(ws: Workspace):
    r = ws.results["verify-corrupt"]
    no_traceback(r)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"{ws.corrupt}: NOT SOUND — 1 problem(s):"
    assert f"'{ATTN}' chunk 0" in lines[1] and "checksum mismatch" in lines[1]


def test_verify_unreadable_file_is_one_error_line(ws: Workspace):
    one_error_line(ws.results["verify-truncated"], "cllm-verify", "truncated")


# --- --help ------------------------------------------------------------------------------------


def help_entries(text: str) -> dict[str, str]:
    """{invocation: help text} of every argument listed in an argparse --help output."""
    entries: dict[str, str] = {}
    section = False
    last = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip().endswith(("options:", "arguments:"))
            last = None
            continue
        if not section or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 2:
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            last = parts[0]
            entries[last] = parts[1] if len(parts) > 1 else ""
        elif last is not None:
            entries[last] = (entries[last] + " " + line.strip()).strip()
    return entries


@pytest.mark.parametrize(
    "prog,expected",
    [
        ("cllm-convert", ["input", "--output", "--quantize", "--level", "--chunk-size", "--threads",
                          "--keep-regex", "--codec", "--trust-gpu-codecs", "--force", "--quiet", "--version", "--help"]),
        ("cllm-info", ["file", "--json", "--no-floor", "--tensors", "--help"]),
        ("cllm-verify", ["file", "--quiet", "--trust-gpu-codecs", "--strict", "--help"]),
    ],
)
def test_help_explains_every_option(prog: str, expected: list[str], ws: Workspace, capsys, monkeypatch):
    if prog == "cllm-convert":  # the real script
        r = ws.results["convert-help"]
    else:  # the same entry point in-process
        monkeypatch.setenv("COLUMNS", "100")
        r = run_main(getattr(cli, SCRIPTS[prog]), ["--help"], capsys)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"usage: {prog}")
    entries = help_entries(r.stdout)
    for flag in expected:
        match = [k for k in entries if re.search(rf"(^|[ ,]){re.escape(flag)}($|[ ,])", k)]
        assert match, (flag, sorted(entries))
    for invocation, text in entries.items():
        assert len(text.split()) >= 3, f"{prog}: {invocation!r} has no explanation ({text!r})"
    assert len(entries) == len(expected)


# --- the same entry points in-process (no 3 s start each) -----------------------------------------


def run_main(main, argv: list[str], capsys) -> Result:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return Result(argv, code, out, err)


def test_convert_existing_output_needs_force(small_safetensors: Path, tmp_path: Path, capsys):
    out = tmp_path / "o.cllm"
    out.write_bytes(b"keep me")
    r = run_main(cli.convert_main, [str(small_safetensors), "-o", str(out), "-q"], capsys)
    one_error_line(r, "cllm-convert", "exists (pass --force to overwrite)")
    assert out.read_bytes() == b"keep me"
    r = run_main(cli.convert_main, [str(small_safetensors), "-o", str(out), "-q", "--force"], capsys)
    assert r.returncode == 0 and r.stdout == r.stderr == ""
    with cf.open(out) as f:
        assert f.verify() == []


@pytest.mark.parametrize(
    "argv,fragment",
    [
        ([], "the following arguments are required: input"),
        (["x", "--chunk-size", "1"], "--chunk-size must be between 4096 and 16777216"),
        (["x", "--chunk-size", "lots"], "not a size: 'lots'"),
        (["x", "--chunk-size", "inf"], "not a size: 'inf'"),
        (["x", "--chunk-size", "nan"], "not a size: 'nan'"),
        (["x", "--threads", "0"], "--threads must be >= 1"),
        (["x", "--level", "-8"], "--level must be between -7 and 22"),
        (["x", "--quantize", "int4"], "invalid choice: 'int4'"),
        (["x", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_convert_usage_errors_in_process(argv: list[str], fragment: str, capsys):
    usage_error(run_main(cli.convert_main, argv, capsys), "cllm-convert", fragment)


def test_convert_chunk_size_units(small_safetensors: Path, tmp_path: Path, capsys):
    out = tmp_path / "k.cllm"
    r = run_main(cli.convert_main, [str(small_safetensors), "-o", str(out), "-q", "--chunk-size", "8K"], capsys)
    assert r.returncode == 0, r.stderr
    with cf.open(out) as f:
        assert {s.chunk_size for e in f.index.tensors for s in e.streams} == {8192}


@pytest.mark.parametrize(
    "kind,fragment",
    [("text", "not a .cllm file"), ("dir", "is a directory"), ("missing", "no such file"), ("cllm", "")],
)
def test_convert_bad_inputs_in_process(kind: str, fragment: str, tmp_path: Path, capsys):
    if kind == "text":
        inp = tmp_path / "notes.safetensors"
        inp.write_text("hello\n")
        fragment = "not a readable safetensors file"
    elif kind == "dir":
        inp = tmp_path / "empty-folder"
        inp.mkdir()
        fragment = "no .safetensors weights in this folder"
    elif kind == "missing":
        inp = tmp_path / "missing"
        fragment = "no such file or folder"
    else:
        inp = write_small_cllm(tmp_path / "x.cllm")
        fragment = "is already a .cllm file; to rewrite it with another int8 codec, pass --codec"
    r = run_main(cli.convert_main, [str(inp), "-o", str(tmp_path / "o.cllm")], capsys)
    one_error_line(r, "cllm-convert", fragment)
    assert not (tmp_path / "o.cllm").exists()


def test_info_text_output(tmp_path: Path, capsys):
    path = write_small_cllm(tmp_path / "s.cllm")
    r = run_main(cli.info_main, [str(path), "--tensors"], capsys)
    assert r.returncode == 0 and r.stderr == ""
    assert f"{path}: .cllm v1.0" in r.stdout
    for name in ("embed.weight", ATTN, "model.layers.0.mask"):
        assert name in r.stdout
    assert "lm_head.weight -> embed.weight (tied)" in r.stdout
    assert "of bf16" in r.stdout and "floor" in r.stdout and "config.json" in r.stdout
    r = run_main(cli.info_main, [str(path), "--no-floor"], capsys)
    assert r.returncode == 0 and "floor (" not in r.stdout


@pytest.mark.parametrize("which", ["missing", "directory", "empty", "truncated-index"])
def test_info_and_verify_unreadable(which: str, tmp_path: Path, capsys):
    path = tmp_path / "f.cllm"
    fragment = {"missing": "no such file", "directory": "is a directory", "empty": "empty file",
                "truncated-index": "truncated"}[which]
    if which == "directory":
        path.mkdir()
    elif which == "empty":
        path.write_bytes(b"")
    elif which == "truncated-index":
        write_small_cllm(path)
        path.write_bytes(path.read_bytes()[:-100])
    for prog, main in (("cllm-info", cli.info_main), ("cllm-verify", cli.verify_main)):
        one_error_line(run_main(main, [str(path)], capsys), prog, fragment)


def test_verify_quiet_and_padding(tmp_path: Path, capsys):
    path = write_small_cllm(tmp_path / "s.cllm")
    r = run_main(cli.verify_main, [str(path), "-q"], capsys)
    assert r.returncode == 0 and r.stdout == r.stderr == ""
    path.write_bytes(hb.patch(path.read_bytes(), 1000, b"\x01"))
    r = run_main(cli.verify_main, [str(path), "-q"], capsys)
    assert r.returncode == 1 and r.stdout == ""
    assert "non-zero padding in [64, 4096)" in r.stderr
    usage_error(run_main(cli.verify_main, [str(path), "--bogus"], capsys), "cllm-verify", "unrecognized arguments")
    usage_error(run_main(cli.info_main, [], capsys), "cllm-info", "the following arguments are required: file")


def test_version(capsys):
    r = run_main(cli.convert_main, ["--version"], capsys)
    assert r.returncode == 0 and r.stdout.strip() == f"cllm-convert {cf.__version__}"


def test_in_process_errors(tmp_path: Path, capsys):
    """A NaN in a weight to quantize (cllm-convert) and a corrupt chunk (cllm-info)."""
    inp = tmp_path / "nan.safetensors"
    w = torch.randn(8, 8)
    w[2, 2] = float("nan")
    save_file({"model.layers.0.proj.weight": w}, str(inp))
    r = run_main(cli.convert_main, [str(inp), "-o", str(tmp_path / "nan.cllm")], capsys)
    one_error_line(r, "cllm-convert", "'model.layers.0.proj.weight' holds NaN")
    assert not (tmp_path / "nan.cllm").exists()
    blob = write_small_cllm(tmp_path / "c.cllm").read_bytes()
    off, stored = hb.chunk_location(blob, ATTN, 0, 0)
    (tmp_path / "c.cllm").write_bytes(hb.flip_bit(blob, off + stored // 2, 1))
    one_error_line(run_main(cli.info_main, [str(tmp_path / "c.cllm")], capsys), "cllm-info", f"tensor '{ATTN}' values chunk 0")


def test_info_of_a_lossless_file_shows_planes_and_their_floor(tmp_path: Path, capsys):
    """cllm-info on a --quantize none file: the float_planes encoding, the exponent entropy and
    a floor of exponent-at-entropy + raw sign/mantissa that the stored size is close to."""
    from codecllm_format.stats import describe

    g = torch.Generator().manual_seed(3)
    save_file({"w": (torch.randn(256, 512, generator=g) * 0.02).to(torch.bfloat16),
               "b": torch.randn(512, generator=g), "ids": torch.arange(5)}, tmp_path / "m.safetensors")
    path = convert(tmp_path / "m.safetensors", tmp_path / "m.cllm", quantize="none").output
    r = run_main(cli.info_main, [str(path), "--tensors"], capsys)
    assert r.returncode == 0 and f"{path}: .cllm v1.1" in r.stdout
    assert "float_planes" in r.stdout and "2 float_planes, 1 raw" in r.stdout
    with cf.open(path) as f:
        d = describe(f)
    w = next(t for t in d["tensors"] if t["name"] == "w")
    assert w["encoding"] == "float_planes" and 2.0 < w["entropy_bits"] < 4.0
    assert w["floor_bytes"] == pytest.approx(w["entropy_bits"] * 256 * 512 / 8 + 256 * 512)
    assert w["floor_bytes"] * 0.98 < w["stored_bytes"] < w["floor_bytes"] * 1.03
