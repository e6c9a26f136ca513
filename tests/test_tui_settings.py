"""The settings dialog and switching models from inside the app (``edge-vlm chat``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_vlm.tui.conversation import ConversationStore
from edge_vlm.tui.screens.settings import SettingsScreen
from edge_vlm.tui.session import load_chat_model
from tests.test_tui_support import (
    SIZE,
    ScriptedModel,
    ask,
    attach,
    make_app,
    notices,
    ready,
    scripted_loader,
    tiny_loader,
    wait_until,
)

pytestmark = pytest.mark.asyncio


async def test_settings_change_temperature_max_tokens_and_system_prompt(tmp_path):
    model = ScriptedModel()
    app = make_app(tmp_path, scripted_loader(model))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        app.chat.prompt.text = "/temperature 0.7"
        await pilot.press("enter")
        app.chat.prompt.text = "/system Answer in French."
        await pilot.press("enter")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings")
        max_tokens = app.screen.query_one("#max-tokens")
        max_tokens.value = "33"  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen),
                         what="closed")
        assert "temp 0.7 · max 33 tok" in str(app.chat.status.render())
        await ask(pilot, app, "Bonjour?")
        sent = model.history[-1]
        assert (sent["temperature"], sent["max_tokens"]) == (0.7, 33)
        assert sent["messages"][0].role == "system"
        assert sent["messages"][0].content == "Answer in French."
        app.chat.prompt.text = "/temperature 9"
        await pilot.press("enter")
        await wait_until(pilot, lambda: any("from 0 to 2" in n for n in notices(app)),
                         what="the range error")
        assert app.chat.prompt.text == "/temperature 9"


async def test_image_detail_from_the_flag_and_the_settings_reaches_the_model(
        tmp_path, tiny_paths, images):
    app = make_app(tmp_path, tiny_loader(tiny_paths), settings={"images__detail": "high"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert "detail high" in str(app.chat.status.render())
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings")
        app.screen.query_one("#detail").value = "low"  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen),
                         what="closed")
        assert "detail low" in str(app.chat.status.render())
        await attach(pilot, app, images["red"])
        answer = await ask(pilot, app, "What is this?")
        # the real runtime encoded it at low detail, and the answer's stats line says so
        assert "(low, 1 tile, " in str(answer.query_one(".meta").render())
        saved = ConversationStore(tmp_path / "convs").load(app.chat.conversation.id)
        part = saved.turns[0].message.content[0]
        assert part.image_url.detail == "low"  # type: ignore[union-attr]


async def test_model_switch_from_inside_the_app(tmp_path, tiny_paths):
    loaded: list[tuple[Any, Any]] = []
    models: list[ScriptedModel] = []

    def loader(model: Any, mmproj: Any, settings: Any) -> ScriptedModel:
        loaded.append((model, mmproj))
        models.append(ScriptedModel(name=Path(str(model)).stem))
        return models[-1]

    app = make_app(tmp_path, loader)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        app.chat.prompt.text = f"/model {tiny_paths.model} {tiny_paths.mmproj}"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(loaded) == 2 and app.chat.model is not None,
                         what="the second model")
        assert loaded == [("default", None), (str(tiny_paths.model), str(tiny_paths.mmproj))]
        assert models[0].closed  # the previous model was freed
        assert "tiny-model" in str(app.chat.status.render())


async def test_settings_offer_the_models_installed_in_the_store(tmp_path, tiny_paths,
                                                                 monkeypatch):
    store = pytest.importorskip("edge_vlm.store.store")
    importer = pytest.importorskip("edge_vlm.store.importer")
    monkeypatch.setenv("EDGE_VLM_HOME", str(tmp_path / "home"))
    importer.import_pair(store.Store.default(), tiny_paths.model, tiny_paths.mmproj,
                         name="tiny-test", check_load=False)
    loaded: list[Any] = []

    def loader(model: Any, mmproj: Any, settings: Any) -> Any:
        loaded.append(model)
        return load_chat_model(model, mmproj, settings)  # the real name resolution

    app = make_app(tmp_path, loader, model=str(tiny_paths.model), mmproj=str(tiny_paths.mmproj))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings")
        assert "tiny-test" in str(app.screen.query_one("#installed").render())
        app.screen.query_one("#model").value = "tiny-test"  # type: ignore[attr-defined]
        app.screen.query_one("#mmproj").value = ""  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: len(loaded) == 2 and app.chat.model is not None,
                         what="the installed model")
        assert loaded[-1] == "tiny-test"
        assert "tiny-test" in str(app.chat.status.render())
