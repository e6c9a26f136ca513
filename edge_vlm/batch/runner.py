"""Run prompts over many images, image by image, yielding each answer as it completes.

All prompts about one image run back to back, so the engine encodes the image once: the
first prompt encodes it, the next ones find it in the KV prefix (or the embedding cache).
A bad image or a failed answer becomes an error result and the batch goes on.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_vlm.batch.inputs import BatchInputError, BatchItem
from edge_vlm.batch.keys import bytes_digest, item_key, model_fingerprint, settings_digest
from edge_vlm.batch.output import ResultWriter
from edge_vlm.batch.resume import ResumeIndex
from edge_vlm.errors import EdgeVLMError, ImageError
from edge_vlm.images import read_image_source
from edge_vlm.schema import GenerationStats, Usage

if TYPE_CHECKING:
    from edge_vlm.api import VLM

Status = Literal["ok", "error", "skipped"]


@dataclass(frozen=True)
class BatchError:
    """Why an answer failed: the error class name and a message fit for a person."""

    type: str
    message: str
    image: bool = field(default=False, compare=False)
    """True when the image itself is at fault (every prompt about it fails the same way)."""


@dataclass
class BatchResult:
    """One answer of a batch, or one skipped because the results file already holds it.

    Attributes:
        path: The image file, as named in the inputs.
        image_index: Position of the image in the batch (0-based).
        prompt_index: Position of the prompt among the image's prompts (the turn, with
            ``conversation``).
        last_for_image: True on the image's last prompt.
        image_sha256: SHA-256 of the file's bytes (None when it could not be read).
        prompt: The question.
        status: ``ok``, ``error`` or ``skipped`` (already in the results file).
        answer: The text, or the parsed JSON value with a schema.
        text: The answer exactly as generated.
        finish_reason: ``stop``, ``length`` or ``cancelled``.
        usage: Token counts.
        timings: The engine's stats of this answer.
        model: The model's name.
        settings: Hash of the answer-changing settings.
        key: The resume key.
        error: What went wrong, for ``error`` results.
        recorded: For ``skipped`` results, the line found in the results file.
    """

    path: Path
    image_index: int
    prompt_index: int
    last_for_image: bool
    image_sha256: str | None
    prompt: str
    status: Status
    model: str
    settings: str
    key: str
    answer: Any = None
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: GenerationStats | None = None
    error: BatchError | None = None
    recorded: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True unless the answer failed."""
        return self.status != "error"

    def record(self) -> dict[str, Any]:
        """The results-file line of this answer."""
        if self.recorded is not None:
            return self.recorded
        return {
            "path": str(self.path),
            "image_sha256": self.image_sha256,
            "prompt": self.prompt,
            "prompt_index": self.prompt_index,
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "usage": self.usage.model_dump() if self.usage else None,
            "timings": self.timings.model_dump() if self.timings else None,
            "model": self.model,
            "settings": self.settings,
            "key": self.key,
            "error": ({"type": self.error.type, "message": self.error.message}
                      if self.error else None),
        }


@dataclass(frozen=True)
class _Plan:
    """Everything fixed for the whole batch."""

    system: str | None
    schema: dict[str, Any] | None
    conversation: bool
    detail: str | None
    fields: dict[str, Any]
    model_id: str
    settings: str


def batch(
    vlm: VLM,
    items: Iterable[str | os.PathLike[str] | BatchItem],
    prompts: Sequence[str] = (),
    *,
    system: str | None = None,
    schema: dict[str, Any] | None = None,
    conversation: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    detail: Literal["auto", "low", "high"] | None = None,
    out: str | os.PathLike[str] | ResultWriter | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: threading.Event | None = None,
) -> Iterator[BatchResult]:
    """Ask every prompt about every image, one image at a time.

    Each prompt is a fresh conversation (system message, the image, the prompt) sharing the
    encoded image; with ``conversation`` the prompts are consecutive turns of one
    conversation per image.

    Args:
        vlm: A loaded model.
        items: Image paths, or :class:`BatchItem` with prompts of their own (asked after
            ``prompts``). See :func:`~edge_vlm.batch.discover` for folders and manifests.
        prompts: Questions asked of every image.
        system: A system message for every conversation.
        schema: Constrain answers to this JSON schema; ``answer`` is then the parsed value.
        conversation: Ask an image's prompts as consecutive turns of one conversation.
        max_tokens: Most tokens per answer (default from the settings).
        temperature: 0 is greedy (default from the settings).
        seed: Sampling seed.
        detail: Image detail (default from the settings).
        out: A ``.jsonl`` path or an open :class:`ResultWriter`: each result is appended
            as one line, durably, before it is yielded. A path is opened when iteration
            starts.
        resume: With ``out``: skip answers already in the file (yielded as ``skipped``),
            retry the ones that failed.
        overwrite: With ``out``: empty an existing file first.
        stop: Set it (from a signal handler or another thread) to stop after the current
            answer.

    Returns:
        An iterator of results in order, one per (image, prompt).

    Raises:
        BatchInputError: at once, before any work: no prompts for an image, an empty
            prompt, or a schema llama.cpp cannot turn into a grammar.
    """
    todo = [it if isinstance(it, BatchItem) else BatchItem(Path(it)) for it in items]
    base = _clean_prompts(prompts, "prompt")
    for item in todo:
        if not base and not item.prompts:
            raise BatchInputError(f"no prompt for image '{item.path}': give --prompt TEXT, "
                                  "--prompts-file FILE, or a prompt column in the manifest")
        _clean_prompts(item.prompts, f"prompt of image '{item.path}'")
    if schema is not None:
        _check_schema(schema)
    s = vlm.settings
    fields = {k: v for k, v in {
        "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
        "response_format": None if schema is None else {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    }.items() if v is not None}
    options = {
        "system": system, "schema": schema, "conversation": conversation,
        "max_tokens": max_tokens or s.sampling.max_tokens,
        "temperature": temperature if temperature is not None else s.sampling.temperature,
        "seed": seed, "top_p": s.sampling.top_p, "top_k": s.sampling.top_k,
        "min_p": s.sampling.min_p, "repeat_penalty": s.sampling.repeat_penalty,
        "detail": detail or s.images.detail, "max_side": s.images.max_side,
    }
    plan = _Plan(system=system, schema=schema, conversation=conversation, detail=detail,
                 fields=fields,
                 model_id=model_fingerprint(vlm.info.model_path, vlm.info.mmproj_path),
                 settings=settings_digest(options))
    return _run(vlm, todo, base, plan, out, resume, overwrite, stop)


def _clean_prompts(prompts: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(prompts, str):
        raise BatchInputError(f"{what}s must be a list of strings, not one string")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise BatchInputError(f"{what} {p!r} is empty; every prompt needs some text")
    return tuple(prompts)


def _check_schema(schema: dict[str, Any]) -> None:
    if not isinstance(schema, dict):
        raise BatchInputError(f"the schema must be a JSON object, got {type(schema).__name__}")
    from edge_vlm.backend import json_schema_grammar  # the model is loaded: already imported

    try:
        json_schema_grammar(schema)
    except EdgeVLMError as err:
        raise BatchInputError(f"--schema: {err.message}") from None


def _run(vlm: VLM, items: list[BatchItem], base: tuple[str, ...], plan: _Plan,
         out: str | os.PathLike[str] | ResultWriter | None, resume: bool, overwrite: bool,
         stop: threading.Event | None) -> Iterator[BatchResult]:
    owned = out is not None and not isinstance(out, ResultWriter)
    writer = out if isinstance(out, ResultWriter) or out is None else (
        ResultWriter.open(out, resume=resume, overwrite=overwrite))
    try:
        index = writer.index if writer is not None else ResumeIndex()
        for i, item in enumerate(items):
            prompts = base + item.prompts
            if not plan.conversation:
                prompts = tuple(dict.fromkeys(prompts))
            for result in _image(vlm, i, item, prompts, plan, index, stop):
                if writer is not None and result.status != "skipped":
                    writer.write(result.record())
                yield result
            if stop is not None and stop.is_set():
                return
    finally:
        if owned and writer is not None:
            writer.close()


def _image(vlm: VLM, i: int, item: BatchItem, prompts: tuple[str, ...], plan: _Plan,
           index: ResumeIndex, stop: threading.Event | None) -> Iterator[BatchResult]:
    url = os.path.abspath(item.path)
    sha: str | None = None
    image_error: BatchError | None = None
    try:
        data, _ = read_image_source(url, vlm.image_policy(), "image")
        sha = bytes_digest(data)
        del data
    except ImageError as err:
        image_error = _error(err)
    history: list[tuple[str, str]] = []  # (prompt, answer text) of earlier turns
    failed_turn: int | None = None
    for t, prompt in enumerate(prompts):
        key = item_key(image=sha or f"path:{url}", prompt=prompt, model=plan.model_id,
                       settings=plan.settings,
                       history=prompts[:t] if plan.conversation else ())
        common: dict[str, Any] = dict(
            path=item.path, image_index=i, prompt_index=t, last_for_image=t == len(prompts) - 1,
            image_sha256=sha, prompt=prompt, model=vlm.name, settings=plan.settings, key=key)
        recorded = index.take(key)
        if recorded is not None:
            if plan.conversation:
                history.append((prompt, _as_text(recorded.get("answer"))))
            yield BatchResult(status="skipped", answer=recorded.get("answer"),
                              finish_reason=recorded.get("finish_reason"), recorded=recorded,
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
        result = _ask(vlm, url, prompt, history, plan, common)
        if result.error is not None:
            if result.error.image:
                image_error = result.error  # the other prompts would fail the same way
            if plan.conversation:
                failed_turn = t
        elif plan.conversation:
            history.append((prompt, result.text or ""))
        yield result


def _messages(url: str, prompt: str, history: list[tuple[str, str]],
              plan: _Plan) -> list[dict[str, Any]]:
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


def _ask(vlm: VLM, url: str, prompt: str, history: list[tuple[str, str]], plan: _Plan,
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
