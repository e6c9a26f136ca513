"""What a batch asks: :class:`BatchOptions` (the caller's choices) and :class:`Plan` (the
choices completed from the settings, fixed for the whole batch, shared by both engines).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_vlm.batch.inputs import BatchInputError, BatchItem
from edge_vlm.batch.keys import settings_digest
from edge_vlm.errors import EdgeVLMError

if TYPE_CHECKING:
    from edge_vlm.config import Settings


@dataclass(frozen=True)
class BatchOptions:
    """How every image is asked; None fields come from the settings.

    Attributes:
        system: A system message for every conversation.
        schema: Constrain answers to this JSON schema; ``answer`` is then the parsed value.
        conversation: Ask an image's prompts as consecutive turns of one conversation
            (default: each prompt is a fresh conversation sharing the encoded image).
        max_tokens: Most tokens per answer.
        temperature: 0 is greedy.
        seed: Sampling seed.
        detail: Image detail (``auto``, ``low`` or ``high``).
    """

    system: str | None = None
    schema: dict[str, Any] | None = None
    conversation: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    detail: Literal["auto", "low", "high"] | None = None

    @classmethod
    def of(cls, options: BatchOptions | None, overrides: dict[str, Any]) -> BatchOptions:
        """``options`` with ``overrides`` (keyword arguments of a ``batch`` call) applied.

        Raises:
            TypeError: an override is not a field (nothing passed is silently ignored).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown batch option(s) {', '.join(unknown)}; "
                            f"the options are {', '.join(sorted(names))}")
        base = options or cls()
        return cls(**{**{n: getattr(base, n) for n in names}, **overrides})


@dataclass(frozen=True)
class Plan:
    """Everything fixed for the whole batch (picklable: Ray ships it to the workers)."""

    system: str | None
    schema: dict[str, Any] | None
    conversation: bool
    detail: str | None
    fields: dict[str, Any]
    """Request fields of every chat call."""
    model_id: str
    """The model pair's content identity (:func:`~edge_vlm.batch.keys.model_key`)."""
    settings: str
    """Hash of the answer-changing settings (written as ``settings``)."""


def make_plan(options: BatchOptions, settings: Settings, model_id: str) -> Plan:
    """Complete ``options`` from ``settings``.

    Raises:
        BatchInputError: the schema is not an object or llama.cpp cannot make a grammar of it.
    """
    if options.schema is not None:
        _check_schema(options.schema)
    s = settings
    request = {k: v for k, v in {
        "max_tokens": options.max_tokens, "temperature": options.temperature,
        "seed": options.seed,
        "response_format": None if options.schema is None else {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": options.schema}},
    }.items() if v is not None}
    answer_changing = {
        "system": options.system, "schema": options.schema,
        "conversation": options.conversation,
        "max_tokens": options.max_tokens or s.sampling.max_tokens,
        # float: ``temperature=0`` (Python) and ``--temperature 0`` (CLI) are one setting
        "temperature": float(options.temperature if options.temperature is not None
                             else s.sampling.temperature),
        "seed": options.seed, "top_p": s.sampling.top_p, "top_k": s.sampling.top_k,
        "min_p": s.sampling.min_p, "repeat_penalty": s.sampling.repeat_penalty,
        "detail": options.detail or s.images.detail, "max_side": s.images.max_side,
    }
    return Plan(system=options.system, schema=options.schema,
                conversation=options.conversation, detail=options.detail, fields=request,
                model_id=model_id, settings=settings_digest(answer_changing))


def prepare_items(items: Iterable[str | os.PathLike[str] | BatchItem],
                  prompts: Sequence[str]) -> tuple[list[BatchItem], tuple[str, ...]]:
    """The batch's items and common prompts, checked before any model work.

    Raises:
        BatchInputError: an image has no prompt, or a prompt is empty.
    """
    todo = [it if isinstance(it, BatchItem) else BatchItem(Path(it)) for it in items]
    base = _clean_prompts(prompts, "prompt")
    for item in todo:
        if not base and not item.prompts:
            raise BatchInputError(f"no prompt for image '{item.path}': give --prompt TEXT, "
                                  "--prompts-file FILE, or a prompt column in the manifest")
        _clean_prompts(item.prompts, f"prompt of image '{item.path}'")
    return todo, base


def prompts_of(item: BatchItem, base: tuple[str, ...], plan: Plan) -> tuple[str, ...]:
    """The prompts asked of one image: the common ones, then its own (each once, unless
    they are turns of a conversation)."""
    prompts = base + item.prompts
    return prompts if plan.conversation else tuple(dict.fromkeys(prompts))


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
    from edge_vlm.backend import json_schema_grammar

    try:
        json_schema_grammar(schema)
    except EdgeVLMError as err:
        raise BatchInputError(f"--schema: {err.message}") from None
