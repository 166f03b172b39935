"""What every conversion writes, shared by the HF converter (`core`) and the GGUF
importer (`gguf`): the `Report`, output shards, the shard index, the progress bar,
and the crash-safe staging folder (`staging`, docs/hardening.md §2)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .errors import ConvertError, InterruptedAfterPublishing

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
PARTIAL = ".partial"
OLD = ".old" + PARTIAL  # DST.old.partial: a DST being replaced, moved aside
# Inside DST.partial while a conversion writes it: flock-ed by the writer for its whole
# life, so the kernel releases it the moment the writer dies, SIGKILL included.
LOCK = ".gemma4-mlx-convert.lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Report:
    dst: Path
    recipe: str
    tensors: dict = field(default_factory=dict)  # module path -> entry (as in config.json)
    skipped: dict = field(default_factory=dict)  # what was left out, with counts
    converted: list = field(default_factory=list)  # "text", "vision", "audio" (or "drafter")
    processor_config: str | None = None  # what the converter changed in processor_config.json
    bytes_in: int = 0
    bytes_out: int = 0
    largest_shard: int = 0  # bytes of the largest source shard
    peak_mlx: int = 0  # MLX allocator high-water mark over the run, above what was in use before, bytes
    peak_rss: int = 0  # process max RSS after the run, bytes (includes everything before)

    def lattice_fraction(self) -> float | None:
        """Fraction of Q4_0 blocks recovered exactly, over all q4_0 tensors."""
        v = [e["lattice_exact"] for e in self.tensors.values() if "lattice_exact" in e]
        return sum(v) / len(v) if v else None


def write_shard(path: Path, tensors: dict[str, mx.array]) -> None:
    """Write one output shard (a module-level name, so tests can inject failures).
    MLX reports a full disk as a RuntimeError: it becomes a one-line ConvertError."""
    try:
        mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})
    except (RuntimeError, OSError) as e:
        need = sum(a.nbytes for a in tensors.values())
        free = shutil.disk_usage(path.parent).free
        if free < need or getattr(e, "errno", None) in _NO_SPACE:
            raise ConvertError(no_space(path.parent, free, need)) from None
        raise ConvertError(f"{path}: cannot write ({' '.join(str(e).split())})") from None


def no_space(where: Path, free: int, need: int | None = None) -> str:
    what = f"{need:,} bytes to write, " if need else ""
    return f"{where}: no space left on device ({what}{free:,} bytes free); nothing was written"


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json for a sharded output: tensor name -> shard file."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class Progress:
    """A rich progress bar over source bytes on stderr; `with Progress(...) as advance:`
    gives `advance(n_bytes)` (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        # rich is imported only when a bar is shown (the library API and the tests never need it)
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("converting"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task("convert", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
        return False


# -- crash-safe output: DST.partial, owned through a lock, renamed at the end ------------


def check_destination(dst: Path) -> None:
    """Refuse, before any work, a destination whose nearest existing folder cannot be
    written (read-only filesystem, no permission)."""
    parent = dst.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConvertError(f"{dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        ro = os.statvfs(parent).f_flag & os.ST_RDONLY
        why = "is on a read-only filesystem" if ro else "is not writable"
        raise ConvertError(f"{dst}: cannot write there ({parent} {why})")


def _try_lock(partial: Path):
    """An open, exclusively locked file object of `partial`'s lock, or None while its
    writer lives.  Raises FileNotFoundError without a lock file."""
    f = open(partial / LOCK, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _owner(partial: Path) -> str:
    try:
        return (partial / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


def clean_stale(parent: Path, own: tuple[Path, ...]) -> list[Path]:
    """Remove the `*.partial` folders in `parent` that killed conversions left: those
    whose lock no live process holds.  Only folders holding our lock file are touched,
    except an empty one of `own` (this run's DST.partial and DST.old.partial: a run
    killed between its mkdir and its lock).  A non-empty `own` folder without the lock
    is somebody's data, and an error; so is a live writer of `own`."""
    removed = []
    for d in sorted(parent.glob("*" + PARTIAL)) if parent.is_dir() else []:
        if not d.is_dir() or d.is_symlink():
            continue
        try:
            lock = _try_lock(d)
        except FileNotFoundError:
            if d in own:
                _remove_if_empty(d)
                removed.append(d)
            continue
        except OSError:
            continue  # unreadable: not ours to judge
        if lock is None:
            if d in own:
                raise ConvertError(f"{d}: another conversion (pid {_owner(d)}) is writing it")
            continue
        with lock:  # held while deleting: a third run sees a live owner, not a half-deleted folder
            _restore_replaced(d)
            remove_staging(d)
        removed.append(d)
    for d in removed:
        log.warning("removed %s, left by a conversion that was killed", d)
    return removed


def _remove_if_empty(d: Path) -> None:
    """rmdir a lock-less staging folder of this run, which only a kill between mkdir and
    taking the lock leaves (empty); anything else there is not ours to delete."""
    try:
        d.rmdir()
    except OSError:
        raise ConvertError(
            f"{d}: a folder of that name is in the way of the conversion's staging folder and is not one "
            "(no lock file); move or rename it"
        ) from None


def _restore_replaced(d: Path) -> None:
    """A dead run's DST.old.partial still holding the DST it replaced, while DST is gone
    (killed between the two renames of `staging`): put that DST back."""
    if not d.name.endswith(OLD):
        return
    dst = d.with_name(d.name[: -len(OLD)])
    if (d / "replaced").exists() and not (dst.exists() or dst.is_symlink()):
        os.rename(d / "replaced", dst)
        log.warning("restored %s, which a killed conversion had moved aside", dst)


def _take(partial: Path):
    """Create DST.partial with its lock held; returns the lock's file object."""
    try:
        partial.mkdir(parents=True)
        f = open(partial / LOCK, "w")
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise ConvertError(no_space(partial.parent, shutil.disk_usage(partial.parent).free)) from None
        raise ConvertError(f"{partial}: cannot create it ({e.strerror or e})") from None
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file and the folder: a rename that survives a crash publishes data that does too."""
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            _fsync(p)
    _fsync(folder)


@contextlib.contextmanager
def staging(dst: Path):
    """`with staging(dst) as partial:` write everything into `partial`; on success it
    becomes `dst` (replacing one that exists) by one rename; on any failure, or a
    kill, `dst` is untouched and `partial` is gone (now, or removed by the next run
    through its dead lock: `clean_stale`).  A full disk is one ConvertError line."""
    partial = dst.with_name(dst.name + PARTIAL)
    trash = dst.with_name(dst.name + OLD)  # a replaced DST, on its way out
    clean_stale(dst.parent, (partial, trash))
    locks = [_take(partial)]
    try:
        interrupted = None
        try:
            yield partial
            _sync_tree(partial)
            if dst.exists() or dst.is_symlink():
                # Moved aside whole (one rename) into a locked folder, never deleted in place:
                # a kill then leaves DST complete or absent, and the folder to the next run.
                locks.append(_take(trash))
                os.rename(dst, trash / "replaced")
            # The lock file goes with the folder, unlinked from DST afterwards: a kill between
            # the two leaves a stray lock file in a complete DST, never a lock-less DST.partial
            # (which the next run could not tell from a user's own folder).
            partial.rename(dst)
        except KeyboardInterrupt as e:
            if not _published(partial, dst):
                _undo(partial, trash, dst)
                raise
            interrupted = e  # landed just after the rename: DST is complete
        except OSError as e:
            _undo(partial, trash, dst)
            if e.errno in _NO_SPACE:
                raise ConvertError(no_space(dst.parent, shutil.disk_usage(dst.parent).free)) from None
            raise ConvertError(f"{e.filename or dst}: {e.strerror or e}") from None
        except BaseException:
            _undo(partial, trash, dst)
            raise
        _finish_publishing(dst, trash, interrupted)
    finally:
        for lock in locks:
            lock.close()


def _finish_publishing(dst: Path, trash: Path, interrupted: BaseException | None) -> None:
    """After the rename: the lock file out of DST, the rename made durable, the old DST
    deleted.  DST is complete whatever happens here, so an interrupt says so
    (`InterruptedAfterPublishing`) and an OSError is a warning, not a failure."""
    try:
        (dst / LOCK).unlink(missing_ok=True)
        _fsync(dst.parent)
    except KeyboardInterrupt as e:
        interrupted = e
    except OSError as e:
        log.warning("%s: written, but finishing up failed (%s)", dst, e.strerror or e)
    try:
        remove_staging(trash)
    except KeyboardInterrupt as e:  # its lock goes last: a next run removes what is left
        interrupted = interrupted or e
    if interrupted is not None:
        raise InterruptedAfterPublishing(dst) from interrupted


def remove_staging(d: Path) -> None:
    """Delete a staging folder with its lock file last, so that a folder left half
    deleted (a second Ctrl-C, a kill) still holds the lock that proves it ours."""
    if not d.is_dir() or d.is_symlink():
        return
    lock = d / LOCK
    with contextlib.suppress(OSError):  # as rmtree(ignore_errors=True): what cannot go stays
        for p in [p for p in d.iterdir() if p != lock] + [lock]:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        d.rmdir()


def _published(partial: Path, dst: Path) -> bool:
    """The rename to DST happened (read from the disk, not a flag: an interrupt can
    land between the rename and any assignment after it)."""
    return not partial.exists() and dst.is_dir()


def _undo(partial: Path, trash: Path, dst: Path) -> None:
    """After a failure: the previous DST back in place if it was moved aside, and this
    run's folders gone."""
    old = trash / "replaced"
    if old.exists() and not dst.exists():
        os.rename(old, dst)
    remove_staging(partial)
    remove_staging(trash)
