"""The top line: which model, whether it is ready, and the sampling settings."""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from edge_vlm.tui.safetext import one_line


class StatusBar(Widget):
    """``◆ shapes-vlm · ready   temp 0 · max 512 tok``."""

    model = reactive("")
    state = reactive("loading")
    """``loading``, ``ready``, ``writing``, ``failed``."""
    detail = reactive("")

    def render(self) -> Content:
        name = one_line(self.model, 40) or "no model"
        if self.state == "loading":
            left = f"◌ loading {name}…"
        elif self.state == "failed":
            left = f"✗ {name} did not load — Ctrl+S to choose a model"
        elif self.state == "writing":
            left = f"● {name} · writing (Esc stops)"
        else:
            left = f"◆ {name} · ready"
        right = self.detail
        width = self.size.width or 80
        gap = max(1, width - len(left) - len(right) - 2)
        return Content(f" {left}{' ' * gap}{right} ")
