"""Crash-safe conversion, proven (docs/hardening.md §2): `gemma4-mlx convert` killed with
SIGKILL at random points leaves its destination absent or complete, the next run cleans
what the killed one left and succeeds; a full disk is one line and leaves nothing; a
read-only destination is refused before any work; a live writer's folder is never taken."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gemma4_mlx
from gemma4_mlx.cli import app as cli_app
from gemma4_mlx.convert import ConvertError, InterruptedAfterPublishing, convert, output
from gemma4_mlx.convert import core as convert_core
from gemma4_mlx.convert.output import LOCK

from helpers.checkpoints import build_hf
from helpers.fuzz import one_line

TRIALS = 10  # SIGKILL trials, two at a time; each costs one CLI start (~2-3 s on 2 cores)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny dense checkpoint in several shards, so kills land between shard writes."""
    path = tmp_path_factory.mktemp("crash") / "src"
    build_hf("dense", seed=5).save_pretrained(path, max_shard_size="150KB")
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, bytes]:
    """Every file of a complete conversion, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "out"
    convert(source, out, "q8", progress=False)
    return _files(out)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _cli(src: Path, dst: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gemma4_mlx", "convert", str(src), str(dst), "-q", "q8", "--force"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _files_in(folder: Path) -> int:
    try:
        return len(os.listdir(folder))
    except OSError:
        return -1


def _kill_after(p: subprocess.Popen, partial: Path, point: tuple[str, float, float]) -> str:
    """SIGKILL `p` at `point`: ("start", seconds, _) after it starts, or ("files", k, seconds)
    that long after DST.partial holds k files (its lock file counts): a random point in
    the writing phase however fast or loaded the machine is."""
    kind, a, b = point
    t0 = time.monotonic()
    if kind == "files":
        while p.poll() is None and _files_in(partial) < a and time.monotonic() - t0 < 120:
            time.sleep(0.0002)
    time.sleep(a if kind == "start" else b)
    state = "finished" if p.poll() is not None else "killed"
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    return state


def _partial(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


def _trial(source: Path, dst: Path, point) -> str:
    return _kill_after(_cli(source, dst), _partial(dst), point)


def test_sigkill_at_random_points(source, reference, tmp_path):
    rng = random.Random(20)
    names = ["a", "b", "c"]  # several destinations: a run cleans the others' dead folders too
    plan = []
    for i in range(TRIALS):
        if i % 5 == 4:  # some kills counted from process start (startup, source checks)
            point = ("start", round(rng.uniform(0, 3.0), 3), 0.0)
        else:  # after k of the output's files (+ the lock file) exist, and a little more
            k = rng.randint(1, len(reference) + 1)
            late = k == len(reference) + 1  # all written: fsync, replacing, renaming, exiting
            point = ("files", k, round(rng.uniform(0, 0.05 if late else 0.004), 4))
        plan.append((tmp_path / names[i % len(names)], point))
    log = []
    for pair in (plan[i : i + 2] for i in range(0, TRIALS, 2)):  # two at a time, on two destinations
        with ThreadPoolExecutor(2) as pool:
            runs = [(dst, pt, pool.submit(_trial, source, dst, pt)) for dst, pt in pair]
        for dst, point, run in runs:
            log.append((dst.name, point, run.result(), dst.exists(), _partial(dst).exists()))
            if dst.exists():  # complete, byte for byte
                assert _files(dst) == reference, log
    print("kill trials (dst, kill point, state, dst exists, partial left):", *log, sep="\n  ")
    # Kills did land mid-write: counted by the kill (the process was alive after k files
    # existed), not by the .partial it left, which the concurrent run may already have
    # cleaned as a dead writer's folder (that raced, and failed a clean-clone CI run).
    assert sum(state == "killed" and point[0] == "files" for _, point, state, *_ in log) >= 3, log
    dst = tmp_path / "final"
    p = _cli(source, dst)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert _files(dst) == reference
    assert not list(tmp_path.glob("*.partial")), (log, sorted(os.listdir(tmp_path)))
    gemma4_mlx.load(dst, dtype="float32")
    for name in names:  # whatever survived the kills is complete
        if (tmp_path / name).exists():
            assert _files(tmp_path / name) == reference


def test_live_writer_is_not_disturbed(source, tmp_path):
    dst = tmp_path / "out"
    partial = tmp_path / "out.partial"
    other = tmp_path / "other.partial"
    for d in (partial, other):
        d.mkdir()
        (d / LOCK).write_text("4242\n")
    holders = [open(d / LOCK) for d in (partial, other)]
    for h in holders:
        fcntl.flock(h, fcntl.LOCK_EX)  # as a running conversion holds it
    try:
        with pytest.raises(ConvertError, match=r"out\.partial: another conversion \(pid 4242\) is writing it"):
            convert(source, dst, "q8", progress=False)
        assert partial.is_dir() and not dst.exists()
        convert(source, tmp_path / "second", "q8", progress=False)  # another dst: fine, leaves `other` alone
        assert other.is_dir()
    finally:
        for h in holders:
            h.close()
    convert(source, dst, "q8", progress=False)  # the owners are gone: both folders are stale now
    assert not partial.exists() and not other.exists() and dst.is_dir()


def test_unowned_partial_of_another_dst_is_kept(source, tmp_path):
    """A `.partial` folder without our lock file is not provably ours: kept."""
    foreign = tmp_path / "photos.partial"
    foreign.mkdir()
    (foreign / "x.jpg").write_bytes(b"x")
    convert(source, tmp_path / "out", "q8", progress=False)
    assert (foreign / "x.jpg").exists()


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        _mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_nearly_full_filesystem(source, reference, tmpfs):
    size = sum(len(b) for b in reference.values())
    fs = tmpfs(f"size={size // 2}")  # room for about half the output
    dst = fs / "out"
    with pytest.raises(ConvertError) as e:
        convert(source, dst, "q8", progress=False)
    msg = str(e.value)
    assert one_line(msg) and "no space left on device" in msg and "nothing was written" in msg, msg
    assert os.listdir(fs) == []


def test_read_only_destination_refused_before_work(source, tmpfs, monkeypatch):
    fs = tmpfs("size=1m,ro")

    def no_work(*a, **k):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(convert_core, "resolve_source", no_work)
    with pytest.raises(ConvertError, match=r"cannot write there \(.* is on a read-only filesystem\)"):
        convert("google/gemma-4-E2B-it", fs / "sub" / "out", "q8", progress=False)


def test_dead_replacement_is_undone(source, reference, tmp_path):
    """A --force run killed between moving the old DST aside and renaming the new one
    in: the next run (for any destination here) puts the old DST back."""
    trash = tmp_path / "out.old.partial"
    convert(source, trash / "replaced", "q8", progress=False)
    (trash / LOCK).write_text("4242\n")  # its writer is dead: nobody holds the lock
    convert(source, tmp_path / "other", "q8", progress=False)
    assert _files(tmp_path / "out") == reference and not trash.exists()


def test_users_folder_named_like_the_staging_folder_is_kept(source, tmp_path):
    """`out.partial` without our lock and not empty is somebody's data: one line, kept."""
    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConvertError) as e:
        convert(source, tmp_path / "out", "q8", progress=False)
    msg = str(e.value)
    assert one_line(msg) and "out.partial" in msg and "move or rename it" in msg, msg
    assert (mine / "notes.txt").read_text() == "keep me" and not (tmp_path / "out").exists()


def test_empty_lockless_staging_folder_is_taken(source, reference, tmp_path):
    """What a run killed between its mkdir and its lock leaves: empty, removed by the next."""
    (tmp_path / "out.partial").mkdir()
    convert(source, tmp_path / "out", "q8", progress=False)
    assert _files(tmp_path / "out") == reference and not (tmp_path / "out.partial").exists()


def _interrupt_after(monkeypatch, name: str, when) -> None:
    """Make output.`name` do its work, then raise KeyboardInterrupt where `when(args)`."""
    real = getattr(output, name)

    def interrupted(*args):
        out = real(*args)
        if when(args):
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(output, name, interrupted)


@pytest.mark.parametrize("where", ["just after the rename", "while finishing"])
def test_interrupt_after_publishing_says_the_output_is_complete(source, reference, tmp_path, monkeypatch, where):
    dst = tmp_path / "out"
    convert(source, dst, "q8", progress=False)
    (dst / "old-only.txt").write_text("from the replaced DST")
    if where == "while finishing":  # the fsync of DST's parent, after the rename
        _interrupt_after(monkeypatch, "_fsync", lambda args: Path(args[0]) == tmp_path)
    else:
        real = Path.rename

        def rename(self, target):
            out = real(self, target)
            if Path(target) == dst:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(InterruptedAfterPublishing) as e:
        convert(source, dst, "q8", progress=False, force=True)
    assert isinstance(e.value, KeyboardInterrupt) and "it is complete" in str(e.value)
    assert _files(dst) == reference  # the new DST, whole, without the lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old DST and staging gone


def test_cli_reports_an_interrupt_after_publishing(tmp_path, monkeypatch):
    def published_then_interrupted(src, dst, *a, **k):
        raise InterruptedAfterPublishing(dst)

    monkeypatch.setattr(convert_core, "convert", published_then_interrupted)
    monkeypatch.setattr(gemma4_mlx.convert, "convert", published_then_interrupted)
    r = CliRunner().invoke(cli_app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-q", "q8"])
    assert r.exit_code != 0
    assert "interrupted after the conversion was written (it is complete)" in r.output
    assert "nothing was written" not in r.output


def test_a_staging_folder_half_deleted_keeps_its_lock(tmp_path, monkeypatch):
    """Deleted in rmtree's order, the lock file could go first: a second Ctrl-C left a
    lock-less folder that the next run had to refuse as somebody's.  The lock goes last."""
    d = tmp_path / "out.partial"
    d.mkdir()
    for name in ("a", LOCK, "b", "c"):
        (d / name).write_text(name)
    real = Path.unlink
    seen = []

    def unlink(self, missing_ok=False):
        seen.append(self.name)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        output.remove_staging(d)
    assert (d / LOCK).exists() and LOCK not in seen
    monkeypatch.setattr(Path, "unlink", real)
    output.remove_staging(d)
    assert not d.exists()
