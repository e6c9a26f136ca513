"""The engine: one owner of a loaded model, turning requests into a stream of tokens.

It keeps what is in the KV cache between requests as a list of chunk identities (text
tokens; images by content identity, never by path), evaluates only the suffix that differs
from the previous request, and skips the vision encoder for images it has encoded before.
One request runs at a time (a lock); cancellation is a flag checked between chunks and
between tokens.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_vlm.backend import (
    Backend,
    ImageChunk,
    PromptChunks,
    RGBImage,
    SamplerParams,
    TextChunk,
)
from edge_vlm.diskcache import DiskEmbeddingCache
from edge_vlm.embcache import EmbeddingCache
from edge_vlm.errors import ContextOverflowError, GenerationError
from edge_vlm.schema import (
    FinishReason,
    GenerationStats,
    ImageStats,
    TokenLogprob,
    TopLogprob,
)
from edge_vlm.stops import StopFilter

# A KV item: a text token id, or an image's key (identity + position count).
KVItem = int | tuple[str, int]


@dataclass
class PromptImage:
    """An image ready for the model: raw RGB plus how it was prepared."""

    rgb: RGBImage
    detail: str
    decode_ms: float


@dataclass
class GenerationParams:
    """What to generate (resolved from the request and the settings)."""

    max_tokens: int
    sampler: SamplerParams
    stop: list[str] = field(default_factory=list)
    max_image_tokens: int = 0
    """Image-token budget for tiling projectors (0: the model's full tiling)."""
    logprobs: int | None = None
    """Report each chosen token's log-probability and this many alternatives (None: off)."""


@dataclass
class Event:
    """One step of a generation: a text delta, and on the last event the finish and stats."""

    text: str
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    logprobs: list[TokenLogprob] | None = None
    """With ``GenerationParams.logprobs``: the tokens behind this event's text."""


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class Engine:
    """Runs generations on one :class:`Backend`, one at a time.

    Args:
        backend: The loaded model.
        mmproj_fingerprint: Identifies the mmproj file in embedding-cache keys.
        embedding_cache_bytes: Budget of the image-embedding LRU (0: off).
        prefix_reuse: Keep the KV cache between requests.
        disk_cache: An optional second level under the memory cache.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        mmproj_fingerprint: str,
        embedding_cache_bytes: int,
        prefix_reuse: bool = True,
        disk_cache: DiskEmbeddingCache | None = None,
    ) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.cache = EmbeddingCache(embedding_cache_bytes)
        self.disk_cache = disk_cache
        self.prefix_reuse = prefix_reuse
        self._fingerprint = mmproj_fingerprint
        self._kv: list[KVItem] = []
        self._kv_pos = 0

    # -- prompt ----------------------------------------------------------------------

    def tokenize(
        self, text: str, images: Sequence[PromptImage], max_image_tokens: int = 0
    ) -> PromptChunks:
        """Tokenize a rendered prompt with its images (caller closes the result)."""
        return self.backend.tokenize_prompt(text, [im.rgb for im in images], max_image_tokens)

    @staticmethod
    def _items(chunks: PromptChunks) -> list[tuple[KVItem, int]]:
        """The prompt as KV items with the positions each occupies."""
        out: list[tuple[KVItem, int]] = []
        for ch in chunks.items:
            if isinstance(ch, TextChunk):
                out.extend((t, 1) for t in ch.tokens)
            else:
                out.append(((ch.identity, ch.n_pos), ch.n_pos))
        return out

    def _reusable_prefix(self, items: list[tuple[KVItem, int]]) -> tuple[int, int]:
        """How many items (and KV positions) of the prompt are already in the KV cache."""
        if not self.prefix_reuse:
            return 0, 0
        n = 0
        pos = 0
        for (item, width), cached in zip(items, self._kv, strict=False):
            if item != cached:
                break
            n += 1
            pos += width
        # Always evaluate at least the last prompt item: its logits start the answer.
        while n >= len(items) and n > 0:
            n -= 1
            pos -= items[n][1]
        return n, pos

    def check_fits(self, chunks: PromptChunks, max_tokens: int) -> None:
        """Raise ContextOverflowError before any evaluation when the request cannot fit."""
        n_ctx = self.backend.n_ctx
        need = chunks.n_pos + max_tokens
        if need > n_ctx:
            n_img = sum(c.n_tokens for c in chunks.items if isinstance(c, ImageChunk))
            raise ContextOverflowError(
                f"the prompt needs {chunks.n_pos} tokens ({n_img} of them for images) plus "
                f"max_tokens={max_tokens}, {need} in all, but the context holds {n_ctx}: "
                "lower max_tokens, send fewer or lower-detail images, shorten the "
                "conversation, or raise runtime.n_ctx"
            )

    def _eval_prompt(
        self, chunks: PromptChunks, stats: GenerationStats, cancel: threading.Event | None
    ) -> bool:
        """Evaluate the part of the prompt not already in the KV cache.

        Returns:
            False if cancelled part-way.
        """
        items = self._items(chunks)
        n_keep, pos = self._reusable_prefix(items)
        self.backend.kv_truncate(pos)
        self._kv = self._kv[:n_keep]
        self._kv_pos = pos
        stats.prompt_tokens_reused = sum(w for _, w in items[:n_keep])
        image_stats = iter(stats.images)
        ist: ImageStats | None = None
        # Embeddings of this prompt's tiles by identity: a tile that is a copy of another
        # (ModelInfo.one_tile_side) reuses them even with the caches off.
        seen: dict[str, npt.NDArray[np.float32]] = {}
        idx = 0  # item index at the start of the current chunk
        t0 = time.perf_counter()
        for ch in chunks.items:
            if cancel is not None and cancel.is_set():
                return False
            if isinstance(ch, TextChunk):
                start = max(0, n_keep - idx)
                todo = ch.tokens[start:]
                if todo:
                    self._kv_pos = self.backend.eval_tokens(todo, self._kv_pos)
                    self._kv.extend(todo)
                    stats.prompt_tokens_evaluated += len(todo)
                idx += len(ch.tokens)
                continue
            if ch.tile == 0:
                ist = next(image_stats, None)
                if ist is not None:
                    ist.tiles, ist.encoded, ist.tokens, ist.cache_hit = 0, 0, 0, True
            if idx >= n_keep:
                copy = seen.get(ch.identity)
                if copy is not None:  # same pixels as a tile of this prompt: no new pass
                    embd, encode_ms = copy, 0.0
                else:
                    embd, encode_ms, hit = self._image_embeddings(chunks, ch)
                    seen[ch.identity] = embd
                    if hit:
                        stats.embedding_cache_hits += 1
                    if ist is not None:
                        ist.encoded += 0 if hit else 1
                        ist.cache_hit = ist.cache_hit and hit
                self._kv_pos = self.backend.decode_image(chunks, ch, embd, self._kv_pos)
                self._kv.append((ch.identity, ch.n_pos))
                stats.prompt_tokens_evaluated += ch.n_tokens
                stats.image_encode_ms += encode_ms
                if ist is not None:
                    ist.encode_ms += encode_ms
            if ist is not None:  # a chunk already in the KV cache counts as a hit
                ist.tiles += 1
                ist.tokens += ch.n_tokens
            idx += 1
        stats.prompt_eval_ms = (time.perf_counter() - t0) * 1000.0
        return True

    def _image_embeddings(
        self, chunks: PromptChunks, ch: ImageChunk
    ) -> tuple[npt.NDArray[np.float32], float, bool]:
        key = (self._fingerprint, ch.identity, str(ch.n_tokens))
        cached = self.cache.get(key) if self.cache.max_bytes else None
        if cached is not None:
            return cached, 0.0, True
        disk_key = "|".join(key)
        shape = (ch.n_tokens, self.backend.n_embd)
        if self.disk_cache is not None:
            cached = self.disk_cache.get(disk_key, shape)
            if cached is not None:
                if self.cache.max_bytes:
                    self.cache.put(key, cached)
                return cached, 0.0, True
        t0 = time.perf_counter()
        embd = self.backend.encode_image(chunks, ch)
        ms = (time.perf_counter() - t0) * 1000.0
        if self.cache.max_bytes:
            self.cache.put(key, embd)
        if self.disk_cache is not None:
            self.disk_cache.put(disk_key, embd)
        return embd, ms, False

    # -- generation ------------------------------------------------------------------

    def generate(
        self,
        text: str,
        images: Sequence[PromptImage],
        params: GenerationParams,
        *,
        cancel: threading.Event | None = None,
        t_start: float | None = None,
    ) -> Iterator[Event]:
        """Evaluate the prompt and stream the answer.

        Holds the engine lock until the generator finishes or is closed.

        Raises:
            ContextOverflowError: before any evaluation, when the request cannot fit.
            GenerationError: llama.cpp failed.
        """
        t_start = t_start if t_start is not None else time.perf_counter()
        with self.lock:
            yield from self._generate_locked(text, images, params, cancel, t_start)

    def _generate_locked(
        self,
        text: str,
        images: Sequence[PromptImage],
        params: GenerationParams,
        cancel: threading.Event | None,
        t_start: float,
    ) -> Iterator[Event]:
        stats = GenerationStats(n_ctx=self.backend.n_ctx)
        stats.image_decode_ms = sum(im.decode_ms for im in images)
        stats.images = [
            ImageStats(identity=im.rgb.identity, width=im.rgb.width, height=im.rgb.height,
                       detail=im.detail, decode_ms=im.decode_ms)
            for im in images
        ]
        with self.tokenize(text, images, params.max_image_tokens) as chunks:
            stats.prompt_tokens = chunks.n_tokens
            stats.image_tokens = sum(
                c.n_tokens for c in chunks.items if isinstance(c, ImageChunk))
            self.check_fits(chunks, params.max_tokens)
            try:
                finished = self._eval_prompt(chunks, stats, cancel)
            except BaseException:
                self._forget()
                raise
        if stats.prompt_eval_ms > 0:
            stats.prompt_tps = stats.prompt_tokens_evaluated / (stats.prompt_eval_ms / 1000.0)
        if not finished:
            yield self._finish("", "cancelled", stats, t_start, None)
            return
        yield from self._decode(params, stats, cancel, t_start)

    def _decode(
        self,
        params: GenerationParams,
        stats: GenerationStats,
        cancel: threading.Event | None,
        t_start: float,
    ) -> Iterator[Event]:
        backend = self.backend
        stop = StopFilter(params.stop)
        sampler = backend.new_sampler(params.sampler)
        t_first: float | None = None
        reason: FinishReason = "length"
        started = False
        lps: list[TokenLogprob] | None = None if params.logprobs is None else []
        try:
            for _ in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                tok = sampler.sample()
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_ms = (t_first - t_start) * 1000.0
                if backend.is_eog(tok):
                    reason = "stop"
                    break
                if lps is not None and params.logprobs is not None:
                    lps.append(self._logprob(tok, params.logprobs))
                stats.completion_tokens += 1
                piece = backend.token_piece(tok)
                if not started:
                    # SentencePiece vocabularies spell the answer's first word with a word
                    # boundary ("▁A" → " A"); an answer does not start with a space.
                    piece = piece.lstrip(b" ")
                    started = bool(piece)
                out = stop.feed(piece)
                if out:
                    yield Event(out, logprobs=lps)
                    lps = None if lps is None else []
                if stop.stopped:
                    reason = "stop"
                    break
                if self._kv_pos + 1 > backend.n_ctx:
                    break  # check_fits makes this unreachable; kept as a guard
                self._kv_pos = backend.eval_tokens([tok], self._kv_pos)
                self._kv.append(tok)
        except GeneratorExit:
            sampler.close()
            raise
        except BaseException:
            sampler.close()
            self._forget()
            raise
        sampler.close()
        tail = stop.flush()
        last = self._finish(tail, reason, stats, t_start, t_first)
        last.logprobs = lps or None
        yield last

    def _logprob(self, tok: int, k: int) -> TokenLogprob:
        """The chosen token's log-probability and the ``k`` most likely alternatives, from
        the raw logits (before temperature and other samplers, as OpenAI reports them)."""
        logits = self.backend.last_logits().astype(np.float64)
        top = logits.max()
        logz = top + np.log(np.exp(logits - top).sum())

        def entry(t: int) -> TopLogprob:
            raw = self.backend.token_piece(t)
            return TopLogprob(token=raw.decode("utf-8", "replace"),
                              logprob=float(logits[t] - logz), bytes=list(raw))

        chosen = entry(tok)
        best = np.argpartition(-logits, k)[:k] if k else np.array([], dtype=np.int64)
        best = best[np.argsort(-logits[best])]
        return TokenLogprob(**chosen.model_dump(), top_logprobs=[entry(int(t)) for t in best])

    def _finish(
        self,
        text: str,
        reason: FinishReason,
        stats: GenerationStats,
        t_start: float,
        t_first: float | None,
    ) -> Event:
        end = time.perf_counter()
        stats.total_ms = (end - t_start) * 1000.0
        if t_first is not None:
            stats.decode_ms = (end - t_first) * 1000.0
            if stats.completion_tokens > 1 and stats.decode_ms > 0:
                stats.decode_tps = (stats.completion_tokens - 1) / (stats.decode_ms / 1000.0)
        stats.context_used = self._kv_pos
        stats.encode_ms_saved = 0.0
        stats.peak_rss_mb = peak_rss_mb()
        return Event(text, reason, stats)

    def _forget(self) -> None:
        """After a failure the KV cache content is unknown: start from scratch next time."""
        self._kv = []
        self._kv_pos = 0
        with contextlib.suppress(GenerationError):
            self.backend.kv_truncate(0)

    # -- debugging hooks (parity checks, tests) --------------------------------------

    def prompt_logits(self, text: str, images: Sequence[PromptImage]) -> npt.NDArray[np.float32]:
        """Logits at the last prompt position (evaluating through the prefix cache)."""
        with self.lock, self.tokenize(text, images) as chunks:
            self.check_fits(chunks, 0)
            stats = GenerationStats()
            try:
                self._eval_prompt(chunks, stats, None)
            except BaseException:
                self._forget()
                raise
            return self.backend.last_logits()

    def reset(self) -> None:
        """Forget the KV cache (the next request evaluates from scratch)."""
        with self.lock:
            self._forget()
