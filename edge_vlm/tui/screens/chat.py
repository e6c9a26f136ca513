"""The main screen: the conversation, the attachments, the message box.

Model loading, image reading, clipboard reading and answering all run in thread workers;
they report back only through the messages defined on this screen (``post_message`` is
thread-safe), and the UI thread alone touches widgets and the conversation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer

from edge_vlm.config import Settings
from edge_vlm.errors import EdgeVLMError
from edge_vlm.image_source import ImagePolicy
from edge_vlm.schema import ChatMessage
from edge_vlm.tui.attachments import PendingImage, probe_sources
from edge_vlm.tui.clipboard import ClipboardImage
from edge_vlm.tui.commands import ParsedCommand, parse_command, unescape_message
from edge_vlm.tui.conversation import Conversation, ConversationError, ConversationStore
from edge_vlm.tui.screens.slash import (
    Attach,
    ChangeOptions,
    Detach,
    Export,
    Open,
    SlashAction,
    interpret,
)
from edge_vlm.tui.session import AnswerEnd, ChatModel, ChatModelLoader, ChatOptions, stream_answer
from edge_vlm.tui.widgets.chips import AttachmentBar
from edge_vlm.tui.widgets.prompt import PromptInput
from edge_vlm.tui.widgets.statusbar import StatusBar
from edge_vlm.tui.widgets.transcript import AnswerMessage, Transcript, UserMessage

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass
class _Draft:
    """What was sent, to give back if the answer fails."""

    text: str
    images: list[PendingImage]
    user: UserMessage
    answer: AnswerMessage


class ChatScreen(Screen[None]):
    """Talk to the model about images."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop", show=True),
        Binding("ctrl+o", "attach", "Image"),
        Binding("ctrl+n", "new", "New"),
        Binding("ctrl+r", "history", "History"),
        Binding("ctrl+s,f2", "settings", "Settings"),
        Binding("ctrl+up", "scroll(-1)", "Scroll up", show=False),
        Binding("ctrl+down", "scroll(1)", "Scroll down", show=False),
    ]

    # -- messages from the workers -------------------------------------------------------

    @dataclass
    class ModelLoaded(Message):
        """A model finished loading."""

        model: ChatModel
        seconds: float
        future: Future[ChatModel]
        """The load it answers (an older one, overtaken by another, is dropped)."""

    @dataclass
    class ModelFailed(Message):
        """A model could not be loaded."""

        error: str
        future: Future[ChatModel]

    @dataclass
    class AnswerText(Message):
        """More of the answer."""

        text: str

    @dataclass
    class AnswerDone(Message):
        """The answer ended (finished, cut at max tokens, or stopped)."""

        end: AnswerEnd
        model: str

    @dataclass
    class AnswerFailed(Message):
        """The answer could not be written; the message goes back to the box."""

        error: str

    @dataclass
    class ImagesRead(Message):
        """Images to attach were read (some may have failed)."""

        images: list[PendingImage]
        errors: list[str] = field(default_factory=list)
        command: str | None = None
        """The ``/image`` command that asked for them (cleared on full success)."""

    def __init__(self, settings: Settings, options: ChatOptions, *, loader: ChatModelLoader,
                 store: ConversationStore, clipboard: Callable[[], ClipboardImage],
                 cwd: Path, initial_images: list[str], samples: Path | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.options = options
        self.store = store
        self.cwd = cwd
        self._loader = loader
        self._clipboard = clipboard
        self._initial_images = initial_images
        self._samples = samples
        self.conversation = Conversation(system=options.system)
        self.model: ChatModel | None = None
        self._model_future: Future[ChatModel] = Future()
        self._loaded_key: tuple[str | None, str | None] | None = None
        self._cancel = threading.Event()
        self._idle = threading.Event()
        """Set while no answer worker runs (the model may then be closed)."""
        self._idle.set()
        self._draft: _Draft | None = None
        self._warned_unsaved = False

    @property
    def generating(self) -> bool:
        """An answer is being written."""
        return self._draft is not None

    # -- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        tui = self.settings.tui
        yield StatusBar(id="status")
        yield Transcript(thumbnails=tui.thumbnails, show_stats=tui.show_stats,
                         thumb_height=tui.thumbnail_height, samples=self._samples,
                         id="transcript")
        yield AttachmentBar(id="attachments")
        yield PromptInput(id="prompt", cwd=self.cwd,
                          placeholder="Ask about an image… (/image PATH to attach, F1 help)")
        yield Footer()

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def attachments(self) -> AttachmentBar:
        return self.query_one(AttachmentBar)

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    def on_mount(self) -> None:
        self.attachments.display = False
        self._update_status()
        self.prompt.focus()
        self.load_model(self.options)
        if self._initial_images:
            self.read_images([Path(p).expanduser() for p in self._initial_images], None)

    def _update_status(self, state: str | None = None) -> None:
        status = self.status
        if state is not None:
            status.state = state
        loaded = self.model is not None and status.state != "loading"
        status.model = self.model.name if loaded and self.model else self._model_label()
        o = self.options
        status.detail = f"temp {o.temperature:g} · max {o.max_tokens} tok · detail {o.detail}"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.generating
        return True

    # -- the model -----------------------------------------------------------------------

    def load_model(self, options: ChatOptions) -> None:
        """Load (or switch to) the model the options name, in a worker."""
        self._model_future = Future()
        self._loaded_key = options.model_key()
        self.status.state = "loading"
        self._update_status()
        self._load_worker(options, self.model, self._model_future)
        self.model = None

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_worker(self, options: ChatOptions, old: ChatModel | None,
                     future: Future[ChatModel]) -> None:
        if old is not None:
            old.close()
        started = time.perf_counter()
        try:
            model = self._loader(options.model, options.mmproj, self.settings)
        except EdgeVLMError as err:
            future.set_exception(err)
            self.post_message(self.ModelFailed(err.message, future))
            return
        except Exception as err:  # a bug or llama.cpp surprise: still shown, not raised
            future.set_exception(err)
            self.post_message(self.ModelFailed(f"{type(err).__name__}: {err}", future))
            return
        future.set_result(model)
        self.post_message(self.ModelLoaded(model, time.perf_counter() - started, future))

    @on(ModelLoaded)
    def _model_loaded(self, event: ModelLoaded) -> None:
        if event.future is not self._model_future:
            event.model.close()  # another model was asked for while this one loaded
            return
        self.model = event.model
        self._update_status("writing" if self.generating else "ready")

    @on(ModelFailed)
    def _model_failed(self, event: ModelFailed) -> None:
        if event.future is not self._model_future:
            return
        self.model = None
        self._update_status("failed")
        self.notify(event.error, title="Model not loaded", severity="error", timeout=12,
                    markup=False)

    # -- sending -------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        command = parse_command(event.text)
        if command is not None:
            await self.run_command(command)
            return
        await self.send(unescape_message(event.text))

    async def send(self, text: str) -> None:
        """Send a message with the attached images and stream the answer."""
        images = self.attachments.images
        if not text and not images:
            return
        if self.generating:
            self.notify("An answer is still being written: wait, or press Esc to stop it",
                        severity="warning")
            return
        typed = self.prompt.text
        try:
            stored = [self.store.store_image(im) for im in images]
        except ConversationError as err:
            self.notify(err.message, severity="error", markup=False)
            return
        self.conversation.add_user(text, stored, self.store.image_path,
                                   detail=self.options.detail)
        self._save()
        self.prompt.clear()
        await self.attachments.clear()
        user = await self.transcript.add_user(text, images)
        answer = await self.transcript.add_answer(self._model_label())
        self._draft = _Draft(typed, images, user, answer)
        self._cancel = threading.Event()
        self._idle.clear()
        self._update_status("writing")
        self.refresh_bindings()
        self._answer_worker(self.conversation.messages(), self.options, self._cancel,
                            self._model_future)

    def _model_label(self) -> str:
        if self.model is not None:
            return self.model.name
        name = self.options.model or "default"
        return Path(name).stem if name.lower().endswith(".gguf") else name

    @work(thread=True, exclusive=True, group="answer", exit_on_error=False)
    def _answer_worker(self, messages: list[ChatMessage], options: ChatOptions,
                       cancel: threading.Event, future: Future[ChatModel]) -> None:
        try:
            self._answer(messages, options, cancel, future)
        finally:
            self._idle.set()

    def _answer(self, messages: list[ChatMessage], options: ChatOptions,
                cancel: threading.Event, future: Future[ChatModel]) -> None:
        try:
            model = self._wait_for_model(future, cancel)
            if model is None:
                self.post_message(self.AnswerDone(AnswerEnd("cancelled", None), ""))
                return
            end = stream_answer(model, messages, options, cancel,
                                lambda text: self.post_message(self.AnswerText(text)))
        except EdgeVLMError as err:
            self.post_message(self.AnswerFailed(err.message))
            return
        except Exception as err:  # shown to the person, the app stays usable
            self.post_message(self.AnswerFailed(f"unexpected error: {type(err).__name__}: "
                                                f"{err}"))
            return
        self.post_message(self.AnswerDone(end, model.name))

    @staticmethod
    def _wait_for_model(future: Future[ChatModel], cancel: threading.Event) -> (
            ChatModel | None):
        while True:
            try:
                return future.result(timeout=0.05)
            except FutureTimeout:
                if cancel.is_set():
                    return None
            except EdgeVLMError as err:
                raise EdgeVLMError(f"the model is not loaded: {err.message}") from None

    @on(AnswerText)
    async def _answer_text(self, event: AnswerText) -> None:
        if self._draft is not None:
            await self._draft.answer.append(event.text)

    @on(AnswerDone)
    async def _answer_done(self, event: AnswerDone) -> None:
        draft, self._draft = self._draft, None
        if draft is None:
            return
        end = event.end
        await draft.answer.finish(end.finish_reason, end.stats,
                                  show_stats=self.settings.tui.show_stats)
        self.conversation.add_answer(draft.answer.raw, end.finish_reason, end.stats,
                                     event.model or None)
        self._save()
        self._update_status("ready" if self.model is not None else self.status.state)
        self.refresh_bindings()

    @on(AnswerFailed)
    async def _answer_failed(self, event: AnswerFailed) -> None:
        draft, self._draft = self._draft, None
        if draft is None:
            return
        await draft.answer.abandon()
        await draft.answer.remove()
        await draft.user.remove()
        with contextlib.suppress(ValueError):
            self.conversation.pop_user()
        self._save()
        if not self.prompt.text.strip():
            self.prompt.text = draft.text
            self.prompt.move_cursor(self.prompt.document.end)
        await self.attachments.add(draft.images)
        self._update_status("ready" if self.model is not None else "failed")
        self.refresh_bindings()
        self.notify(event.error, title="Not sent", severity="error", timeout=10,
                    markup=False)

    def action_stop(self) -> None:
        """Esc: stop the answer being written (within one token)."""
        if self.generating:
            self._cancel.set()
            if self._draft is not None:
                self._draft.answer.set_meta("stopping…")

    def _save(self) -> None:
        if not self.conversation.turns:
            return
        try:
            self.store.save(self.conversation)
        except ConversationError as err:
            if not self._warned_unsaved:
                self._warned_unsaved = True
                self.notify(f"Not saved: {err.message}", severity="warning", markup=False)

    # -- attaching images ----------------------------------------------------------------

    def _policy(self) -> ImagePolicy:
        s = self.settings.images
        return ImagePolicy(max_bytes=s.max_bytes, max_pixels=s.max_pixels)

    @work(thread=True, group="images", exit_on_error=False)
    def read_images(self, sources: list[Path | ClipboardImage], command: str | None) -> None:
        """Read and check images to attach; ``command`` is cleared from the box when all
        of them were read."""
        self.post_message(self._probe(sources, command))

    def _probe(self, sources: list[Path | ClipboardImage], command: str | None) -> ImagesRead:
        images, errors = probe_sources(sources, self._policy())
        return self.ImagesRead(images, errors, command)

    @on(ImagesRead)
    async def _images_read(self, event: ImagesRead) -> None:
        if event.images:
            await self.attachments.add(event.images)
        for error in event.errors:
            self.notify(error, title="Image not attached", severity="error", timeout=10,
                        markup=False)
        if event.command is not None and not event.errors and self.prompt.text == event.command:
            self.prompt.clear()

    @on(PromptInput.PathsPasted)
    def _pasted(self, event: PromptInput.PathsPasted) -> None:
        self.read_images(list(event.paths), None)

    @on(PromptInput.Completions)
    def _completions(self, event: PromptInput.Completions) -> None:
        shown = "  ".join(event.candidates[:24])
        more = f"  (+{len(event.candidates) - 24})" if len(event.candidates) > 24 else ""
        self.notify(shown + more, title="Matches", timeout=4, markup=False)

    @work(exclusive=True, group="picker")
    async def action_attach(self) -> None:
        """Ctrl+O: pick an image file."""
        from edge_vlm.tui.screens.picker import PickerScreen

        path = await self.app.push_screen_wait(
            PickerScreen(self.cwd, thumbnails=self.settings.tui.thumbnails))
        if path is not None:
            self.read_images([path], None)
        self.prompt.focus()

    def action_paste_image(self) -> None:
        """Ctrl+V: attach the image on the system clipboard."""
        self._read_clipboard()

    @work(thread=True, exclusive=True, group="clipboard", exit_on_error=False)
    def _read_clipboard(self) -> None:
        try:
            found = self._clipboard()
        except EdgeVLMError as err:
            self.post_message(self.ImagesRead([], [err.message]))
            return
        self.post_message(self._probe([found], None))

    # -- commands and actions ------------------------------------------------------------

    async def run_command(self, command: ParsedCommand) -> None:
        """Run a slash command; an error leaves the typed text in place."""
        if command.spec is None:
            self.notify(f"unknown command /{command.name}: F1 lists the commands (type "
                        f"//{command.name} to send it as a message)", severity="error",
                        markup=False)
            return
        try:
            action = interpret(command.spec.name, command.args, cwd=self.cwd,
                               options=self.options, attached=len(self.attachments.images))
        except ValueError as err:
            self.notify(str(err), severity="error", markup=False)
            return
        if await self._do(action):
            self.prompt.clear()

    async def _do(self, action: SlashAction) -> bool:
        """Do what a slash command asked; True when done (the box is cleared), False when
        the typed text should stay."""
        match action:
            case Attach(paths=None):
                self.action_attach()
            case Attach(paths=paths):
                self.read_images(paths or [], self.prompt.text)
                return False  # the box is cleared once every image was read
            case Detach(index=None):
                await self.attachments.clear()
            case Detach(index=index):
                await self.attachments.remove_at((index or 1) - 1)
            case Export(path=path):
                return self.export(path)
            case ChangeOptions(options=options, note=note):
                done = self.apply_options(options)
                if note:
                    self.notify(note, markup=False)
                return done
            case Open(what="new"):
                return await self.new_conversation()
            case Open(what="history"):
                self.action_history()
            case Open(what="settings"):
                self.action_settings()
            case Open(what="stop"):
                self.action_stop()
            case Open(what="help"):
                self.app.action_help()  # type: ignore[attr-defined]
            case Open(what="quit"):
                self.app.exit()
        return True

    def apply_options(self, options: ChatOptions) -> bool:
        """Use new options; a different model is loaded. False when refused."""
        reload = options.model_key() != self._loaded_key
        if reload and self.generating:
            self.notify("Stop the answer first (Esc), then change the model",
                        severity="warning")
            return False
        self.options = options
        if options.system != self.conversation.system:
            self.conversation.system = options.system
            self._save()
        if reload:
            self.load_model(options)
        self._update_status()
        return True

    @work(exclusive=True, group="settings")
    async def action_settings(self) -> None:
        """Ctrl+S: change model, system prompt, temperature, max tokens, image detail."""
        from edge_vlm.tui.screens.settings import SettingsScreen
        from edge_vlm.tui.session import installed_names

        result = await self.app.push_screen_wait(
            SettingsScreen(self.options, installed_names(self.settings)))
        if result is not None:
            self.apply_options(result)
        self.prompt.focus()

    async def new_conversation(self) -> bool:
        """Start an empty conversation (the current one is already saved)."""
        if self.generating:
            self.notify("Stop the answer first (Esc)", severity="warning")
            return False
        self.conversation = Conversation(system=self.options.system)
        await self.transcript.show(self.conversation, self.store.image_path)
        self.prompt.focus()
        return True

    async def action_new(self) -> None:
        """Ctrl+N: a new conversation."""
        await self.new_conversation()

    @work(exclusive=True, group="history")
    async def action_history(self) -> None:
        """Ctrl+R: reopen, delete or export saved conversations."""
        from edge_vlm.tui.screens.history import HistoryScreen

        chosen = await self.app.push_screen_wait(
            HistoryScreen(self.store, export_dir=self.cwd, current=self.conversation.id))
        if chosen is not None:
            await self.open_conversation(chosen)
        elif self.conversation.turns and not self.store.path(self.conversation.id).exists():
            await self.new_conversation()  # the open conversation was deleted
        self.prompt.focus()

    async def open_conversation(self, conversation_id: str) -> bool:
        """Show a saved conversation and continue it."""
        if self.generating:
            self.notify("Stop the answer first (Esc)", severity="warning")
            return False
        try:
            conversation = self.store.load(conversation_id)
        except ConversationError as err:
            self.notify(err.message, severity="error", markup=False)
            return False
        self.conversation = conversation
        self.options = self.options.with_changes(system=conversation.system)
        await self.transcript.show(conversation, self.store.image_path)
        self._update_status()
        return True

    def export(self, target: Path) -> bool:
        """Write the conversation as Markdown to a file or folder."""
        if not self.conversation.turns:
            self.notify("Nothing to export yet", severity="warning")
            return False
        try:
            path = self.store.export_markdown(self.conversation, target)
        except ConversationError as err:
            self.notify(err.message, severity="error", markup=False)
            return False
        self.notify(f"Exported to {path}", markup=False)
        return True

    def action_export(self) -> None:
        """Export to the current folder."""
        self.export(self.cwd)

    def action_scroll(self, direction: int) -> None:
        transcript = self.transcript
        if direction < 0:
            transcript.scroll_page_up()
        else:
            transcript.scroll_page_down()

    def on_unmount(self) -> None:
        """Stop any answer (within a token) and free the model: the app is closing."""
        self._cancel.set()
        if not self._idle.wait(10):
            return  # still inside llama.cpp: leave the model to the process exit
        model, self.model = self.model, None
        if model is not None:
            model.close()
