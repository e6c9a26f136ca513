"""Run prompts over many images, image by image, yielding each answer as it completes.

All prompts about one image run back to back, so the engine encodes the image once: the
first prompt encodes it, the next ones find it in the KV prefix (or the embedding cache).
A bad image or a failed answer becomes an error result and the batch goes on.

:func:`answer_image` is the work on one image; the local engine (:func:`batch`) and every
Ray worker (:mod:`edge_vlm.batch.raydata`) call it, so both write the same lines.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edge_vlm.batch.inputs import BatchItem
from edge_vlm.batch.keys import bytes_digest, item_key
from edge_vlm.batch.options import BatchOptions, Plan, make_plan, prepare_items, prompts_of
from edge_vlm.batch.output import ResultWriter
from edge_vlm.batch.results import BatchError, BatchResult, Status
from edge_vlm.batch.resume import ResumeIndex
from edge_vlm.errors import EdgeVLMError, ImageError
from edge_vlm.image_source import ImagePolicy, read_image_source

if TYPE_CHECKING:
    from edge_vlm.api import VLM

__all__ = ["BatchError", "BatchResult", "ImageInput", "Status", "answer_image", "batch",
           "read_input"]


class Recorded(Protocol):
    """Answers already in the results file, by resume key (a :class:`ResumeIndex`)."""

    def take(self, key: str) -> dict[str, Any] | None:
        """The recorded line for ``key``; None when the work is still to do."""


@dataclass(frozen=True)
class ImageInput:
    """An image as :func:`answer_image` needs it, read beforehand.

    Attributes:
        url: What the chat request names: the file's absolute path (local) or a ``data:``
            URL of its bytes (Ray workers, which may not see the driver's files).
        sha256: SHA-256 of the file's bytes; None when it could not be read.
        error: Why it could not be read.
    """

    url: str
    sha256: str | None
    error: BatchError | None = None


def read_input(item: BatchItem, policy: ImagePolicy) -> tuple[ImageInput, bytes | None]:
    """Read an image file under ``policy``: its :class:`ImageInput` (naming the file by
    path) and its bytes (None when unreadable: the error is in the input)."""
    url = os.path.abspath(item.path)
    try:
        data, _ = read_image_source(url, policy, "image")
    except ImageError as err:
        return ImageInput(url, None, _error(err)), None
    return ImageInput(url, bytes_digest(data)), data


def batch(
    vlm: VLM,
    items: Iterable[str | os.PathLike[str] | BatchItem],
    prompts: Sequence[str] = (),
    *,
    options: BatchOptions | None = None,
    out: str | os.PathLike[str] | ResultWriter | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    **option_fields: Any,
) -> Iterator[BatchResult]:
    """Ask every prompt about every image with a loaded model, one image at a time.

    Each prompt is a fresh conversation (system message, the image, the prompt) sharing the
    encoded image; with ``conversation`` the prompts are consecutive turns of one
    conversation per image. :func:`edge_vlm.batch.run` does the same on Ray.

    Args:
        vlm: A loaded model.
        items: Image paths, or :class:`BatchItem` with prompts of their own (asked after
            ``prompts``). See :func:`~edge_vlm.batch.discover` for folders and manifests.
        prompts: Questions asked of every image.
        options: How to ask (:class:`~edge_vlm.batch.options.BatchOptions`).
        out: A ``.jsonl`` path or an open :class:`ResultWriter`: each result is appended
            as one line, durably, before it is yielded. A path is opened when iteration
            starts.
        resume: With ``out``: skip answers already in the file (yielded as ``skipped``),
            retry the ones that failed.
        overwrite: With ``out``: empty an existing file first.
        stop: Set it (from a signal handler or another thread) to stop after the current
            answer.
        **option_fields: :class:`~edge_vlm.batch.options.BatchOptions` fields given one
            by one (``max_tokens=8``), applied over ``options``.

    Returns:
        An iterator of results in order, one per (image, prompt).

    Raises:
        BatchInputError: at once, before any work: no prompts for an image, an empty
            prompt, or a schema llama.cpp cannot turn into a grammar.
        TypeError: an unknown option.
    """
    from edge_vlm.batch.identity import recorded_digests
    from edge_vlm.batch.keys import model_key
    from edge_vlm.preflight import open_store
    from edge_vlm.store.fsutil import hash_file

    opts = BatchOptions.of(options, option_fields)
    todo, base = prepare_items(items, prompts)
    info = vlm.info
    model_sha, mmproj_sha = recorded_digests(vlm.name, info.model_path, info.mmproj_path,
                                             open_store(vlm.settings))
    model_id = model_key(model_sha or hash_file(info.model_path)[0],
                         mmproj_sha or hash_file(info.mmproj_path)[0])
    plan = make_plan(opts, vlm.settings, model_id)
    return _run(vlm, todo, base, plan, out, resume, overwrite, stop)


def _run(vlm: VLM, items: list[BatchItem], base: tuple[str, ...], plan: Plan,
         out: str | os.PathLike[str] | ResultWriter | None, resume: bool, overwrite: bool,
         stop: threading.Event | None) -> Iterator[BatchResult]:
    owned = out is not None and not isinstance(out, ResultWriter)
    writer = out if isinstance(out, ResultWriter) or out is None else (
        ResultWriter.open(out, resume=resume, overwrite=overwrite))
    try:
        index = writer.index if writer is not None else ResumeIndex()
        policy = vlm.image_policy()
        for i, item in enumerate(items):
            image, _ = read_input(item, policy)
            for result in answer_image(vlm, i, item, prompts_of(item, base, plan), plan, image,
                                       index, stop):
                if writer is not None and result.status != "skipped":
                    writer.write(result.record())
                yield result
            if stop is not None and stop.is_set():
                return
    finally:
        if owned and writer is not None:
            writer.close()


def answer_image(vlm: VLM, i: int, item: BatchItem, prompts: tuple[str, ...], plan: Plan,
                 image: ImageInput, recorded: Recorded,
                 stop: threading.Event | None = None) -> Iterator[BatchResult]:
    """Ask one image's prompts, skipping what ``recorded`` holds; the image is encoded once.

    Args:
        vlm: The loaded model.
        i: The image's position in the batch.
        item: The image and its own prompts.
        prompts: Every prompt asked of it (:func:`~edge_vlm.batch.options.prompts_of`).
        plan: The batch's fixed choices.
        image: The image, already read (:func:`read_input`).
        recorded: Answers already in the results file.
        stop: Set: return before the next answer.
    """
    sha = image.sha256
    image_error = image.error
    history: list[tuple[str, str]] = []  # (prompt, answer text) of earlier turns
    failed_turn: int | None = None
    for t, prompt in enumerate(prompts):
        key = item_key(image=sha or f"path:{os.path.abspath(item.path)}", prompt=prompt,
                       model=plan.model_id, settings=plan.settings,
                       history=prompts[:t] if plan.conversation else ())
        common: dict[str, Any] = dict(
            path=item.path, image_index=i, prompt_index=t, last_for_image=t == len(prompts) - 1,
            image_sha256=sha, prompt=prompt, model=vlm.name, settings=plan.settings, key=key)
        done = recorded.take(key)
        if done is not None:
            if plan.conversation:
                history.append((prompt, _as_text(done.get("answer"))))
            yield BatchResult(status="skipped", answer=done.get("answer"),
                              finish_reason=done.get("finish_reason"), recorded=done,
                              **common)
            continue
        if stop is not None and stop.is_set():
            return
        if image_error is not None:
            yield BatchResult(status="error", error=image_error, **common)
            continue
        if failed_turn is not None:
            yield BatchResult(status="error", error=BatchError(
                "EarlierTurnFailed", f"turn {failed_turn + 1} of this conversation failed, "
                "so this turn was not asked"), **common)
            continue
        result = _ask(vlm, image.url, prompt, history, plan, common)
        if result.error is not None:
            if result.error.image:
                image_error = result.error  # the other prompts would fail the same way
            if plan.conversation:
                failed_turn = t
        elif plan.conversation:
            history.append((prompt, result.text or ""))
        yield result


def _messages(url: str, prompt: str, history: list[tuple[str, str]],
              plan: Plan) -> list[dict[str, Any]]:
    image: dict[str, Any] = {"url": url}
    if plan.detail:
        image["detail"] = plan.detail
    messages: list[dict[str, Any]] = []
    if plan.system:
        messages.append({"role": "system", "content": plan.system})
    turns = [*history, (prompt, None)]
    for t, (question, answer) in enumerate(turns):
        content: Any = question
        if t == 0:
            content = [{"type": "image_url", "image_url": image},
                       {"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def _ask(vlm: VLM, url: str, prompt: str, history: list[tuple[str, str]], plan: Plan,
         common: dict[str, Any]) -> BatchResult:
    try:
        reply = vlm.chat(_messages(url, prompt, history, plan), **plan.fields)
    except EdgeVLMError as err:
        return BatchResult(status="error", error=_error(err), **common)
    except Exception as err:  # an unexpected failure must not end a night-long batch
        return BatchResult(status="error", error=BatchError(type(err).__name__, str(err)),
                           **common)
    choice = reply.choices[0]
    text = choice.message.content or ""
    answer: Any = text
    error = None
    if plan.schema is not None:
        try:
            answer = json.loads(text)
        except json.JSONDecodeError as err:
            answer = text
            hint = ("the answer was cut at max_tokens: raise --max-tokens"
                    if choice.finish_reason == "length" else f"{err.msg} at {err.pos}")
            error = BatchError("AnswerNotJSON", f"the answer is not valid JSON ({hint})")
    return BatchResult(status="error" if error else "ok", answer=answer, text=text,
                       finish_reason=choice.finish_reason, usage=reply.usage,
                       timings=reply.timings, error=error, **common)


def _error(err: EdgeVLMError) -> BatchError:
    """The error without the request-field prefix (the line already names the image)."""
    message = err.message
    if err.param and message.startswith(f"{err.param}: "):
        message = message[len(err.param) + 2:]
    return BatchError(type(err).__name__, message, image=isinstance(err, ImageError))


def _as_text(answer: Any) -> str:
    """A recorded answer as the assistant text of a resumed conversation."""
    if isinstance(answer, str):
        return answer
    # With a schema the line holds the parsed value; compact JSON is what the grammar
    # produces for most schemas, close enough to continue the conversation.
    return json.dumps(answer, ensure_ascii=False)
