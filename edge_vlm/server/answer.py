"""Answer one chat completion: the model works in a thread, the event loop moves the bytes.

:class:`Job` runs the request on a worker thread (its place in the model's queue, its
turn, the generation) and hands every chunk to the event loop through an asyncio queue.
:class:`Watch` notices a client that left, or a request past its deadline, and sets the
cancel flag the engine checks between tokens: the model is free within one token.

Errors found before the first token (an unreadable image, a prompt that does not fit, a
full queue) become an HTTP error status; after the stream started they become an SSE
error event.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edge_vlm.errors import EdgeVLMError
from edge_vlm.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    GenerationStats,
)
from edge_vlm.server.cache import CachedAnswer
from edge_vlm.server.errors import (
    ClientGone,
    GenerationTimeoutError,
    ServiceUnavailableError,
    error_body,
)

if TYPE_CHECKING:
    from edge_vlm.image_source import ImagePolicy
    from edge_vlm.server.models import Lease, ModelManager, ModelSpec

log = logging.getLogger("edge_vlm.server")

#: How long past its deadline a job still waiting for its model may take to report its
#: own timeout before the event loop reports it.
_GRACE_S = 0.5

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies: do not hold events back
}


@dataclass
class Outcome:
    """What happened to one request, for the log line."""

    model: str = "-"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    finish_reason: str | None = None
    cache: str = "-"
    """``hit``, ``miss`` or ``-`` (not a chat completion)."""
    error: str | None = None
    """An error sent as an SSE event after the stream started."""
    timings: GenerationStats | None = field(default=None, repr=False)

    def note(self, stats: GenerationStats | None, finish: str | None, *,
             replayed: bool = False) -> None:
        """Record a finished generation's stats (TTFT is the engine's ``ttft_ms``; a
        cached answer ``replayed`` generated nothing, so it has none)."""
        if stats is not None:
            self.timings = stats
            self.prompt_tokens = stats.prompt_tokens
            self.completion_tokens = stats.completion_tokens
            self.ttft_ms = None if replayed else stats.ttft_ms
        self.finish_reason = finish


# -- the wire format ----------------------------------------------------------------------


def with_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """Put back the ``finish_reason`` and ``logprobs`` OpenAI sends as ``null`` until set
    (the models are dumped without their None fields)."""
    for choice in data.get("choices", []):
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
    return data


def sse_data(payload: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event: ``data: <json>`` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(
        payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chunk_event(chunk: ChatCompletionChunk) -> bytes:
    """A chat-completion chunk as an SSE event."""
    return sse_data(with_nulls(chunk.model_dump(mode="json", exclude_none=True)))


def completion_body(reply: ChatCompletion) -> dict[str, Any]:
    """A chat completion as the JSON document sent."""
    return with_nulls(reply.model_dump(mode="json", exclude_none=True))


# -- the client and the deadline ------------------------------------------------------------


class Watch:
    """Sets ``cancel`` when the client disconnects or ``deadline`` passes.

    Start it once the request body has been read: from then on, the next ASGI message is
    ``http.disconnect``. Stop it before the response's last bytes.

    Args:
        request: The request (its ``receive`` channel).
        cancel: The request's cancel flag.
        deadline: ``time.monotonic()`` value of the request's deadline.
    """

    def __init__(self, request: Request, cancel: threading.Event, deadline: float) -> None:
        self._request = request
        self.cancel = cancel
        self.deadline = deadline
        self.client_gone = False
        self.timed_out = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Watch:
        """Start watching (on the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            async with asyncio.timeout_at(self.deadline):  # loop.time() is time.monotonic()
                while True:
                    message = await self._request.receive()
                    if message["type"] == "http.disconnect":
                        self.client_gone = True
                        self.cancel.set()
                        return
        except TimeoutError:
            self.timed_out = True
            self.cancel.set()

    def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def stopped_error(self, timeout_s: float) -> EdgeVLMError:
        """Why a generation was cancelled, as the error to report.

        Raises:
            ClientGone: the client left (there is no one to report to).
        """
        if self.client_gone:
            raise ClientGone
        if self.timed_out:
            return GenerationTimeoutError(
                f"the answer took longer than {timeout_s:g} s (server.request_timeout_s) "
                "and was stopped; ask for fewer tokens, stream it, or raise the limit")
        return ServiceUnavailableError("the server is shutting down; retry later",
                                       retry_after=5, code="shutting_down")


# -- the model's side ---------------------------------------------------------------------


class Job:
    """One chat completion on its model's worker thread; its output read from the loop.

    :meth:`start` takes a place in the model's queue (503 when full) and waits for the
    model to load if asked (``x-wait-for-model``), on a helper thread; then the model's
    worker (:class:`~edge_vlm.server.models.ModelWorker`, one per loaded model) runs the
    job in its turn. Every chunk (or the whole reply, or the error) is handed over through
    an asyncio queue; waiting in the model's queue holds no thread.

    Args:
        models: The server's models.
        spec: The model.
        request: The validated request.
        image_data: Its images' bytes, read once (:func:`~edge_vlm.server.media.read_images`).
        policy: The server's image policy.
        cancel: The request's cancel flag.
        wait: Wait for a loading model instead of a 503.
        deadline: ``time.monotonic()`` after which to give up.
    """

    def __init__(self, models: ModelManager, spec: ModelSpec, request: ChatCompletionRequest,
                 image_data: list[bytes], policy: ImagePolicy, cancel: threading.Event, *,
                 wait: bool, deadline: float) -> None:
        self._models = models
        self._spec = spec
        self._request = request
        self._image_data = image_data
        self._policy = policy
        self.cancel = cancel
        self._wait = wait
        self._deadline = deadline
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._lease: AbstractContextManager[Lease] | None = None
        self.started = threading.Event()
        """Set by the worker when the job has the model (its generation runs)."""

    async def start(self, executor: Executor) -> None:
        """Take a place in the model's queue, then hand the job to the model's worker.

        Raises:
            ServiceUnavailableError: the queue is full, the model is loading (without
                ``x-wait-for-model``), or the server is shutting down.
            EdgeVLMError: the model failed to load.
            ClientGone: the client left while waiting for the model to load.
        """
        lease_cm = self._models.lease(self._spec, wait=self._wait, deadline=self._deadline,
                                      cancel=self.cancel)
        try:
            lease = await self._loop.run_in_executor(executor, lease_cm.__enter__)
        except RuntimeError as exc:
            if "shutdown" not in str(exc):
                raise
            raise ServiceUnavailableError("the server is shutting down; retry later",
                                          retry_after=5, code="shutting_down") from None
        self._lease = lease_cm
        try:
            lease.worker.submit(functools.partial(self._run, lease))
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.__exit__(None, None, None)

    def _put(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _run(self, lease: Lease) -> None:
        """On the model's worker: wait for the turn, generate, report."""
        try:
            with lease.turn(self._deadline, self.cancel) as vlm:
                self.started.set()
                answer = vlm.answer_read(self._request, self._image_data, cancel=self.cancel,
                                         policy=self._policy)
                if isinstance(answer, ChatCompletion):
                    self._put("reply", answer)
                else:
                    chunks = answer
                    try:
                        for chunk in chunks:
                            self._put("chunk", chunk)
                    finally:
                        close = getattr(chunks, "close", None)
                        if close is not None:
                            close()  # releases the engine if the loop stopped early
        except BaseException as exc:  # every failure travels back to the request
            self._put("error", exc)
        finally:
            self._release()  # the place in the queue
            self._put("end", None)

    async def next(self) -> tuple[str, Any]:
        """The next item: ``("chunk", c)``, ``("reply", r)``, ``("error", e)`` or
        ``("end", None)``.

        Raises:
            ServiceUnavailableError: the deadline passed while the job was still waiting
                behind other jobs of its model (it is dropped when its turn comes).
        """
        if self.started.is_set() or not self._queue.empty():
            return await self._queue.get()
        try:
            async with asyncio.timeout_at(self._deadline + _GRACE_S):
                return await self._queue.get()
        except TimeoutError:
            if self.started.is_set() or not self._queue.empty():
                return await self._queue.get()
            self.cancel.set()
            raise ServiceUnavailableError(
                f"model {self._spec.name!r} stayed busy with other requests until this "
                "request's time ran out (server.request_timeout_s); retry later",
                retry_after=5, code="queue_timeout") from None

    async def reply(self) -> ChatCompletion:
        """The whole answer of a non-streamed request.

        Raises:
            Exception: whatever the generation raised.
        """
        kind, value = await self.next()
        if kind == "error":
            raise value
        assert kind == "reply", kind
        reply: ChatCompletion = value
        return reply

    async def head(self) -> list[ChatCompletionChunk]:
        """The chunks up to the first one with text or a finish reason (a stream's head).

        Raises:
            Exception: whatever the generation raised before its first token.
        """
        out: list[ChatCompletionChunk] = []
        while True:
            kind, value = await self.next()
            if kind == "error":
                raise value
            if kind == "end":
                return out
            out.append(value)
            choice = value.choices[0] if value.choices else None
            if choice is None or choice.delta.content or choice.finish_reason is not None:
                return out


# -- the streamed response ------------------------------------------------------------------


class EventStream(Response):
    """An SSE response whose events come from an async iterator of bytes.

    Args:
        events: The events, each already framed (``data: ...\\n\\n``).
        headers: Extra response headers.
        before_end: Called before the last bytes are sent (stops the :class:`Watch`).
    """

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str],
                 before_end: Callable[[], None] | None = None) -> None:
        super().__init__(content=None, status_code=200, headers={**SSE_HEADERS, **headers})
        # Sent with chunked encoding: its length is not known in advance.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._events = events
        self._before_end = before_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                # Let the loop run between events even when they are all queued already:
                # a lost connection is noticed (and the generation stopped) at once.
                await asyncio.sleep(0)
        finally:
            if self._before_end is not None:
                self._before_end()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def stream_chunks(job: Job, head: list[ChatCompletionChunk], watch: Watch,
                        outcome: Outcome, timeout_s: float,
                        store: Callable[[CachedAnswer], None] | None,
                        ) -> AsyncIterator[ChatCompletionChunk | EdgeVLMError]:
    """The chunks of a streamed answer, from its head on.

    An error after the stream started is yielded as the last item (each wire format
    turns it into its error event). A client that left ends the iteration.
    """
    pieces: list[str] = []
    pending = list(head)
    try:
        while True:
            kind: str
            value: Any
            if pending:
                kind, value = "chunk", pending.pop(0)
            else:
                kind, value = await job.next()
            if kind == "end":
                return
            if kind == "error":
                if isinstance(value, ClientGone) or watch.client_gone:
                    return
                err = value if isinstance(value, EdgeVLMError) else _internal(value)
                outcome.error = err.message
                yield err
                return
            chunk: ChatCompletionChunk = value
            choice = chunk.choices[0] if chunk.choices else None
            if choice is not None and choice.finish_reason is not None:
                outcome.note(chunk.timings, choice.finish_reason)
                if choice.finish_reason == "cancelled":
                    err = watch.stopped_error(timeout_s)  # raises ClientGone if it left
                    outcome.error = err.message
                    yield err
                    return
                if store is not None and chunk.timings is not None:
                    store(CachedAnswer(chunk.model, (*pieces, choice.delta.content or ""),
                                       choice.finish_reason, chunk.timings))
            if choice is not None and choice.delta.content:
                pieces.append(choice.delta.content)
            yield chunk
    except ClientGone:
        return
    finally:
        job.cancel.set()  # a no-op when the generation ended; else it stops within a token


async def chat_events(items: AsyncIterator[ChatCompletionChunk | EdgeVLMError],
                      ) -> AsyncIterator[bytes]:
    """Chat-completion SSE: one event per chunk, an error event, ``[DONE]``."""
    async for item in items:
        if isinstance(item, EdgeVLMError):
            yield sse_data(error_body(item))
        else:
            yield chunk_event(item)
    yield sse_data("[DONE]")


async def replay_chunks(answer: CachedAnswer, include_usage: bool,
                        ) -> AsyncIterator[ChatCompletionChunk | EdgeVLMError]:
    """A cached answer as the chunks of a stream (timings as first computed)."""
    from edge_vlm.schema import ChunkChoice, Delta, new_completion_id, now

    cid, created = new_completion_id(), now()

    def chunk(delta: Delta, finish: Any = None, **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=cid, created=created, model=answer.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                                   **extra)

    yield chunk(Delta(role="assistant", content=""))
    for piece in answer.pieces:
        if piece:
            yield chunk(Delta(content=piece))
    yield chunk(Delta(), answer.finish_reason, timings=answer.timings)
    if include_usage:
        yield ChatCompletionChunk(id=cid, created=created, model=answer.model, choices=[],
                                  usage=answer.usage)


def _internal(exc: BaseException) -> EdgeVLMError:
    log.error("error in a stream", exc_info=exc)
    return EdgeVLMError(f"internal error: {type(exc).__name__}")
