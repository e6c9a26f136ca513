"""The KV cache and evaluation: text tokens, image embeddings, logits. One part of
:class:`~edge_vlm.backend.Backend`."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_vlm.backend._lib import llama_cpp, mtmd
from edge_vlm.backend.tokenizer import PromptChunks
from edge_vlm.chunks import ImageChunk
from edge_vlm.errors import GenerationError


class Evaluation:
    """Evaluate a prompt into the KV cache and manage the cache (one sequence).

    A mixin of :class:`~edge_vlm.backend.model.Backend`, which creates the context and
    sets the attributes below.
    """

    _ctx: Any  # llama_context *
    _batch: Any  # llama_batch of n_batch tokens
    _mtmd: Any  # the vision context (a ctypes.c_void_p), or None
    n_batch: int
    n_vocab: int
    n_embd: int
    recurrent: bool
    n_swa: int

    # -- KV cache ------------------------------------------------------------------------

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

    # -- evaluation ----------------------------------------------------------------------

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
