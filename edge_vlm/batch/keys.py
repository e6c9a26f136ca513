"""Resume keys: what makes two answers "the same work".

An answer is identified by the image's *file bytes* (never its path: a moved folder still
resumes, a file changed in place does not), the prompt, the model files' contents and every
setting that changes the answer. In ``--conversation`` mode the earlier prompts of the
conversation are part of the key too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Bumped when the key recipe changes: old output files then simply do not match.
KEY_VERSION = 1
_CHUNK = 1 << 20


def bytes_digest(data: bytes) -> str:
    """SHA-256 (hex) of an image file's bytes: the ``image_sha256`` of an output line."""
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(*paths: str | os.PathLike[str]) -> str:
    """A content identity of model files: size and the first and last MiB of each.

    Unlike the engine's cache fingerprint it leaves out the path and mtime, so copying the
    model elsewhere keeps old results resumable.
    """
    h = hashlib.sha256()
    for raw in paths:
        path = Path(raw)
        size = path.stat().st_size
        h.update(f"{size}:".encode())
        with path.open("rb") as f:
            h.update(f.read(_CHUNK))
            if size > _CHUNK:
                f.seek(-_CHUNK, os.SEEK_END)
                h.update(f.read(_CHUNK))
    return h.hexdigest()[:32]


def _digest(value: Any, n: int = 32) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def settings_digest(options: dict[str, Any]) -> str:
    """A short hash of the settings that change answers (written as ``settings``)."""
    return _digest(options, 16)


def item_key(*, image: str, prompt: str, model: str, settings: str,
             history: Sequence[str] = ()) -> str:
    """The resume key of one answer.

    Args:
        image: The image's :func:`bytes_digest` (or ``path:...`` when it is unreadable).
        prompt: The question.
        model: :func:`model_fingerprint` of the model pair.
        settings: :func:`settings_digest` of the answer-changing settings.
        history: Earlier prompts of the same conversation (``--conversation``).
    """
    return _digest([KEY_VERSION, image, prompt, model, settings, list(history)])
