"""The one module that imports ``llama_cpp``: thin, typed wrappers over llama.cpp and libmtmd.

Everything above this module (engine, API, CLI, TUI, server) talks to :class:`Backend`.
It uses llama.cpp's low-level C API through llama-cpp-python's ctypes bindings rather than
``Llama`` + ``MTMDChatHandler``: that handler clears the KV cache and re-encodes every image
on every call, and the engine needs to control the KV cache itself.

A Backend is not thread-safe; the engine serialises access to it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# llama.cpp's CPU threads meet at a barrier after every graph node (~1,300 per token). This
# build runs them with OpenMP, whose runtime (libgomp) spins ~300,000 times (milliseconds)
# before a waiting thread sleeps: on a busy machine, a thread whose partner was descheduled
# burns its core waiting for it, and between tokens the workers spin while Python samples.
# A bounded spin still catches the microsecond waits of an idle machine, then yields the
# core; sleeping at once (OMP_WAIT_POLICY=passive) made idle decoding ~3x slower on a
# 2-vCPU VM (42-47 against 138-142 tokens/s, two threads), every barrier then waiting for
# a wake-up. Under load the thread count does most (see cpuload.py). libgomp reads this
# once, when it loads: before `import llama_cpp`, and only when the user has chosen nothing
# (OMP_WAIT_POLICY or GOMP_SPINCOUNT set: theirs wins).
OMP_SPINCOUNT = "20000"
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = OMP_SPINCOUNT

import llama_cpp  # noqa: E402
import llama_cpp.mtmd_cpp as mtmd  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from edge_vlm.chunks import (  # noqa: E402
    BackendConfig,
    Chunk,
    ImageChunk,
    RGBImage,
    SamplerParams,
    TextChunk,
    next_tile,
    share_copied_slice,
)
from edge_vlm.errors import GenerationError, ModelLoadError  # noqa: E402

__all__ = [
    "Backend",
    "BackendConfig",
    "ImageChunk",
    "PromptChunks",
    "RGBImage",
    "Sampler",
    "SamplerParams",
    "TextChunk",
]

# ---------------------------------------------------------------------------------------
# Logging: quiet unless verbose. The callbacks must stay referenced for the process life.


_verbose = False
_log_lock = threading.Lock()


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if _verbose and text:
        os.write(2, text)


_backend_ready = False


def _init_once(verbose: bool) -> None:
    global _verbose, _backend_ready
    with _log_lock:
        _verbose = verbose
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            mtmd.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


# ---------------------------------------------------------------------------------------


class PromptChunks:
    """A tokenized prompt; owns libmtmd's native chunk list (call :meth:`close`)."""

    def __init__(self, native: Any, items: list[Chunk], mtmd_ctx: Any) -> None:
        self._native = native
        self.items = items
        self.mtmd_ctx = mtmd_ctx

    @property
    def n_tokens(self) -> int:
        """Prompt tokens, text and image."""
        return sum(len(c.tokens) if isinstance(c, TextChunk) else c.n_tokens for c in self.items)

    @property
    def n_pos(self) -> int:
        """KV positions the prompt occupies."""
        return sum(len(c.tokens) if isinstance(c, TextChunk) else c.n_pos for c in self.items)

    def native_chunk(self, chunk: ImageChunk) -> Any:
        return mtmd.mtmd_input_chunks_get(self._native, chunk.index)

    def close(self) -> None:
        if self._native is not None:
            mtmd.mtmd_input_chunks_free(self._native)
            self._native = None

    def __enter__(self) -> PromptChunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FLASH = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


# libmtmd takes the vision encoder's thread count only when a context is made
# (``mtmd_context_params.n_threads``) and has no setter. The context is made with this
# improbable count, the one int field holding it is found in the struct's head, and the
# real count written there (before any encoding: only encoding reads it). Where the value
# is not found exactly once (another libmtmd layout), the context is made again with a
# fixed count and the vision encoder keeps it.
_THREADS_SENTINEL = 0x5EED1
_STRUCT_HEAD = 256  # bytes searched; mtmd_context is larger (strings, vectors, tokens)


def _find_int(ptr: int, value: int) -> int | None:
    """The only 4-aligned offset in the first bytes at ``ptr`` holding ``value``, or None."""
    head = (ctypes.c_int * (_STRUCT_HEAD // 4)).from_address(ptr)
    hits = [i * 4 for i, v in enumerate(head) if v == value]
    return hits[0] if len(hits) == 1 and hits[0] > 0 else None


class Backend:
    """A loaded language model, its context and its mtmd (vision) context.

    Raises:
        ModelLoadError: when llama.cpp cannot load either file.
    """

    def __init__(self, cfg: BackendConfig) -> None:
        _init_once(cfg.verbose)
        self.cfg = cfg
        self._model: Any = None
        self._ctx: Any = None
        self._mtmd: Any = None
        self._batch: Any = None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- loading -------------------------------------------------------------------------

    def _load(self) -> None:
        cfg = self.cfg
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = cfg.n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(
            str(cfg.model_path).encode(), mparams
        )
        if not self._model:
            self._model = None
            raise ModelLoadError(
                f"llama.cpp could not load the model '{cfg.model_path}' "
                "(run with --verbose to see llama.cpp's log)"
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx if cfg.n_ctx else min(self.n_ctx_train, 8192)
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        self.threads = cfg.threads
        cparams.n_threads = cfg.threads
        cparams.n_threads_batch = cfg.threads
        cparams.flash_attn_type = _FLASH[cfg.flash_attn]
        cparams.no_perf = False
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._ctx = None
            raise ModelLoadError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens for "
                f"'{cfg.model_path}': lower runtime.n_ctx"
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = cfg.n_batch
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

        self._mtmd_key: tuple[int, int] | None = None
        self.mtmd_rebuilds = 0
        self._mtmd_threads_at: int | None = 0  # offset of n_threads (0: not looked for yet)
        self.mtmd_for(cfg.image_max_tokens)
        if not mtmd.mtmd_support_vision(self._mtmd):
            raise ModelLoadError(f"mmproj '{cfg.mmproj_path}' has no vision encoder")
        self.marker = mtmd.mtmd_default_marker().decode()

    def _new_mtmd(self, max_image_tokens: int, min_image_tokens: int) -> Any:
        cfg = self.cfg
        mp = mtmd.mtmd_context_params_default()
        mp.use_gpu = cfg.mmproj_use_gpu
        mp.print_timings = False
        probe = self._mtmd_threads_at is not None
        mp.n_threads = _THREADS_SENTINEL if probe else self.threads
        mp.flash_attn_type = _FLASH[cfg.flash_attn]
        mp.warmup = False  # must stay off: a warm-up would encode with the sentinel count
        if min_image_tokens:
            mp.image_min_tokens = min_image_tokens
        if max_image_tokens:
            mp.image_max_tokens = max_image_tokens
        ctx = mtmd.mtmd_init_from_file(str(cfg.mmproj_path).encode(), self._model, mp)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not load the mmproj '{cfg.mmproj_path}' for model "
                f"'{cfg.model_path}' (run with --verbose to see llama.cpp's log)"
            )
        if probe:
            self._mtmd_threads_at = _find_int(ctx, _THREADS_SENTINEL)
            if self._mtmd_threads_at is None:  # a layout we do not know: fixed threads
                mtmd.mtmd_free(ctx)
                return self._new_mtmd(max_image_tokens, min_image_tokens)
            ctypes.c_int.from_address(ctx + self._mtmd_threads_at).value = self.threads
        return ctx

    def set_threads(self, n: int) -> None:
        """Use ``n`` CPU threads from the next llama.cpp call on (language model, and the
        vision encoder where this libmtmd's layout allows it)."""
        if n == self.threads or n < 1:
            return
        llama_cpp.llama_set_n_threads(self._ctx, n, n)
        self.threads = n
        if self._mtmd is not None and self._mtmd_threads_at:
            addr = int(self._mtmd.value or 0)
            ctypes.c_int.from_address(addr + self._mtmd_threads_at).value = n

    @property
    def n_threads(self) -> tuple[int, int]:
        """Threads llama.cpp and the vision encoder will use, as they hold them now."""
        vision = self.threads
        if self._mtmd is not None and self._mtmd_threads_at:
            addr = int(self._mtmd.value or 0)
            vision = ctypes.c_int.from_address(addr + self._mtmd_threads_at).value
        return int(llama_cpp.llama_n_threads(self._ctx)), int(vision)

    @property
    def vision_threads_adjustable(self) -> bool:
        """Whether :meth:`set_threads` reaches the vision encoder too."""
        return bool(self._mtmd_threads_at)

    def mtmd_for(self, max_image_tokens: int, min_image_tokens: int = 0) -> Any:
        """The vision context for an image-token budget (0: the model's full tiling).

        A tiling projector's preprocessing is fixed per mtmd context, and every context
        holds its own copy of the mmproj weights. So the backend keeps exactly one, keyed
        by all of its parameters, and rebuilds it when a request needs other ones: the old
        context is freed *before* the new one loads, so the process never holds two copies
        (peak memory as llama-mtmd-cli's), at the price of re-reading the mmproj file on a
        switch of detail level (from the page cache: a fraction of one encoder pass).
        """
        key = (max_image_tokens, min_image_tokens or self.cfg.image_min_tokens)
        if self._mtmd is not None and self._mtmd_key == key:
            return self._mtmd
        self._free_mtmd()
        # A new Python object per context: prompts tokenized for an earlier one are told
        # apart by identity even when malloc hands back the same address.
        self._mtmd = ctypes.c_void_p(self._new_mtmd(*key))
        self._mtmd_key = key
        self.mtmd_rebuilds += 1
        return self._mtmd

    @property
    def vision_contexts(self) -> int:
        """libmtmd contexts alive, each holding a copy of the mmproj weights (at most 1)."""
        return 0 if self._mtmd is None else 1

    def _free_mtmd(self) -> None:
        if self._mtmd is not None:
            mtmd.mtmd_free(self._mtmd)
        self._mtmd = None
        self._mtmd_key = None

    # -- metadata ------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the language model, as text."""
        size = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        """The model's ``tokenizer.chat_template``, or None."""
        ptr = llama_cpp.llama_model_chat_template(self._model, None)
        return ptr.decode("utf-8", errors="replace") if ptr else None

    def token_text(self, token: int) -> str:
        """A special token's text (for ``bos_token`` / ``eos_token`` in templates)."""
        if token < 0:
            return ""
        return self.token_piece(token, special=True).decode("utf-8", errors="replace")

    @property
    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._vocab))

    @property
    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    @property
    def model_size(self) -> int:
        """Bytes of the language model's weights."""
        return int(llama_cpp.llama_model_size(self._model))

    # -- tokens --------------------------------------------------------------------------

    def tokenize_text(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Tokenize plain text with the model's vocabulary."""
        raw = text.encode()
        cap = len(raw) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special,
                                     parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special,
                                         parse_special)
        return list(buf[:n])

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation (EOS, EOT, ``<|end|>``...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def tokenize_prompt(
        self, text: str, images: Sequence[RGBImage], max_image_tokens: int = 0
    ) -> PromptChunks:
        """Tokenize a rendered prompt holding one marker per image (BOS added if the model
        wants one), images preprocessed for an image-token budget (0: full detail).

        Raises:
            GenerationError: the marker and image counts differ or libmtmd failed.
        """
        bitmaps = []
        native = None
        try:
            for img in images:
                buf = (ctypes.c_uint8 * len(img.data)).from_buffer_copy(img.data)
                bmp = mtmd.mtmd_bitmap_init(img.width, img.height, buf)
                if not bmp:
                    raise GenerationError(f"libmtmd refused an image of {img.width}x{img.height}")
                mtmd.mtmd_bitmap_set_id(bmp, img.identity.encode())
                bitmaps.append(bmp)
            native = mtmd.mtmd_input_chunks_init()
            raw = text.encode()
            inp = mtmd.mtmd_input_text()
            inp.text = raw
            inp.text_len = len(raw)
            inp.add_special = True
            inp.parse_special = True
            arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            mctx = self.mtmd_for(max_image_tokens)
            rc = mtmd.mtmd_tokenize(mctx, native, ctypes.byref(inp), arr, len(bitmaps))
            if rc == 1:
                raise GenerationError(
                    f"the prompt has a different number of image markers than images "
                    f"({len(bitmaps)} images); the chat template may have dropped an image"
                )
            if rc != 0:
                raise GenerationError(f"libmtmd could not tokenize the prompt (error {rc})")
            items: list[Chunk] = []
            for i in range(mtmd.mtmd_input_chunks_size(native)):
                ch = mtmd.mtmd_input_chunks_get(native, i)
                kind = mtmd.mtmd_input_chunk_get_type(ch)
                if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                    items.append(TextChunk(tuple(ptr[j] for j in range(n.value))))
                elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    it = mtmd.mtmd_input_chunk_get_tokens_image(ch)
                    cid = mtmd.mtmd_input_chunk_get_id(ch)
                    # Tiling projectors give every tile of an image the image's id: number
                    # them, so each tile has its own cache identity.
                    base = cid.decode() if cid else ""
                    tile = next_tile(items, base)
                    items.append(ImageChunk(
                        index=i,
                        identity=f"{base}#{tile}",
                        image=base,
                        tile=tile,
                        n_tokens=int(mtmd.mtmd_input_chunk_get_n_tokens(ch)),
                        n_pos=int(mtmd.mtmd_input_chunk_get_n_pos(ch)),
                        nx=int(mtmd.mtmd_image_tokens_get_nx(it)),
                        ny=int(mtmd.mtmd_image_tokens_get_ny(it)),
                    ))
                else:
                    raise GenerationError("audio input is not supported")
            side = self.cfg.one_tile_side
            if side and max_image_tokens:
                square = {im.identity for im in images if im.width == im.height == side}
                items = share_copied_slice(items, square)
            chunks = PromptChunks(native, items, mctx)
            native = None
            return chunks
        finally:
            if native is not None:
                mtmd.mtmd_input_chunks_free(native)
            for bmp in bitmaps:
                mtmd.mtmd_bitmap_free(bmp)

    # -- KV cache and evaluation --------------------------------------------------------

    def kv_truncate(self, n_pos: int) -> None:
        """Forget every KV position at or after ``n_pos`` (0 clears the cache)."""
        mem = llama_cpp.llama_get_memory(self._ctx)
        if n_pos <= 0:
            llama_cpp.llama_memory_clear(mem, True)
        elif not llama_cpp.llama_memory_seq_rm(mem, 0, n_pos, -1):
            llama_cpp.llama_memory_clear(mem, True)
            raise GenerationError("llama.cpp could not trim the KV cache; it was cleared")

    def kv_state(self) -> bytearray:
        """A copy of the KV cache's sequence state (for :meth:`kv_restore`).

        Raises:
            GenerationError: llama.cpp could not serialise it.
        """
        llama_cpp.llama_synchronize(self._ctx)
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, 0))
        data = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(data)
        n = int(llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, 0))
        del buf  # release the export of ``data`` before resizing it
        if n == 0 and size:
            raise GenerationError("llama.cpp could not save the KV cache state")
        del data[n:]
        return data

    def kv_restore(self, data: bytearray) -> None:
        """Replace the KV cache with a state from :meth:`kv_state`.

        Raises:
            GenerationError: llama.cpp refused it (the KV cache is then empty).
        """
        self.kv_truncate(0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if not llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), 0):
            self.kv_truncate(0)
            raise GenerationError("llama.cpp could not restore a saved KV cache state; "
                                  "the prompt is evaluated from scratch")

    def eval_tokens(self, tokens: Sequence[int], n_past: int) -> int:
        """Evaluate text tokens at ``n_past``; logits are kept for the last one.

        Returns:
            The new ``n_past``.
        """
        b = self._batch
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = start + i == len(tokens) - 1
            rc = llama_cpp.llama_decode(self._ctx, b)
            if rc != 0:
                raise GenerationError(f"llama.cpp failed to evaluate the prompt (decode {rc})")
            n_past += len(part)
        return n_past

    def encode_image(self, chunks: PromptChunks, chunk: ImageChunk) -> npt.NDArray[np.float32]:
        """Run the vision encoder on an image chunk; returns ``[n_tokens, n_embd]`` floats."""
        if chunks.mtmd_ctx is not self._mtmd:
            raise GenerationError("the prompt was tokenized for a vision context that has "
                                  "since been replaced: tokenize it again")
        native = chunks.native_chunk(chunk)
        rc = mtmd.mtmd_encode_chunk(chunks.mtmd_ctx, native)
        if rc != 0:
            raise GenerationError(f"the vision encoder failed on an image (error {rc})")
        ptr = mtmd.mtmd_get_output_embd(chunks.mtmd_ctx)
        n = chunk.n_tokens * self.n_embd
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n,))
        return arr.copy().reshape(chunk.n_tokens, self.n_embd)

    def decode_image(
        self, chunks: PromptChunks, chunk: ImageChunk, embd: npt.NDArray[np.float32], n_past: int
    ) -> int:
        """Evaluate an image's (possibly cached) embeddings in the language model."""
        native = chunks.native_chunk(chunk)
        flat = np.ascontiguousarray(embd, dtype=np.float32).reshape(-1)
        ptr = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        new_n_past = llama_cpp.llama_pos(n_past)  # the helper *sets* it for images
        rc = mtmd.mtmd_helper_decode_image_chunk(
            chunks.mtmd_ctx, self._ctx, native, ptr, n_past, 0, self.n_batch,
            ctypes.byref(new_n_past), mtmd.mtmd_helper_post_decode_callback(), None,
        )
        if rc != 0:
            raise GenerationError(f"llama.cpp failed to evaluate image embeddings (error {rc})")
        return int(new_n_past.value)

    def last_logits(self) -> npt.NDArray[np.float32]:
        """A copy of the logits of the last evaluated position."""
        llama_cpp.llama_synchronize(self._ctx)
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- sampling ------------------------------------------------------------------------

    def new_sampler(self, p: SamplerParams) -> Sampler:
        """A sampler chain for one generation (call ``close``)."""
        return Sampler(self, p)

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the mtmd context, the llama context and the model (idempotent)."""
        self._free_mtmd()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()


class Sampler:
    """llama.cpp's sampler chain: penalties, grammar, then greedy or top-k/p/min-p + temp."""

    def __init__(self, backend: Backend, p: SamplerParams) -> None:
        self._backend = backend
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain
        add = llama_cpp.llama_sampler_chain_add
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
        if p.grammar is not None:
            g = llama_cpp.llama_sampler_init_grammar(backend._vocab, p.grammar.encode(), b"root")
            if not g:
                self.close()
                raise GenerationError("llama.cpp could not compile the response_format grammar")
            add(chain, g)
        if p.temperature <= 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            add(chain, llama_cpp.llama_sampler_init_dist(seed))

    def sample(self) -> int:
        """Sample the next token from the last logits (and accept it into the chain)."""
        return int(llama_cpp.llama_sampler_sample(self._chain, self._backend._ctx, -1))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


# ---------------------------------------------------------------------------------------
# Process-wide facts and tools


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload to a GPU (Metal, CUDA, Vulkan...)."""
    _init_once(_verbose)
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> dict[str, str]:
    """llama.cpp's build and CPU feature string, and the llama-cpp-python version."""
    _init_once(_verbose)
    return {
        "llama_cpp_python": str(llama_cpp.__version__),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "gpu_offload": str(bool(llama_cpp.llama_supports_gpu_offload())),
        "mmap": str(bool(llama_cpp.llama_supports_mmap())),
    }


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A GBNF grammar for a JSON schema (llama-cpp-python's converter)."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as err:
        raise GenerationError(f"cannot turn response_format's JSON schema into a grammar: {err}") \
            from None


QUANT_TYPES = {
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def quantize_model(src: Path | str, dst: Path | str, qtype: str, threads: int = 0) -> None:
    """Quantize a language-model GGUF with llama.cpp (``Q8_0``, ``Q4_K_M``, ...).

    Writes to a temporary file and renames it, so ``dst`` is never half written.
    """
    _init_once(_verbose)
    if qtype not in QUANT_TYPES:
        raise ModelLoadError(f"unknown quantization '{qtype}'; choose one of {sorted(QUANT_TYPES)}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"llama.cpp could not quantize '{src}' to {qtype} (error {rc})")
    os.replace(tmp, dst)
