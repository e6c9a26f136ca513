"""The images attached to the message being written, as removable chips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.binding import Binding, BindingType
from textual.containers import HorizontalScroll
from textual.events import Click
from textual.message import Message
from textual.widgets import Static

from edge_vlm.tui.attachments import PendingImage
from edge_vlm.tui.safetext import one_line


class Chip(Static, can_focus=True):
    """One attached image: name, size and a ✕; Delete or a click on it removes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("delete,backspace,x", "remove", "Remove image")]

    @dataclass
    class RemoveRequested(Message):
        """The user asked to remove this image."""

        chip: Chip

    def __init__(self, image: PendingImage) -> None:
        super().__init__(f"▣ {one_line(image.label(), 44)} ✕", markup=False, classes="chip")
        self.image = image
        self.tooltip = str(image.source) if image.source else image.name

    def action_remove(self) -> None:
        self.post_message(self.RemoveRequested(self))

    def on_click(self, event: Click) -> None:
        event.stop()
        self.post_message(self.RemoveRequested(self))


class AttachmentBar(HorizontalScroll, can_focus=False):
    """The attachments of the draft; hidden while there are none."""

    @dataclass
    class Changed(Message):
        """The attachments changed."""

        bar: AttachmentBar
        count: int

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._images: list[PendingImage] = []

    @property
    def images(self) -> list[PendingImage]:
        """The attached images, in order."""
        return list(self._images)

    async def add(self, images: list[PendingImage]) -> int:
        """Attach images (one already attached is not added twice); returns how many were."""
        known = {im.sha256 for im in self._images}
        added = 0
        for image in images:
            if image.sha256 not in known:
                known.add(image.sha256)
                self._images.append(image)
                added += 1
        await self._refresh()
        return added

    async def remove_at(self, index: int) -> PendingImage:
        """Remove the image at ``index`` (0-based)."""
        image = self._images.pop(index)
        await self._refresh()
        return image

    async def clear(self) -> None:
        """Remove every image."""
        self._images.clear()
        await self._refresh()

    async def set(self, images: list[PendingImage]) -> None:
        """Replace the attachments."""
        self._images = list(images)
        await self._refresh()

    async def _refresh(self) -> None:
        focused_index = next((i for i, c in enumerate(self.query(Chip)) if c.has_focus), None)
        await self.remove_children()
        chips = [Chip(im) for im in self._images]
        await self.mount_all(chips)
        self.display = bool(chips)
        if focused_index is not None:
            if chips:
                chips[min(focused_index, len(chips) - 1)].focus()
            else:
                self.screen.focus_next("PromptInput")
        self.post_message(self.Changed(self, len(self._images)))

    @on(Chip.RemoveRequested)
    async def _remove_chip(self, event: Chip.RemoveRequested) -> None:
        event.stop()
        for i, image in enumerate(self._images):
            if image is event.chip.image:
                await self.remove_at(i)
                break
