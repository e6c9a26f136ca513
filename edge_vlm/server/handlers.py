"""The endpoints: chat completions (both URL layouts), the model list, health."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from edge_vlm.errors import ModelNotFoundError
from edge_vlm.schema import ChatCompletionRequest
from edge_vlm.server import generate
from edge_vlm.server.cache import cache_key, is_deterministic
from edge_vlm.server.exchange import ClientGone, Exchange
from edge_vlm.server.generate import Outcome
from edge_vlm.server.limits import check_limits, parse_body
from edge_vlm.server.media import prepare_images
from edge_vlm.server.models import ModelSpec
from edge_vlm.server.names import installed_models
from edge_vlm.server.watch import Watch

if TYPE_CHECKING:
    from edge_vlm.server.app import ServerApp


def chat_completions(app: ServerApp, ex: Exchange, outcome: Outcome,
                     model_id: str | None = None) -> None:
    """``POST /v1/chat/completions`` and ``POST /models/{model_id}/v1/chat/completions``.

    Order of checks: body (size, JSON, depth) → schema and limits → model name → images
    (under the server's policy) → response cache → model loading and queue → generation.
    Nothing reaches the model before every check passed.
    """
    srv = app.settings.server
    body = ex.read_json(srv.max_json_depth)
    deadline = time.monotonic() + srv.request_timeout_s
    request = parse_body(body, model_id)
    check_limits(request, srv)
    request = _with_default_max_tokens(request, app)
    spec = app.models.resolve(request.model)
    outcome.model = spec.name
    use_cache = ex.flag("x-use-cache", True)
    wait = ex.flag("x-wait-for-model", False)
    with app.tracked() as cancel, Watch(ex.socket, cancel, deadline) as watch:
        prepared = prepare_images(request, app.image_policy)
        key = None
        if app.cache.enabled and is_deterministic(request, app.settings.sampling):
            key = cache_key(request, prepared.identities, spec.fingerprint())
        cached = app.cache.get(key) if key is not None and use_cache else None
        if cached is not None:
            outcome.cache = "hit"
            outcome.completion_tokens = cached.usage.completion_tokens
            outcome.prompt_tokens = cached.usage.prompt_tokens
            outcome.ttft_ms = (time.perf_counter() - ex.started) * 1000.0
            generate.replay(cached, request, ex, {"x-cache": "hit"})
            return
        outcome.cache = "miss"
        if cancel.is_set():
            raise ClientGone  # left while its images were being fetched
        with app.models.lease(spec, wait=wait, deadline=deadline, cancel=cancel) as lease, \
                lease.turn(deadline, cancel) as vlm:
            store = None if key is None else functools.partial(app.cache.put, key)
            generate.run(vlm, prepared.request, ex, watch, outcome, {"x-cache": "miss"},
                         srv.request_timeout_s, store, app.image_policy)


def _with_default_max_tokens(request: ChatCompletionRequest, app: ServerApp) -> (
        ChatCompletionRequest):
    """Fill in ``max_tokens`` from the settings, within the server's limit."""
    if request.token_limit is not None:
        return request
    limit = min(app.settings.sampling.max_tokens, app.settings.server.max_tokens_limit)
    return request.model_copy(update={"max_tokens": limit})


def list_models(app: ServerApp, ex: Exchange, outcome: Outcome) -> None:
    """``GET /v1/models``: installed models in OpenAI's list format, marking the loaded."""
    ex.send_json(200, {"object": "list", "data": _model_objects(app)})


def get_model(app: ServerApp, ex: Exchange, outcome: Outcome, model_id: str) -> None:
    """``GET /v1/models/{model_id}``."""
    spec = app.models.resolve(model_id)
    for item in _model_objects(app):
        if item["id"] == spec.name:
            ex.send_json(200, item)
            return
    ex.send_json(200, _model_object(spec, None))


def _model_objects(app: ServerApp) -> list[dict[str, Any]]:
    states = {s.name: s.state for s in app.models.status()}
    specs: dict[str, ModelSpec] = {}
    try:
        default = app.models.default_spec()
        specs[default.name] = default
    except ModelNotFoundError:
        default = None
    for m in installed_models():
        specs.setdefault(m.name, ModelSpec(m.name, m.name, None, m.model, m.mmproj))
    items = [_model_object(spec, states.get(name)) for name, spec in specs.items()]
    if default is not None:
        items[0]["default"] = True
    return items


def _model_object(spec: ModelSpec, state: str | None) -> dict[str, Any]:
    try:
        created = int(spec.model_path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": spec.name, "object": "model", "created": created, "owned_by": "edge-vlm",
            "loaded": state == "ready", "state": state or "available"}


def health(app: ServerApp, ex: Exchange, outcome: Outcome) -> None:
    """``GET /health``: 200 when a model is ready (or none was asked for yet), 503 with
    ``Retry-After`` while one loads, 500 when loading failed."""
    statuses = app.models.status()
    models = [{"name": s.name, "state": s.state} for s in statuses]
    loading = [s for s in statuses if s.state == "loading"]
    ready = [s for s in statuses if s.state == "ready"]
    if statuses and not ready and not loading:
        ex.send_json(500, {"status": "error", "models": models,
                           "message": "no model could be loaded; see the server's log"})
        return
    if loading and not ready:
        est = max(s.estimated_time or 1.0 for s in loading)
        ex.send_json(503, {"status": "loading", "estimated_time": round(est, 1),
                           "models": models}, {"Retry-After": str(max(1, round(est)))})
        return
    ex.send_json(200, {"status": "ok", "models": models})
