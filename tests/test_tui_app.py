"""The chat app driven through Textual's Pilot, on the real tiny model where it matters."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from textual import events
from textual.widgets import Markdown, OptionList, Tree

from edge_vlm.tui.app import ChatApp
from edge_vlm.tui.clipboard import ClipboardError, ClipboardImage
from edge_vlm.tui.conversation import ConversationStore
from edge_vlm.tui.screens.help import HelpScreen
from edge_vlm.tui.screens.history import HistoryScreen
from edge_vlm.tui.screens.picker import PickerScreen
from edge_vlm.tui.session import load_chat_model
from edge_vlm.tui.widgets.chips import Chip
from edge_vlm.tui.widgets.thumbnail import Thumbnail
from edge_vlm.tui.widgets.transcript import AnswerMessage, UserMessage
from tests.test_tui_support import (
    SIZE,
    ScriptedModel,
    SlowModel,
    ask,
    attach,
    make_app,
    make_settings,
    notices,
    ready,
    scripted_loader,
    tiny_loader,
    wait_until,
)

pytestmark = pytest.mark.asyncio

async def test_attach_with_image_command_ask_and_see_the_answer(tmp_path, tiny_paths, images):
    app = make_app(tmp_path, tiny_loader(tiny_paths))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await attach(pilot, app, images["red"])
        assert app.chat.prompt.text == ""  # the command was consumed
        chip = app.query_one(Chip)
        assert "red.png 96×72" in str(chip.render())
        answer = await ask(pilot, app, "What is this?")
        user = app.query_one(UserMessage)
        assert len(user.query(Thumbnail)) == 1  # the thumbnail sits with its question
        assert answer.raw.strip(), "no answer text reached the transcript"
        assert answer.markdown.source == answer.raw
        meta = str(answer.query_one(".meta").render())
        assert "ttft" in meta and "ctx" in meta and "tok/s" in meta
        assert not app.chat.attachments.images  # sent with the message
        # saved as it happened, in the one message schema, with the image by hash
        saved = ConversationStore(tmp_path / "convs").load(app.chat.conversation.id)
        assert [t.role for t in saved.turns] == ["user", "assistant"]
        assert saved.turns[1].text == answer.raw
        assert Path(saved.messages()[0].images()[0].url).read_bytes() == \
            images["red"].read_bytes()


async def test_follow_up_sends_the_whole_conversation_and_reuses_the_image(
        tmp_path, tiny_paths, images):
    app = make_app(tmp_path, tiny_loader(tiny_paths))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await attach(pilot, app, images["blue"])
        await ask(pilot, app, "What is this?")
        second = await ask(pilot, app, "Where is it?")
        turns = app.chat.conversation.turns
        assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[3].stats is not None
        assert turns[3].stats.prompt_tokens_reused > 0  # the KV prefix was kept
        assert all(im.cache_hit for im in turns[3].stats.images)
        assert "16 tok, cached)" in str(second.query_one(".meta").render())


async def test_escape_stops_the_answer_and_the_app_stays_usable(tmp_path, tiny_paths, images):
    slow: list[SlowModel] = []

    def loader(model: Any, mmproj: Any, settings: Any) -> SlowModel:
        slow.append(SlowModel(tiny_loader(tiny_paths)(model, mmproj, settings), delay=0.05))
        return slow[0]

    app = make_app(tmp_path, loader, settings={"sampling__max_tokens": 400})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await attach(pilot, app, images["red"])
        app.chat.prompt.text = "Describe the image."
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.query(AnswerMessage)) == 1
                         and app.query_one(AnswerMessage).raw != "", what="streaming")
        assert app.chat.generating
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.chat.generating, timeout=5, what="the stop")
        turn = app.chat.conversation.turns[-1]
        assert turn.finish_reason == "cancelled"
        assert 0 < turn.stats.completion_tokens < 400  # type: ignore[union-attr]
        answer = app.query_one(AnswerMessage)
        assert answer.has_class("stopped")
        assert "stopped" in str(answer.query_one(".meta").render())
        assert answer.raw == turn.text  # the partial answer stays
        # still usable: the next question gets a full answer
        slow[0].delay = 0.0
        app.chat.options = app.chat.options.with_changes(max_tokens=5)
        again = await ask(pilot, app, "What is this?")
        assert app.chat.conversation.turns[-1].finish_reason == "length"
        assert again.raw.strip()


async def test_missing_image_path_shows_the_error_and_keeps_the_typed_text(
        tmp_path, tiny_paths):
    app = make_app(tmp_path, tiny_loader(tiny_paths))
    async with app.run_test(size=SIZE) as pilot:
        typed = f"/image {tmp_path / 'no-such-picture.png'}"
        app.chat.prompt.text = typed
        await pilot.press("enter")
        await wait_until(pilot, lambda: bool(notices(app)), what="an error")
        assert any("no file at" in n and "no-such-picture.png" in n for n in notices(app))
        assert app.chat.prompt.text == typed
        assert not app.chat.attachments.images


async def test_a_runtime_error_shows_and_gives_the_message_back(tmp_path, tiny_paths, images):
    """An error from the runtime is a notification; the typed text and images come back."""
    app = make_app(tmp_path, tiny_loader(tiny_paths), settings={"sampling__max_tokens": 5000})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await attach(pilot, app, images["red"])
        app.chat.prompt.text = "What is this?"
        await pilot.press("enter")
        await wait_until(pilot, lambda: bool(notices(app)), what="an error")
        assert any("max_tokens" in n and "5000" in n for n in notices(app))
        assert app.chat.prompt.text == "What is this?"
        assert [im.name for im in app.chat.attachments.images] == ["red.png"]
        assert not app.query(UserMessage) and not app.query(AnswerMessage)
        assert not app.chat.conversation.turns


async def test_model_load_failure_is_shown_in_the_app(tmp_path, images):
    app = make_app(tmp_path, load_chat_model, model=str(tmp_path / "missing-model.gguf"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.status.state == "failed", what="failure")
        assert any("missing-model.gguf" in n and "does not exist" in n for n in notices(app))
        assert "did not load" in str(app.chat.status.render())
        await attach(pilot, app, images["red"])
        app.chat.prompt.text = "What is this?"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat.prompt.text == "What is this?",
                         what="the text to come back")
        assert any("the model is not loaded" in n for n in notices(app))
        assert len(app.chat.attachments.images) == 1


async def test_pasted_image_paths_attach_and_other_text_is_inserted(tmp_path, tiny_paths):
    folder = tmp_path / "Drop Zone"
    folder.mkdir()
    from tests.conftest import draw
    one = draw(folder / "one shot.png", (10, 200, 10))
    two = draw(folder / "two.jpg", (10, 10, 200))
    app = make_app(tmp_path, tiny_loader(tiny_paths))
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.chat.prompt
        escaped = str(two).replace(" ", "\\ ")
        app.post_message(events.Paste(f"'{one}' {escaped}\n"))
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 2, what="chips")
        assert [im.name for im in app.chat.attachments.images] == ["one shot.png", "two.jpg"]
        assert prompt.text == ""  # attached instead of inserted
        app.post_message(events.Paste("what about [this]?"))
        await wait_until(pilot, lambda: prompt.text == "what about [this]?", what="text")
        assert len(app.chat.attachments.images) == 2
        # chips can be removed from the keyboard: Shift+Tab to the chips, Delete
        await pilot.press("shift+tab")  # the chip nearest the box: the last one
        assert isinstance(app.focused, Chip) and app.focused.image.name == "two.jpg"
        await pilot.press("delete")
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 1, what="remove")
        assert app.chat.attachments.images[0].name == "one shot.png"
        assert isinstance(app.focused, Chip)  # focus stays on the chips
        await pilot.press("backspace")
        await wait_until(pilot, lambda: not app.chat.attachments.images, what="remove")
        assert app.focused is prompt and not app.chat.attachments.display


async def test_history_saves_and_reopens_a_conversation(tmp_path, tiny_paths, images):
    app = make_app(tmp_path, tiny_loader(tiny_paths))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await attach(pilot, app, images["green"])
        first = await ask(pilot, app, "What color is it?")
        first_id = app.chat.conversation.id
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: not app.query(AnswerMessage), what="a new conversation")
        await ask(pilot, app, "Something else")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="history")
        options = app.screen.query_one(OptionList)
        assert options.option_count == 2
        assert "What color is it?" in str(options.get_option_at_index(1).prompt)
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: app.chat.conversation.id == first_id, what="reopen")
        assert [a.raw for a in app.query(AnswerMessage)] == [first.raw]
        assert len(app.query(Thumbnail)) == 1
        # continuing it sends the old turns too, and saves into the same file
        await ask(pilot, app, "And its shape?")
        saved = ConversationStore(tmp_path / "convs").load(first_id)
        assert [t.text for t in saved.turns][:3] == ["What color is it?", first.raw,
                                                     "And its shape?"]


async def test_history_delete_and_export(tmp_path):
    model = ScriptedModel()
    app = make_app(tmp_path, scripted_loader(model))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await ask(pilot, app, "first question")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="history")
        await pilot.press("e")
        exported = list(tmp_path.glob("first-question-*.md"))
        assert len(exported) == 1 and "## You\n\nfirst question" in exported[0].read_text()
        await pilot.press("d")
        await pilot.press("y")
        await wait_until(pilot, lambda: not ConversationStore(tmp_path / "convs").list(),
                         what="the delete")
        await pilot.press("escape")
        # the open conversation was the one deleted: the app starts a new one
        await wait_until(pilot, lambda: not app.chat.conversation.turns, what="new")


async def test_model_output_is_never_markup_or_escape_codes(tmp_path):
    model = ScriptedModel()
    model.enqueue("[bold]not bold[/bold] ", "\x1b[31mnot red\x1b[0m ", "<b>tag</b>")
    app = make_app(tmp_path, scripted_loader(model))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        answer = await ask(pilot, app, "[red]hi[/red]")
        shown = answer.markdown.source
        assert "[bold]not bold[/bold]" in shown
        assert "\x1b" not in shown and "␛[31mnot red␛[0m" in shown
        screen_text = "".join(
            str(p.render()) for p in answer.markdown.query("MarkdownParagraph"))
        assert "[bold]not bold[/bold]" in screen_text and "<b>tag</b>" in screen_text
        assert "[red]hi[/red]" in str(app.query_one(UserMessage).query_one(".text").render())
        # the saved conversation keeps exactly what the model wrote
        assert app.chat.conversation.turns[-1].text.startswith("[bold]not bold[/bold] \x1b[31m")


async def test_clipboard_image_attaches_and_a_missing_tool_is_explained(tmp_path, images):
    reads: list[int] = []

    def clipboard() -> ClipboardImage:
        reads.append(1)
        if len(reads) == 1:
            return ClipboardImage(tool="wl-paste", data=images["red"].read_bytes(),
                                  mime="image/png")
        raise ClipboardError("no clipboard tool: install xclip to paste images with Ctrl+V")

    app = ChatApp(make_settings(tmp_path), loader=scripted_loader(ScriptedModel()),
                  store=ConversationStore(tmp_path / "convs"), cwd=tmp_path,
                  clipboard=clipboard)
    async with app.run_test(size=SIZE) as pilot:
        app.chat.prompt.text = "keep me"
        await pilot.press("ctrl+v")
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 1, what="paste")
        assert app.chat.attachments.images[0].name == "clipboard.png"
        assert app.chat.prompt.text == "keep me"
        await pilot.press("ctrl+v")
        await wait_until(pilot, lambda: any("install xclip" in n for n in notices(app)),
                         what="the explanation")


async def test_file_picker_shows_images_only_and_attaches_the_choice(tmp_path, images):
    pics = tmp_path / "pics"
    pics.mkdir()
    shutil.copy(images["red"], pics / "red.png")
    (pics / "notes.txt").write_text("x")
    app = make_app(tmp_path, scripted_loader(ScriptedModel()), cwd=pics)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, PickerScreen), what="picker")
        tree = app.screen.query_one(Tree)
        await wait_until(pilot, lambda: len(tree.root.children) > 0, what="the folder listing")
        names = [str(n.label).strip() for n in tree.root.children]
        assert names == ["red.png"]
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 1, what="attach")
        assert not isinstance(app.screen, PickerScreen)


async def test_help_lists_keys_and_commands_and_palette_has_app_commands(tmp_path):
    app = make_app(tmp_path, scripted_loader(ScriptedModel()))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        table = app.screen.query_one("DataTable")
        rows = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]  # type: ignore[attr-defined]
        assert "Ctrl+O" in rows and "/image PATH..." in rows and "Esc" in rows
        await pilot.press("escape")
        app.chat.prompt.text = "/help"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="/help")
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Attach image", "New conversation", "History", "Settings",
                "Export conversation"} <= set(titles)


async def test_image_path_completion_with_tab(tmp_path):
    (tmp_path / "photos").mkdir()
    shutil.copy(Path(__file__).parent / "test_tui_support.py", tmp_path / "photos" / "x.txt")
    from tests.conftest import draw
    draw(tmp_path / "photos" / "sunset beach.png", (250, 120, 0))
    app = make_app(tmp_path, scripted_loader(ScriptedModel()))
    async with app.run_test(size=SIZE) as pilot:
        app.chat.prompt.text = "/image ph"
        app.chat.prompt.move_cursor(app.chat.prompt.document.end)
        await pilot.press("tab")
        assert app.chat.prompt.text == "/image photos/"
        await pilot.press("tab")
        assert app.chat.prompt.text == "/image photos/sunset\\ beach.png"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 1, what="attach")


async def test_startup_images_are_attached(tmp_path, images):
    app = make_app(tmp_path, scripted_loader(ScriptedModel()),
                   images=[str(images["red"]), str(tmp_path / "gone.png")])
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app.chat.attachments.images) == 1, what="attach")
        await wait_until(pilot, lambda: any("gone.png" in n for n in notices(app)),
                         what="the error for the missing one")


async def test_markdown_is_rendered_for_answers(tmp_path):
    model = ScriptedModel()
    model.enqueue("# Title\n\n", "- one\n- two\n")
    app = make_app(tmp_path, scripted_loader(model))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        answer = await ask(pilot, app, "list")
        md = answer.query_one(Markdown)
        assert md.query("MarkdownH1") and md.query("MarkdownBulletList")


async def test_typing_newline_keys_and_enter_to_send(tmp_path):
    model = ScriptedModel()
    app = make_app(tmp_path, scripted_loader(model))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press(*"two", "shift+enter", *"lines", "ctrl+j", "x")
        assert app.chat.prompt.text == "two\nlines\nx"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(model.history) == 1 and not app.chat.generating,
                         what="the answer")
        assert model.history[0]["messages"][-1].text() == "two\nlines\nx"
        assert app.chat.prompt.text == ""
        await pilot.press(*"//image is a word")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(model.history) == 2 and not app.chat.generating,
                         what="the second answer")
        assert model.history[1]["messages"][-1].text() == "/image is a word"


async def test_ui_is_usable_while_the_model_loads_and_esc_cancels_a_queued_question(tmp_path):
    import threading

    release = threading.Event()
    model = ScriptedModel()

    def slow_loader(name: Any, mmproj: Any, settings: Any) -> ScriptedModel:
        release.wait(30)
        return model

    app = make_app(tmp_path, slow_loader)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        assert app.chat.status.state == "loading"
        assert "loading" in str(app.chat.status.render())
        await pilot.press(*"hello")  # typing works at once
        assert app.chat.prompt.text == "hello"
        await pilot.press("enter")  # queued until the model is there
        await wait_until(pilot, lambda: app.chat.generating, what="the queued question")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.chat.generating, what="the stop")
        assert app.chat.conversation.turns[-1].finish_reason == "cancelled"
        assert model.history == []  # nothing reached the model
        release.set()
        await ready(pilot, app)
        await ask(pilot, app, "now?")
        assert len(model.history) == 1


async def test_command_palette_runs_the_app_commands(tmp_path):
    app = make_app(tmp_path, scripted_loader(ScriptedModel()))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "CommandPalette",
                         what="the palette")
        await pilot.press(*"history")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="history")
