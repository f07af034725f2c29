"""The Hugging Face Hub side, without network: repo ids resolved from a hand-built HF cache
(HF_HUB_OFFLINE=1, HF_HOME/HF_HUB_CACHE in tmp, sockets refused), cllm-push --dry-run and its
model card, cllm-convert org/name from the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import write_small_cllm  # noqa: E402
from tiny_models import CHAT_TEMPLATE, make_folder  # noqa: E402

import codecllm_format as cf  # noqa: E402
from codecllm_format import CllmError, ConversionError, HubError, cli  # noqa: E402
from codecllm_format import hub  # noqa: E402
from codecllm_format.convert import convert  # noqa: E402
from codecllm_format.stats import describe  # noqa: E402

COMMIT_MAIN = "a" * 40
COMMIT_OLD = "b" * 40
COMMIT_SRC = "c" * 40
SOURCE_CARD = "---\nlicense: mit\nlanguage: en\n---\n# tiny llama\n"


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str, ref: str | None = "main") -> Path:
    """Add `files` to `repo_id` at `commit` in an HF hub cache laid out as huggingface_hub
    does: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty HF cache in tmp, HF_HUB_OFFLINE=1, and every socket connection refused."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return cache


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama HF folder (with a model card carrying a license), converted from the
    folder, and the conftest small file."""
    root = tmp_path_factory.mktemp("hubmodels")
    folder = root / "tiny-llama"
    make_folder("llama", folder, seed=3, chat_template=CHAT_TEMPLATE)
    (folder / "README.md").write_text(SOURCE_CARD)
    return {
        "folder": folder,
        "llama": convert(folder, root / "tiny-llama.cllm").output,
        "small": write_small_cllm(root / "small.cllm"),
    }


@pytest.fixture
def repo(offline_cache: Path, models) -> str:
    """org/tiny in the cache: main -> the Llama .cllm (+ a README), 'old' -> the small file."""
    put_in_cache(offline_cache, "org/tiny", {"tiny-llama.cllm": models["llama"], "README.md": b"# card\n"}, COMMIT_MAIN)
    put_in_cache(offline_cache, "org/tiny", {"tiny-llama.cllm": models["small"]}, COMMIT_OLD, ref="old")
    return "org/tiny"


def greedy(m, n: int = 6) -> list[int]:
    ids = torch.tensor([[2, 10, 11, 12]])
    return m.generate(ids, max_new_tokens=n, do_sample=False)[0].tolist()


# --- load by repo id, offline ------------------------------------------------------------------


def test_load_repo_id_offline_generates_like_the_local_file(repo, models, offline_cache):
    with cf.load(models["llama"]) as local:
        expected = greedy(local)
    with cf.load(repo) as m:
        assert m.file.path.resolve().is_relative_to(offline_cache.resolve())
        assert m.file.path.read_bytes() == models["llama"].read_bytes()
        out = greedy(m)
        assert out == expected and len(out) > 4
        text = m.generate("what is the capital of italy ?", max_new_tokens=3, do_sample=False)
        assert isinstance(text, str)


@pytest.mark.parametrize("how", ["filename", "hf-uri", "hf-uri-at-commit", "revision-commit", "revision-branch", "url"])
def test_the_ways_of_naming_a_repo_file(how, repo, models):
    spec = {
        "filename": ((repo,), {"filename": "tiny-llama.cllm"}),
        "hf-uri": ((f"hf://{repo}/tiny-llama.cllm",), {}),
        "hf-uri-at-commit": ((f"hf://{repo}@{COMMIT_MAIN}/tiny-llama.cllm",), {}),
        "revision-commit": ((repo,), {"revision": COMMIT_MAIN}),
        "revision-branch": ((repo,), {"revision": "main"}),
        "url": ((f"https://huggingface.co/{repo}/blob/main/tiny-llama.cllm",), {}),
    }[how]
    args, kwargs = spec
    with cf.load(*args, **kwargs) as m:
        assert m.file.path.read_bytes() == models["llama"].read_bytes()
        assert len(greedy(m, 2)) == 6


def test_revision_selects_the_snapshot(repo, models):
    with cf.open(repo, revision="old") as f:
        assert sorted(f.keys()) == sorted(cf.open(models["small"]).keys())
    with cf.open(f"hf://{repo}@{COMMIT_OLD}") as f:
        assert f.metadata()["source"] == "conftest"
    with cf.open(repo) as f:
        assert f.metadata()["architecture"] == "LlamaForCausalLM"


def test_missing_repo_offline(offline_cache):
    with pytest.raises(HubError) as e:
        cf.load("org/absent")
    msg = str(e.value)
    assert "org/absent" in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download org/absent" in msg
    with pytest.raises(HubError, match="org/absent.*not in the local Hugging Face cache"):
        cf.open("hf://org/absent/x.cllm")


def test_missing_file_offline(repo):
    with pytest.raises(HubError) as e:
        cf.load(repo, filename="other.cllm")
    msg = str(e.value)
    assert "'other.cllm'" in msg and repo in msg and "tiny-llama.cllm" in msg  # what is missing, what is there
    assert "hf download org/tiny other.cllm" in msg


def test_missing_revision_offline(repo):
    with pytest.raises(HubError, match="revision 'v9' of org/tiny is not in the local Hugging Face cache.*main, old"):
        cf.open(repo, revision="v9")


def test_several_cllm_files_are_listed(offline_cache, models):
    put_in_cache(offline_cache, "org/two", {"a.cllm": models["small"], "sub/b.cllm": models["small"], "c.txt": b"x"}, COMMIT_MAIN)
    with pytest.raises(HubError) as e:
        cf.open("org/two")
    msg = str(e.value)
    assert "2 .cllm files" in msg and "a.cllm" in msg and "sub/b.cllm" in msg and "filename=" in msg
    with cf.open("org/two", filename="sub/b.cllm") as f:
        assert f.metadata()["source"] == "conftest"


def test_no_cllm_file(offline_cache, models):
    put_in_cache(offline_cache, "org/none", {"model.safetensors": b"not really", "README.md": b"hi"}, COMMIT_MAIN)
    with pytest.raises(HubError, match=r"holds no \.cllm file.*README.md, model.safetensors"):
        cf.load("org/none")


def test_dangling_snapshot_link_is_not_a_cached_file(offline_cache, models):
    storage = put_in_cache(offline_cache, "org/partial", {"x.cllm": models["small"]}, COMMIT_MAIN)
    for blob in (storage / "blobs").iterdir():
        blob.unlink()  # an interrupted download leaves the link without its blob
    with pytest.raises(HubError, match="no .cllm file"):
        cf.open("org/partial")


def test_local_path_shadows_repo_id(repo, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copyfile(models["small"], tmp_path / "org" / "tiny")  # a local *file* named like the repo
    with cf.open(repo) as f:
        assert f.path == Path("org/tiny") and f.metadata()["source"] == "conftest"
    (tmp_path / "org" / "tiny").unlink()
    (tmp_path / "org" / "tiny").mkdir()  # a local folder (hf download --local-dir): its single .cllm
    shutil.copyfile(models["small"], tmp_path / "org" / "tiny" / "m.cllm")
    with cf.open(repo) as f:
        assert f.path == Path("org/tiny/m.cllm")
    with pytest.raises(HubError, match="revision='main' applies to Hub repos, but org/tiny is a local path "
                                       r"\(write hf://org/tiny to mean the Hub repo\)"):
        cf.open(repo, revision="main")
    with cf.open(f"hf://{repo}", revision="main") as f:  # hf:// always means the Hub
        assert f.metadata()["architecture"] == "LlamaForCausalLM"


def test_local_names_stay_local(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("models/x.cllm", "missing.cllm", "a/b/c"):
        assert hub.parse_ref(name) is None
        with pytest.raises(CllmError, match="no such file"):
            cf.open(name)
    assert hub.parse_ref(Path("org/name")) is None  # a Path is always local
    assert hub.parse_ref("org/name") == hub.HubRef("org/name")
    assert hub.parse_ref("hf://org/name@refs/pr/3/sub/m.cllm") == hub.HubRef("org/name", "sub/m.cllm", "refs/pr/3")
    with pytest.raises(HubError, match="names the file 'a.cllm' but filename='b.cllm'"):
        hub.parse_ref("hf://org/name/a.cllm", filename="b.cllm")
    with pytest.raises(HubError, match="Repository id must be"):
        cf.open("hf://justaname")


def test_hf_offline_set_after_import_is_honoured(repo, monkeypatch):
    """The env var alone (huggingface_hub's import-time constant left False) keeps us offline:
    the sockets are refused, so any Hub request would fail the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.is_offline()
    with cf.open(repo) as f:
        assert f.metadata()["architecture"] == "LlamaForCausalLM"


def test_generate_cli_takes_a_repo_id(repo, capsys):
    rc = cli.generate_main([repo, "what is the capital of italy ?", "--max-new-tokens", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rc = cli.generate_main(["org/absent", "hi"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("cllm-generate: error: org/absent is not in the local Hugging Face cache")


# --- cllm-push --dry-run and the model card ----------------------------------------------------


@pytest.fixture
def from_hub_cllm(offline_cache, models, tmp_path) -> Path:
    """The tiny Llama converted by repo id from the cache (source = the repo id, license from its card)."""
    put_in_cache(offline_cache, "src-org/tiny-src", {p.name: p for p in models["folder"].iterdir() if p.is_file()}, COMMIT_SRC)
    return convert("src-org/tiny-src", tmp_path / "tiny-src.cllm").output


def test_push_dry_run_writes_the_upload_folder(from_hub_cllm, tmp_path, capsys):
    from huggingface_hub import metadata_load

    out = tmp_path / "upload"
    rc = cli.push_main([str(from_hub_cllm), "me/tiny-cllm", "--dry-run", str(out), "--private", "--commit-message", "hello"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny-src.cllm"]
    assert (out / "tiny-src.cllm").read_bytes() == from_hub_cllm.read_bytes()
    assert "would create the private model repo me/tiny-cllm" in cap.out and "'hello'" in cap.out
    assert "nothing was uploaded" in cap.out

    meta = metadata_load(out / "README.md")
    assert meta["library_name"] == "codecllm"
    assert {"cllm", "int8", "raw", "llama"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "src-org/tiny-src" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "mit"

    card = (out / "README.md").read_text()
    with cf.open(from_hub_cllm) as f:
        d = describe(f, floor=False)
    assert f"{d['ratio_bf16']:.4f}" in card and f"{d['file_bytes']:,} bytes" in card
    assert f"{d['tensor_count']}: {d['encodings']['int8_row']} int8_row, {d['encodings']['raw']} raw" in card
    assert 'codecllm_format.load("me/tiny-cllm")' in card and "chat=True" in card
    assert "pip install codecllm-format" in card


def test_push_dry_run_refuses_a_non_empty_folder(models, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "other").write_text("x")
    rc = cli.push_main([str(models["llama"]), "me/tiny", "--dry-run", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "not an empty folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["other"]


@pytest.mark.parametrize("args,fragment", [
    (["me/tiny"], None),  # checked below: a corrupt file
    (["not a repo"], "is not a repo id"),
    (["justname"], "give the repo as org/name"),
])
def test_push_refusals(args, fragment, models, tmp_path, capsys):
    src = models["small"]
    if fragment is None:
        blob = bytearray(src.read_bytes())
        blob[5000] ^= 0xFF  # inside the first chunk's stored bytes
        src = tmp_path / "bad.cllm"
        src.write_bytes(bytes(blob))
        fragment = "not sound"
    rc = cli.push_main([str(src), *args, "--dry-run", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_push_offline_uploads_nothing(models, offline_cache, capsys):
    rc = cli.push_main([str(models["small"]), "me/tiny"])
    err = capsys.readouterr().err
    assert rc == 1 and "HF_HUB_OFFLINE is set: cannot upload" in err


def test_card_of_a_file_without_provenance(models):
    with cf.open(models["small"]) as f:
        card = hub.model_card(f, "me/small")
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    import yaml

    meta = yaml.safe_load(REGEX_YAML_BLOCK.search(card).group(2))
    assert meta["library_name"] == "codecllm" and "base_model" not in meta and "pipeline_tag" not in meta
    assert "int8" in meta["tags"] and "license" not in meta


def test_card_lists_fidelity_metadata(tmp_path, models):
    out = convert(models["folder"], tmp_path / "f.cllm", metadata={"fidelity.perplexity_delta": "+0.57%"}).output
    with cf.open(out) as f:
        card = hub.model_card(f, "me/f")
    assert "## Fidelity" in card and "| perplexity_delta | +0.57% |" in card


@pytest.mark.parametrize("arch,tag", [
    ("LlamaForCausalLM", "text-generation"), ("GPT2LMHeadModel", "text-generation"), ("BertModel", "feature-extraction"),
    ("BertForMaskedLM", "fill-mask"), ("RobertaForSequenceClassification", "text-classification"),
    ("T5ForConditionalGeneration", None), (None, None),
])
def test_pipeline_tags(arch, tag):
    assert hub.pipeline_tag_for(arch) == tag


# --- cllm-convert org/name from the local cache ------------------------------------------------


def test_convert_repo_id_from_the_cache(from_hub_cllm, models, tmp_path, monkeypatch, capsys):
    with cf.open(from_hub_cllm) as a, cf.open(models["llama"]) as b:
        assert a.metadata()["source"] == "src-org/tiny-src" and a.metadata()["license"] == "mit"
        assert a.keys() == b.keys() and a.file_names() == b.file_names()
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    rc = cli.convert_main(["src-org/tiny-src", "-q"])  # default output: ./<name>.cllm
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "cwd" / "tiny-src.cllm").read_bytes() == from_hub_cllm.read_bytes()


def test_convert_missing_repo(offline_cache, tmp_path, capsys):
    rc = cli.convert_main(["org/not-cached", "-o", str(tmp_path / "o.cllm")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == (f"cllm-convert: error: org/not-cached: not in the local Hugging Face cache ({offline_cache}); "
                           "download it first with `hf download org/not-cached`")
    assert not (tmp_path / "o.cllm").exists()


def test_convert_repo_without_cached_weights(offline_cache, models, tmp_path):
    put_in_cache(offline_cache, "org/cfg-only", {"config.json": models["folder"] / "config.json"}, COMMIT_MAIN)
    with pytest.raises(ConversionError, match=r"org/cfg-only: no \.safetensors weights in the local Hugging Face cache "
                                              r"\(cached: config.json\); download it first with `hf download org/cfg-only`"):
        convert("org/cfg-only", tmp_path / "o.cllm")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}
    put_in_cache(offline_cache, "org/sharded", {"model.safetensors.index.json": json.dumps(index).encode(),
                                                "model-00001-of-00002.safetensors": models["folder"] / "model.safetensors"},
                 COMMIT_MAIN)
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors are not in the local Hugging Face cache"):
        convert("org/sharded", tmp_path / "o.cllm")


def test_convert_local_folder_shadows_repo_id(offline_cache, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["folder"], tmp_path / "org" / "tiny")
    rep = convert("org/tiny", tmp_path / "local.cllm")
    with cf.open(rep.output) as f:
        assert f.metadata()["source"] == "tiny"  # the local folder's name, not a repo id
