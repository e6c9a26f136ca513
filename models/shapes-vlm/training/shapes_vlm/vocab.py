"""Vocabulary, special tokens and chat template of the shipped ``shapes-vlm`` model.

No torch here. Words are whole SentencePiece tokens (``"▁red"``); punctuation is a piece of
its own. Anything else falls back to characters and bytes, exactly as llama.cpp tokenizes it
(:meth:`edge_vlm.gguf.vocab.Vocab.tokenize` mirrors llama.cpp).
"""

from __future__ import annotations

import re
from functools import lru_cache

from edge_vlm.gguf.vocab import SPACE, Vocab, build_spm_vocab
from shapes_vlm import world

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

MEDIA_MARKER = "<__media__>"
"""llama.cpp's default media marker (``mtmd_default_marker()``)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message.role }}|>"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.text is defined %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The GGUF chat template: role token, the message's text parts, ``<|end|>``."""

PUNCTUATION = (".", ",", "?")


def _corpus() -> list[str]:
    texts: list[str] = []
    for ts in world.QUESTION_TEMPLATES.values():
        for t in ts:
            texts.extend(t.replace("{shape}", s) for s in world.SHAPES)
    texts.extend(world.SYSTEM_PROMPTS)
    words = {
        "a",
        "an",
        "and",
        "on",
        "at",
        "in",
        "the",
        "background",
        "There",
        "is",
        "no",
        "Yes",
        "No",
        *world.NUMBERS,
        "On",
        "At",
        "In",
        "A",
        "An",
        "gradient",
        "noisy",
    }
    words |= {c for c in world.COLORS} | {c.capitalize() for c in world.COLORS}
    words |= set(world.BACKGROUND_COLORS) | set(world.SHAPES)
    words |= {w for p in world.WHERE for w in p.split()} | {
        p.split()[0].capitalize() for p in world.WHERE
    }
    texts.extend(sorted(words))
    return texts


def word_list() -> list[str]:
    """The vocabulary's words as SentencePiece pieces (``"▁red"``), sorted."""
    words: set[str] = set()
    for text in _corpus():
        for w in re.findall(r"[A-Za-z]+", text):
            words.add(SPACE + w)
    return sorted(words)


@lru_cache(maxsize=1)
def shapes_vocab() -> Vocab:
    """The shipped model's vocabulary (built deterministically from :func:`word_list`)."""
    return build_spm_vocab(word_list(), list(SPECIAL_TOKENS), chars=PUNCTUATION, eot=END)


def render_messages(messages: list[dict], add_generation_prompt: bool) -> str:
    """Render messages like :data:`CHAT_TEMPLATE`, image parts becoming the media marker.

    This is what the runtime does (image parts → text parts holding the marker); it is
    reimplemented here without Jinja for speed in training.
    """
    out = []
    for m in messages:
        out.append(ROLE_TOKENS[m["role"]])
        c = m["content"]
        if isinstance(c, str):
            out.append(c)
        else:
            for part in c:
                out.append(MEDIA_MARKER if part["type"] == "image_url" else part["text"])
        out.append(END)
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


@lru_cache(maxsize=65536)
def _tok(text: str, add_bos: bool) -> tuple[int, ...]:
    return tuple(shapes_vocab().tokenize(text, add_bos=add_bos))


def prompt_chunks(prompt: str) -> list[tuple[str, list[int] | int]]:
    """Split a rendered prompt as libmtmd does: text chunks and image chunks.

    Image chunks carry ``-1`` for their token count (the caller knows it). BOS is added once,
    to the first text chunk (``add_special``), and every chunk is tokenized on its own.
    """
    parts = prompt.split(MEDIA_MARKER)
    chunks: list[tuple[str, list[int] | int]] = []
    for i, part in enumerate(parts):
        if i > 0:
            chunks.append(("image", -1))
        ids = list(_tok(part, i == 0))
        if ids:
            chunks.append(("text", ids))
    return chunks
