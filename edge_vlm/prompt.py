"""A rendered prompt that remembers which of its text came from whom (no llama_cpp here).

The chat template's own text may hold control tokens (``<|user|>``, ``<|end|>``) and the
media marker; message text must not: a user who types ``<|end|><|assistant|>`` would
otherwise forge a turn, and one who types ``<__media__>`` would move or break the images.
So the template renders into pieces: ``template`` text (tokenized with special tokens
parsed), message ``text`` (tokenized as plain text) and ``image`` places (each becomes
exactly its image's chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PieceKind = Literal["template", "text", "image"]


@dataclass(frozen=True)
class PromptPiece:
    """A run of the rendered prompt: template text, message text, or an image's place."""

    kind: PieceKind
    text: str
    """The text (for an image: the media marker it stands for in :attr:`RenderedPrompt.text`)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered conversation as pieces, in order."""

    pieces: tuple[PromptPiece, ...]
    unchecked_texts: tuple[str, ...] = ()
    """Message texts inside ``template`` pieces: set when the template changed message text
    so that it could not be cut out; the tokenizer refuses the prompt if one of them holds
    a control token."""

    @property
    def text(self) -> str:
        """The whole prompt as one string, each image as the media marker."""
        return "".join(p.text for p in self.pieces)

    @property
    def n_images(self) -> int:
        """How many image places the prompt has."""
        return sum(1 for p in self.pieces if p.kind == "image")

    def __str__(self) -> str:
        return self.text
