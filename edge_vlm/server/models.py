"""Which models the server has loaded, their loading state, and leases on them.

A request names a model (or not: the default). :meth:`ModelManager.resolve` turns the name
into files (404 when nothing is installed under it). :meth:`ModelManager.lease` reserves
a place in that model's queue (503 when full), starts loading the model if needed (in a
background thread; at most ``server.max_loaded_models`` stay loaded, the least recently
used idle one is unloaded), and waits for it when the request carries
``x-wait-for-model: true`` (else 503 with ``estimated_time``). Each model has one worker
thread (:class:`ModelWorker`) that runs its generations in order; :meth:`Lease.turn`
waits for the model to be free (the worker's job, or a caller holding the model).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from edge_vlm.config import Settings
from edge_vlm.errors import EdgeVLMError, ModelLoadError, ModelNotFoundError
from edge_vlm.resolve import SHIPPED_MODEL, resolve_model
from edge_vlm.server.errors import ClientGone, ServiceUnavailableError
from edge_vlm.server.names import catalog_name_for_hub_id
from edge_vlm.server.turnstile import Turnstile

if TYPE_CHECKING:
    from edge_vlm.api import VLM
    from edge_vlm.store.store import Store

log = logging.getLogger("edge_vlm.server")

#: Names that mean "the server's default model": HF's client sends ``dummy`` when the
#: model is only in the base URL, TGI examples send ``tgi``.
DEFAULT_ALIASES = frozenset({"", "default", "dummy", "tgi", SHIPPED_MODEL})
#: Guess of load speed for a model never loaded before (bytes per second), plus overhead.
_LOAD_BYTES_PER_S = 400e6
_LOAD_OVERHEAD_S = 0.5
_POLL_S = 0.1
#: How long a store name's resolution is reused (the store marks a model used per lookup).
_RESOLVE_TTL_S = 10.0

State = Literal["loading", "ready", "failed"]


@dataclass(frozen=True)
class ModelSpec:
    """A model the server can load.

    Attributes:
        name: The name shown to clients.
        load_name: What :func:`~edge_vlm.loader.load_model` is given (name or path).
        load_mmproj: The mmproj given with it (paths only).
        model_path: The language model file.
        mmproj_path: The projector file.
    """

    name: str
    load_name: str
    load_mmproj: str | None
    model_path: Path
    mmproj_path: Path

    @property
    def key(self) -> str:
        """Identity of the file pair."""
        return f"{self.model_path.resolve()}|{self.mmproj_path.resolve()}"

    def fingerprint(self) -> str:
        """Identity of the files' content as of now (:func:`~edge_vlm.loader.file_fingerprint`
        of both files)."""
        from edge_vlm.loader import file_fingerprint

        parts = []
        for path in (self.model_path, self.mmproj_path):
            try:
                parts.append(file_fingerprint(path))
            except OSError:
                parts.append(f"{path}:missing")
        return "+".join(parts)

    def size_bytes(self) -> int:
        """Both files' size."""
        total = 0
        for path in (self.model_path, self.mmproj_path):
            with suppress(OSError):
                total += path.stat().st_size
        return total


Loader = Callable[[ModelSpec, Settings], "VLM"]


def load_vlm(spec: ModelSpec, settings: Settings) -> VLM:
    """The default loader: :func:`edge_vlm.api.load` with the server's settings."""
    from edge_vlm.api import load

    return load(spec.load_name, spec.load_mmproj, settings=settings)


class ModelWorker:
    """The one thread that does a loaded model's work: jobs run one at a time, in order.

    Args:
        name: The model's name (the thread's name says it).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"edge-vlm-model-{name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job (it must report its own outcome; an escaping error is logged)."""
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException:
                log.exception("a model job failed")

    def stop(self) -> None:
        """End the thread after the jobs already queued."""
        self._jobs.put(None)


class ModelEntry:
    """One model's state in the server."""

    def __init__(self, spec: ModelSpec, expected_load_s: float) -> None:
        self.spec = spec
        self.state: State = "loading"
        self.vlm: VLM | None = None
        self.error: EdgeVLMError | None = None
        self.load_started = time.monotonic()
        self.expected_load_s = expected_load_s
        self.users = 0
        """Requests holding a lease: waiting for the load, for their turn, or running."""
        self.turnstile = Turnstile()
        self.last_used = time.monotonic()
        self.worker = ModelWorker(spec.name)

    def estimated_time(self) -> float:
        """Seconds until the load is expected to finish."""
        elapsed = time.monotonic() - self.load_started
        return max(0.5, self.expected_load_s - elapsed)


@dataclass(frozen=True)
class ModelStatus:
    """A model's state, as ``/v1/models`` and ``/health`` show it."""

    name: str
    state: State
    users: int
    estimated_time: float | None


class Lease:
    """A place in one model's queue; :meth:`turn` waits to use the model."""

    def __init__(self, entry: ModelEntry) -> None:
        self._entry = entry

    @property
    def name(self) -> str:
        """The model's name."""
        return self._entry.spec.name

    @property
    def worker(self) -> ModelWorker:
        """The model's worker thread."""
        return self._entry.worker

    @contextmanager
    def turn(self, deadline: float, cancel: threading.Event) -> Iterator[VLM]:
        """Wait until the model is free, then hold it.

        Raises:
            ServiceUnavailableError: the deadline passed while waiting.
            ClientGone: the client left while waiting.
        """
        entry = self._entry
        entry.turnstile.enter(deadline, cancel, entry.spec.name)
        started = time.monotonic()
        try:
            assert entry.vlm is not None
            yield entry.vlm
        finally:
            entry.turnstile.leave(time.monotonic() - started)


class ModelManager:
    """Loads models on demand and hands out leases.

    Args:
        settings: The server's settings.
        loader: Loads a model (tests may gate it to observe the loading state).
    """

    def __init__(self, settings: Settings, loader: Loader | None = None) -> None:
        from edge_vlm.preflight import open_store

        self.settings = settings
        #: The model store, opened once from the settings (``store.verify_on_load``,
        #: ``store.catalog_file``): names are resolved and listed through it.
        self.store: Store = open_store(settings)
        self._loader = loader or load_vlm
        self._cond = threading.Condition()
        self._entries: dict[str, ModelEntry] = {}
        self._load_times: dict[str, float] = {}
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._resolved: dict[str, tuple[float, ModelSpec]] = {}

    # -- names -------------------------------------------------------------------------

    def default_spec(self) -> ModelSpec:
        """The model used when a request names none.

        Raises:
            ModelNotFoundError: the configured default is not there.
        """
        with self._cond:
            cached = self._resolved.get("")
        if cached is not None and time.monotonic() - cached[0] < _RESOLVE_TTL_S:
            return cached[1]
        m = self.settings.model
        ref = resolve_model(m.default, m.mmproj, store=self.store)
        spec = ModelSpec(ref.name, m.default, m.mmproj, ref.model, ref.mmproj)
        with self._cond:
            self._resolved[""] = (time.monotonic(), spec)
        return spec

    def resolve(self, requested: str | None) -> ModelSpec:
        """The model a request names.

        Args:
            requested: ``None``/``default`` (and HF's ``dummy``, TGI's ``tgi``), the
                default model's name, a store name, or a hub repo id the catalog maps
                to a store name.

        Raises:
            ModelNotFoundError: nothing installed under that name (404, saying how to
                install it), or a file path (clients may not name files).
        """
        text = (requested or "").strip()
        if text in DEFAULT_ALIASES or text == self.settings.model.default:
            return self.default_spec()
        try:
            default: ModelSpec | None = self.default_spec()
        except ModelNotFoundError:
            default = None
        if default is not None and text == default.name:
            return default
        if _looks_like_path(text):
            raise ModelNotFoundError(
                f"model {text[:200]!r}: this server does not load model files named in "
                "requests; name an installed model, or start the server with --model PATH")
        with self._cond:
            cached = self._resolved.get(text)
        if cached is not None and time.monotonic() - cached[0] < _RESOLVE_TTL_S:
            return cached[1]
        store_name = catalog_name_for_hub_id(text, self.store.catalog_file) or text
        found = self.store.lookup(store_name)  # raises with a pull hint for catalog models
        if found is None:
            raise ModelNotFoundError(
                f"model {text[:200]!r} is not installed on this machine and not in the "
                "model catalog: import its files with 'edge-vlm models import MODEL.gguf "
                "--mmproj MMPROJ.gguf --name NAME' and request it as NAME; 'edge-vlm models "
                "list' shows what is installed, 'edge-vlm models catalog' what can be pulled")
        name = store_name.strip().lower()
        spec = ModelSpec(name, name, None, found[0], found[1])
        with self._cond:
            self._resolved[text] = (time.monotonic(), spec)
        return spec

    def installed(self) -> list[ModelSpec]:
        """Every installed model whose files are present (none is marked as used)."""
        manifests, _ = self.store.installed()
        out: list[ModelSpec] = []
        for m in manifests:
            try:
                model, mmproj = self.store.paths(m)
            except EdgeVLMError:  # a file went missing: resolving it says so
                continue
            out.append(ModelSpec(m.name, m.name, None, model, mmproj))
        return out

    # -- loading -----------------------------------------------------------------------

    def start(self, spec: ModelSpec) -> None:
        """Start loading a model in the background if it is not loaded (preloading)."""
        with self._cond:
            self._entry_for(spec, wait=False, deadline=time.monotonic(), cancel=None)

    def _expected_load_s(self, spec: ModelSpec) -> float:
        measured = self._load_times.get(spec.key)
        if measured is not None:
            return measured
        return _LOAD_OVERHEAD_S + spec.size_bytes() / _LOAD_BYTES_PER_S

    def _entry_for(self, spec: ModelSpec, *, wait: bool, deadline: float,
                   cancel: threading.Event | None) -> ModelEntry:
        """The entry of a model, loading it (making room) if needed. Holds ``_cond``."""
        while True:
            if self._closing:
                raise ServiceUnavailableError("the server is shutting down", retry_after=5,
                                              code="shutting_down")
            entry = self._entries.get(spec.key)
            if entry is not None:
                return entry
            victim: ModelEntry | None = None
            if len(self._entries) >= self.settings.server.max_loaded_models:
                idle = [e for e in self._entries.values()
                        if e.users == 0 and e.state != "loading"]
                if idle:
                    victim = min(idle, key=lambda e: e.last_used)
                    del self._entries[victim.spec.key]
            if victim is not None or len(self._entries) < self.settings.server.max_loaded_models:
                entry = ModelEntry(spec, self._expected_load_s(spec))
                self._entries[spec.key] = entry
                thread = threading.Thread(target=self._load, args=(entry, victim),
                                          name=f"edge-vlm-load-{spec.name}", daemon=True)
                self._threads.append(thread)
                thread.start()
                return entry
            names = ", ".join(sorted(e.spec.name for e in self._entries.values()))
            retry = min(e.turnstile.avg_turn_s for e in self._entries.values())
            if not wait or time.monotonic() >= deadline:
                raise ServiceUnavailableError(
                    f"model {spec.name!r} is not loaded and the loaded model(s) ({names}) are "
                    f"busy; the server keeps {self.settings.server.max_loaded_models} loaded "
                    "(server.max_loaded_models): retry later", retry_after=retry,
                    code="model_busy")
            if cancel is not None and cancel.is_set():
                raise ClientGone
            self._cond.wait(min(_POLL_S, deadline - time.monotonic()))

    def _load(self, entry: ModelEntry, victim: ModelEntry | None) -> None:
        if victim is not None:
            victim.worker.stop()
        if victim is not None and victim.vlm is not None:
            log.info("unloading model %s to make room for %s", victim.spec.name,
                     entry.spec.name)
            victim.vlm.close()
        started = time.monotonic()
        vlm: VLM | None = None
        error: EdgeVLMError | None = None
        try:
            vlm = self._loader(entry.spec, self.settings)
        except EdgeVLMError as err:
            error = err
        except Exception as err:  # a failed load must reach the waiting requests
            error = ModelLoadError(f"model {entry.spec.name!r} failed to load: {err}")
        seconds = time.monotonic() - started
        with self._cond:
            if vlm is not None:
                self._load_times[entry.spec.key] = seconds
                entry.vlm, entry.state = vlm, "ready"
                log.info("model %s ready in %.1f s", entry.spec.name, seconds)
            else:
                entry.error, entry.state = error, "failed"
                log.error("model %s failed to load: %s", entry.spec.name, error)
            closing = self._closing
            self._cond.notify_all()
        if closing and vlm is not None and entry.users == 0:
            vlm.close()

    # -- leases ------------------------------------------------------------------------

    @contextmanager
    def lease(self, spec: ModelSpec, *, wait: bool, deadline: float,
              cancel: threading.Event) -> Iterator[Lease]:
        """Reserve a place in a model's queue, with the model loaded.

        Args:
            spec: The model.
            wait: Wait for a loading model (``x-wait-for-model: true``) instead of a 503.
            deadline: ``time.monotonic()`` after which to give up.
            cancel: Set when the client left.

        Raises:
            ServiceUnavailableError: the model is loading (``estimated_time``), the
                queue is full, or it is still loading at the deadline.
            EdgeVLMError: the model failed to load.
            ClientGone: the client left while waiting.
        """
        limit = self.settings.server.queue_size + 1  # waiting + the one running
        with self._cond:
            entry = self._entry_for(spec, wait=wait, deadline=deadline, cancel=cancel)
            if entry.users >= limit:
                raise ServiceUnavailableError(
                    f"model {spec.name!r} has {entry.users - 1} requests waiting already, the "
                    f"most this server queues (server.queue_size = "
                    f"{self.settings.server.queue_size}); retry later",
                    retry_after=entry.turnstile.avg_turn_s * entry.users, code="queue_full")
            entry.users += 1
        try:
            self._wait_ready(entry, wait, deadline, cancel)
            yield Lease(entry)
        finally:
            with self._cond:
                entry.users -= 1
                entry.last_used = time.monotonic()
                self._cond.notify_all()

    def _wait_ready(self, entry: ModelEntry, wait: bool, deadline: float,
                    cancel: threading.Event) -> None:
        limit = min(deadline,
                    time.monotonic() + self.settings.server.wait_for_model_timeout_s)
        with self._cond:
            while entry.state == "loading":
                est = entry.estimated_time()
                if not wait:
                    raise ServiceUnavailableError(
                        f"model {entry.spec.name!r} is loading; retry in about {est:.0f} s, "
                        "or send 'x-wait-for-model: true' to wait for it",
                        retry_after=est, estimated_time=est, code="model_loading")
                if time.monotonic() >= limit:
                    raise ServiceUnavailableError(
                        f"model {entry.spec.name!r} is still loading after waiting "
                        f"(server.wait_for_model_timeout_s = "
                        f"{self.settings.server.wait_for_model_timeout_s:g}); retry later",
                        retry_after=est, estimated_time=est, code="model_loading")
                if cancel.is_set():
                    raise ClientGone
                self._cond.wait(min(_POLL_S, max(0.001, limit - time.monotonic())))
            if entry.state == "failed":
                # Report it once; the next request tries to load the model again.
                if self._entries.get(entry.spec.key) is entry:
                    del self._entries[entry.spec.key]
                    entry.worker.stop()
                assert entry.error is not None
                raise entry.error

    # -- state -------------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        """The state of every model the server holds or is loading."""
        with self._cond:
            return [ModelStatus(e.spec.name, e.state, e.users,
                                e.estimated_time() if e.state == "loading" else None)
                    for e in self._entries.values()]

    def close(self, timeout: float = 10.0) -> None:
        """Unload every model, after the requests using them end (bounded wait).

        A model still in use when the time is up stays loaded (freeing it under a
        running generation would crash); the process is about to exit anyway.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            while any(e.users for e in self._entries.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(_POLL_S, remaining))
            idle = [e for e in self._entries.values() if e.users == 0]
            for e in idle:
                del self._entries[e.spec.key]
        for e in idle:
            e.worker.stop()
            if e.vlm is not None:
                e.vlm.close()
                e.vlm = None


def _looks_like_path(text: str) -> bool:
    if text.lower().endswith(".gguf") or text.startswith(("/", "~", ".", "\\")):
        return True
    if "\\" in text or ".." in text.split("/"):
        return True
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return True
