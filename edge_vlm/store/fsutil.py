"""Filesystem primitives of the store: atomic writes, the store lock, staged blobs, hashing.

Every file the store makes visible appears whole or not at all: it is written under a
temporary name, fsynced, then renamed over its final name (and the folder fsynced). Large
files are staged in ``tmp/`` while they are copied and hashed; each staging file carries an
``flock`` for as long as its writer lives, so leftovers of a killed process are recognised
(their lock is gone) and removed by the next writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from edge_vlm.errors import StoreError
from edge_vlm.fileio import write_atomic

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CHUNK = 4 * 1024 * 1024
"""Bytes read per step while copying or hashing."""
LOCK_TIMEOUT_S = 120.0
"""How long a writer waits for another one to finish registering or removing a model."""
ORPHAN_MIN_AGE_S = 30.0
"""Staging files younger than this are never treated as left over."""
ORPHAN_AGE_S = 24 * 3600
"""Without ``flock`` (Windows), staging files older than this count as left over."""


class ProgressSink(Protocol):
    """Receives progress of a long copy or hash (the CLI draws a bar with it)."""

    def start(self, label: str, total: int) -> None:
        """A new file of ``total`` bytes begins."""

    def advance(self, n: int) -> None:
        """``n`` more bytes are done."""

    def finish(self) -> None:
        """The current file is done."""


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def store_lock(lock_path: Path, *, timeout: float = LOCK_TIMEOUT_S,
               on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the store's exclusive lock (``flock``; released by the kernel if we die).

    Raises:
        StoreError: another process held it for longer than ``timeout`` seconds.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                _try_lock(fd)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
                    raise
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if time.monotonic() > deadline:
                raise StoreError(
                    f"another edge-vlm process has held the model store lock ({lock_path}) "
                    f"for over {timeout:.0f} s; wait for it to finish and try again"
                )
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _try_lock(fd: int) -> None:
    """Take an exclusive lock on ``fd`` without waiting (OSError if someone holds it)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover - Windows, untested
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


class StagedFile:
    """A file being written in the store's ``tmp/`` folder, locked while this process lives.

    Attributes:
        path: Where the staged bytes are.
        sha256: Hex digest, once :meth:`fill_from` or :meth:`adopt_link` has run.
        size: Bytes, likewise.
    """

    def __init__(self, tmp_dir: Path) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.part"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.sha256 = ""
        self.size = 0
        self.linked = False

    def fill_from(self, src: Path, progress: ProgressSink | None = None,
                  label: str = "") -> None:
        """Copy ``src`` here, hashing while copying, then fsync."""
        h = hashlib.sha256()
        total = 0
        with open(src, "rb") as fin, os.fdopen(os.dup(self._fd), "wb") as fout:
            if progress is not None:
                progress.start(label or src.name, os.fstat(fin.fileno()).st_size)
            while chunk := _read_chunk(fin):
                h.update(chunk)
                fout.write(chunk)
                total += len(chunk)
                if progress is not None:
                    progress.advance(len(chunk))
            fout.flush()
            os.fsync(fout.fileno())
        if progress is not None:
            progress.finish()
        self.sha256, self.size = h.hexdigest(), total

    def adopt_link(self, src: Path, progress: ProgressSink | None = None,
                   label: str = "") -> bool:
        """Replace the staging file by a hard link to ``src`` and hash it.

        Returns:
            False when ``src`` is on another filesystem (or links are not supported):
            nothing changed, the caller falls back to referencing ``src`` in place.
        """
        link_path = self.path.with_suffix(".link")
        try:
            os.link(src, link_path)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                             errno.EOPNOTSUPP):
                return False
            raise
        fd = os.open(link_path, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.close()
        self.path, self._fd, self.linked = link_path, fd, True
        self.sha256, self.size = hash_file(self.path, progress, label or src.name)
        return True

    def close(self) -> None:
        """Delete the staging file if it was not moved away, and drop the lock."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_chunk(f: BinaryIO) -> bytes:
    return f.read(CHUNK)


def hash_file(path: Path, progress: ProgressSink | None = None,
              label: str = "") -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks."""
    h = hashlib.sha256()
    total = 0
    with open(path, "rb") as f:
        if progress is not None:
            progress.start(label or path.name, os.fstat(f.fileno()).st_size)
        while chunk := _read_chunk(f):
            h.update(chunk)
            total += len(chunk)
            if progress is not None:
                progress.advance(len(chunk))
    if progress is not None:
        progress.finish()
    return h.hexdigest(), total


def _writer_alive(name: str) -> bool:
    """Whether the process whose pid starts a staging file's name still runs."""
    try:
        pid = int(name.split("-", 1)[0])
    except ValueError:
        return False
    return pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (on Windows: assumed, since ``os.kill(pid, 0)``
    would end it; callers then rely on age)."""
    if fcntl is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def remove_orphans(tmp_dir: Path) -> int:
    """Delete staging files whose writer is gone; returns how many were removed."""
    removed = 0
    if not tmp_dir.is_dir():
        return 0
    for p in tmp_dir.iterdir():
        try:
            # ctime: a fresh hard link has its source's old mtime, but a new ctime.
            age = time.time() - p.stat().st_ctime
        except OSError:
            continue
        if age < ORPHAN_MIN_AGE_S and _writer_alive(p.name):
            continue  # being created right now: its writer may not hold the flock yet
        if fcntl is None:
            if age > ORPHAN_AGE_S:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its writer is alive
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
