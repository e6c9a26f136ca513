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
from edge_vlm.errors import GenerationError, ModelLoadError, RequestError  # noqa: E402
from edge_vlm.prompt import RenderedPrompt  # noqa: E402

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


def _input_text(text: str, *, parse_special: bool, add_special: bool) -> Any:
    raw = text.encode()
    inp = mtmd.mtmd_input_text()
    inp.text = raw
    inp.text_len = len(raw)
    inp.add_special = add_special
    inp.parse_special = parse_special
    return inp


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
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(self._model)
                              or llama_cpp.llama_model_is_hybrid(self._model))
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._model))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx if cfg.n_ctx else min(self.n_ctx_train, 8192)
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        self.threads = cfg.threads
        cparams.n_threads = cfg.threads
        cparams.n_threads_batch = cfg.threads
        cparams.flash_attn_type = _FLASH[cfg.flash_attn]
        cparams.no_perf = False
        # llama.cpp's tools keep only the window for sliding-window layers; its C default
        # (full size) would hold ~0.75 GB more for Gemma 3 4B at 8192 tokens.
        cparams.swa_full = cfg.swa_full
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
    def adds_bos(self) -> bool:
        """Whether tokenizing a prompt adds BOS (``tokenizer.ggml.add_bos_token``)."""
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos_text(self) -> str:
        """The BOS token's text (empty if the model has none)."""
        return self.token_text(self.bos)

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
        self, prompt: str | RenderedPrompt, images: Sequence[RGBImage],
        max_image_tokens: int = 0,
    ) -> PromptChunks:
        """Tokenize a prompt with its images (BOS added if the model wants one), images
        preprocessed for an image-token budget (0: full detail).

        A :class:`~edge_vlm.prompt.RenderedPrompt` keeps message text plain: special tokens
        are parsed only in the template's pieces, and each image place becomes exactly its
        image's chunks (see :meth:`prompt_parts`). A string is tokenized as a whole, special
        tokens parsed and each media marker standing for the next image (trusted text only).

        Raises:
            RequestError: a message text holds a control token and the template's output
                could not be cut apart (see ``RenderedPrompt.unchecked_texts``).
            GenerationError: the image places and image counts differ or libmtmd failed.
        """
        parts = None if isinstance(prompt, str) else self.prompt_parts(prompt)
        bitmaps = []
        native = None
        keep: list[Any] = []  # ctypes objects libmtmd reads during the call
        try:
            for img in images:
                buf = (ctypes.c_uint8 * len(img.data)).from_buffer_copy(img.data)
                bmp = mtmd.mtmd_bitmap_init(img.width, img.height, buf)
                if not bmp:
                    raise GenerationError(f"libmtmd refused an image of {img.width}x{img.height}")
                mtmd.mtmd_bitmap_set_id(bmp, img.identity.encode())
                bitmaps.append(bmp)
            native = mtmd.mtmd_input_chunks_init()
            mctx = self.mtmd_for(max_image_tokens)
            if parts is None:
                assert isinstance(prompt, str)
                inp = _input_text(prompt, parse_special=True, add_special=True)
                arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
                rc = mtmd.mtmd_tokenize(mctx, native, ctypes.byref(inp), arr, len(bitmaps))
            else:
                n_places = sum(1 for part in parts if part is None)
                if n_places != len(bitmaps):
                    raise GenerationError(
                        f"the prompt has {n_places} image places for {len(bitmaps)} images; "
                        "the chat template may have dropped or repeated an image")
                pointers = []
                images_left = iter(bitmaps)
                for part in parts:
                    item = mtmd.mtmd_input_part()
                    if part is None:
                        item.bitmap = next(images_left)
                    else:
                        text = _input_text(part[0], parse_special=part[1], add_special=False)
                        keep.append(text)
                        item.text = ctypes.pointer(text)
                    keep.append(item)
                    pointers.append(ctypes.pointer(item))
                arr_parts = (ctypes.POINTER(mtmd.mtmd_input_part) * max(1, len(pointers)))(
                    *pointers)
                rc = mtmd.mtmd_tokenize_from_parts(mctx, native, arr_parts, len(pointers), True)
            if rc == 1:
                raise GenerationError(
                    f"the prompt has a different number of image markers than images "
                    f"({len(bitmaps)} images); the chat template may have dropped an image"
                )
            if rc != 0:
                raise GenerationError(f"libmtmd could not tokenize the prompt (error {rc})")
            items = self._read_chunks(native)
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

    def _read_chunks(self, native: Any) -> list[Chunk]:
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
        return items

    def _special_attr(self, token: int) -> int:
        """The token's attributes if the tokenizer treats it as a control token, else 0."""
        attr = int(llama_cpp.llama_vocab_get_attr(self._vocab, token))
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        return attr if attr & special else 0

    def prompt_parts(self, prompt: RenderedPrompt) -> list[tuple[str, bool] | None]:
        """The libmtmd input parts of a rendered prompt: ``(text, parse_special)`` or None
        for an image.

        The parts reproduce how llama.cpp tokenizes a whole prompt: it cuts the text at
        control tokens and tokenizes each run of text between them separately. Here only
        the template's pieces are searched for control tokens; a run of plain text joins
        template text and message text as the whole-prompt tokenizer would, so an ordinary
        prompt gives the same tokens as before, and message text never yields a control
        token or an image.

        Raises:
            RequestError: an unchecked message text holds a control token.
        """
        for i, text in enumerate(prompt.unchecked_texts):
            self._refuse_control_tokens(text, i)
        lstrip = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
        rstrip = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
        spaces = " \t\n\v\f\r"
        out: list[tuple[str, bool] | None] = []
        strip_next = False

        def add_plain(text: str) -> None:
            nonlocal strip_next
            if strip_next:
                text = text.lstrip(spaces)
                strip_next = not text
            last = out[-1] if out else None
            if last is not None and not last[1]:
                out[-1] = (last[0] + text, False)
            elif text:
                out.append((text, False))

        for piece in prompt.pieces:
            if piece.kind == "image":
                out.append(None)
                strip_next = False
                continue
            if piece.kind == "text":
                add_plain(piece.text)
                continue
            cursor = 0
            for token in self.tokenize_text(piece.text, add_special=False, parse_special=True):
                attr = self._special_attr(token)
                if not attr:
                    continue
                shown = self.token_piece(token, special=True).decode("utf-8", "replace")
                at = piece.text.find(shown, cursor)
                if at < 0:  # a piece that does not spell the token: keep the text whole
                    continue
                add_plain(piece.text[cursor:at])
                last = out[-1] if out else None
                if attr & lstrip and last is not None and not last[1]:
                    kept = last[0].rstrip(spaces)
                    if kept:
                        out[-1] = (kept, False)
                    else:
                        out.pop()
                out.append((shown, True))
                strip_next = bool(attr & rstrip)
                cursor = at + len(shown)
            add_plain(piece.text[cursor:])
        return out

    def _refuse_control_tokens(self, text: str, index: int) -> None:
        for token in self.tokenize_text(text, add_special=False, parse_special=True):
            if self._special_attr(token):
                shown = self.token_piece(token, special=True).decode("utf-8", "replace")
                raise RequestError(
                    f"messages: a message text holds the model's control token {shown!r}, and "
                    "this model's chat template rewrites message text, so the token cannot be "
                    "kept as plain text; remove it", param=f"messages (text {index})")

    # -- KV cache and evaluation --------------------------------------------------------

    def kv_truncate(self, n_pos: int) -> None:
        """Forget every KV position at or after ``n_pos`` (0 clears the cache)."""
        mem = llama_cpp.llama_get_memory(self._ctx)
        if n_pos <= 0:
            llama_cpp.llama_memory_clear(mem, True)
        elif not llama_cpp.llama_memory_seq_rm(mem, 0, n_pos, -1):
            llama_cpp.llama_memory_clear(mem, True)
            raise GenerationError("llama.cpp could not trim the KV cache; it was cleared")

    def can_keep(self, n_pos: int) -> bool:
        """Whether the KV cache can be cut back to ``n_pos`` and evaluation resumed there.

        A recurrent or hybrid model (LFM2) keeps one state per sequence: it can only be
        extended, never rolled back. A sliding-window cache (Gemma 3) drops positions that
        fell out of the window: resuming at ``n_pos`` needs ``n_pos - n_swa`` onwards.
        """
        mem = llama_cpp.llama_get_memory(self._ctx)
        pos_max = int(llama_cpp.llama_memory_seq_pos_max(mem, 0))
        if pos_max < 0:
            return n_pos <= 0
        if self.recurrent:
            return n_pos > pos_max
        if self.n_swa:
            pos_min = int(llama_cpp.llama_memory_seq_pos_min(mem, 0))
            return pos_min <= max(0, n_pos - self.n_swa)
        return True

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


#: numpy's view of ``llama_token_data`` (id, logit, p).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Sampler:
    """llama.cpp's sampler chain: logit bias, penalties, grammar, then greedy or
    top-k/p/min-p + temperature + a seeded draw.

    Raises:
        RequestError: a logit-bias token id outside the vocabulary, or a grammar llama.cpp
            refuses.
    """

    #: Tokens the repetition penalties look back over (llama.cpp's common default).
    PENALTY_LAST_N = 64

    def __init__(self, backend: Backend, p: SamplerParams) -> None:
        self._backend = backend
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain
        add = llama_cpp.llama_sampler_chain_add
        n_vocab = backend.n_vocab
        if p.logit_bias:
            check_logit_bias(p.logit_bias, n_vocab)
            arr = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias):
                arr[i] = llama_cpp.llama_logit_bias(token, bias)
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                n_vocab, self.PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty,
                p.presence_penalty))
        self._grammar: Any = None
        if p.grammar is not None:
            # Kept out of the chain: a grammar that allows no token would make the chain
            # pick a forbidden one, and llama.cpp aborts the process on accepting it.
            g = llama_cpp.llama_sampler_init_grammar(backend._vocab, p.grammar.encode(), b"root")
            if not g:
                self.close()
                raise RequestError(
                    "response_format: llama.cpp refused the grammar made from the JSON schema "
                    "(too many repetitions or rules); simplify the schema",
                    param="response_format")
            self._grammar = g
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
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
        """Sample the next token from the last logits (and accept it into the chain).

        Raises:
            RequestError: the response_format grammar allows no token at this point.
        """
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, self._backend._ctx, -1))
        backend = self._backend
        cand = self._cand
        ptr = llama_cpp.llama_get_logits_ith(backend._ctx, -1)
        cand["id"] = self._ids  # the chain sorts the array in place: lay it out anew
        cand["logit"] = np.ctypeslib.as_array(ptr, shape=(backend.n_vocab,))
        cand["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(cand),
            selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        if not np.isfinite(cand["logit"][:arr.size]).any():
            raise RequestError(
                "response_format: the JSON schema allows no text this model can write at this "
                "point of the answer (an empty character range or an impossible pattern?)",
                param="response_format")
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise GenerationError("llama.cpp's sampler chain selected no token")
        token = int(cand["id"][arr.selected])
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if getattr(self, "_grammar", None) is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def check_logit_bias(bias: Sequence[tuple[int, float]], n_vocab: int) -> None:
    """Raise RequestError for a ``logit_bias`` token id the vocabulary does not have."""
    for token, _ in bias:
        if not 0 <= token < n_vocab:
            raise RequestError(
                f"logit_bias.{token}: no such token; this model's token ids run from 0 to "
                f"{n_vocab - 1}", param=f"logit_bias.{token}")


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


def json_schema_grammar(schema: dict[str, Any],
                        field: str = "response_format.json_schema.schema") -> str:
    """A GBNF grammar for a JSON schema (llama-cpp-python's converter), checked so that
    llama.cpp can take it without crashing (see :mod:`edge_vlm.grammar`).

    Args:
        schema: The JSON schema.
        field: Where it is in the request (named in errors).

    Raises:
        RequestError: the schema is unsupported or beyond the bounds, naming its part;
            :class:`~edge_vlm.errors.RequestTooLargeError` for size limits.
    """
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from edge_vlm.grammar import check_grammar, check_schema

    check_schema(schema, field)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError:
        raise RequestError(f"{field}: the schema refers to itself too deeply", param=field) \
            from None
    except Exception as err:  # the converter raises ValueError, AssertionError, KeyError...
        raise RequestError(f"{field}: the runtime cannot turn this JSON schema into a "
                           f"grammar: {err}", param=field) from None
    check_grammar(grammar, field)
    _init_once(_verbose)
    # Parse it once here, before any model work (no vocabulary is needed to parse).
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        raise RequestError(
            f"{field}: llama.cpp refused the grammar made from this schema (too many "
            "repetitions or rules, or a rule that refers to itself first); simplify it",
            param=field)
    llama_cpp.llama_sampler_free(sampler)
    return grammar


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
