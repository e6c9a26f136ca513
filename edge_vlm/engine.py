"""The engine: one owner of a loaded model, turning requests into a stream of tokens.

It keeps what is in the KV cache between requests as a list of chunk identities (text
tokens; images by content identity, never by path), evaluates only the suffix that differs
from the previous request, and skips the vision encoder for images it has encoded before.
One request runs at a time (a lock); cancellation is a flag checked between chunks and
between tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from edge_vlm.cpuload import ThreadAdvisor
from edge_vlm.diskcache import DiskEmbeddingCache
from edge_vlm.embcache import EmbeddingCache
from edge_vlm.errors import ContextOverflowError, GenerationError
from edge_vlm.kvstate import KVItem, KVStateCache, common_prefix
from edge_vlm.prompt import PromptPiece, RenderedPrompt
from edge_vlm.schema import (
    FinishReason,
    GenerationStats,
    ImageStats,
    TokenLogprob,
    TopLogprob,
)
from edge_vlm.stops import StopFilter


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


REFIT_S = 0.5
"""How often a running request re-reads the machine's load (a few file reads)."""


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
        kv_state_bytes: Budget of saved KV states in host memory (0: off), so that a
            conversation the live cache no longer holds is restored, not re-evaluated.
        threads: Chooses the thread count from the machine's load, per request and again
            every :data:`REFIT_S` while it runs (None: the backend's count, fixed).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        mmproj_fingerprint: str,
        embedding_cache_bytes: int,
        prefix_reuse: bool = True,
        disk_cache: DiskEmbeddingCache | None = None,
        threads: ThreadAdvisor | None = None,
        kv_state_bytes: int = 0,
    ) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.cache = EmbeddingCache(embedding_cache_bytes)
        self.disk_cache = disk_cache
        self.prefix_reuse = prefix_reuse
        self._fingerprint = mmproj_fingerprint
        self._kv: list[KVItem] = []
        self._kv_pos = 0
        self._kv_cells = 0  # KV cells in use: one per token (positions can be fewer)
        self.threads = threads
        self._threads_fit_at = 0.0
        self.kv_states = KVStateCache(kv_state_bytes)

    # -- threads ---------------------------------------------------------------------

    def _fit_threads(self, *, start: bool = False) -> None:
        """Follow the machine's load: at the start of a request (reading the run queue
        too), then at most every :data:`REFIT_S` between chunks and tokens."""
        if self.threads is None:
            return
        now = time.monotonic()
        if not start and now - self._threads_fit_at < REFIT_S:
            return
        self._threads_fit_at = now
        self.backend.set_threads(
            self.threads.threads(probe=start, current=self.backend.threads))

    # -- prompt ----------------------------------------------------------------------

    def tokenize(
        self, text: str | RenderedPrompt, images: Sequence[PromptImage],
        max_image_tokens: int = 0,
    ) -> PromptChunks:
        """Tokenize a rendered prompt with its images (caller closes the result); message
        text in a :class:`~edge_vlm.prompt.RenderedPrompt` stays plain text.

        A template that prints ``bos_token`` for a model whose tokenizer adds BOS itself
        would give two BOS tokens: the printed one is dropped, as llama.cpp's own chat code
        does (``common/chat.cpp``). Gemma 3, Pixtral and LFM2-VL templates do this.
        """
        return self.backend.tokenize_prompt(self.prompt_text(text), [im.rgb for im in images],
                                            max_image_tokens)

    def prompt_text(self, text: str | RenderedPrompt) -> str | RenderedPrompt:
        """The rendered prompt as it is tokenized (a leading BOS text dropped when the
        tokenizer adds BOS itself)."""
        bos = self.backend.bos_text
        if not (bos and self.backend.adds_bos):
            return text
        if isinstance(text, str):
            return text[len(bos):] if text.startswith(bos) else text
        first = text.pieces[0] if text.pieces else None
        if first is None or first.kind != "template" or not first.text.startswith(bos):
            return text
        rest = PromptPiece("template", first.text[len(bos):])
        return dataclasses.replace(text, pieces=(rest, *text.pieces[1:]))

    @staticmethod
    def _items(chunks: PromptChunks) -> list[tuple[KVItem, int]]:
        """The prompt as KV items with the positions each occupies.

        Positions, not tokens: with M-RoPE (Qwen-VL) an image of ``n_tokens`` embeddings
        advances the position by only ``n_pos``; the next token goes at the new position.
        """
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
        if n and not self.backend.can_keep(pos):
            # Recurrent (LFM2) or sliding-window (Gemma 3) memory that cannot be rolled
            # back to this position: evaluate the whole prompt again.
            return 0, 0
        return n, pos

    @staticmethod
    def _prefix_cells(chunks: PromptChunks, n_items: int) -> int:
        """KV cells taken by the first ``n_items`` items of a prompt (an image: n_tokens)."""
        cells = 0
        for ch in chunks.items:
            if n_items <= 0:
                break
            if isinstance(ch, TextChunk):
                take = min(n_items, len(ch.tokens))
                cells += take
                n_items -= take
            else:
                cells += ch.n_tokens
                n_items -= 1
        return cells

    def check_fits(self, chunks: PromptChunks, max_tokens: int) -> None:
        """Raise ContextOverflowError before any evaluation when the request cannot fit.

        The KV cache holds one cell per token, text or image: an M-RoPE image that takes
        fewer positions than tokens still takes a cell per token, so capacity is counted in
        tokens (``n_tokens >= n_pos``). Counting positions let a Qwen-VL prompt through
        that llama.cpp then could not place (an abort inside libmtmd's helper).
        """
        n_ctx = self.backend.n_ctx
        need = chunks.n_tokens + max_tokens
        if need > n_ctx:
            n_img = sum(c.n_tokens for c in chunks.items if isinstance(c, ImageChunk))
            raise ContextOverflowError(
                f"the prompt needs {chunks.n_tokens} tokens ({n_img} of them for images) plus "
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
        self._swap_kv_state([item for item, _ in items])
        n_keep, pos = self._reusable_prefix(items)
        self.backend.kv_truncate(pos)
        self._kv = self._kv[:n_keep]
        self._kv_pos = pos
        self._kv_cells = self._prefix_cells(chunks, n_keep)
        stats.prompt_tokens_reused = self._kv_cells  # tokens, not positions (M-RoPE)
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
            self._fit_threads()
            if isinstance(ch, TextChunk):
                start = max(0, n_keep - idx)
                todo = ch.tokens[start:]
                if todo:
                    self._kv_pos = self.backend.eval_tokens(todo, self._kv_pos)
                    self._kv.extend(todo)
                    self._kv_cells += len(todo)
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
                self._kv_cells += ch.n_tokens
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

    def _swap_kv_state(self, items: list[KVItem]) -> None:
        """Before the live KV cache loses what the prompt does not share, save it; when a
        saved state shares more of the prompt, restore that one instead."""
        states = self.kv_states
        if not states.max_bytes or not self.prefix_reuse:
            return
        live = common_prefix(self._kv, items)
        if live < len(self._kv):
            with contextlib.suppress(GenerationError):  # not saved: only a later cost
                states.put(self._kv, self._kv_pos, self.backend.kv_state())
        found = states.best(items, at_least=live)
        if found is not None:
            state = found[0]
            try:
                self.backend.kv_restore(state.data)
            except GenerationError:
                self._kv, self._kv_pos = [], 0
                return
            self._kv, self._kv_pos = list(state.items), state.n_pos

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
        text: str | RenderedPrompt,
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
        text: str | RenderedPrompt,
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
        self._fit_threads(start=True)
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
                self._fit_threads()
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
                if self._kv_cells + 1 > backend.n_ctx:
                    break  # check_fits makes this unreachable; kept as a guard
                self._kv_pos = backend.eval_tokens([tok], self._kv_pos)
                self._kv.append(tok)
                self._kv_cells += 1
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
        stats.context_used = self._kv_cells
        stats.encode_ms_saved = 0.0
        stats.peak_rss_mb = peak_rss_mb()
        return Event(text, reason, stats)

    def _forget(self) -> None:
        """After a failure the KV cache content is unknown: start from scratch next time."""
        self._kv = []
        self._kv_pos = 0
        self._kv_cells = 0
        with contextlib.suppress(GenerationError):
            self.backend.kv_truncate(0)

    # -- debugging hooks (parity checks, tests) --------------------------------------

    def prompt_logits(
        self, text: str | RenderedPrompt, images: Sequence[PromptImage],
        max_image_tokens: int = 0,
    ) -> npt.NDArray[np.float32]:
        """Logits at the last prompt position (evaluating through the prefix cache), images
        prepared for an image-token budget as :meth:`generate` does."""
        with self.lock, self.tokenize(text, images, max_image_tokens) as chunks:
            self.check_fits(chunks, 0)
            stats = GenerationStats()
            try:
                self._eval_prompt(chunks, stats, None)
            except BaseException:
                self._forget()
                raise
            return self.backend.last_logits()

    def reset(self) -> None:
        """Forget the KV cache and the saved states (the next request evaluates from
        scratch)."""
        with self.lock:
            self._forget()
            self.kv_states.clear()
