"""SVG snapshots of the main screen, the image picker and the help screen at 80x24.

Nondeterminism is switched off: a scripted model with fixed stats, a BMP test image (its
size does not depend on a compressor), HOME pointed at the test folder (paths show as
``~/...``), no cursor blink. Update with ``pytest tests/test_tui_snapshots.py
--snapshot-update`` and look at the SVGs before committing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from textual.widgets import Tree

from edge_vlm.tui.app import ChatApp
from edge_vlm.tui.conversation import ConversationStore
from edge_vlm.tui.screens.picker import PickerScreen
from tests.test_tui_support import ScriptedModel, make_settings, scripted_loader, wait_until


def circle(path: Path, size: tuple[int, int] = (96, 72)) -> Path:
    img = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(img).ellipse((28, 16, 68, 56), fill=(220, 30, 30))
    img.save(path)
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


def make_app(home: Path, *, theme: str = "textual-dark") -> tuple[ChatApp, ScriptedModel]:
    model = ScriptedModel()
    settings = make_settings(home, tui__theme=theme)
    app = ChatApp(settings, loader=scripted_loader(model), store=ConversationStore(
        home / "convs"), cwd=home, samples=home / "samples")
    return app, model


async def _steady(pilot: Any) -> None:
    pilot.app.chat.prompt.cursor_blink = False
    await pilot.pause()


def test_main_screen_after_an_answer(snap_compare, home):
    image = circle(home / "circle.bmp")
    second = circle(home / "another.bmp", (64, 64))
    app, model = make_app(home)
    model.enqueue("A red ", "circle.")

    async def run_before(pilot: Any) -> None:
        chat = pilot.app.chat
        await wait_until(pilot, lambda: chat.model is not None, what="model")
        chat.prompt.text = f"/image {image}"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat.attachments.images) == 1, what="attach")
        chat.prompt.text = "What shape is in the image?"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat.conversation.turns) == 2, what="answer")
        chat.prompt.text = f"/image {second}"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat.attachments.images) == 1, what="chip")
        chat.prompt.text = "And this one?"
        await _steady(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_main_screen_light_theme_empty(snap_compare, home):
    app, _ = make_app(home, theme="textual-light")

    async def run_before(pilot: Any) -> None:
        await wait_until(pilot, lambda: pilot.app.chat.model is not None, what="model")
        await _steady(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_image_picker(snap_compare, home):
    pics = home / "Pictures"
    (pics / "holidays").mkdir(parents=True)
    circle(pics / "circle.bmp")
    circle(pics / "small.bmp", (40, 40))
    (pics / "notes.txt").write_text("not shown")
    app, _ = make_app(home)
    app.chat.cwd = pics

    async def run_before(pilot: Any) -> None:
        await _steady(pilot)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, PickerScreen),
                         what="picker")
        tree = pilot.app.screen.query_one(Tree)
        await wait_until(pilot, lambda: len(tree.root.children) == 3, what="listing")
        await pilot.press("down", "down")  # highlight circle.bmp: the preview shows it
        await wait_until(pilot, lambda: bool(pilot.app.screen.query("Thumbnail")),
                         what="preview")

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_help_screen(snap_compare, home):
    app, _ = make_app(home)

    async def run_before(pilot: Any) -> None:
        await _steady(pilot)
        await pilot.press("f1")

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
