"""The response cache behind ``x-use-cache``: identical deterministic requests, one answer.

A request is deterministic when it samples greedily (temperature 0, the default) or fixes
a ``seed``; only those are cached. The key is the SHA-256 of the canonical JSON of the
request (sorted keys; ``stream``, ``stream_options`` and ``model`` left out; every image
replaced by the SHA-256 of its bytes) and the model's fingerprint, so a streamed and a
plain request share an entry, and the same image sent as a data URL or fetched from a URL
hits the same entry.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from edge_vlm.config import SamplingSettings
from edge_vlm.schema import (
    ChatCompletionRequest,
    FinishReason,
    GenerationStats,
    ImagePart,
    Usage,
)


@dataclass(frozen=True)
class CachedAnswer:
    """A finished answer, kept to be replayed.

    Attributes:
        model: The model name the answer came from.
        pieces: The text deltas as first streamed (replayed as the same chunks).
        finish_reason: ``stop`` or ``length``.
        timings: The original computation's stats (a replay reports them unchanged).
    """

    model: str
    pieces: tuple[str, ...]
    finish_reason: FinishReason
    timings: GenerationStats

    @property
    def text(self) -> str:
        """The whole answer."""
        return "".join(self.pieces)

    @property
    def usage(self) -> Usage:
        """Token counts of the original computation."""
        t = self.timings
        return Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
                     total_tokens=t.prompt_tokens + t.completion_tokens)


def is_deterministic(request: ChatCompletionRequest, sampling: SamplingSettings) -> bool:
    """Whether the same request always gets the same answer (greedy, or a fixed seed)."""
    temperature = request.temperature if request.temperature is not None else sampling.temperature
    return temperature == 0 or request.seed is not None


def cache_key(request: ChatCompletionRequest, identities: list[str], fingerprint: str) -> str:
    """The key of a request for a model, images by content identity.

    Args:
        request: The validated request (original image URLs are ignored).
        identities: The content identity of each image, in order.
        fingerprint: The model's fingerprint (its files).
    """
    data = request.model_dump(mode="json", exclude_none=True, by_alias=True,
                              exclude={"stream", "stream_options", "model"})
    images = iter(identities)
    for msg_data, msg in zip(data["messages"], request.messages, strict=True):
        if not isinstance(msg.content, list):
            continue
        for part_data, part in zip(msg_data["content"], msg.content, strict=True):
            if isinstance(part, ImagePart):
                part_data["image_url"]["url"] = next(images)
    canonical = json.dumps({"model": fingerprint, "request": data}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """A thread-safe LRU of answers, bounded by entry count.

    Args:
        max_entries: Entries kept (0: the cache is off).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """Whether anything is kept."""
        return self.max_entries > 0

    def get(self, key: str) -> CachedAnswer | None:
        """The answer stored under ``key``, marked as recently used."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store an answer, dropping the least recently used beyond the bound."""
        if not self.enabled:
            return
        with self._lock:
            self._items[key] = answer
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
