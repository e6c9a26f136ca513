"""The JSONL results file: appended line by line, never left with a partial line.

Each answer is one ``write`` of a whole line followed by ``fsync``, so a crash, a power loss
or ``kill -9`` loses at most the line being written. That torn last line (bytes after the
last newline) is cut away when the file is opened again with ``resume``. A failed write is
rolled back to the previous end of the file. An exclusive lock keeps two batches from
writing the same file.

On ``resume`` the answers that failed last time are retried: their error lines are removed
(by writing the kept lines to a new file and renaming it over the old one, atomically), so
the file still holds one line per answer.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from edge_vlm.batch.inputs import BatchInputError
from edge_vlm.batch.resume import ResumeIndex
from edge_vlm.errors import EdgeVLMError
from edge_vlm.fileio import fsync_dir

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]


class BatchOutputError(EdgeVLMError):
    """The results file could not be written (disk full, permissions, ...)."""


class ResultWriter:
    """An open results file. Use :meth:`open`; close it (or use ``with``) when done.

    Attributes:
        path: The file.
        index: Successful answers already in the file (empty unless resumed).
        kept: Lines found in the file when it was opened with ``resume``.
        dropped: Error lines removed on ``resume`` so their answers are retried.
        truncated: Bytes of a torn last line cut away on ``resume``.
    """

    def __init__(self, path: Path, fd: int, index: ResumeIndex, *, fsync: bool,
                 kept: int = 0, dropped: int = 0, truncated: int = 0) -> None:
        self.path = path
        self.index = index
        self.kept = kept
        self.dropped = dropped
        self.truncated = truncated
        self._fd: int | None = fd
        self._fsync = fsync
        self.written = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, resume: bool = False,
             overwrite: bool = False, fsync: bool = True) -> ResultWriter:
        """Open (or create) a results file for appending.

        Args:
            path: The ``.jsonl`` file.
            resume: Keep the lines already there and skip their answers.
            overwrite: Empty an existing file first.
            fsync: Flush every line to the disk (off only for benchmarks and tests).

        Raises:
            BatchInputError: the file holds results and neither ``resume`` nor
                ``overwrite`` was asked; the file is not an edge-vlm results file; another
                batch is writing it.
            BatchOutputError: the file cannot be created or read.
        """
        p = Path(path).expanduser()
        if resume and overwrite:
            raise BatchInputError("choose --resume (continue) or --overwrite (start over), "
                                  "not both")
        try:
            if p.is_dir():
                raise BatchInputError(f"--out '{p}' is a folder; give a file such as "
                                      f"{p / 'results.jsonl'}")
            p.parent.mkdir(parents=True, exist_ok=True)
            created = not p.exists()
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise BatchOutputError(f"cannot open results file '{p}': {err.strerror}") from None
        try:
            _lock(fd, p)
            if created:
                fsync_dir(p.parent)
            size = os.fstat(fd).st_size
            if size and overwrite:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            elif size and not resume:
                raise BatchInputError(
                    f"results file '{p}' already exists ({size} bytes): pass --resume to "
                    "continue that run, or --overwrite to start over")
            if not (size and resume):
                return cls(p, fd, ResumeIndex(), fsync=fsync)
            return cls._resumed(p, fd, fsync)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _resumed(cls, path: Path, fd: int, fsync: bool) -> ResultWriter:
        data = _read_all(fd)
        end = data.rfind(b"\n") + 1
        truncated = len(data) - end
        if truncated:  # a line torn by a crash: cut it away before appending
            os.ftruncate(fd, end)
            os.fsync(fd)
            data = data[:end]
        index = ResumeIndex()
        keep: list[bytes] = []
        dropped = 0
        for n, line in enumerate(data.split(b"\n")[:-1], 1):
            line += b"\n"
            if not line.strip():
                dropped += 1
                continue
            record = _parse_line(line, path, n)
            if record.get("error") is None:
                index.add(record)
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            fd = _replace_with(path, fd, b"".join(keep))
        return cls(path, fd, index, fsync=fsync, kept=len(keep), dropped=dropped,
                   truncated=truncated)

    def write(self, record: dict[str, Any]) -> None:
        """Append one result as one line, durable when this returns.

        Raises:
            BatchOutputError: the line could not be written (the file is left as before).
        """
        if self._fd is None:
            raise BatchOutputError(f"results file '{self.path}' is closed")
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        data = (line + "\n").encode("utf-8")  # json.dumps escapes every newline
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self._fsync:
                os.fsync(self._fd)
        except BaseException as err:  # OSError, or a KeyboardInterrupt between two writes
            with contextlib.suppress(OSError):  # else the next --resume cuts the torn line
                os.ftruncate(self._fd, start)
            if not isinstance(err, OSError):
                raise
            raise BatchOutputError(
                f"cannot write to results file '{self.path}': {err.strerror}; free space or "
                "fix permissions, then run again with --resume") from None
        self.written += 1

    def close(self) -> None:
        """Release the lock and close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BatchInputError(f"results file '{path}' is being written by another edge-vlm "
                              "batch; wait for it or choose another --out") from None


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    parts: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _parse_line(line: bytes, path: Path, n: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise BatchInputError(
            f"line {n} of '{path}' is not an edge-vlm batch result; --resume needs the file "
            "a previous run wrote (choose another --out, or --overwrite to start over)")
    return record


def _replace_with(path: Path, old_fd: int, data: bytes) -> int:
    """Atomically replace the file's content; returns the new (locked) descriptor."""
    tmp = path.with_name(f".{path.name}.resume-tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        _lock(fd, tmp)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise BatchOutputError(f"cannot rewrite results file '{path}': {err.strerror}") from None
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(old_fd)
    return fd
