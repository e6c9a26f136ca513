"""Conversations: turns, their images, saving, reopening and Markdown export.

Plain Python (no Textual, no llama.cpp): the app displays a :class:`Conversation` and asks
a :class:`ConversationStore` to save it after every change.

Every turn *is* a :class:`~edge_vlm.schema.ChatMessage` (the one chat-message schema),
with display facts beside it (attachment names, finish reason, stats). On disk::

    <root>/<id>.json                     one conversation, rewritten atomically
    <root>/images/<sha256><suffix>       every image once, named by its content hash

Saving writes a temporary file in the same folder, fsyncs it and renames it over the old
one, so a crash or a kill at any moment leaves either the previous or the new version,
never a torn file. Images are referenced by hash; on load the message URLs are pointed at
the store's current location, so conversations reopen after the original files moved (and
after the data folder itself moved).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_vlm import fileio
from edge_vlm.config import data_dir
from edge_vlm.errors import EdgeVLMError
from edge_vlm.schema import (
    ChatMessage,
    Detail,
    GenerationStats,
    ImagePart,
    ImageURL,
    TextPart,
)
from edge_vlm.tui.attachments import PendingImage, human_size
from edge_vlm.tui.safetext import one_line

FORMAT_VERSION = 1


class ConversationError(EdgeVLMError):
    """A saved conversation cannot be read, written or found."""


def conversations_dir() -> Path:
    """Where conversations are saved: ``conversations/`` in the data dir."""
    return data_dir() / "conversations"


@dataclass(frozen=True)
class Attachment:
    """An image stored with a conversation."""

    sha256: str
    """Hex SHA-256 of the image bytes; the stored file's name."""
    suffix: str
    """``.png``, ``.jpg``, ..."""
    name: str
    """The name it had when attached (shown; the file may since have moved)."""
    size: int
    width: int
    height: int

    @property
    def file_name(self) -> str:
        """The stored file's name."""
        return self.sha256 + self.suffix

    def label(self) -> str:
        """``circle.png 96×72 12 KB``."""
        return f"{self.name} {self.width}×{self.height} {human_size(self.size)}"

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "suffix": self.suffix, "name": self.name,
                "size": self.size, "width": self.width, "height": self.height}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        return cls(sha256=str(data["sha256"]), suffix=str(data["suffix"]),
                   name=str(data["name"]), size=int(data["size"]),
                   width=int(data["width"]), height=int(data["height"]))


@dataclass
class Turn:
    """One message of a conversation and what the app shows beside it."""

    message: ChatMessage
    """The message in the chat-completion schema, exactly as sent to the model."""
    attachments: list[Attachment] = field(default_factory=list)
    """The message's images, in the order of its image parts."""
    finish_reason: str | None = None
    """Answers: ``stop``, ``length`` or ``cancelled`` (stopped with Esc)."""
    stats: GenerationStats | None = None
    """Answers: the runtime's timings."""
    model: str | None = None
    """Answers: the model that wrote it."""
    created: float = field(default_factory=time.time)

    @property
    def role(self) -> str:
        return self.message.role

    @property
    def text(self) -> str:
        return self.message.text()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "message": self.message.model_dump(mode="json", exclude_none=True),
            "created": self.created,
        }
        if self.attachments:
            out["attachments"] = [a.to_json() for a in self.attachments]
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        if self.stats is not None:
            out["stats"] = self.stats.model_dump(mode="json")
        if self.model is not None:
            out["model"] = self.model
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Turn:
        stats = data.get("stats")
        return cls(
            message=ChatMessage.model_validate(data["message"]),
            attachments=[Attachment.from_json(a) for a in data.get("attachments", [])],
            finish_reason=data.get("finish_reason"),
            stats=GenerationStats.model_validate(stats) if stats is not None else None,
            model=data.get("model"),
            created=float(data.get("created", 0.0)),
        )


def new_id() -> str:
    """A sortable, unique conversation id: ``20250102-153000-1a2b3c``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class Conversation:
    """A conversation: an optional system prompt and its turns."""

    id: str = field(default_factory=new_id)
    system: str = ""
    """The system prompt (empty: none)."""
    turns: list[Turn] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    model: str | None = None
    """The model of the last answer."""

    @property
    def title(self) -> str:
        """The first question, on one line."""
        for turn in self.turns:
            if turn.role == "user":
                text = one_line(turn.text, 60)
                if text:
                    return text
                return f"{len(turn.attachments)} image(s)"
        return "New conversation"

    def add_user(self, text: str, attachments: list[Attachment], image_path: Callable[
            [Attachment], Path], *, detail: Detail | None = None) -> Turn:
        """Append a user message: its images first (in order), then the text.

        ``detail`` is written into each image part, so a saved conversation replays with
        the detail its images were asked with.
        """
        parts: list[ImagePart | TextPart] = [
            ImagePart(image_url=ImageURL(url=str(image_path(a)), detail=detail))
            for a in attachments]
        if text or not parts:
            parts.append(TextPart(text=text))
        turn = Turn(ChatMessage(role="user", content=list(parts)), list(attachments))
        self.turns.append(turn)
        self.updated = turn.created
        return turn

    def add_answer(self, text: str, finish_reason: str | None,
                   stats: GenerationStats | None, model: str | None) -> Turn:
        """Append the model's answer (partial when stopped)."""
        turn = Turn(ChatMessage(role="assistant", content=text), finish_reason=finish_reason,
                    stats=stats, model=model)
        self.turns.append(turn)
        self.model = model or self.model
        self.updated = turn.created
        return turn

    def pop_user(self) -> Turn:
        """Remove the last turn, a user message whose answer failed."""
        if not self.turns or self.turns[-1].role != "user":
            raise ValueError("the last turn is not a user message")
        return self.turns.pop()

    def messages(self) -> list[ChatMessage]:
        """The whole conversation in the chat-completion schema, system prompt first."""
        out = [ChatMessage(role="system", content=self.system)] if self.system.strip() else []
        return out + [t.message for t in self.turns]

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "id": self.id, "system": self.system,
                "created": self.created, "updated": self.updated, "model": self.model,
                "title": self.title, "turns": [t.to_json() for t in self.turns]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        return cls(id=str(data["id"]), system=str(data.get("system") or ""),
                   turns=[Turn.from_json(t) for t in data.get("turns", [])],
                   created=float(data.get("created", 0.0)),
                   updated=float(data.get("updated", 0.0)), model=data.get("model"))

    def to_markdown(self, image_path: Callable[[Attachment], Path]) -> str:
        """The conversation as Markdown, with image file references.

        Args:
            image_path: Where each attachment's file is (the store's copy).
        """
        when = datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M")
        lines = [f"# {self.title}", "", f"*edge-vlm conversation, {when}*", ""]
        if self.system.strip():
            lines += ["**System:** " + self.system.strip(), ""]
        for turn in self.turns:
            if turn.role == "user":
                lines += ["## You", ""]
                for att in turn.attachments:
                    lines.append(f"![{_md_escape(att.name)}](<{image_path(att).as_posix()}>)")
                if turn.attachments:
                    lines.append("")
                if turn.text:
                    lines += [turn.text, ""]
            else:
                lines += [f"## {turn.model or 'Assistant'}", "", turn.text or "*(no text)*", ""]
                note = answer_note(turn.finish_reason)
                if note:
                    lines += [f"*{note}*", ""]
        return "\n".join(lines).rstrip() + "\n"


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def answer_note(finish_reason: str | None) -> str:
    """``stopped`` / ``cut at max tokens`` for an answer that did not finish."""
    if finish_reason == "cancelled":
        return "stopped"
    if finish_reason == "length":
        return "cut at max tokens"
    return ""


@dataclass(frozen=True)
class Summary:
    """A saved conversation as the history list shows it."""

    id: str
    title: str
    updated: float
    turns: int
    model: str | None


def write_atomic(path: Path, data: bytes) -> None:
    """Write a conversation file atomically, readable only by the user (chats are private)."""
    fileio.write_atomic(path, data, mode=0o600)


class ConversationStore:
    """Saved conversations and their images, in one folder."""

    def __init__(self, root: Path | None = None) -> None:
        """
        Args:
            root: The folder (default: :func:`conversations_dir`). Created when first written.
        """
        self.root = Path(root) if root is not None else conversations_dir()
        self.images = self.root / "images"

    def _ensure(self) -> None:
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConversationError(
                f"cannot create the conversations folder {self.root}: {err.strerror}; set "
                "EDGE_VLM_HOME to a writable folder") from None

    def path(self, conversation_id: str) -> Path:
        """The JSON file of a conversation."""
        if not conversation_id or "/" in conversation_id or conversation_id.startswith("."):
            raise ConversationError(f"invalid conversation id {conversation_id!r}")
        return self.root / f"{conversation_id}.json"

    def image_path(self, attachment: Attachment) -> Path:
        """Where an attachment's bytes are stored."""
        return (self.images / attachment.file_name).absolute()

    def store_image(self, image: PendingImage) -> Attachment:
        """Store an image's bytes under their hash (once) and describe it."""
        self._ensure()
        att = Attachment(sha256=image.sha256, suffix=image.suffix, name=image.name,
                         size=image.size, width=image.width, height=image.height)
        target = self.image_path(att)
        if not target.is_file() or target.stat().st_size != image.size:
            try:
                write_atomic(target, image.data)
            except OSError as err:
                raise ConversationError(f"cannot save image {image.name} in {self.images}: "
                                        f"{err.strerror}") from None
        return att

    def save(self, conversation: Conversation) -> Path:
        """Write a conversation atomically; returns its file."""
        self._ensure()
        path = self.path(conversation.id)
        data = json.dumps(conversation.to_json(), ensure_ascii=False, indent=1).encode()
        try:
            write_atomic(path, data)
        except OSError as err:
            raise ConversationError(f"cannot save the conversation to {path}: "
                                    f"{err.strerror}") from None
        return path

    def load(self, conversation_id: str) -> Conversation:
        """Read a saved conversation, pointing its images at this store.

        Raises:
            ConversationError: missing or unreadable.
        """
        path = self.path(conversation_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            conv = Conversation.from_json(data)
        except FileNotFoundError:
            raise ConversationError(f"no saved conversation {conversation_id!r} in "
                                    f"{self.root}") from None
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as err:
            raise ConversationError(f"cannot read the conversation {path}: {err}") from None
        for turn in conv.turns:
            if turn.role == "user" and isinstance(turn.message.content, list):
                images = iter(turn.attachments)
                for part in turn.message.content:
                    if isinstance(part, ImagePart):
                        att = next(images, None)
                        if att is not None:
                            part.image_url.url = str(self.image_path(att))
        return conv

    def list(self) -> list[Summary]:
        """Saved conversations, most recently changed first (unreadable files skipped)."""
        out: list[Summary] = []
        for path in self._files():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                out.append(Summary(id=str(data["id"]), title=str(data.get("title", "")),
                                   updated=float(data.get("updated", 0.0)),
                                   turns=len(data.get("turns", [])), model=data.get("model")))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        out.sort(key=lambda s: (s.updated, s.id), reverse=True)
        return out

    def _files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for path in self.root.glob("*.json"):
            if not path.name.startswith("."):
                yield path

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation and the images no other conversation uses."""
        conv = self.load(conversation_id)
        self.path(conversation_id).unlink(missing_ok=True)
        mine = {a.file_name for t in conv.turns for a in t.attachments}
        if not mine:
            return
        used: set[str] = set()
        for summary in self.list():
            with contextlib.suppress(ConversationError):
                used |= {a.file_name for t in self.load(summary.id).turns for a in t.attachments}
        for name in mine - used:
            (self.images / name).unlink(missing_ok=True)

    def export_markdown(self, conversation: Conversation, target: Path) -> Path:
        """Write a conversation as Markdown to ``target`` (a file, or a folder for a
        generated name); returns the file written."""
        target = target.expanduser()
        if target.is_dir():
            slug = "".join(c if c.isalnum() else "-" for c in conversation.title.lower())
            slug = "-".join(p for p in slug.split("-") if p)[:40] or "conversation"
            target = target / f"{slug}-{conversation.id}.md"
        try:
            write_atomic(target, conversation.to_markdown(self.image_path).encode())
        except OSError as err:
            raise ConversationError(f"cannot write {target}: {err.strerror}") from None
        return target.absolute()
