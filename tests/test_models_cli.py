"""The first hour of a new user: short model names, `pull` / `list` / `rm`, `--version`,
the demo fallback's banner, the examples' usage line.

Nothing here reaches the Hugging Face Hub: every test runs offline against a fake
cache laid out as huggingface_hub lays it out (blobs, snapshot symlinks, refs/main),
holding the embedded demo model and drafter under the released repo ids."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from huggingface_hub import constants

import gemma4_mlx.demo
from gemma4_mlx.checkpoint import hub, store
from gemma4_mlx.checkpoint.files import LoadError
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL, default_model

from helpers.hub_cache import cache_repo
from test_bad_input import cli

ROOT = Path(__file__).resolve().parents[1]
REPO = "google/gemma-4-E2B-it"
RELEASED = {
    "e2b": "google/gemma-4-E2B",
    "e2b-it": "google/gemma-4-E2B-it",
    "e4b": "google/gemma-4-E4B",
    "e4b-it": "google/gemma-4-E4B-it",
    "26b": "google/gemma-4-26B-A4B",
    "26b-it": "google/gemma-4-26B-A4B-it",
    "31b": "google/gemma-4-31B",
    "31b-it": "google/gemma-4-31B-it",
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache and models folder, for this process (huggingface_hub
    read its settings at import) and for the `gemma4-mlx` subprocesses."""
    h = SimpleNamespace(cache=tmp_path / "hf" / "hub", models=tmp_path / "models", tmp=tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(h.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEMMA4_MLX_MODELS", str(h.models))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(h.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    h.cache.mkdir(parents=True)
    return h


def released_e2b(h) -> tuple[Path, Path]:
    """The demo model and drafter cached as google/gemma-4-E2B-it(-assistant)."""
    return cache_repo(h.cache, REPO, DEMO_MODEL), cache_repo(h.cache, REPO + "-assistant", DEMO_DRAFTER)


def one_error_line(r, needle: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: ") and needle in lines[-1], r.stderr


# -- short names ------------------------------------------------------------------


def test_short_names_name_the_released_repos(home, tmp_path, monkeypatch):
    assert hub.SHORT_NAMES == RELEASED
    for short, repo in RELEASED.items():
        assert hub.lookup(short) == repo and hub.lookup(short.upper()) == repo
    assert hub.lookup("demo") == hub.resolve_path("demo") == DEMO_MODEL.resolve()
    assert hub.lookup("demo-assistant") == DEMO_DRAFTER.resolve()
    assert type(gemma4_mlx.load_drafter("demo-assistant")).__name__ == "Drafter"
    assert hub.find_drafter("demo") == DEMO_DRAFTER.resolve()
    snap, drafter = released_e2b(home)
    assert hub.resolve_path("e2b-it") == hub.resolve_path(REPO) == snap
    assert hub.find_drafter("e2b-it") == drafter
    with pytest.raises(LoadError, match=r"^31b-it \(google/gemma-4-31B-it\): not a local folder"):
        hub.resolve_path("31b-it")  # offline and not cached
    with pytest.raises(LoadError, match=r"gemma-5: no such folder.*short names: e2b, e2b-it"):
        hub.resolve_path("gemma-5")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e2b").mkdir()  # a folder of that name is what the user means
    assert hub.lookup("e2b") == Path("e2b")


def test_short_names_reach_generate_and_info(home):
    snap, drafter = released_e2b(home)
    r = cli("info", "e2b-it", "--no-load", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(snap)
    r = cli("generate", "-m", "e2b-it", "-p", "What is the capital of Japan?", "--draft-tokens", "2")
    assert r.returncode == 0 and "Tokyo" in r.stdout, r.stderr
    assert f"draft model: {drafter} (draft tokens: 2)" in r.stderr


# -- pull ---------------------------------------------------------------------------


def test_pull_converts_next_to_the_cache_and_the_name_works(home):
    snap, cached_drafter = released_e2b(home)
    r = cli("pull", "e2b-it", "--quant", "q4_0", "--drafter")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "gemma-4-E2B-it-q4_0"  # the name to give --model
    folder, sibling = home.models / "gemma-4-E2B-it-q4_0", home.models / "gemma-4-E2B-it-q4_0-assistant"
    assert json.loads((folder / "config.json").read_text())["quantization"]["recipe"] == "q4_0"
    assert json.loads((sibling / "config.json").read_text())["quantization"]["recipe"] == "q4_0"
    assert hub.pull_record(folder) == {"repo": REPO, "revision": snap.name, "quant": "q4_0"}
    assert hub.resolve_path("gemma-4-E2B-it-q4_0") == hub.resolve_path("e2b-it-q4_0") == folder
    assert hub.find_drafter("e2b-it-q4_0") == sibling
    r = cli("generate", "-m", "e2b-it-q4_0", "-p", "Hello", "-n", "8", "--draft-tokens", "2")
    assert r.returncode == 0 and f"draft model: {sibling}" in r.stderr, r.stderr
    shutil.rmtree(sibling)  # no converted drafter: the one of the repo it came from
    assert hub.find_drafter("e2b-it-q4_0") == cached_drafter
    again = cli("pull", "e2b-it", "-q", "q4_0")
    assert again.returncode == 0 and "converted already" in again.stderr, again.stderr


def test_pull_without_quant_only_downloads_and_errors_are_one_line(home):
    released_e2b(home)
    r = cli("pull", "e2b-it")
    assert r.returncode == 0 and r.stdout.strip() == "e2b-it", r.stderr
    assert not home.models.exists()
    one_error_line(cli("pull", "e2b-it", "--quant", "q3"), "--quant q3: expected one of")
    one_error_line(cli("pull", "not a repo"), "not a repo id")
    one_error_line(cli("pull", "31b"), "google/gemma-4-31B: not downloadable")  # offline, not cached


# -- list ---------------------------------------------------------------------------


def test_list_shows_pulled_cached_and_demo_models(home):
    released_e2b(home)
    other = home.tmp / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    cache_repo(home.cache, "someone/llama-3", other)  # not a Gemma 4 model: not listed
    ours = home.models / "my-e2b-fp32"
    shutil.copytree(DEMO_MODEL, ours)
    store.record_pull(ours, REPO, "abc", "fp32")

    r = cli("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert list(rows) == ["my-e2b-fp32", "e2b-it", REPO + "-assistant", "demo"]
    weights = mx.load(str(DEMO_MODEL / "model.safetensors"))
    # resident: every tensor but the memory-mapped per-layer-embedding table
    resident = sum(v.nbytes for k, v in weights.items() if "embed_tokens_per_layer." not in k)
    e2b = rows["e2b-it"]
    assert e2b["kind"] == "hf-cache" and e2b["source"] == REPO and e2b["format"] == "fp32"
    assert e2b["resident_bytes"] == resident and e2b["drafter"] == REPO + "-assistant"
    assert e2b["size_bytes"] == sum(f.stat().st_size for f in DEMO_MODEL.iterdir())
    assert rows[REPO + "-assistant"]["drafter_of"] and not e2b["drafter_of"]
    assert rows["my-e2b-fp32"]["kind"] == "converted" and rows["my-e2b-fp32"]["source"] == REPO
    assert rows["my-e2b-fp32"]["drafter"] == REPO + "-assistant"  # through the pull record
    assert rows["demo"]["kind"] == "embedded" and rows["demo"]["drafter"].startswith("demo")

    table = cli("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "FORMAT", "SIZE", "RESIDENT", "DRAFTER", "SOURCE"]
    assert table[2].split()[:2] == ["e2b-it", "fp32"] and table[2].split()[-1] == REPO


def test_list_with_nothing_pulled_points_at_pull(home):
    r = cli("list")
    assert r.returncode == 0 and [line.split()[0] for line in r.stdout.splitlines()] == ["NAME", "demo"]
    assert "gemma4-mlx pull e2b-it" in r.stderr


# -- rm -----------------------------------------------------------------------------


def test_rm_asks_then_removes_cache_entries_and_pulled_models(home):
    snap, drafter = released_e2b(home)
    entry = snap.parents[1]
    for answer in ("n\n", ""):  # no, and end of input
        one_error_line(cli("rm", "e2b-it", stdin=answer), "e2b-it: not removed")
        assert entry.exists()
    r = cli("rm", "e2b-it", stdin="y\n")
    assert r.returncode == 0 and "removed google/gemma-4-E2B-it" in r.stderr, r.stderr
    assert not entry.exists() and drafter.exists()

    ours = home.models / "gemma-4-E2B-it-q8"
    shutil.copytree(DEMO_MODEL, ours)
    r = cli("rm", "e2b-it-q8", "--yes")
    assert r.returncode == 0 and not ours.exists() and home.models.exists(), r.stderr

    elsewhere = home.tmp / "my-model"
    shutil.copytree(DEMO_MODEL, elsewhere)
    one_error_line(cli("rm", str(elsewhere), "-y"), "not a model gemma4-mlx manages")
    one_error_line(cli("rm", "demo", "-y"), "part of the package")
    one_error_line(cli("rm", "31b", "-y"), "not in the Hugging Face cache")
    assert elsewhere.exists() and DEMO_MODEL.exists()


def test_rm_removes_only_its_repo_when_commit_hashes_collide(home):
    """A duplicated repo shares its commit hashes; delete_revisions goes by hash alone."""
    copy = "someone/gemma-4-E2B-it-copy"
    for gone, kept in ((REPO, copy), (copy, REPO)):  # whichever of the two the hash would pick
        snaps = {r: cache_repo(home.cache, r, DEMO_MODEL, rev="1" * 40) for r in (REPO, copy)}
        store.removal(gone).run()
        assert not snaps[gone].parents[1].exists() and snaps[kept].exists()
        shutil.rmtree(snaps[kept].parents[1])


# -- the demo fallback, --version, examples ---------------------------------------------


def test_demo_banner_says_why_and_how_to_get_the_real_model(home, monkeypatch):
    path, banner = default_model()
    assert path == str(DEMO_MODEL) and "embedded demo" in banner
    assert "HF_HUB_OFFLINE is set" in banner and "gemma4-mlx pull e2b-it" in banner
    assert "capitals" in banner and "sum" not in banner  # it gets about half of its sums wrong
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("GEMMA4_MLX_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.model_info", unreachable)
    path, banner = default_model()
    assert path == str(DEMO_MODEL) and "did not answer (ConnectionError)" in banner and "pull e2b-it" in banner
    snap, _ = released_e2b(home)
    assert default_model() == (str(snap), f"model: {REPO} (cached)")
    ours = home.models / "gemma-4-E2B-it-q4_0"  # what `pull e2b-it --quant q4_0` makes is preferred
    shutil.copytree(DEMO_MODEL, ours)
    store.record_pull(ours, REPO, snap.name, "q4_0")
    assert default_model()[0] == str(ours)
    assert gemma4_mlx.demo.DEMO_MODEL.resolve() == hub.DEMO_PATH


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"gemma4-mlx {version('gemma4-mlx')} (mlx "), r.stdout


def test_example_without_arguments_prints_its_usage():
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and r.stderr.startswith("usage: ") and "Traceback" not in r.stderr, r.stderr
