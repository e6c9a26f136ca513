"""Prompt tokenization through libmtmd: text and images into chunks, message text kept
apart from the template's control tokens."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from edge_vlm.backend._lib import llama_cpp, mtmd
from edge_vlm.backend.vocab import Vocabulary
from edge_vlm.chunks import (
    Chunk,
    ImageChunk,
    RGBImage,
    TextChunk,
    next_tile,
    share_copied_slice,
)
from edge_vlm.errors import GenerationError, RequestError
from edge_vlm.prompt import RenderedPrompt

#: A libmtmd input part: ``(text, parse_special)``, or None for an image.
Part: TypeAlias = tuple[str, bool] | None


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


def _input_text(text: str, *, parse_special: bool, add_special: bool) -> Any:
    raw = text.encode()
    inp = mtmd.mtmd_input_text()
    inp.text = raw
    inp.text_len = len(raw)
    inp.add_special = add_special
    inp.parse_special = parse_special
    return inp


def tokenize(
    source: str | list[Part], images: Sequence[RGBImage], vision: Callable[[], Any],
    one_tile_images: set[str],
) -> PromptChunks:
    """Tokenize a prompt with its images.

    Args:
        source: A whole prompt (special tokens parsed, BOS added, each media marker
            standing for the next image), or its parts from :func:`prompt_parts`.
        images: The images, in prompt order.
        vision: Gives the libmtmd context to tokenize with; asked for once the images are
            accepted (getting it may rebuild it for another image-token budget).
        one_tile_images: Identities of the images whose only slice copies the overview
            (see :func:`edge_vlm.chunks.share_copied_slice`); empty for none.

    Raises:
        GenerationError: the image places and image counts differ or libmtmd failed.
    """
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
        mctx = vision()
        if isinstance(source, str):
            inp = _input_text(source, parse_special=True, add_special=True)
            arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd.mtmd_tokenize(mctx, native, ctypes.byref(inp), arr, len(bitmaps))
        else:
            n_places = sum(1 for part in source if part is None)
            if n_places != len(bitmaps):
                raise GenerationError(
                    f"the prompt has {n_places} image places for {len(bitmaps)} images; "
                    "the chat template may have dropped or repeated an image")
            pointers = []
            images_left = iter(bitmaps)
            for part in source:
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
        items = _read_chunks(native)
        if one_tile_images:
            items = share_copied_slice(items, one_tile_images)
        chunks = PromptChunks(native, items, mctx)
        native = None
        return chunks
    finally:
        if native is not None:
            mtmd.mtmd_input_chunks_free(native)
        for bmp in bitmaps:
            mtmd.mtmd_bitmap_free(bmp)


def _read_chunks(native: Any) -> list[Chunk]:
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


def _special_attr(vocab: Vocabulary, token: int) -> int:
    """The token's attributes if the tokenizer treats it as a control token, else 0."""
    attr = vocab.token_attr(token)
    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    return attr if attr & special else 0


def prompt_parts(vocab: Vocabulary, prompt: RenderedPrompt) -> list[Part]:
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
        _refuse_control_tokens(vocab, text, i)
    lstrip = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
    rstrip = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
    spaces = " \t\n\v\f\r"
    out: list[Part] = []
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
        for token in vocab.tokenize_text(piece.text, add_special=False, parse_special=True):
            attr = _special_attr(vocab, token)
            if not attr:
                continue
            shown = vocab.token_piece(token, special=True).decode("utf-8", "replace")
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


def _refuse_control_tokens(vocab: Vocabulary, text: str, index: int) -> None:
    for token in vocab.tokenize_text(text, add_special=False, parse_special=True):
        if _special_attr(vocab, token):
            shown = vocab.token_piece(token, special=True).decode("utf-8", "replace")
            raise RequestError(
                f"messages: a message text holds the model's control token {shown!r}, and "
                "this model's chat template rewrites message text, so the token cannot be "
                "kept as plain text; remove it", param=f"messages (text {index})")
