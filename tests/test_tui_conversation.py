"""The TUI's plain-Python parts: conversations and their store, pasted paths, path
completion, the clipboard, slash commands, and what untrusted text may do to a terminal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_vlm.errors import ImageError
from edge_vlm.schema import GenerationStats, ImagePart, ImageStats, parse_messages
from edge_vlm.stats import short_line as format_stats
from edge_vlm.tui.attachments import probe_bytes, probe_file
from edge_vlm.tui.clipboard import ClipboardError, read_image
from edge_vlm.tui.commands import COMMANDS, parse_command, unescape_message
from edge_vlm.tui.conversation import Conversation, ConversationError, ConversationStore
from edge_vlm.tui.paths import complete_path, last_word_start, parse_pasted_paths
from edge_vlm.tui.safetext import visible
from tests.conftest import draw

# -- conversations ------------------------------------------------------------------------


def _conversation(store: ConversationStore, image: Path, text: str = "What is this?") -> (
        Conversation):
    conv = Conversation(system="Be brief.")
    att = store.store_image(probe_file(image))
    conv.add_user(text, [att], store.image_path)
    conv.add_answer("A red square.", "stop", GenerationStats(ttft_ms=12.0), "tiny-model")
    return conv


def test_messages_are_the_one_schema_with_images_before_text(tmp_path, images):
    store = ConversationStore(tmp_path / "convs")
    conv = _conversation(store, images["red"])
    messages = conv.messages()
    # What the runtime validates is exactly what the app sends.
    again = parse_messages([m.model_dump(exclude_none=True) for m in messages])
    assert [m.role for m in again] == ["system", "user", "assistant"]
    user = again[1]
    assert isinstance(user.content, list)
    assert isinstance(user.content[0], ImagePart)
    assert user.text() == "What is this?"
    assert Path(user.content[0].image_url.url).read_bytes() == images["red"].read_bytes()


def test_images_are_stored_once_by_content_hash(tmp_path, images):
    store = ConversationStore(tmp_path / "convs")
    copy = shutil.copy(images["red"], tmp_path / "same-pixels-other-name.png")
    a = store.store_image(probe_file(images["red"]))
    b = store.store_image(probe_file(copy))
    assert a.sha256 == b.sha256
    assert [p.name for p in store.images.iterdir()] == [a.file_name]
    assert b.name == "same-pixels-other-name.png"  # the name shown is the attached one


def test_saved_conversation_reopens_after_the_original_image_moved(tmp_path, images):
    original = Path(shutil.copy(images["blue"], tmp_path / "photo.png"))
    store = ConversationStore(tmp_path / "convs")
    conv = _conversation(store, original)
    store.save(conv)
    original.unlink()
    # the whole data folder moves too: URLs are re-pointed at the store on load
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "convs", moved)
    again = ConversationStore(moved).load(conv.id)
    assert [t.text for t in again.turns] == ["What is this?", "A red square."]
    url = again.messages()[1].images()[0].url
    assert url.startswith(str(moved))
    assert Path(url).read_bytes() == images["blue"].read_bytes()
    assert again.turns[1].stats is not None and again.turns[1].stats.ttft_ms == 12.0
    assert again.system == "Be brief."


def test_list_is_newest_first_and_delete_keeps_shared_images(tmp_path, images):
    store = ConversationStore(tmp_path / "convs")
    first = _conversation(store, images["red"], "first")
    store.save(first)
    second = _conversation(store, images["red"], "second")
    second.updated = first.updated + 10
    store.save(second)
    assert [s.title for s in store.list()] == ["second", "first"]
    store.delete(first.id)
    assert [s.title for s in store.list()] == ["second"]
    assert store.image_path(second.turns[0].attachments[0]).is_file()  # still used
    store.delete(second.id)
    assert store.list() == []
    assert list(store.images.iterdir()) == []  # no longer used by anyone


def test_unreadable_files_are_skipped_in_the_list_and_named_on_load(tmp_path, images):
    store = ConversationStore(tmp_path / "convs")
    conv = _conversation(store, images["red"])
    store.save(conv)
    (store.root / "broken.json").write_text("{not json")
    assert [s.id for s in store.list()] == [conv.id]
    with pytest.raises(ConversationError, match=r"broken\.json"):
        store.load("broken")
    with pytest.raises(ConversationError, match="no saved conversation"):
        store.load("missing")


_SAVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edge_vlm.tui.conversation import Conversation, ConversationStore
    store = ConversationStore(Path(sys.argv[1]))
    conv = Conversation(id="killme")
    i = 0
    while True:
        i += 1
        conv.add_answer("x" * (1000 + i % 5000), "stop", None, "m")
        store.save(conv)
        if i == 3:
            print("saving", flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killing_the_writer_at_any_moment_never_corrupts_the_file(tmp_path):
    root = tmp_path / "convs"
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(root)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads((root / "killme.json").read_text())  # never torn
        assert data["id"] == "killme" and len(data["turns"]) >= 3
        assert [s.id for s in ConversationStore(root).list()] == ["killme"]


def test_markdown_export_references_the_stored_images(tmp_path, images):
    store = ConversationStore(tmp_path / "convs")
    conv = _conversation(store, images["red"])
    conv.add_user("and [this]?", [], store.image_path)
    conv.add_answer("I was stopp", "cancelled", None, "tiny-model")
    out = store.export_markdown(conv, tmp_path)
    text = out.read_text()
    att = conv.turns[0].attachments[0]
    assert f"![red.png](<{store.image_path(att).as_posix()}>)" in text
    assert "**System:** Be brief." in text
    assert "## You\n\nand [this]?" in text
    assert "## tiny-model\n\nI was stopp\n\n*stopped*" in text
    named = store.export_markdown(conv, tmp_path / "chat.md")
    assert named == (tmp_path / "chat.md").absolute() and named.read_text() == text


def test_a_failed_answer_takes_its_question_back(tmp_path, images):
    store = ConversationStore(tmp_path / "convs")
    conv = _conversation(store, images["red"])
    conv.add_user("again?", [], store.image_path)
    assert conv.pop_user().text == "again?"
    with pytest.raises(ValueError):
        conv.pop_user()  # the last turn is now an answer


# -- attachments ---------------------------------------------------------------------------


def test_probe_rejects_what_the_runtime_would_reject(tmp_path, images):
    with pytest.raises(ImageError, match="no file at"):
        probe_file(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ImageError, match="not a known image"):
        probe_file(text)
    image = probe_file(images["green"])
    assert (image.name, image.width, image.height, image.format) == ("green.jpg", 96, 72, "JPEG")
    assert image.label() == "green.jpg 96×72 1 KB"
    with pytest.raises(ImageError, match="over the"):
        from edge_vlm.image_source import ImagePolicy
        probe_bytes(image.data, "big.jpg", policy=ImagePolicy(max_bytes=10))


# -- pasted paths and completion ------------------------------------------------------------


@pytest.fixture
def spaced(tmp_path) -> Path:
    folder = tmp_path / "My Pictures"
    folder.mkdir()
    draw(folder / "a cat.png", (200, 100, 50))
    draw(folder / "dog.JPG", (20, 100, 50))
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("pasted", [
    "'{p}'",              # GNOME Terminal, Kitty
    '"{p}"',              # Windows Terminal style
    "{e}",                # iTerm2 / macOS Terminal: escaped spaces
    "{p}",                # copied as plain text
    "file://{u}",         # Konsole, file managers
    "  '{p}' \n",         # trailing space / newline some terminals add
])
def test_a_pasted_image_path_is_recognised_in_every_terminal_form(spaced, pasted):
    p = spaced / "a cat.png"
    text = pasted.format(p=p, e=str(p).replace(" ", "\\ "), u=str(p).replace(" ", "%20"))
    assert parse_pasted_paths(text) == [p]


def test_several_pasted_paths_attach_together_and_text_stays_text(spaced):
    cat, dog = spaced / "a cat.png", spaced / "dog.JPG"
    assert parse_pasted_paths(f"'{cat}' '{dog}'") == [cat, dog]
    assert parse_pasted_paths(f"{cat}\n{dog}".replace(" ", "\\ ")) == [cat, dog]
    assert parse_pasted_paths("What is in this image?") is None
    assert parse_pasted_paths(str(spaced / "notes.txt")) is None  # not an image
    assert parse_pasted_paths(str(spaced / "gone.png")) is None  # no such file
    assert parse_pasted_paths(f"'{cat}' and some words") is None
    assert parse_pasted_paths("a 'quote never closed") is None


def test_tab_completion_of_image_paths(spaced):
    base = spaced.parent
    done = complete_path("My", base)
    assert done.text == "My\\ Pictures/" and not done.candidates
    done = complete_path("My\\ Pictures/", base)
    assert done.text == "My\\ Pictures/" and done.candidates == ["a cat.png", "dog.JPG"]
    assert complete_path("My\\ Pictures/a", base).text == "My\\ Pictures/a\\ cat.png"
    assert complete_path("'My Pictures/d", base).text == "'My Pictures/dog.JPG'"
    assert complete_path(str(spaced) + "/n", base).text == str(spaced) + "/n"  # not images
    assert complete_path("zzz", base).text == "zzz"


def test_last_word_start_keeps_quoted_and_escaped_spaces():
    assert last_word_start("/image a b") == 9
    assert last_word_start("/image a\\ b") == 7
    assert last_word_start("/image 'a b") == 7
    assert last_word_start("/image ") == 7


# -- clipboard -------------------------------------------------------------------------------


class FakeTools:
    """A scripted stand-in for clipboard tools that records every command it is given."""

    def __init__(self, outputs: dict[str, bytes]) -> None:
        self.outputs = outputs
        self.calls: list[list[str]] = []

    def __call__(self, argv):  # type: ignore[no-untyped-def]
        self.calls.append(list(argv))
        key = " ".join(argv)
        if key not in self.outputs:
            raise subprocess.CalledProcessError(1, argv, b"", b"no such type")
        return self.outputs[key]


def test_clipboard_image_through_wl_paste(images):
    png = images["red"].read_bytes()
    run = FakeTools({"wl-paste --list-types": b"text/plain\nimage/png\n",
                     "wl-paste --no-newline --type image/png": png})
    got = read_image(env={"WAYLAND_DISPLAY": "wayland-0"}, which=lambda t: f"/usr/bin/{t}",
                     run=run, platform="linux")
    assert (got.tool, got.mime, got.data) == ("wl-paste", "image/png", png)


def test_clipboard_copied_file_through_xclip(images):
    run = FakeTools({
        "xclip -selection clipboard -t TARGETS -o": b"TARGETS\ntext/uri-list\n",
        "xclip -selection clipboard -t text/uri-list -o":
            f"file://{images['blue']}\r\n".encode()})
    got = read_image(env={"DISPLAY": ":0"}, which=lambda t: t if t == "xclip" else None,
                     run=run, platform="linux")
    assert got.path == images["blue"] and got.data is None


def test_clipboard_errors_say_what_to_install_or_do():
    def none(_tool: str) -> None:
        return None
    with pytest.raises(ClipboardError, match="install xclip"):
        read_image(env={"DISPLAY": ":0"}, which=none, platform="linux")
    with pytest.raises(ClipboardError, match="install wl-clipboard"):
        read_image(env={"WAYLAND_DISPLAY": "w"}, which=none, platform="linux")
    with pytest.raises(ClipboardError, match=r"SSH.*/image PATH"):
        read_image(env={}, which=none, platform="linux")
    with pytest.raises(ClipboardError, match="brew install pngpaste"):
        read_image(env={}, which=none, platform="darwin")
    run = FakeTools({"wl-paste --list-types": b"text/plain\n"})
    with pytest.raises(ClipboardError, match=r"holds no image \(it has: text/plain\)"):
        read_image(env={"WAYLAND_DISPLAY": "w"}, which=lambda t: t, run=run, platform="linux")


def test_clipboard_through_a_real_wl_paste_process(tmp_path, images, monkeypatch):
    """The real subprocess path, with a shell-script wl-paste on PATH."""
    tool = tmp_path / "bin" / "wl-paste"
    tool.parent.mkdir()
    tool.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--list-types" ]; then printf 'image/png\\ntext/plain\\n'; exit 0; fi
        cat '{images["red"]}'
    """))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    got = read_image(env={"WAYLAND_DISPLAY": "wayland-0"}, platform="linux")
    assert got.data == images["red"].read_bytes()


def test_macos_osascript_png_data_is_decoded(images):
    png = images["red"].read_bytes()
    run = FakeTools({"osascript -e the clipboard as «class PNGf»":
                     f"«data PNGf{png.hex().upper()}»\n".encode()})
    got = read_image(which=lambda t: t if t == "osascript" else None, run=run,
                     platform="darwin")
    assert got.data == png


# -- commands and untrusted text ---------------------------------------------------------


def test_slash_commands_parse_and_double_slash_sends_text():
    cmd = parse_command("/image  a.png b.png")
    assert cmd is not None and cmd.spec is not None
    assert (cmd.spec.name, cmd.args) == ("image", "a.png b.png")
    alias = parse_command("/temp 0.7")
    assert alias is not None and alias.spec is not None and alias.spec.name == "temperature"
    unknown = parse_command("/frobnicate")
    assert unknown is not None and unknown.spec is None
    assert parse_command("//image is a command") is None
    assert unescape_message("//image is a command") == "/image is a command"
    assert parse_command("/usr/share/pic.png — what is it?") is None
    assert parse_command("what is /image?") is None
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)


def test_control_characters_become_visible():
    assert visible("\x1b[31mred\x1b[0m") == "␛[31mred␛[0m"
    assert visible("a\r\nb\rc\x07\x9b2J\x7f") == "a\nb␍c␇\\x9b2J␡"
    assert visible("tab\tand\nnewline") == "tab\tand\nnewline"
    assert visible("[bold]x[/bold]") == "[bold]x[/bold]"


def test_stats_line():
    stats = GenerationStats(ttft_ms=120.4, image_encode_ms=35.2, decode_tps=24.12,
                            context_used=412, n_ctx=4096,
                            images=[{"identity": "x", "width": 1, "height": 1,
                                     "cache_hit": True}])
    assert format_stats(stats) == (
        "ttft 120 ms · image 35 ms (auto, 1 tile, 0 tok, cached) · 24.1 tok/s · ctx 412/4096")
    two = stats.model_copy(update={"images": [
        ImageStats(identity="a", width=1, height=1, detail="low", tiles=1, tokens=64),
        ImageStats(identity="b", width=1, height=1, detail="high", tiles=5, tokens=320,
                   cache_hit=True)]})
    assert "image 35 ms (2 images, 384 tok, 1/2 cached)" in format_stats(two)
    one = stats.model_copy(update={"images": [
        ImageStats(identity="a", width=1, height=1, detail="high", tiles=5, tokens=320)]})
    assert "image 35 ms (high, 5 tiles, 320 tok)" in format_stats(one)


def test_slash_commands_say_what_to_do_without_a_screen(tmp_path):
    from edge_vlm.tui.screens.slash import (
        Attach,
        ChangeOptions,
        Detach,
        Export,
        Open,
        interpret,
    )
    from edge_vlm.tui.session import ChatOptions

    opts = ChatOptions(model="default", mmproj=None, system="", temperature=0.0, max_tokens=64)

    def run(name: str, args: str = "", attached: int = 0):  # type: ignore[no-untyped-def]
        return interpret(name, args, cwd=tmp_path, options=opts, attached=attached)

    assert run("image", '"a b.png" c.png') == Attach([tmp_path / "a b.png", tmp_path / "c.png"])
    assert run("image") == Attach(None)
    assert run("detach", "2", attached=2) == Detach(2)
    with pytest.raises(ValueError, match="there is no image 3 \\(2 attached\\)"):
        run("detach", "3", attached=2)
    assert run("export") == Export(tmp_path)
    cleared = run("system", "-")
    assert isinstance(cleared, ChangeOptions) and cleared.options.system == ""
    assert cleared.note == "System prompt cleared"
    hot = run("temperature", "0.7")
    assert isinstance(hot, ChangeOptions) and hot.options.temperature == 0.7
    with pytest.raises(ValueError):
        run("temperature", "9")
    model = run("model", "m.gguf p.gguf")
    assert isinstance(model, ChangeOptions)
    assert (model.options.model, model.options.mmproj) == (str(tmp_path / "m.gguf"),
                                                           str(tmp_path / "p.gguf"))
    assert run("quit") == Open("quit") and run("model") == Open("settings")
