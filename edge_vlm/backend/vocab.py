"""The language model's metadata and vocabulary: one part of :class:`~edge_vlm.backend.Backend`."""

from __future__ import annotations

import ctypes
from typing import Any

from edge_vlm.backend._lib import llama_cpp


class Vocabulary:
    """GGUF metadata, special tokens and text <-> token conversion of a loaded model.

    A mixin of :class:`~edge_vlm.backend.model.Backend`, which loads the model and sets the
    attributes below.
    """

    _model: Any  # llama_model *
    _vocab: Any  # const llama_vocab *
    n_vocab: int

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

    def token_attr(self, token: int) -> int:
        """The token's attribute bits (``llama_cpp.LLAMA_TOKEN_ATTR_*``)."""
        return int(llama_cpp.llama_vocab_get_attr(self._vocab, token))

    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation (EOS, EOT, ``<|end|>``...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
