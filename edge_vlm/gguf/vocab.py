"""SentencePiece-style (``tokenizer.ggml.model = "llama"``) vocabularies built from word lists.

llama.cpp's SPM tokenizer splits text into characters and repeatedly joins the adjacent
pair with the highest score *whose concatenation is a token*; it never looks further ahead.
A word is therefore only produced as one token when a chain of pieces leads to it. Here
every prefix of every word (of two or more characters) is a token: whatever the merge
order, the leftmost piece of a word is a prefix and so is its concatenation with the next
piece, so merging always continues until the whole word is one token.

:meth:`Vocab.tokenize` mirrors llama.cpp's algorithm (special-token split, space prefix,
merge queue, byte fallback), so training data can be tokenized exactly as llama.cpp will
tokenize prompts, without importing llama_cpp.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from edge_vlm.gguf.constants import TokenType

SPACE = "\u2581"
"""The "▁" SentencePiece writes for a space; a word that follows a space starts with it."""

UNK, BOS, EOS = "<unk>", "<s>", "</s>"

_SPECIAL_TYPES = {TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN}


def byte_token(b: int) -> str:
    """The byte-fallback token text for byte ``b`` (``<0x0A>`` for a newline)."""
    return f"<0x{b:02X}>"


@dataclass(frozen=True)
class Vocab:
    """A tokenizer vocabulary as stored in ``tokenizer.ggml.*``.

    Attributes:
        tokens: Token texts; the index is the token id. Unique.
        scores: Merge priority per token (higher merges first).
        token_types: :class:`TokenType` value per token.
        bos_id: Beginning-of-sequence token id.
        eos_id: End-of-sequence token id.
        unk_id: Unknown token id.
        pad_id: Padding token id, if any.
        eot_id: End-of-turn token id (e.g. ``<|end|>``), if any.
        add_space_prefix: Whether llama.cpp prepends a space to text that starts a prompt
            or follows a special token (``tokenizer.ggml.add_space_prefix``).
    """

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None = None
    eot_id: int | None = None
    add_space_prefix: bool = True
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.scores) != n or len(self.token_types) != n:
            raise ValueError(
                f"{n} tokens but {len(self.scores)} scores and {len(self.token_types)} types"
            )
        ids: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            if not tok:
                raise ValueError(f"token {i} is empty")
            if tok in ids:
                # llama.cpp asserts on duplicate token texts (id_to_token vs token_to_id).
                raise ValueError(f"token {tok!r} appears twice (ids {ids[tok]} and {i})")
            ids[tok] = i
        for name in ("bos_id", "eos_id", "unk_id", "pad_id", "eot_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < n:
                raise ValueError(f"{name} {value} is outside the vocabulary (0..{n - 1})")
        object.__setattr__(self, "_ids", ids)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, text: object) -> bool:
        return text in self._ids

    def token_id(self, text: str) -> int:
        """The id of the token whose text is exactly ``text``.

        Raises:
            KeyError: No such token.
        """
        return self._ids[text]

    def tokenize(
        self, text: str, *, add_bos: bool = False, parse_special: bool = True
    ) -> list[int]:
        """Tokenize like llama.cpp's ``llama_tokenize`` does for an SPM vocabulary.

        Args:
            text: The text. llama.cpp's media marker is not handled here: libmtmd splits
                the prompt at each marker and tokenizes the parts separately, so do the same.
            add_bos: Prepend the BOS token (``add_special``).
            parse_special: Recognise control/user-defined token texts such as ``<|end|>``.

        Returns:
            Token ids.
        """
        out: list[int] = [self.bos_id] if add_bos else []
        prev_special = True  # llama.cpp prefixes a space at the start and after specials
        for fragment in self._split_special(text, parse_special):
            if isinstance(fragment, int):
                out.append(fragment)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                fragment = " " + fragment
            self._spm(fragment.replace(" ", SPACE), out)
            prev_special = False
        return out

    def detokenize(self, ids: Iterable[int], *, special: bool = False) -> str:
        """Turn ids back into text (``▁`` → space, byte tokens → bytes).

        Args:
            ids: Token ids.
            special: Render control tokens too (llama.cpp hides them by default).
        """
        buf = bytearray()
        for i in ids:
            text, ttype = self.tokens[i], self.token_types[i]
            if ttype == TokenType.BYTE:
                buf.append(int(text[3:5], 16))
            elif ttype in (TokenType.CONTROL, TokenType.UNKNOWN):
                if special:
                    buf += text.encode("utf-8")
            else:
                buf += text.replace(SPACE, " ").encode("utf-8")
        return buf.decode("utf-8", errors="replace")

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        specials = [
            i
            for i, t in enumerate(self.token_types)
            if t in _SPECIAL_TYPES and (parse_special or t == TokenType.USER_DEFINED)
        ]
        # llama.cpp tries the longest special texts first, each over all remaining text.
        specials.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        parts: list[str | int] = [text] if text else []
        for sid in specials:
            needle = self.tokens[sid]
            split: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or needle not in part:
                    split.append(part)
                    continue
                pieces = part.split(needle)
                for k, piece in enumerate(pieces):
                    if k:
                        split.append(sid)
                    if piece:
                        split.append(piece)
            parts = split
        return parts

    def _spm(self, text: str, out: list[int]) -> None:
        # Symbols are [start, length] in characters; a merged-away symbol has length 0.
        chars = list(text)
        n = len(chars)
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = [i + 1 if i + 1 < n else -1 for i in range(n)]
        queue: list[tuple[float, int, int, int]] = []

        def try_add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            tid = self._ids.get("".join(chars[left : right + length[right]]))
            if tid is not None:
                # heapq is a min-heap: highest score first, then leftmost, as llama.cpp.
                heapq.heappush(
                    queue, (-self.scores[tid], left, right, length[left] + length[right])
                )

        for i in range(1, n):
            try_add(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue
            length[left] += length[right]
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        i = 0 if n else -1
        while i != -1:
            piece = "".join(chars[i : i + length[i]])
            tid = self._ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_id(b) for b in piece.encode("utf-8"))
            i = nxt[i]

    def _byte_id(self, b: int) -> int:
        tid = self._ids.get(byte_token(b))
        return self.unk_id if tid is None else tid


def build_spm_vocab(
    words: Iterable[str],
    special_tokens: Sequence[str] | Mapping[str, TokenType] = (),
    *,
    chars: Iterable[str] = (),
    newline_tokens: bool = False,
    eot: str | None = None,
    pad: str | None = None,
) -> Vocab:
    """Build a vocabulary in which each given word is a single token.

    Token order: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), the 256 byte-fallback tokens
    ``<0x00>``..``<0xFF>`` (3..258), the special tokens, then (if asked) ``"\\n"`` and
    ``"\\n\\n"``, ``"▁"`` and the single characters, then the word pieces shortest first.

    Args:
        words: Words as they appear in SentencePiece text: ``"▁red"`` for a word after a
            space (or at the start of a prompt, where llama.cpp adds a space), ``"red"``
            for a word glued to what precedes it. A "▁" inside a word is refused, since such
            a token would merge across word boundaries.
        special_tokens: Texts such as ``"<|end|>"`` that must always be one token, as a list
            (type CONTROL: hidden when detokenized) or a mapping to CONTROL or USER_DEFINED
            (rendered as text). ``<|end|>``, ``<|im_end|>`` and ``<|eot_id|>`` are detected
            by llama.cpp as end of generation.
        chars: Extra single characters to include (e.g. punctuation a model should emit).
        newline_tokens: Add tokens that are exactly ``"\\n"`` and ``"\\n\\n"`` (libmtmd's
            idefics3 path looks them up).
        eot: Special token to record as ``tokenizer.ggml.eot_token_id``.
        pad: Special token to record as the padding token.

    Returns:
        The vocabulary.

    Raises:
        ValueError: A word is empty, contains an inner "▁", or equals a special token; a
            special token has a type other than CONTROL/USER_DEFINED; eot/pad is unknown.
    """
    specials = (
        dict(special_tokens)
        if isinstance(special_tokens, Mapping)
        else dict.fromkeys(special_tokens, TokenType.CONTROL)
    )
    for text, ttype in specials.items():
        if ttype not in (TokenType.CONTROL, TokenType.USER_DEFINED):
            raise ValueError(f"special token {text!r} must be CONTROL or USER_DEFINED")

    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []

    def add(text: str, ttype: int, score: float = 0.0) -> None:
        if text not in seen:
            seen.add(text)
            tokens.append(text)
            types.append(int(ttype))
            scores.append(score)

    seen: set[str] = set()
    add(UNK, TokenType.UNKNOWN)
    add(BOS, TokenType.CONTROL)
    add(EOS, TokenType.CONTROL)
    for b in range(256):
        add(byte_token(b), TokenType.BYTE)
    for text, ttype in specials.items():
        if text in seen:
            raise ValueError(f"special token {text!r} clashes with a built-in token")
        add(text, ttype)
    reserved = set(seen)

    word_list = list(dict.fromkeys(words))
    for w in word_list:
        if not w or SPACE in w[1:]:
            raise ValueError(f"word {w!r} is empty or has a '{SPACE}' after its start")
        if w in reserved:
            raise ValueError(f"word {w!r} equals a special or byte token")

    singles = [SPACE, *chars, *(c for w in word_list for c in w)]
    if newline_tokens:
        singles = ["\n", *singles]
    pieces = [w[:k] for w in word_list for k in range(2, len(w) + 1)]
    if newline_tokens:
        pieces.insert(0, "\n\n")
    # Normal pieces get SentencePiece-like descending negative scores: short pieces first,
    # so merges build words bottom-up (any order would work, see the module docstring).
    ordered = list(dict.fromkeys(singles)) + sorted(dict.fromkeys(pieces), key=lambda p: len(p))
    rank = 0
    for text in ordered:
        if len(text) != 1 and text in reserved:
            raise ValueError(f"piece {text!r} equals a special or byte token")
        if text not in seen:
            rank += 1
            add(text, TokenType.NORMAL, -float(rank))

    def special_id(text: str | None, what: str) -> int | None:
        if text is None:
            return None
        if text not in specials:
            raise ValueError(f"{what} token {text!r} is not one of the special tokens")
        return tokens.index(text)

    return Vocab(
        tokens=tokens,
        scores=scores,
        token_types=types,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=special_id(pad, "pad"),
        eot_id=special_id(eot, "eot"),
    )
