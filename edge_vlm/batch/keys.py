"""Resume keys: what makes two answers "the same work".

An answer is identified by the image's *file bytes* (never its path: a moved folder still
resumes, a file changed in place does not), the prompt, the model files' contents and every
setting that changes the answer. In ``--conversation`` mode the earlier prompts of the
conversation are part of the key too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

#: Bumped when the key recipe changes: old output files then simply do not match.
#: (2: the model is identified by its files' full SHA-256, not a sampled fingerprint.)
KEY_VERSION = 2


def bytes_digest(data: bytes) -> str:
    """SHA-256 (hex) of an image file's bytes: the ``image_sha256`` of an output line."""
    return hashlib.sha256(data).hexdigest()


def model_key(model_sha256: str, mmproj_sha256: str) -> str:
    """The content identity of a model pair, from the files' SHA-256 (the store's manifest
    records them; :mod:`edge_vlm.batch.identity` finds or computes them).

    It leaves out paths and dates, so a model copied elsewhere, or installed on another
    node of a cluster, keeps old results resumable.
    """
    return _digest([model_sha256, mmproj_sha256])


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
        model: :func:`model_key` of the model pair.
        settings: :func:`settings_digest` of the answer-changing settings.
        history: Earlier prompts of the same conversation (``--conversation``).
    """
    return _digest([KEY_VERSION, image, prompt, model, settings, list(history)])
