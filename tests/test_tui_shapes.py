"""The chat app with the real shipped model: attach a sample, ask, the right answer appears."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from shapes_vlm import render, world

from edge_vlm.resolve import SHIPPED_MMPROJ_FILE, SHIPPED_MODEL_FILE, shipped_model_dir
from edge_vlm.tui.app import ChatApp
from edge_vlm.tui.conversation import ConversationStore
from edge_vlm.tui.session import load_chat_model
from edge_vlm.tui.widgets.transcript import AnswerMessage
from tests.test_tui_support import make_settings, wait_until

_MODEL = shipped_model_dir()
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(
        not ((_MODEL / SHIPPED_MODEL_FILE).is_file() and (_MODEL / SHIPPED_MMPROJ_FILE).is_file()),
        reason=f"the shipped model is not in {_MODEL} yet ({SHIPPED_MODEL_FILE} and "
               f"{SHIPPED_MMPROJ_FILE}; it is being trained, issue 3)"),
]


def one_shape_image(tmp_path: Path) -> tuple[Path, str]:
    """A shipped sample named after the one shape it shows, else a rendered one-shape scene."""
    for sample in sorted((_MODEL / "samples").glob("*.png")):
        words = set(re.split(r"[^a-z]+", sample.stem.lower()))
        kinds = [k for k in world.SHAPES if k in words]
        if len(kinds) == 1 and not words & {"shapes", "two", "three"}:
            return sample, kinds[0]
    scene = world.sample_scene(random.Random(7), n_shapes=1, size=(256, 192),
                               size_range=(0.45, 0.6))
    path = tmp_path / "one-shape.png"
    render.render(scene).save(path)
    return path, scene.shapes[0].kind


async def test_the_shipped_model_names_the_shape_in_the_transcript(tmp_path):
    image, kind = one_shape_image(tmp_path)
    app = ChatApp(make_settings(tmp_path, sampling__max_tokens=24, sampling__temperature=0.0),
                  loader=load_chat_model, store=ConversationStore(tmp_path / "convs"),
                  cwd=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.chat.model is not None, timeout=120, what="load")
        app.chat.prompt.text = f"/image {image}"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 1, what="attach")
        app.chat.prompt.text = "What shape is in the image?"
        await pilot.press("enter")
        await wait_until(pilot, lambda: bool(app.chat.conversation.turns)
                         and not app.chat.generating, timeout=120, what="the answer")
        answer = app.query_one(AnswerMessage)
        assert kind in answer.markdown.source.lower(), (
            f"asked about {image.name} (a {kind}), the transcript shows {answer.raw!r}")
        assert app.chat.conversation.turns[-1].finish_reason == "stop"
