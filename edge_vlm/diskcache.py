"""An optional on-disk cache of vision-encoder outputs (off by default).

One file per entry, named by a hash of its key, written atomically (temporary file, fsync,
rename). Every read is validated: magic, the full key, the expected shape and a checksum of
the data; a corrupt, truncated or foreign entry is deleted and reported as a miss, so it
can never feed wrong embeddings to the model. The folder is kept under a byte budget by
evicting the least recently used entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_vlm.fileio import write_atomic

MAGIC = b"EVLMEMB1"
_HEADER = struct.Struct("<8sIII")  # magic, key length, rows, cols
SUFFIX = ".emb"


class DiskEmbeddingCache:
    """Embeddings on disk, bounded by bytes.

    Args:
        folder: Where entries live (created on first write).
        max_bytes: The budget for the folder's entries.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:40] + SUFFIX)

    def get(self, key: str, shape: tuple[int, int]) -> npt.NDArray[np.float32] | None:
        """The entry for ``key`` if it is present and valid for ``shape``, else None."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        value = _decode(raw, key, shape)
        if value is None:
            with contextlib.suppress(OSError):
                path.unlink()  # corrupt or foreign: never use it again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for eviction
        return value

    def put(self, key: str, value: npt.NDArray[np.float32]) -> None:
        """Store an entry atomically, then trim the folder to the budget."""
        data = _encode(key, np.ascontiguousarray(value, dtype=np.float32))
        if len(data) > self.max_bytes:
            return
        with self._lock:
            write_atomic(self._path(key), data, mode=0o600)
            self._trim()

    def _trim(self) -> None:
        entries = []
        for p in self.folder.glob("*" + SUFFIX):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size


def _encode(key: str, value: npt.NDArray[np.float32]) -> bytes:
    rows, cols = value.shape
    kb = key.encode()
    body = value.tobytes()
    return (_HEADER.pack(MAGIC, len(kb), rows, cols) + kb + body
            + hashlib.sha256(body).digest())


def _decode(raw: bytes, key: str, shape: tuple[int, int]) -> npt.NDArray[np.float32] | None:
    if len(raw) < _HEADER.size:
        return None
    magic, klen, rows, cols = _HEADER.unpack_from(raw)
    if magic != MAGIC or (rows, cols) != shape:
        return None
    start = _HEADER.size + klen
    end = start + rows * cols * 4
    if len(raw) != end + 32 or raw[_HEADER.size:start] != key.encode():
        return None
    body = raw[start:end]
    if hashlib.sha256(body).digest() != raw[end:]:
        return None
    return np.frombuffer(body, dtype=np.float32).reshape(rows, cols).copy()
