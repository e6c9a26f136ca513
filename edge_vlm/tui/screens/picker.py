"""Ctrl+O: pick an image file, with a preview; returns its path or None."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Static, Tree
from textual.widgets.directory_tree import DirEntry
from textual.widgets.tree import TreeNode

from edge_vlm.tui.attachments import human_size
from edge_vlm.tui.paths import display_path, is_image_name, to_path
from edge_vlm.tui.widgets.thumbnail import Thumbnail


class ImageTree(DirectoryTree):
    """Folders and image files only (no hidden ones), with plain-text icons."""

    ICON_NODE_EXPANDED = "▾ "
    ICON_NODE = "▸ "
    ICON_FILE = "  "

    def render_label(self, node: TreeNode[DirEntry], base_style: Style, style: Style) -> Text:
        if node is self.root and node.data is not None:
            return Text(display_path(node.data.path), style=base_style + style)
        return super().render_label(node, base_style, style)

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        out = []
        for path in paths:
            if path.name.startswith("."):
                continue
            try:
                if path.is_dir() or (is_image_name(path) and path.is_file()):
                    out.append(path)
            except OSError:
                continue
        return out


class PickerScreen(ModalScreen[Path | None]):
    """A file picker that shows only images, with a preview of the highlighted one."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("backspace", "parent", "Up a folder"),
    ]

    def __init__(self, start: Path, *, thumbnails: str) -> None:
        super().__init__()
        self._start = start
        self._mode = thumbnails

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-dialog", classes="dialog"):
            yield Static("Attach an image — Enter picks, Backspace goes up, Esc cancels",
                         classes="dialog-title", markup=False)
            yield Input(display_path(self._start), id="picker-path", compact=True,
                        placeholder="folder or image path, then Enter")
            with Horizontal(id="picker-body"):
                yield ImageTree(self._start, id="picker-tree")
                with Vertical(id="picker-preview"):
                    yield Static("", id="picker-info", markup=False)

    def on_mount(self) -> None:
        self.query_one(ImageTree).focus()

    @property
    def image_tree(self) -> ImageTree:
        return self.query_one(ImageTree)

    def action_parent(self) -> None:
        current = Path(self.image_tree.path)
        self._go(current.parent)

    def _go(self, folder: Path) -> None:
        self.image_tree.path = folder
        self.query_one("#picker-path", Input).value = display_path(folder)
        self.image_tree.focus()

    @on(DirectoryTree.FileSelected)
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(Path(event.path))

    @on(Input.Submitted, "#picker-path")
    def _typed(self, event: Input.Submitted) -> None:
        path = to_path(event.value.strip() or ".")
        if path.is_dir():
            self._go(path)
        elif path.is_file():
            self.dismiss(path)
        else:
            self.notify(f"no folder or file at {path}", severity="error", markup=False)

    @on(Tree.NodeHighlighted)
    async def _preview(self, event: Tree.NodeHighlighted[object]) -> None:
        data = event.node.data
        path = getattr(data, "path", None)
        pane = self.query_one("#picker-preview", Vertical)
        for old in pane.query(Thumbnail):
            await old.remove()
        info = self.query_one("#picker-info", Static)
        if path is None or not is_image_name(path):
            info.update("")
            return
        try:
            size = human_size(Path(path).stat().st_size)
        except OSError:
            size = "?"
        await pane.mount(Thumbnail(Path(path), Path(path).name, mode=self._mode), before=info)
        info.update(size)
