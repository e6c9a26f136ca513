"""Answer one chat completion with a model the request holds: stream it or send it whole.

Errors found before the first token (an unreadable image, a prompt that does not fit)
become an HTTP error status; after the stream started they become an SSE error event. A
client gone, or the deadline passed, ends the generation within one token: the engine
checks the cancel flag that :class:`~edge_vlm.server.watch.Watch` sets.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge_vlm.errors import EdgeVLMError
from edge_vlm.images import ImagePolicy
from edge_vlm.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    FinishReason,
    GenerationStats,
    Usage,
    new_completion_id,
    now,
)
from edge_vlm.server.cache import CachedAnswer
from edge_vlm.server.errors import GenerationTimeoutError, ServiceUnavailableError
from edge_vlm.server.exchange import ClientGone, Exchange
from edge_vlm.server.sse import SSEStream
from edge_vlm.server.watch import Watch

if TYPE_CHECKING:
    from edge_vlm.api import VLM

log = logging.getLogger("edge_vlm.server")


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


def _timeout_error(timeout_s: float) -> GenerationTimeoutError:
    return GenerationTimeoutError(
        f"the answer took longer than {timeout_s:g} s (server.request_timeout_s) and was "
        "stopped; ask for fewer tokens, stream it, or raise the limit")


def _stopped_error(watch: Watch, timeout_s: float) -> EdgeVLMError:
    """Why a generation was cancelled, as the error to report.

    Raises:
        ClientGone: the client left (there is no one to report to).
    """
    if watch.client_gone:
        raise ClientGone
    if watch.timed_out:
        return _timeout_error(timeout_s)
    return ServiceUnavailableError("the server is shutting down; retry later", retry_after=5,
                                   code="shutting_down")


Store = Callable[[CachedAnswer], None]


def run(vlm: VLM, request: ChatCompletionRequest, ex: Exchange, watch: Watch,
        outcome: Outcome, headers: dict[str, str], timeout_s: float,
        store: Store | None = None, policy: ImagePolicy | None = None) -> None:
    """Generate and send the answer.

    Args:
        vlm: The model (this request's turn is held).
        request: The validated request, images inline.
        ex: The exchange to answer.
        watch: The request's disconnect and deadline watch.
        outcome: Filled in for the log line.
        headers: Extra response headers (``x-cache``).
        timeout_s: The request timeout, for messages.
        store: Called with an answer that finished normally, before its last byte is
            sent (so a client's next, identical request already finds it cached).
        policy: The server's image policy.

    Raises:
        EdgeVLMError: before anything was sent (image, context, generation errors).
        ClientGone: the client left.
    """
    # Every image is inline by now (see media); the server's policy still applies.
    chunks = vlm.chat(request, stream=True, cancel=watch.cancel, policy=policy)
    try:
        # The role chunk and the first token's chunk come from the same engine event:
        # taking both before answering costs nothing, and a request stopped before its
        # first token still gets an HTTP status rather than a stream.
        head = list(itertools.islice(chunks, 2))
        outcome.ttft_ms = (time.perf_counter() - ex.started) * 1000.0
        if not head:
            raise EdgeVLMError("the model produced no output")
        stream = itertools.chain(head, chunks)
        if request.stream:
            _send_stream(stream, ex, watch, outcome, headers, timeout_s, store)
        else:
            _send_whole(stream, ex, watch, outcome, headers, timeout_s, store)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # releases the engine lock if we stopped early


def _note_finish(chunk: ChatCompletionChunk, outcome: Outcome) -> FinishReason | None:
    if not chunk.choices or chunk.choices[0].finish_reason is None:
        return None
    stats = chunk.timings
    if stats is not None:
        outcome.timings = stats
        outcome.prompt_tokens = stats.prompt_tokens
        outcome.completion_tokens = stats.completion_tokens
    outcome.finish_reason = chunk.choices[0].finish_reason
    return chunk.choices[0].finish_reason


def _send_stream(chunks: Iterator[ChatCompletionChunk], ex: Exchange, watch: Watch,
                 outcome: Outcome, headers: dict[str, str], timeout_s: float,
                 store: Store | None) -> None:
    sse: SSEStream | None = None
    pieces: list[str] = []
    finish: FinishReason | None = None
    usage: Usage | None = None
    model = outcome.model
    pending: list[ChatCompletionChunk] = []
    try:
        try:
            for chunk in chunks:
                model = chunk.model
                reason = _note_finish(chunk, outcome)
                if reason == "cancelled":
                    err = _stopped_error(watch, timeout_s)
                    if sse is None:
                        raise err
                    outcome.error = err.message
                    sse.error(err)
                    break
                if sse is None and chunk.choices and chunk.choices[0].delta.role:
                    pending.append(chunk)  # held back until the next chunk (see run)
                    continue
                finish = reason or finish
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
                if sse is None:
                    sse = SSEStream(ex, headers)
                    for held in pending:
                        sse.send(held)
                sse.send(chunk)
        except (ClientGone, OSError):
            raise
        except Exception as exc:
            if sse is None:
                raise  # nothing sent yet: the caller answers with an HTTP status
            # The status line went out long ago: the error becomes the stream's last event.
            err = exc if isinstance(exc, EdgeVLMError) else EdgeVLMError(
                f"internal error: {type(exc).__name__}: {exc}")
            if not isinstance(exc, EdgeVLMError):
                log.error("error in a stream", exc_info=exc)
            outcome.error = err.message
            finish = None
            sse.error(err)
        if sse is None:
            sse = SSEStream(ex, headers)
            for held in pending:
                sse.send(held)
        if store is not None and finish in ("stop", "length") and outcome.timings is not None:
            store(CachedAnswer(model, tuple(pieces), finish,
                               usage or _usage(outcome.timings)))
        sse.close()
    except OSError as exc:
        watch.mark_gone()
        raise ClientGone from exc


def _send_whole(chunks: Iterator[ChatCompletionChunk], ex: Exchange, watch: Watch,
                outcome: Outcome, headers: dict[str, str], timeout_s: float,
                store: Store | None) -> None:
    pieces: list[str] = []
    last: ChatCompletionChunk | None = None
    finish: FinishReason | None = None
    for chunk in chunks:
        reason = _note_finish(chunk, outcome)
        if reason == "cancelled":
            raise _stopped_error(watch, timeout_s)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if reason is not None:
            finish, last = reason, chunk
    if last is None or finish is None or outcome.timings is None:
        raise EdgeVLMError("the generation ended without a finish reason")
    usage = _usage(outcome.timings)
    reply = ChatCompletion(
        id=last.id, created=last.created, model=last.model,
        choices=[Choice(message=AssistantMessage(content="".join(pieces)),
                        finish_reason=finish)],
        usage=usage, timings=outcome.timings)
    if store is not None and finish in ("stop", "length"):
        store(CachedAnswer(last.model, tuple(pieces), finish, usage))
    try:
        ex.send_json(200, reply.model_dump(mode="json", exclude_none=True), headers)
    except OSError as exc:
        watch.mark_gone()
        raise ClientGone from exc


def replay(answer: CachedAnswer, request: ChatCompletionRequest, ex: Exchange,
           headers: dict[str, str]) -> None:
    """Answer from the response cache, streamed as chunks when the request streams.

    Raises:
        ClientGone: the client left.
    """
    cid, created = new_completion_id(), now()

    def chunk(delta: Delta, finish: FinishReason | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=cid, created=created, model=answer.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)])

    try:
        if not request.stream:
            reply = ChatCompletion(
                id=cid, created=created, model=answer.model,
                choices=[Choice(message=AssistantMessage(content=answer.text),
                                finish_reason=answer.finish_reason)],
                usage=answer.usage)
            ex.send_json(200, reply.model_dump(mode="json", exclude_none=True), headers)
            return
        sse = SSEStream(ex, headers)
        sse.send(chunk(Delta(role="assistant", content="")))
        for piece in answer.pieces:
            sse.send(chunk(Delta(content=piece)))
        sse.send(chunk(Delta(), answer.finish_reason))
        if request.stream_options is not None and request.stream_options.include_usage:
            sse.send(ChatCompletionChunk(id=cid, created=created, model=answer.model,
                                         choices=[], usage=answer.usage))
        sse.close()
    except OSError as exc:
        raise ClientGone from exc


def _usage(stats: GenerationStats) -> Usage:
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                 total_tokens=stats.prompt_tokens + stats.completion_tokens)
