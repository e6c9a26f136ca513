"""Loading a model pair: the language model, its context and its vision (libmtmd) context.

:class:`Backend` is what everything above :mod:`edge_vlm.backend` talks to. It uses
llama.cpp's low-level C API through llama-cpp-python's ctypes bindings rather than
``Llama`` + ``MTMDChatHandler``: that handler clears the KV cache and re-encodes every image
on every call, and the engine needs to control the KV cache itself. Its vocabulary and its
evaluation methods are mixins beside it (:mod:`~edge_vlm.backend.vocab`,
:mod:`~edge_vlm.backend.kv`).

A Backend is not thread-safe; the engine serialises access to it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from edge_vlm.backend._lib import init_once, llama_cpp, mtmd
from edge_vlm.backend.kv import Evaluation
from edge_vlm.backend.sampler import Sampler
from edge_vlm.backend.tokenizer import Part, PromptChunks, prompt_parts, tokenize
from edge_vlm.backend.vocab import Vocabulary
from edge_vlm.chunks import BackendConfig, RGBImage, SamplerParams
from edge_vlm.errors import ModelLoadError
from edge_vlm.prompt import RenderedPrompt

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


class Backend(Vocabulary, Evaluation):
    """A loaded language model, its context and its mtmd (vision) context.

    Raises:
        ModelLoadError: when llama.cpp cannot load either file.
    """

    def __init__(self, cfg: BackendConfig) -> None:
        init_once(cfg.verbose)
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

    # -- prompts -------------------------------------------------------------------------

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
        source = prompt if isinstance(prompt, str) else self.prompt_parts(prompt)
        side = self.cfg.one_tile_side
        square = ({im.identity for im in images if im.width == im.height == side}
                  if side and max_image_tokens else set())
        return tokenize(source, images, lambda: self.mtmd_for(max_image_tokens), square)

    def prompt_parts(self, prompt: RenderedPrompt) -> list[Part]:
        """The libmtmd input parts of a rendered prompt: ``(text, parse_special)`` or None
        for an image (see :func:`edge_vlm.backend.tokenizer.prompt_parts`).

        Raises:
            RequestError: an unchecked message text holds a control token.
        """
        return prompt_parts(self, prompt)

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
